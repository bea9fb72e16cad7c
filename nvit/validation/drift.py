"""Drift since profiling: re-time a few of the table's own rows beside the models, and correct for it.

A table and a model are measured at different moments; on a shared host the machine between them may have
slowed (a neighbour, a clock change) or sped up. Re-timing some of the table's rows *in the same session* as
the models (interleaved with them) tells how much: each reference's ``now / in the table`` ratio. Narrow,
overhead-bound work and wide, compute-bound work drift differently (DESIGN.md §4), so the references span
the table's full blocks from the narrowest to the widest, and a model is corrected by the ratio at its own
mean block size (interpolated in log size between references, the nearest one beyond them).

``drift-corrected measured = measured / ratio``: what the model would have measured when the table was made,
which is what the table's prediction can be held to. Both figures are reported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: References re-timed beside the models: the narrowest, a middle and the widest full block of the table.
DEFAULT_REFERENCES = 3
#: Below this drift (|ratio − 1| at every reference) nothing is said of it.
DRIFT_NOTICE = 0.05
REFERENCE_PREFIX = "ref:"


@dataclass(frozen=True)
class Reference:
    """One table row re-timed now: its key, its latency in the table and now."""

    key: str
    table_ms: float
    now_ms: float

    @property
    def ratio(self) -> float:
        return self.now_ms / self.table_ms


@dataclass(frozen=True)
class DriftCorrection:
    """Ratios ``now / table`` of the references, as a function of work size (a block's latency in ms)."""

    references: tuple[Reference, ...]

    def ratio(self, size_ms: float) -> float:
        """The drift ratio for work of ``size_ms`` per block (1 with no references)."""
        refs = sorted(self.references, key=lambda r: r.table_ms)
        if not refs:
            return 1.0
        xs = np.log([r.table_ms for r in refs])
        ys = np.log([r.ratio for r in refs])
        return float(math.exp(np.interp(math.log(max(size_ms, 1e-12)), xs, ys)))

    @property
    def largest_pct(self) -> float:
        """The largest drift of any reference, in percent (signed)."""
        if not self.references:
            return 0.0
        worst = max(self.references, key=lambda r: abs(r.ratio - 1.0))
        return 100.0 * (worst.ratio - 1.0)

    def summary(self) -> str:
        if not self.references:
            return "no references re-timed"
        refs = sorted(self.references, key=lambda r: r.table_ms)
        parts = ", ".join(f"{r.table_ms:.3g} ms block {100 * (r.ratio - 1):+.1f}%" for r in refs)
        return f"the table's rows re-timed now: {parts}"

    def to_dict(self) -> dict[str, Any]:
        return {"references": [{"key": r.key, "table_ms": r.table_ms, "now_ms": r.now_ms, "ratio": r.ratio}
                               for r in self.references], "largest_pct": self.largest_pct}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> DriftCorrection:
        refs = (data or {}).get("references") or []
        return cls(tuple(Reference(r["key"], float(r["table_ms"]), float(r["now_ms"])) for r in refs))


def reference_rows(table: Any, count: int = DEFAULT_REFERENCES) -> list[dict[str, Any]]:
    """``count`` full-block rows of ``table`` spread over its latency range (narrowest, …, widest); none of a Swin
    table (its rows are not re-timed beside a model yet)."""
    from nvit.lut.table import LATENCY_COLUMN
    from nvit.vocab import PartKind

    if count <= 0 or table.is_swin:
        return []
    blocks = table.of_kind(PartKind.BLOCK).sort_values(LATENCY_COLUMN)
    if blocks.empty:
        return []
    picks = sorted({round(i * (len(blocks) - 1) / max(1, count - 1)) for i in range(count)})
    return [blocks.iloc[i].to_dict() for i in picks]


def reference_workloads(table: Any, rows: Sequence[dict[str, Any]]) -> list[Any]:
    """Workloads of the reference rows, named ``ref:<key>`` (distinct from any model's name)."""
    from dataclasses import replace

    from nvit.arch import ArchSpec
    from nvit.profiler.workloads import part_workload

    if not rows:
        return []
    base = ArchSpec.from_dict(table.meta.base_arch)
    out = []
    for row in rows:
        config = _config(row)
        w = part_workload(config, base, table.meta.batch_size)
        out.append(replace(w, name=REFERENCE_PREFIX + config.key))
    return out


def correction_from(rows: Sequence[dict[str, Any]], stats: Sequence[Any]) -> DriftCorrection:
    """The correction from the reference rows and their statistics measured now."""
    from nvit.lut.table import LATENCY_COLUMN

    return DriftCorrection(tuple(Reference(_config(r).key, float(r[LATENCY_COLUMN]),
                                           float(s.latency_ms_median)) for r, s in zip(rows, stats, strict=True)))


def _config(row: dict[str, Any]) -> Any:
    from nvit.vocab import WIDTH_FIELDS, PartConfig

    return PartConfig(kind=row["kind"], embed_dim=int(row["embed_dim"]), **{f: int(row[f]) for f in WIDTH_FIELDS})


def mean_block_ms(predictor: Any, spec: Any) -> float:
    """A model's work size: the mean uncalibrated price of its blocks (what the references are sized by)."""
    return float(np.mean(predictor.raw_block_latencies_ms(spec)))
