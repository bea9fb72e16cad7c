"""PNG figures: predicted vs measured latency, latency vs accuracy, widths per block against the base."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nvit.arch import ArchSpec
from nvit.fileio import atomic_path
from nvit.validation.compare import CompareReport

COMPARE_FIGURE = "compare.png"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=130, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def plot_compare(report: CompareReport, path: str | os.PathLike[str]) -> Path:
    """Left: predicted vs measured latency with the y = x line. Right (if accuracies are known):
    measured latency vs top-1."""
    plt = _pyplot()
    with_acc = [r for r in report.results if r.top1 is not None]
    fig, axes = plt.subplots(1, 2 if with_acc else 1, figsize=(11 if with_acc else 5.5, 4.8), squeeze=False)
    ax = axes[0][0]
    measured = [r.measured_ms for r in report.results]
    predicted = [r.predicted_ms for r in report.results]
    lo, hi = min(measured + predicted) * 0.9, max(measured + predicted) * 1.1
    ax.plot([lo, hi], [lo, hi], color="0.6", lw=1, ls="--", label="y = x")
    for frac, style in ((0.05, ":"), (0.10, "-.")):
        ax.plot([lo, hi], [lo * (1 + frac), hi * (1 + frac)], color="0.8", lw=0.8, ls=style)
        ax.plot([lo, hi], [lo * (1 - frac), hi * (1 - frac)], color="0.8", lw=0.8, ls=style,
                label=f"±{frac:.0%}")
    ax.errorbar(measured, predicted,
                xerr=[[r.measured_ms - r.measured_ms_p10 for r in report.results],
                      [r.measured_ms_p90 - r.measured_ms for r in report.results]],
                fmt="o", color="tab:blue", ecolor="tab:blue", alpha=0.8, capsize=2)
    for r in report.results:
        ax.annotate(r.name, (r.measured_ms, r.predicted_ms), textcoords="offset points", xytext=(4, 4),
                    fontsize=7)
    ax.set(xlim=(lo, hi), ylim=(lo, hi), xlabel="measured latency (ms, median; p10-p90)",
           ylabel="predicted latency (ms)",
           title=f"predicted vs measured (mean |error| {report.mean_abs_error_pct:.1f}%)")
    ax.legend(fontsize=7, loc="upper left")
    if with_acc:
        ax2 = axes[0][1]
        pts = sorted(with_acc, key=lambda r: r.measured_ms)
        ax2.plot([r.measured_ms for r in pts], [r.top1 * 100 for r in pts], "o-", color="tab:green")
        for r in pts:
            ax2.annotate(r.name, (r.measured_ms, r.top1 * 100), textcoords="offset points", xytext=(4, -10),
                         fontsize=7)
        ax2.set(xlabel="measured latency (ms)", ylabel="top-1 (%)", title="latency vs accuracy")
        ax2.grid(alpha=0.3)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def save_compare(report: CompareReport, folder: str | os.PathLike[str]) -> dict[str, Path]:
    """Write the report (compare.json, compare.csv) and its figure (compare.png) into ``folder``."""
    paths = report.save(folder)
    paths["png"] = plot_compare(report, Path(folder) / COMPARE_FIGURE)
    return paths


#: (label, per-block values per panel, bar colour or None for the next one in the cycle)
Series = tuple[str, Sequence[Sequence[float]], str | None]


def plot_per_block(panels: Sequence[str], series: Sequence[Series], path: str | os.PathLike[str], *, title: str,
                   ylabel: str = "", reference_line: float | None = None) -> Path:
    """One panel per width kind, one group of bars per block, one bar per series: the drawing behind
    :func:`plot_widths` and :func:`plot_shares`. Series may differ in depth (each draws its own blocks)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False)
    depth = max(len(values[0]) for _, values, _ in series)
    width = 0.8 / len(series)
    for p, (ax, label) in enumerate(zip(axes[0], panels, strict=True)):
        for j, (name, values, color) in enumerate(series):
            xs = [i - 0.4 + width * (j + 0.5) for i in range(len(values[p]))]
            ax.bar(xs, list(values[p]), width, color=color, label=name)
        if reference_line is not None:
            ax.axhline(reference_line, color="0.4", lw=0.8, ls="--")
        ax.set(title=label, xlabel="block", xticks=list(range(depth)), ylabel=ylabel if p == 0 else "")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return _save(fig, path)


def _absolute(spec: ArchSpec, attrs: Sequence[str], dropped: Sequence[int] = ()) -> list[list[float]]:
    """Per-block values; a block the variant dropped (``dropped``: the base's numbering) is 0 in its place."""
    values = [[float(getattr(b, a)) for b in spec.blocks] for a in attrs]
    for i in sorted(dropped):
        for row in values:
            row.insert(i, 0.0)
    return values


def plot_widths(base: ArchSpec, variants: Sequence[tuple[str, ArchSpec]], path: str | os.PathLike[str], *,
                dropped: Mapping[str, Sequence[int]] | None = None) -> Path:
    """Per-block widths (heads, QK width, V width, MLP width) of each variant against the dense base; a removed
    sub-layer or a dropped block (``dropped[name]``: the base's block numbers) shows no bar."""
    fields = (("heads", "heads"), ("qk_width", "QK width (heads × qk_dim)"),
              ("v_width", "V width (heads × v_dim)"), ("mlp_dim", "MLP width"))
    attrs = [a for a, _ in fields]
    series: list[Series] = [(f"{base.name or 'base'} (e={base.embed_dim})", _absolute(base, attrs), "0.75")]
    series += [(f"{name} (e={spec.embed_dim})", _absolute(spec, attrs, (dropped or {}).get(name, ())), None)
               for name, spec in variants]
    return plot_per_block([label for _, label in fields], series, path,
                          title="widths per block: pruned variants against the dense base")


def plot_shares(variants: Sequence[Any], rule: Any, path: str | os.PathLike[str]) -> Path:
    """Per-block width shares (width / dense width at the same embedding: :mod:`nvit.redesign.learned`) of each
    variant of a family (light) and of the rule derived from them (dark)."""
    from nvit.redesign.learned import KINDS

    panels = ("heads share", "QK per head share", "V per head share", "MLP share")
    series: list[Series] = [(v.name, [v.values[k] for k in KINDS], None) for v in variants]
    series.append((rule.name, [rule.values[k] for k in KINDS], "black"))
    return plot_per_block(panels, series, path, ylabel="width / dense width", reference_line=1.0,
                          title="widths per block relative to dense: pruned variants and the derived rule")


def plot_pareto(points: Sequence[tuple[str, float, float]], path: str | os.PathLike[str],
                baselines: dict[str, Sequence[tuple[float, float]]] | None = None) -> Path:
    """Latency (ms) vs top-1 for named variants ``(name, latency_ms, top1)``, plus optional baseline curves."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    pts = sorted(points, key=lambda p: p[1])
    ax.plot([p[1] for p in pts], [p[2] * 100 for p in pts], "o-", label="nvit", color="tab:green")
    for name, lat, acc in pts:
        ax.annotate(name, (lat, acc * 100), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for label, curve in (baselines or {}).items():
        c = sorted(curve)
        ax.plot([p[0] for p in c], [p[1] * 100 for p in c], "s--", label=label, alpha=0.7)
    ax.set(xlabel="measured latency (ms)", ylabel="top-1 (%)", title="latency vs accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)
