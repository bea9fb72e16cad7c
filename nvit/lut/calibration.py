"""From a sum of parts to a whole model: the calibration a table fits on whole-model measurements.

Every part a table holds was timed as a graph of its own, so each carries that graph's fixed cost (its input
and output, its launch) once; a whole model pays such costs once, not once per part. A sum of parts plus one
constant therefore cannot fit models of different depth: the constant that fits a 12-block model is wrong
for a 3-block one. The calibration follows the model's composition::

    whole = scale · (fixed + Σ blocks) + offset · r_fixed + per_block · Σ r_block

``per_block`` (usually negative) is what one block's own graph costs beyond what it costs inside a model
(a full or a one-half block alike: each was one graph), ``offset`` the same for the fixed part plus what the
whole model pays once. ``r`` is 1 for a part at least as large as the smallest of its kind in the table's
space and shrinks in proportion below it (extrapolated widths), so a correction never exceeds its share.

**Never ≤ 0, by construction.** A part inside a whole model costs at least :data:`PART_FLOOR_FRACTION` of
what it costs alone. The fit is constrained so: ``per_block ≥ −(1 − φ) · scale · smallest block`` and
``offset ≥ −(1 − φ) · scale · smallest fixed part`` of the table's space (φ = the floor fraction). Then every
calibrated part is at least φ times its scaled raw price, and every architecture's prediction is at least
φ · scale · its sum of parts, which is positive. When the data ask for more (a noisy moment, or a table whose
parts are off) a bound is *active*: the record says which, and the verdict is ``implausible``.

**Which form.** Up to four forms are fitted (offset; scale and offset; offset and per-block; all three),
each only where the models identify it (a scale needs predictions that span :data:`MIN_SCALE_SPREAD` and a
fitted scale within :data:`SCALE_BOUNDS`, a per-block term models of different depth), by least squares on
relative residuals under the bounds. A scale is used where it is identified; the per-block term is added only
when it lowers the leave-one-out error (each model predicted by the fit to the others) by
:data:`LOO_MARGIN` and :data:`LOO_MARGIN_PCT` points. Every form's figures are kept in the record.

A stored calibration that breaks these bounds for the table it is in (an older table's offset, one edited
by hand) is *refused* when a predictor loads it: the predictor predicts from the parts alone and says why.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from nvit.errors import LutError
from nvit.lut.meta import utc_now
from nvit.lut.records import Calibration, CalibrationModel

logger = logging.getLogger(__name__)

#: A part inside a whole model costs at least this fraction of what it costs timed alone.
PART_FLOOR_FRACTION = 0.5
#: A scale is only fitted when the calibration models' predictions span at least this ratio.
MIN_SCALE_SPREAD = 1.25
#: A fitted scale outside this range means the calibration data is unusable for a scale.
SCALE_BOUNDS = (0.5, 2.0)
#: A richer form must lower the leave-one-out error by this fraction (and by LOO_MARGIN_PCT points).
LOO_MARGIN = 0.1
LOO_MARGIN_PCT = 0.1
#: Residuals (fitted or leave-one-out) beyond this make a calibration implausible (noise, or a bad table).
PLAUSIBLE_RESIDUAL_PCT = 10.0
#: A per-block term needs the models' (effective) depths to differ by at least this.
MIN_DEPTH_SPREAD = 0.5

FORMS = ("offset", "scale_offset", "offset_per_block", "scale_offset_per_block")


@dataclass(frozen=True)
class Floors:
    """The smallest raw part prices of a table's space: a block (full or one-half, at the smallest widths of
    every embedding width) and a fixed part; the calibration's bounds and shrink factors rest on them."""

    block_ms: float
    fixed_ms: float
    fraction: float = PART_FLOOR_FRACTION

    def block_share(self, raw_block_ms: Any) -> np.ndarray:
        """``r_block``: 1 for blocks at least as large as the smallest, proportionally less below it."""
        b = np.asarray(raw_block_ms, dtype=np.float64)
        return np.minimum(1.0, b / self.block_ms) if self.block_ms > 0 else np.ones_like(b)

    def fixed_share(self, raw_fixed_ms: Any) -> np.ndarray:
        f = np.asarray(raw_fixed_ms, dtype=np.float64)
        return np.minimum(1.0, f / self.fixed_ms) if self.fixed_ms > 0 else np.ones_like(f)

    def lowered(self, block_ms: float, fixed_ms: float) -> Floors:
        """These floors, lowered to smaller positive prices (never raised)."""
        def low(mine: float, other: float) -> float:
            return min(mine, other) if np.isfinite(other) and other > 0 else mine

        return Floors(low(self.block_ms, block_ms), low(self.fixed_ms, fixed_ms), self.fraction)

    def min_per_block_ms(self, scale: float) -> float:
        return -(1.0 - self.fraction) * scale * self.block_ms

    def min_offset_ms(self, scale: float) -> float:
        return -(1.0 - self.fraction) * scale * self.fixed_ms

    def to_dict(self) -> dict[str, float]:
        return {"block_ms": self.block_ms, "fixed_ms": self.fixed_ms, "fraction": self.fraction}


