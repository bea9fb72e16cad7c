"""What a table's metadata records about whole models: its calibration (:mod:`nvit.lut.calibration`, fitted on
whole-model measurements, refitted by :mod:`nvit.lut.learn`) and its self-check (held-out models predicted
against their measurement, :mod:`nvit.profiler.selfcheck`).

Typed here, stored as JSON objects in the table's footer (:class:`~nvit.lut.meta.LutMeta`); ``from_dict`` reads
what any nvit wrote (fields an older table lacks take their defaults) and ``to_dict`` writes the same keys as
before, so the file format is unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nvit.errors import LutError


def _from_dict(cls: Any, data: Any, what: str) -> Any:
    """``cls(**data)``, refusing what is not an object, unknown keys and missing ones with one clear line."""
    if not isinstance(data, Mapping):
        raise LutError(f"LUT metadata: {what} must be a JSON object")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise LutError(f"LUT metadata: unknown {what} key(s): {', '.join(unknown)}")
    try:
        return cls(**data)
    except TypeError as exc:
        raise LutError(f"LUT metadata: incomplete {what}: {exc}") from None


# ---- calibration ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CalibrationModel:
    """One whole model the calibration was fitted on."""

    name: str
    measured_ms: float
    predicted_raw_ms: float
    blocks: float = 0.0  # the model's block count as the per-block term sees it
    arch: Mapping[str, Any] | None = None  # its architecture (``ArchSpec.to_dict``); older tables have none
    learned: bool = False  # added by ``nvit lut learn`` (not one of the table's own calibration models)

    @classmethod
    def from_dict(cls, data: Any) -> CalibrationModel:
        return _from_dict(cls, data, "calibration model")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "measured_ms": self.measured_ms,
                               "predicted_raw_ms": self.predicted_raw_ms, "blocks": self.blocks}
        if self.arch is not None:
            out["arch"] = dict(self.arch)
        if self.learned:
            out["learned"] = True
        return out


@dataclass(frozen=True)
class Calibration:
    """From a sum of parts to a whole model: ``scale × raw + offset_ms + per_block_ms × blocks`` (module doc of
    :mod:`nvit.lut.calibration`), the models it was fitted on, how well it fits and its verdict."""

    method: str
    scale: float
    offset_ms: float
    per_block_ms: float = 0.0
    models: tuple[CalibrationModel, ...] = ()
    residual_pct_max_abs: float = 0.0
    loo_pct_mean_abs: float | None = None  # leave-one-out error of the chosen form (None: too few models)
    forms: Mapping[str, Any] = field(default_factory=dict)  # every form tried: its fit and leave-one-out error
    floors: Mapping[str, float] | None = None  # the parts' floors it was bounded by (Floors.to_dict)
    bounded: tuple[str, ...] = ()  # the bounds the chosen fit rests on ("block", "fixed")
    fitted_at: str = ""
    verdict: str | None = None  # plausible | implausible (None: an older table; judged when read)
    reasons: tuple[str, ...] = ()
    learned: Mapping[str, Any] | None = None  # what ``nvit lut learn`` added (version, sources, held-out figures)

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", tuple(m if isinstance(m, CalibrationModel)
                                                 else CalibrationModel.from_dict(m) for m in self.models))
        object.__setattr__(self, "bounded", tuple(self.bounded))
        object.__setattr__(self, "reasons", tuple(self.reasons))

    @classmethod
    def from_dict(cls, data: Any) -> Calibration:
        return _from_dict(cls, data, "calibration")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "method": self.method, "scale": self.scale, "offset_ms": self.offset_ms,
            "per_block_ms": self.per_block_ms, "models": [m.to_dict() for m in self.models],
            "residual_pct_max_abs": self.residual_pct_max_abs, "loo_pct_mean_abs": self.loo_pct_mean_abs,
            "forms": dict(self.forms), "floors": None if self.floors is None else dict(self.floors),
            "bounded": list(self.bounded), "fitted_at": self.fitted_at, "verdict": self.verdict,
            "reasons": list(self.reasons),
        }
        if self.learned is not None:
            out["learned"] = dict(self.learned)
        return out

    def replace(self, **changes: Any) -> Calibration:
        return dataclasses.replace(self, **changes)

    def with_archs(self, archs: Sequence[Mapping[str, Any]]) -> Calibration:
        """The same fit, each model carrying its architecture (one per model, in order)."""
        if len(archs) != len(self.models):
            raise LutError("one architecture per calibration model is needed")
        return self.replace(models=tuple(dataclasses.replace(m, arch=dict(a))
                                         for m, a in zip(self.models, archs, strict=True)))


# ---- self-check ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckedModel:
    """One held-out model of a self-check."""

    name: str
    measured_ms: float
    predicted_ms: float
    error_pct: float
    arch: Mapping[str, Any] | None = None

    @classmethod
    def from_dict(cls, data: Any) -> CheckedModel:
        return _from_dict(cls, data, "self-check model")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "measured_ms": self.measured_ms, "predicted_ms": self.predicted_ms,
                               "error_pct": self.error_pct}
        if self.arch is not None:
            out["arch"] = dict(self.arch)
        return out


#: The error figures of :func:`nvit.lut.accuracy.error_figures`, stored flat in a self-check.
FIGURE_KEYS = ("n", "mape_pct", "median_abs_pct", "max_abs_pct", "bias_pct", "within_5pct", "within_10pct",
               "kendall_tau")


@dataclass(frozen=True)
class SelfCheck:
    """Held-out whole models predicted by the table and measured: the figures over all of them (and over the
    pruned shapes and the shapes with removed sub-layers alone, when both kinds are among them)."""

    seed: int
    passes: int
    measured_at: str
    n: int
    mape_pct: float
    median_abs_pct: float
    max_abs_pct: float
    bias_pct: float
    within_5pct: float
    within_10pct: float
    kendall_tau: float | None
    models: tuple[CheckedModel, ...] = ()
    pruned_shapes: Mapping[str, Any] | None = None
    removed_shapes: Mapping[str, Any] | None = None
    seconds: float | None = None  # measuring time
    conditions: Mapping[str, Any] | None = None  # the machine while checking (``nvit lut check``)

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", tuple(m if isinstance(m, CheckedModel) else CheckedModel.from_dict(m)
                                                 for m in self.models))

    @classmethod
    def from_dict(cls, data: Any) -> SelfCheck:
        return _from_dict(cls, data, "self-check")

    def figures(self) -> dict[str, Any]:
        """The error figures over every model (the keys of :func:`nvit.lut.accuracy.error_figures`)."""
        return {k: getattr(self, k) for k in FIGURE_KEYS}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"seed": self.seed, "passes": self.passes, "measured_at": self.measured_at,
                               **self.figures(), "models": [m.to_dict() for m in self.models]}
        for key in ("pruned_shapes", "removed_shapes", "seconds", "conditions"):
            value = getattr(self, key)
            if value is not None:
                out[key] = dict(value) if isinstance(value, Mapping) else value
        return out

    def replace(self, **changes: Any) -> SelfCheck:
        return dataclasses.replace(self, **changes)
