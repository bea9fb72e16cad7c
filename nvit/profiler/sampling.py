"""Architectures drawn from a base model's range: random non-uniform variants, uniform shrinks, and the
whole models a table is calibrated on."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from nvit.arch import ArchSpec, BlockSpec
from nvit.errors import SpecError


def _aligned_width(rng: np.random.Generator, full: int, low: float, high: float, align: int) -> int:
    lo = max(align, math.ceil(low * full / align) * align)
    hi = max(lo, math.floor(high * full / align) * align)
    return int(rng.integers(lo // align, hi // align + 1)) * align


def _head_count(rng: np.random.Generator, heads: int, low: float, high: float) -> int:
    lo = max(1, math.ceil(low * heads))
    return int(rng.integers(lo, max(lo, math.floor(high * heads)) + 1))


def random_arch(base: ArchSpec, rng: np.random.Generator, *, low: float = 0.3, high: float = 1.0,
                align: int = 8, name: str = "") -> ArchSpec:
    """A non-uniform variant of ``base``: every width drawn between ``low`` and ``high`` of the dense one
    (multiples of ``align``; heads between ``ceil(low·H)`` and ``floor(high·H)``), independently per block."""
    if not 0 < low <= high:
        raise SpecError(f"width fractions must satisfy 0 < low <= high, got {low} and {high}")
    dense = base.blocks[0]
    e = _aligned_width(rng, base.embed_dim, low, high, align)
    blocks = tuple(
        BlockSpec(heads=_head_count(rng, dense.heads, low, high),
                  qk_dim=_aligned_width(rng, dense.qk_dim, low, high, align),
                  v_dim=_aligned_width(rng, dense.v_dim, low, high, align),
                  mlp_dim=_aligned_width(rng, dense.mlp_dim, low, high, align))
        for _ in range(base.depth)
    )
    return replace(base, embed_dim=e, blocks=blocks, name=name or base.name)


def uniform_arch(base: ArchSpec, fraction: float, *, align: int = 8, name: str = "") -> ArchSpec:
    """``base`` with every width scaled by ``fraction`` (rounded to ``align``, heads to at least 1)."""
    def scaled(full: int) -> int:
        return max(align, round(fraction * full / align) * align)

    dense = base.blocks[0]
    block = BlockSpec(heads=max(1, round(fraction * dense.heads)), qk_dim=scaled(dense.qk_dim),
                      v_dim=scaled(dense.v_dim), mlp_dim=scaled(dense.mlp_dim))
    return replace(base, embed_dim=scaled(base.embed_dim), blocks=(block,) * base.depth, name=name or base.name)


#: Width fraction of the small uniform calibration model: the low end of the range pruning explores.
CALIBRATION_LOW_FRACTION = 0.35


def calibration_archs(base: ArchSpec, count: int, *, seed: int = 1, removed: bool = False) -> list[ArchSpec]:
    """Whole models for calibration: the dense base, a small uniform one, then pruned-shape models
    (:func:`pruned_arch`: narrow and wide blocks mixed) and random non-uniform ones alternately (seeded), so
    that the fitted line spans the models a pruned table is asked about, narrow end included. With
    ``removed``, every second of those lacks whole sub-layers and blocks (:func:`removed_arch`), and from four
    models on the dense and the small uniform model cut to half their depth come third and fourth
    (``cal-shallow``, ``cal-shallow-uniform``): removal changes a model's depth, and a calibration that follows
    depth needs two models at least of another depth to fit it and to judge it on one left out."""
    archs = [replace(base, name="cal-dense")]
    if count >= 2:
        archs.append(uniform_arch(base, CALIBRATION_LOW_FRACTION, name="cal-uniform"))
    if removed and count >= 4 and base.depth >= 2:
        for arch, name in ((archs[0], "cal-shallow"), (archs[1], "cal-shallow-uniform")):
            archs.append(replace(arch, blocks=arch.blocks[: (base.depth + 1) // 2], name=name))
    archs += mixed_archs(base, max(0, count - len(archs)), np.random.default_rng(seed), prefix="cal-", digits=1,
                         removed=removed)
    return archs[:count]


def mixed_archs(base: ArchSpec, count: int, rng: np.random.Generator, *, prefix: str,
                digits: int = 2, removed: bool = False) -> list[ArchSpec]:
    """``count`` variants of ``base``: a pruned shape (:func:`pruned_arch`) and a random one
    (:func:`random_arch`) alternately, named ``<prefix>pruned<i>`` and ``<prefix>random<i>``; with
    ``removed``, a pruned shape with removed sub-layers (:func:`removed_arch`, ``<prefix>removed<i>``) between
    the two."""
    makers = [("pruned", pruned_arch), ("removed", removed_arch), ("random", random_arch)][::1 if removed else 2]
    out = []
    for i in range(count):
        label, make = makers[i % len(makers)]
        out.append(make(base, rng, name=f"{prefix}{label}{i // len(makers):0{digits}d}"))
    return out


#: How often a :func:`removed_arch` block loses its attention, its MLP, or both (the block is dropped).
REMOVED_FATES = (("attn", 0.25), ("mlp", 0.2), ("block", 0.1))


def removed_arch(base: ArchSpec, rng: np.random.Generator, *, align: int = 8, name: str = "") -> ArchSpec:
    """A :func:`pruned_arch` whose blocks may also have lost their whole attention, their whole MLP or both
    (:data:`REMOVED_FATES`), as a pruning run that removes sub-layers ends; at least one block keeps its
    attention, and at least one sub-layer is removed."""
    shape = pruned_arch(base, rng, align=align, name=name)
    fates = rng.random(shape.depth)
    edges = np.cumsum([p for _, p in REMOVED_FATES])
    blocks: list[BlockSpec | None] = []
    for b, u in zip(shape.blocks, fates, strict=True):
        fate = next((f for (f, _), edge in zip(REMOVED_FATES, edges, strict=True) if u < edge), None)
        blocks.append({"attn": b.without_attn(), "mlp": b.without_mlp(), "block": None}.get(fate, b)
                      if fate else b)
    if all(b is None or not b.has_attn for b in blocks):  # keep one attention: the first block as drawn
        blocks[0] = shape.blocks[0]
    if all(b == o for b, o in zip(blocks, shape.blocks, strict=True)):  # remove one: the last block's MLP
        blocks[-1] = shape.blocks[-1].without_mlp()
    kept = tuple(b for b in blocks if b is not None)
    return replace(shape, blocks=kept, name=name or base.name)


#: How the blocks of a pruned-shape model end (see :func:`pruned_arch`): probability of each fate.
PRUNED_FATES = (("narrow", 0.4), ("mid", 0.3), ("wide", 0.3))


def pruned_arch(base: ArchSpec, rng: np.random.Generator, *, align: int = 8, name: str = "") -> ArchSpec:
    """A variant of ``base`` shaped like the end of a pruning run: each block independently ``narrow``
    (1–2 heads, per-head Q/K and V widths of one or two groups, MLP of 1–4 groups: 8–32 at group size 8),
    ``mid`` (heads, Q/K/V 25–75% and MLP 10–50% of dense) or ``wide`` (70–100%, MLP 60–100%); the embedding
    width between 50% and 100% of dense. Widths are multiples of ``align`` and never exceed the base's."""
    dense = base.blocks[0]
    fates = [f for f, _ in PRUNED_FATES]
    weights = np.array([w for _, w in PRUNED_FATES])

    def narrow_width(full: int) -> int:
        return min(full, align * int(rng.integers(1, 3)))

    def block(fate: str) -> BlockSpec:
        if fate == "narrow":
            return BlockSpec(heads=int(rng.integers(1, min(2, dense.heads) + 1)), qk_dim=narrow_width(dense.qk_dim),
                             v_dim=narrow_width(dense.v_dim),
                             mlp_dim=min(dense.mlp_dim, align * int(rng.integers(1, 5))))
        lo, hi, m_lo, m_hi = (0.25, 0.75, 0.1, 0.5) if fate == "mid" else (0.7, 1.0, 0.6, 1.0)
        return BlockSpec(heads=_head_count(rng, dense.heads, lo, hi),
                         qk_dim=_aligned_width(rng, dense.qk_dim, lo, hi, align),
                         v_dim=_aligned_width(rng, dense.v_dim, lo, hi, align),
                         mlp_dim=_aligned_width(rng, dense.mlp_dim, m_lo, m_hi, align))

    e = _aligned_width(rng, base.embed_dim, 0.5, 1.0, align)
    blocks = tuple(block(fates[int(rng.choice(len(fates), p=weights))]) for _ in range(base.depth))
    return replace(base, embed_dim=e, blocks=blocks, name=name or base.name)
