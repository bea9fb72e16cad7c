"""A redistribution rule learned from pruned variants: per-block width shares, smoothed, rounded, scaled.

**Shares.** A variant's width share of one kind in one block is its width over the dense reference's at the
variant's own embedding: ``heads / (H·e/E₀)``, ``qk_dim / Q``, ``v_dim / V``, ``mlp_dim / (M·e/E₀)``, with
``H, Q, V, M`` the base model's block widths averaged over its blocks and ``E₀`` its embedding (a DeiT-style
family: per-head dims fixed, heads and MLP proportional to the embedding). A variant rebuilt at its own
embedding from its own shares is the variant again. A zero width (a removed attention or MLP) is a valid
share of 0; shares are averaged like any other.

**Fit.** Block ``j`` of a ``D``-block model sits at relative position ``j/(D−1)`` (one block: 0.5). The
rule's share at position ``p`` is the Gaussian-kernel average (bandwidth ``σ`` in relative position) of every
variant's block shares: a family of variants and any depth pool into one curve. ``σ = 0`` averages only the
blocks at the nearest position (per-block means when all variants share the target depth).

**Widths.** At embedding ``E``: ``share × reference(E)``, rounded to the nearest multiple of the kind's step
(:class:`~nvit.arch.WidthSteps`; :data:`DEFAULT_ROUNDING`: heads even, QK/V/MLP multiples of 8) and never
below one step.

**Latency.** :func:`scale_to_latency` picks the largest embedding on the table's measured grid (multiples of
the embedding step between its smallest and largest measured embedding) whose predicted latency meets a
target, or refuses with the reachable range.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nvit.arch import ArchSpec, BlockSpec, WidthSteps
from nvit.errors import LutError, SpecError, TargetError

logger = logging.getLogger(__name__)

DEFAULT_BANDWIDTH = 0.15


class WidthKind(str, enum.Enum):
    HEADS = "heads"
    QK = "qk_dim"
    V = "v_dim"
    MLP = "mlp_dim"


KINDS = tuple(WidthKind)
#: Kinds whose dense reference grows with the embedding (DeiT: 64-channel heads, MLP ratio 4).
_SCALES_WITH_EMBED = {WidthKind.HEADS: True, WidthKind.QK: False, WidthKind.V: False, WidthKind.MLP: True}


@dataclass(frozen=True)
class Shape:
    """A model's widths as plain numbers (zero allowed: a removed sub-layer), one tuple per block."""

    embed_dim: int
    blocks: tuple[tuple[int, int, int, int], ...]  # heads, qk_dim, v_dim, mlp_dim
    name: str = ""

    def __post_init__(self) -> None:
        if self.embed_dim <= 0 or not self.blocks:
            raise SpecError(f"{self.name or 'a variant'}: needs a positive embedding and at least one block")
        for i, b in enumerate(self.blocks):
            if len(b) != len(KINDS) or any(not isinstance(w, int) or w < 0 for w in b):
                raise SpecError(f"{self.name or 'a variant'}: block {i} widths must be 4 integers >= 0, got {b!r}")

    @classmethod
    def of(cls, spec: ArchSpec, name: str | None = None) -> Shape:
        return cls(spec.embed_dim, tuple((b.heads, b.qk_dim, b.v_dim, b.mlp_dim) for b in spec.blocks),
                   spec.name if name is None else name)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def widths(self, kind: WidthKind) -> np.ndarray:
        return np.array([b[KINDS.index(kind)] for b in self.blocks], dtype=np.float64)


@dataclass(frozen=True)
class Reference:
    """The dense base as one mean block at embedding ``embed_dim``; :meth:`at` scales it to another."""

    embed_dim: int
    widths: Mapping[WidthKind, float]

    @classmethod
    def of(cls, base: ArchSpec | Shape) -> Reference:
        shape = base if isinstance(base, Shape) else Shape.of(base)
        return cls(shape.embed_dim, {k: float(shape.widths(k).mean()) for k in KINDS})

    def at(self, embed_dim: float) -> dict[WidthKind, float]:
        ratio = embed_dim / self.embed_dim
        return {k: w * ratio if _SCALES_WITH_EMBED[k] else w for k, w in self.widths.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"embed_dim": self.embed_dim, **{k.value: v for k, v in self.widths.items()}}


def relative_positions(depth: int) -> np.ndarray:
    """Block ``j``'s relative position ``j/(depth−1)``; one block sits at 0.5."""
    if depth < 1:
        raise SpecError(f"depth must be at least 1, got {depth}")
    return np.array([0.5]) if depth == 1 else np.arange(depth) / (depth - 1)


@dataclass(frozen=True)
class Shares:
    """Width shares per block (kind → one value per block) at their relative positions."""

    name: str
    positions: tuple[float, ...]
    values: Mapping[WidthKind, tuple[float, ...]]
    embed_share: float | None = None

    @property
    def depth(self) -> int:
        return len(self.positions)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "embed_share": self.embed_share, "positions": list(self.positions),
                **{k.value: list(v) for k, v in self.values.items()}}


def variant_shares(variant: Shape, reference: Reference) -> Shares:
    """A variant's shares against the dense reference at the variant's own embedding."""
    dense = reference.at(variant.embed_dim)
    values = {k: tuple(float(x) for x in variant.widths(k) / dense[k]) for k in KINDS}
    return Shares(variant.name, tuple(float(p) for p in relative_positions(variant.depth)), values,
                  variant.embed_dim / reference.embed_dim)


