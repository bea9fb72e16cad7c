"""Designing new ViTs from what pruning learned; every module here stands on :mod:`nvit.arch`.

- :mod:`nvit.redesign.learned`: a rule fitted on pruned variants (width shares per relative block position),
  rounded with :class:`nvit.arch.WidthSteps` and scaled to an embedding or a latency target.
- :mod:`nvit.redesign.published`: NViT's published rule (whose widths are the ``revit_*`` preset family of
  :mod:`nvit.arch`) read as width shares, to redistribute any base like a learned rule.
- :mod:`nvit.redesign.family`: reading a family of variants from files and writing the design with its
  provenance (``nvit arch redistribute``).
"""