@dataclass(frozen=True)
class Composition:
    """One whole model as the calibration sees it: its raw sum of parts and the shares of its parts."""

    raw_ms: float
    blocks: float  # Σ r_block (the depth, where no block is below the smallest)
    fixed: float = 1.0  # r_fixed


@dataclass(frozen=True)
class _Fit:
    form: str
    scale: float
    offset_ms: float
    per_block_ms: float
    active: tuple[str, ...]
    cost: float

    def predict(self, x: np.ndarray, d: np.ndarray, f: np.ndarray) -> np.ndarray:
        return self.scale * x + self.offset_ms * f + self.per_block_ms * d


def _solve(form: str, x: np.ndarray, d: np.ndarray, f: np.ndarray, y: np.ndarray, floors: Floors | None,
           active: tuple[str, ...]) -> _Fit | None:
    """Weighted least squares of one form with the bounds in ``active`` held as equalities."""
    free_s, free_c = form.startswith("scale"), form.endswith("per_block")
    kb = (1.0 - floors.fraction) * floors.block_ms if floors else 0.0
    kf = (1.0 - floors.fraction) * floors.fixed_ms if floors else 0.0
    # each of s, o, c as (coefficients over the free variables z, constant)
    names = [n for n, free in (("s", free_s), ("o", "offset" not in active), ("c", free_c and "block" not in active))
             if free]
    unit = {n: np.eye(len(names))[i] for i, n in enumerate(names)}
    zero = np.zeros(len(names))
    s = (unit["s"], 0.0) if free_s else (zero, 1.0)
    o = (-kf * s[0], -kf * s[1]) if "offset" in active else (unit["o"], 0.0)
    c = (zero, 0.0) if not free_c else ((-kb * s[0], -kb * s[1]) if "block" in active else (unit["c"], 0.0))
    design = np.outer(x, s[0]) + np.outer(f, o[0]) + np.outer(d, c[0])
    const = x * s[1] + f * o[1] + d * c[1]
    w = 1.0 / y
    z = np.linalg.lstsq(design * w[:, None], (y - const) * w, rcond=None)[0] if names else zero
    scale, offset, per_block = (float(v[0] @ z + v[1]) for v in (s, o, c))
    if free_s and not SCALE_BOUNDS[0] <= scale <= SCALE_BOUNDS[1]:
        return None
    if floors is not None:
        tol = 1e-12 * max(1.0, abs(scale))
        if offset < floors.min_offset_ms(scale) - tol or per_block < floors.min_per_block_ms(scale) - tol:
            return None
    fit = _Fit(form, scale, offset, per_block, active, 0.0)
    cost = float(np.sum(((fit.predict(x, d, f) - y) * w) ** 2))
    return _Fit(form, scale, offset, per_block, active, cost)


def _fit_form(form: str, x: np.ndarray, d: np.ndarray, f: np.ndarray, y: np.ndarray,
              floors: Floors | None) -> _Fit | None:
    """The best fit of ``form`` that respects the bounds (active-set enumeration: the problem is a small
    convex quadratic, so the cheapest feasible candidate is the optimum)."""
    bounds = ("offset", "block") if form.endswith("per_block") else ("offset",)
    sets = [()] if floors is None else [a for k in range(len(bounds) + 1) for a in itertools.combinations(bounds, k)]
    fits = [fit for a in sets if (fit := _solve(form, x, d, f, y, floors, a)) is not None]
    return min(fits, key=lambda fit: fit.cost) if fits else None


def _identifiable(form: str, x: np.ndarray, d: np.ndarray, fit_scale: bool) -> bool:
    n_params = 1 + form.startswith("scale") + form.endswith("per_block")
    if len(x) < n_params:
        return False
    if form.startswith("scale") and not (fit_scale and len(x) >= 2 and x.max() / x.min() >= MIN_SCALE_SPREAD):
        return False
    return not (form.endswith("per_block") and np.ptp(d) < MIN_DEPTH_SPREAD)