def smooth(x: np.ndarray, y: np.ndarray, at: np.ndarray, bandwidth: float) -> np.ndarray:
    """Gaussian-kernel average of points ``(x, y)`` at positions ``at``; bandwidth 0: the nearest x's mean."""
    x, y, at = (np.asarray(a, dtype=np.float64) for a in (x, y, at))
    if bandwidth < 0 or not math.isfinite(bandwidth):
        raise SpecError(f"the smoothing bandwidth must be a finite number >= 0, got {bandwidth}")
    dist = np.abs(at[:, None] - x[None, :])
    if bandwidth == 0:
        weight = np.isclose(dist, dist.min(axis=1, keepdims=True), rtol=0, atol=1e-9).astype(np.float64)
    else:
        weight = np.exp(-0.5 * (dist / bandwidth) ** 2)
    return (weight @ y) / weight.sum(axis=1)


def fit_shares(family: Sequence[Shares], depth: int, bandwidth: float = DEFAULT_BANDWIDTH,
               name: str = "learned rule") -> Shares:
    """The rule: every variant's block shares pooled and smoothed onto ``depth`` blocks."""
    if not family:
        raise SpecError("fitting a rule needs at least one variant")
    x = np.concatenate([np.asarray(s.positions) for s in family])
    at = relative_positions(depth)
    values = {k: tuple(float(v) for v in smooth(x, np.concatenate([np.asarray(s.values[k]) for s in family]),
                                                at, bandwidth)) for k in KINDS}
    embeds = [s.embed_share for s in family if s.embed_share is not None]
    return Shares(name, tuple(float(p) for p in at), values, float(np.mean(embeds)) if embeds else None)


#: Heads even, QK/V/MLP and the embedding multiples of 8.
DEFAULT_ROUNDING = WidthSteps(heads=2)


def build_arch(rule: Shares, reference: Reference, embed_dim: int, template: ArchSpec,
               rounding: WidthSteps = DEFAULT_ROUNDING, name: str = "") -> ArchSpec:
    """The rule's widths at ``embed_dim`` on ``template``'s image, patch, classes and tokens."""
    dense = reference.at(embed_dim)
    blocks = tuple(BlockSpec(**{k.value: rounding.round(k, rule.values[k][j] * dense[k]) for k in KINDS})
                   for j in range(rule.depth))
    return template.with_blocks(blocks, embed_dim=embed_dim, name=name or template.name, qk_scale=None)


@dataclass(frozen=True)
class ScaledDesign:
    """The embedding :func:`scale_to_latency` chose and what the table predicts for it."""

    spec: ArchSpec
    embed_dim: int
    predicted_ms: float
    target_ms: float
    tried: tuple[tuple[int, float | None], ...] = field(default=())  # (embedding, predicted ms or None: unpriced)

    def to_dict(self) -> dict[str, Any]:
        return {"embed_dim": self.embed_dim, "predicted_ms": self.predicted_ms, "target_ms": self.target_ms,
                "tried": [list(t) for t in self.tried]}


def embed_candidates(grid_embeds: Sequence[int], step: int) -> list[int]:
    """Multiples of ``step`` within the measured embedding range, plus the measured embeddings themselves."""
    lo, hi = min(grid_embeds), max(grid_embeds)
    return sorted({*range(step * math.ceil(lo / step), hi + 1, step), *grid_embeds})


def scale_to_latency(build: Callable[[int], ArchSpec], predictor: Any, target_ms: float,
                     embed_step: int = 8) -> ScaledDesign:
    """The largest embedding on the table's grid whose design ``build(E)`` the table predicts at or below
    ``target_ms``; :class:`TargetError` (with the reachable range) when none does."""
    from nvit.lut.coverage import GridStatus

    if not (math.isfinite(target_ms) and target_ms > 0):
        raise TargetError(f"the latency target must be a positive number of ms, got {target_ms}")
    embeds = predictor.grid.values("embed_dim")
    tried: list[tuple[int, float | None]] = []
    unpriced: list[str] = []
    for e in embed_candidates(embeds, embed_step):
        try:
            spec = build(e)
        except SpecError as exc:
            unpriced.append(f"E={e}: {exc}")
            tried.append((e, None))
            continue
        report = predictor.grid_report(spec)
        if report.status is GridStatus.FAR:
            unpriced.append(f"E={e}: {report.describe()}")
            tried.append((e, None))
            continue
        tried.append((e, float(predictor.predict_ms(spec))))
    priced = [(e, ms) for e, ms in tried if ms is not None]
    where = f"the table's measured embeddings {min(embeds)}..{max(embeds)}"
    if not priced:
        raise LutError(f"the latency table cannot price the design at any embedding in {where} "
                       f"({unpriced[0]}); profile a table whose space covers these widths")
    meeting = [(e, ms) for e, ms in priced if ms <= target_ms]
    if not meeting:
        lo_e, lo_ms = min(priced, key=lambda t: t[1])
        raise TargetError(f"target {target_ms:.4g} ms is unreachable: on {where} the design's predicted latency "
                          f"is at least {lo_ms:.4g} ms (E={lo_e}); the largest is "
                          f"{max(ms for _, ms in priced):.4g} ms")
    e, ms = max(meeting)
    logger.info("embedding %d: predicted %.4g ms <= target %.4g ms", e, ms, target_ms)
    return ScaledDesign(build(e), e, ms, target_ms, tuple(tried))
