"""Designing new ViTs from what pruning learned.

- :mod:`nvit.redesign.published`: NViT's published rule (ReViT), per-block widths for an embedding width.
  Pure arithmetic on integers: :mod:`nvit.arch` builds its ``revit_*`` presets from it.
- :mod:`nvit.redesign.learned`: a rule fitted on pruned variants (width shares per relative block position),
  rounded with :class:`nvit.arch.WidthSteps` and scaled to an embedding or a latency target.
- :mod:`nvit.redesign.family`: reading a family of variants from files and writing the design with its
  provenance (``nvit arch redistribute``).

This file imports nothing, so :mod:`nvit.arch` can stand on ``published`` while ``learned`` and ``family``
stand on :mod:`nvit.arch`.
"""