def _loo_pct(form: str, x: np.ndarray, d: np.ndarray, f: np.ndarray, y: np.ndarray,
             floors: Floors | None) -> float | None:
    """Mean |relative error| of each model predicted by the form fitted to the others (``None``: too few)."""
    n_params = 1 + form.startswith("scale") + form.endswith("per_block")
    if len(y) < n_params + 1:
        return None
    errors = []
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        if form.endswith("per_block") and np.ptp(d[keep]) < MIN_DEPTH_SPREAD:
            return None
        fit = _fit_form(form, x[keep], d[keep], f[keep], y[keep], floors)
        if fit is None:
            return None
        errors.append(abs(float(fit.predict(x[i:i + 1], d[i:i + 1], f[i:i + 1])[0]) / y[i] - 1.0))
    return float(np.mean(errors) * 100.0)


def fit_calibration(names: Sequence[str], measured_ms: Sequence[float], predicted_raw_ms: Sequence[float],
                    *, fit_scale: bool = True, compositions: Sequence[Composition] | None = None,
                    floors: Floors | None = None) -> Calibration:
    """Fit the calibration (module doc) on whole models: their measured latency and raw sum of parts;
    ``compositions`` (their per-part shares) enable the per-block forms, ``floors`` the bounds. Returns the
    calibration record a table stores."""
    y = np.asarray(measured_ms, dtype=np.float64)
    x = np.asarray(predicted_raw_ms, dtype=np.float64)
    if len(y) == 0 or len(y) != len(x) or len(names) != len(y):
        raise LutError("calibration needs at least one whole-model measurement and its prediction")
    if not (np.all(np.isfinite(y)) and np.all(y > 0) and np.all(np.isfinite(x)) and np.all(x > 0)):
        raise LutError("calibration measurements and predictions must be finite and positive")
    if compositions is not None and len(compositions) != len(y):
        raise LutError("calibration needs one composition per model")
    d = np.array([c.blocks for c in compositions]) if compositions is not None else np.zeros_like(x)
    f = np.array([c.fixed for c in compositions]) if compositions is not None else np.ones_like(x)
    candidates: list[tuple[_Fit, float | None]] = []
    for form in FORMS:
        if not _identifiable(form, x, d, fit_scale):
            continue
        fit = _fit_form(form, x, d, f, y, floors)
        if fit is None:
            if form.startswith("scale"):
                logger.warning("calibration: a scale within %s does not fit these models (scale implausible); "
                               "fitting without one", SCALE_BOUNDS)
            continue
        candidates.append((fit, _loo_pct(form, x, d, f, y, floors)))
    by_form = {fit.form: (fit, loo) for fit, loo in candidates}
    # a scale where the models identify one (as tables always did); "offset" is always identifiable and
    # feasible (bounded at worst)
    best, best_loo = by_form.get("scale_offset", by_form["offset"])
    richer = by_form.get(f"{best.form}_per_block")
    if richer is not None:  # the per-block term must earn its place on models left out
        fit, loo = richer
        if loo is not None and best_loo is not None and loo < best_loo * (1 - LOO_MARGIN) - LOO_MARGIN_PCT:
            best, best_loo = fit, loo
    residual_pct = (best.predict(x, d, f) - y) / y * 100.0
    record = Calibration(
        method=best.form,
        scale=best.scale,
        offset_ms=best.offset_ms,
        per_block_ms=best.per_block_ms,
        models=tuple(CalibrationModel(n, float(m), float(p), float(b))
                     for n, m, p, b in zip(names, y, x, d, strict=True)),
        residual_pct_max_abs=float(np.max(np.abs(residual_pct))),
        loo_pct_mean_abs=best_loo,
        forms={fit.form: {"loo_pct_mean_abs": loo, "scale": fit.scale, "offset_ms": fit.offset_ms,
                          "per_block_ms": fit.per_block_ms, "bounded": list(fit.active)} for fit, loo in candidates},
        floors=floors.to_dict() if floors else None,
        bounded=tuple(best.active),
        fitted_at=utc_now(),
    )
    verdict, reasons = judge_record(record)
    return record.replace(verdict=verdict, reasons=tuple(reasons))


