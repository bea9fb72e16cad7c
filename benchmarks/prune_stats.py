"""Comparing accuracy/latency curves of pruning methods at equal *measured* latency (used by prune_fashion.py).

Each (method, seed) gives one curve: top-1 against measured latency at its targets. Curves are compared on
a common latency range (the overlap of every curve's measured range), by linear interpolation at evenly
spaced latencies and by the normalised area under the curve (the mean top-1 over that range). A method is
compared with a reference by paired differences over seeds, with a two-sided 95% t-interval.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

Curve = tuple[np.ndarray, np.ndarray]  # (latency_ms, top1), any order


def curve(points: Sequence[tuple[float, float]]) -> Curve:
    xy = np.array(sorted(points), dtype=np.float64)
    return xy[:, 0], xy[:, 1]


def common_range(curves: Sequence[Curve]) -> tuple[float, float]:
    """The latency range every curve covers (the largest minimum to the smallest maximum)."""
    lo = max(float(c[0].min()) for c in curves)
    hi = min(float(c[0].max()) for c in curves)
    if not lo < hi:
        raise ValueError(f"the curves share no latency range (largest minimum {lo:.4g} >= smallest maximum {hi:.4g})")
    return lo, hi


def at(c: Curve, latencies: np.ndarray) -> np.ndarray:
    """Top-1 at the given latencies, linear between measured points (within the curve's range)."""
    return np.interp(latencies, c[0], c[1])


def mean_over(c: Curve, lo: float, hi: float, points: int = 201) -> float:
    """Normalised area under the curve on [lo, hi]: the mean top-1 over that latency range."""
    grid = np.linspace(lo, hi, points)
    return float(np.trapezoid(at(c, grid), grid) / (hi - lo))


@dataclass(frozen=True)
class Paired:
    """Mean paired difference over seeds and its two-sided 95% t-interval (``nan`` with one seed)."""

    mean: float
    low: float
    high: float
    n: int
    values: tuple[float, ...]

    def to_dict(self) -> dict[str, object]:
        return {"mean": self.mean, "ci95": [self.low, self.high], "n": self.n, "values": list(self.values)}


def paired(differences: Sequence[float]) -> Paired:
    d = np.asarray(differences, dtype=np.float64)
    n = len(d)
    mean = float(d.mean())
    if n < 2:
        return Paired(mean, math.nan, math.nan, n, tuple(d.tolist()))
    half = float(stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n))
    return Paired(mean, mean - half, mean + half, n, tuple(d.tolist()))


def compare_methods(curves: Mapping[str, Mapping[int, Curve]], reference: str, *, points: int = 5
                    ) -> dict[str, object]:
    """Every method against ``reference`` on the common range of all curves: per-seed mean top-1 over the
    range, top-1 at ``points`` evenly spaced latencies, and paired differences (method − reference)."""
    everything = [c for per_seed in curves.values() for c in per_seed.values()]
    lo, hi = common_range(everything)
    grid = np.linspace(lo, hi, points)
    out: dict[str, object] = {"range_ms": [lo, hi], "latencies_ms": grid.tolist(), "reference": reference,
                              "methods": {}}
    ref = curves[reference]
    for method, per_seed in curves.items():
        seeds = sorted(per_seed)
        auc = {s: mean_over(per_seed[s], lo, hi) for s in seeds}
        pts = {s: at(per_seed[s], grid) for s in seeds}
        shared = [s for s in seeds if s in ref]
        item: dict[str, object] = {
            "mean_top1": float(np.mean(list(auc.values()))), "mean_top1_per_seed": {str(s): auc[s] for s in seeds},
            "top1_at": np.mean([pts[s] for s in seeds], axis=0).tolist(),
        }
        if method != reference and shared:
            item["vs_reference_mean_top1"] = paired([auc[s] - mean_over(ref[s], lo, hi) for s in shared]).to_dict()
            item["vs_reference_at"] = [paired([pts[s][i] - at(ref[s], grid)[i] for s in shared]).to_dict()
                                       for i in range(points)]
        out["methods"][method] = item  # type: ignore[index]
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _ci(p: Mapping[str, object] | None) -> str:
    if p is None:
        return "—"
    low, high = p["ci95"]  # type: ignore[misc]
    return f"{100 * p['mean']:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}]"  # type: ignore[operator]


def markdown(doc: Mapping[str, object]) -> str:
    """The benchmark's tables for BENCHMARKS.md, from the report JSON."""
    comp = doc["comparison"]  # type: ignore[index]
    after, before = comp["after"], comp["before"]  # type: ignore[index]
    lo, hi = after["range_ms"]
    split = doc["split"]
    lines = [f"Mean {split} top-1 over the common measured range {lo:.4f}–{hi:.4f} ms (area under each curve), "
             f"and the paired difference to `saliency` over seeds (mean [95% CI], points):", "",
             "| method | after FT | Δ vs saliency | before FT | Δ vs saliency (before FT) |", "|---|---|---|---|---|"]
    for method, item in after["methods"].items():
        b = before["methods"][method]
        lines.append(f"| {method} | {_pct(item['mean_top1'])} | {_ci(item.get('vs_reference_mean_top1'))} | "
                     f"{_pct(b['mean_top1'])} | {_ci(b.get('vs_reference_mean_top1'))} |")
    rows = doc["rows"]  # type: ignore[index]
    ratios = sorted({r["target_ratio"] for r in rows}, reverse=True)  # type: ignore[index]
    head = " | ".join(f"{r:g}" for r in ratios)
    lines += ["", f"{split} top-1 after fine-tuning, mean ± sd over seeds (mean measured ms), per target ratio:", "",
              f"| method | {head} |", "|---|" + "---|" * len(ratios)]
    for method in sorted({r["method"] for r in rows}):  # type: ignore[index]
        cells = []
        for ratio in ratios:
            sel = [r for r in rows if r["method"] == method and r["target_ratio"] == ratio]  # type: ignore[index]
            acc = np.array([r[f"{split}_after"] for r in sel])
            ms = np.mean([r["measured_ms"] for r in sel])
            cells.append(f"{_pct(acc.mean())} ± {100 * acc.std():.2f} ({ms:.4f})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
