"""Whole models measured against a latency table: the check a user trusts the tool by.

:mod:`~nvit.validation.compare` times model variants with the table's own backend and settings and sets the
measurement beside the prediction; :mod:`~nvit.validation.drift` re-times some of the table's rows in the same
session and corrects for the machine's drift since profiling; :mod:`~nvit.validation.trust` judges how far the
figures can be trusted; :mod:`~nvit.validation.targets` is the measurer a pruning run uses to meet its targets
at measured latency; :mod:`~nvit.validation.measured_models` reads every such measurement back as calibration
rows for ``nvit lut learn``.
"""