def judge_record(record: Calibration) -> tuple[str, list[str]]:
    """``plausible`` or ``implausible`` and why, for a fitted calibration."""
    reasons = []
    frac = (record.floors or {}).get("fraction", PART_FLOOR_FRACTION)
    for bound in record.bounded:
        what = "block" if bound == "block" else "fixed part"
        reasons.append(f"the models asked each {what} to cost less than {100 * frac:.0f}% of its own time "
                       f"(bounded at {'per-block' if bound == 'block' else 'offset'} "
                       f"{record.per_block_ms if bound == 'block' else record.offset_ms:+.4f} ms)")
    if record.residual_pct_max_abs > PLAUSIBLE_RESIDUAL_PCT:
        reasons.append(f"its models miss the fit by up to {record.residual_pct_max_abs:.1f}%")
    loo = record.loo_pct_mean_abs
    if loo is not None and loo > PLAUSIBLE_RESIDUAL_PCT:
        reasons.append(f"each model predicted from the others misses by {loo:.1f}% on average")
    return ("implausible" if reasons else "plausible"), reasons


def refusal(record: Calibration, floors: Floors) -> str | None:
    """Why a stored calibration cannot be used with a table whose space has ``floors`` (``None``: it can):
    it would price some part of the space below its floor, down to ≤ 0."""
    scale, offset, per_block = float(record.scale), float(record.offset_ms), float(record.per_block_ms)
    if not (np.isfinite(scale) and np.isfinite(offset) and np.isfinite(per_block)) or scale <= 0:
        return f"its scale {scale:.4g} is not a positive number"
    tol = 1e-9
    if offset < floors.min_offset_ms(scale) - tol:
        return (f"its offset {offset:+.4f} ms would take more than {100 * (1 - floors.fraction):.0f}% of the "
                f"smallest fixed part ({floors.fixed_ms:.4f} ms), so small models would be predicted near or "
                "below zero")
    if per_block < floors.min_per_block_ms(scale) - tol:
        return (f"its per-block term {per_block:+.4f} ms would take more than {100 * (1 - floors.fraction):.0f}% "
                f"of the smallest block ({floors.block_ms:.4f} ms)")
    return None


@dataclass(frozen=True)
class Applied:
    """A stored calibration as a predictor uses it: its terms (1, 0, 0 when there is none or it is refused),
    the floors they are bounded by, whether a stored calibration is in use and why it was refused, if it was."""

    floors: Floors
    scale: float = 1.0
    offset_ms: float = 0.0
    per_block_ms: float = 0.0
    calibrated: bool = False
    refused: str | None = None


def apply_stored(record: Calibration | None, floors: Floors) -> Applied:
    """Load ``record`` against a table's space ``floors``: lowered to the record's own fitted floors (its
    calibration models may lie below the grid), refused when it would price a part below its floor."""
    if record is None:
        return Applied(floors=floors)
    if record.floors:
        floors = floors.lowered(record.floors["block_ms"], record.floors["fixed_ms"])
    refused = refusal(record, floors)
    if refused:
        logger.info("the latency table's calibration is refused: %s; predicting from the parts alone", refused)
        return Applied(floors=floors, refused=refused)
    return Applied(scale=float(record.scale), offset_ms=float(record.offset_ms),
                   per_block_ms=float(record.per_block_ms), floors=floors, calibrated=True)


def status_line(record: Calibration | None, refused: str | None = None) -> tuple[str, str]:
    """The calibration's verdict (``plausible`` / ``implausible`` / ``refused`` / ``none``) and one line a
    user understands, with the advice when it is not plausible."""
    advice = ("re-profile the table on a quiet moment (nvit profile --no-resume), or see how it predicts now "
              "(nvit lut check)")
    if record is None:
        return "none", "uncalibrated: predictions are the plain sum of parts"
    figures = (f"{record.method}: scale {record.scale:.4f}, offset {record.offset_ms:+.4f} ms, "
               f"per block {record.per_block_ms:+.4f} ms, max residual {record.residual_pct_max_abs:.2f}%")
    if record.loo_pct_mean_abs is not None:
        figures += f", leave-one-out {record.loo_pct_mean_abs:.2f}%"
    if refused:
        return "refused", (f"calibration refused ({figures}): {refused}; predicting from the parts alone; "
                           f"{advice}")
    verdict, reasons = ((record.verdict, list(record.reasons)) if record.verdict is not None
                        else judge_record(record))
    if verdict == "plausible":
        return verdict, f"calibration plausible ({figures})"
    return verdict, f"calibration implausible ({figures}): {'; '.join(reasons)}; {advice}"
