"""A Swin's search space: one grid of block widths per stage, and the whole Swins a table is calibrated on.

A Swin's blocks differ by stage in what decides their latency: the token count (the resolution halves from
stage to stage), the window and the embedding width. A Swin table therefore measures every stage's blocks on a
grid of their own (:class:`SwinStageGrid`, expanded like a ViT's space by
:class:`~nvit.profiler.grid_configs.GridConfigs`: attention and MLP halves, sampled full blocks, one-half blocks
and the narrow shapes pruning reaches), at the stage's resolution and window.

The fixed parts (patch embedding, the merging layers, the final norm, pooling and head) depend on every stage's
width at once. A stage's ``fixed`` row at width ``e`` is that skeleton (the Swin with no blocks) with this stage
at ``e`` and the others at the base's widths; the predictor adds the stages' changes to the dense skeleton
(:mod:`nvit.lut.swin_table`).

Derived axes follow the ViT recipe (:func:`~nvit.profiler.space_recipes.derive_axes`) per stage, from the
pruning group size up to the stage's widest block.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from nvit.arch import BlockSpec
from nvit.errors import SpecError
from nvit.profiler.grid_configs import DEFAULT_HALF_BLOCKS_PER_EMBED, GRID_AXES, GridConfigs
from nvit.profiler.space_recipes import GENERIC_BLOCKS_PER_EMBED, derive_axes
from nvit.swin import SwinSpec, SwinStage
from nvit.vocab import PartConfig, PartKind, Precision, positive_int

SWIN_SPACE_KIND = "nvit.swin_space"
SWIN_SPACE_SCHEMA_VERSION = 1
#: Width fraction of the small uniform calibration Swin (the low end pruning explores).
SWIN_CALIBRATION_LOW_FRACTION = 0.35


@dataclass(frozen=True)
class SwinStageGrid(GridConfigs):
    """The grids of one stage's blocks (the same axes and sampling as a ViT space)."""

    embed_dims: tuple[int, ...]
    heads: tuple[int, ...]
    qk_dims: tuple[int, ...]
    v_dims: tuple[int, ...]
    mlp_dims: tuple[int, ...]
    blocks_per_embed: int = GENERIC_BLOCKS_PER_EMBED
    half_blocks_per_embed: int = DEFAULT_HALF_BLOCKS_PER_EMBED
    narrow_blocks: bool = True
    sample_seed: int = 0

    def __post_init__(self) -> None:
        self.check_grids()

    def configs(self) -> list[PartConfig]:
        return (self.attn_configs() + self.mlp_configs() + self.block_configs() + self.fixed_configs()
                + self.one_half_block_configs() + self.narrow_block_configs())

    def to_dict(self) -> dict[str, Any]:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}


@dataclass(frozen=True, order=True)
class StagePart:
    """One configuration to time: a part of ``stage``'s blocks (or the skeleton with that stage at a width)."""

    stage: int
    config: PartConfig

    @property
    def key(self) -> str:
        return f"s{self.stage}/{self.config.key}"

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, **self.config.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StagePart:
        data = dict(data)
        return cls(int(data.pop("stage")), PartConfig(**data))


@dataclass(frozen=True)
class SwinSearchSpace:
    """Per-stage grids for one Swin, batch size and precision."""

    base: SwinSpec
    stages: tuple[SwinStageGrid, ...]
    batch_size: int = 1
    precision: Precision = Precision.FP32
    name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(g if isinstance(g, SwinStageGrid) else SwinStageGrid(**g)
                                                 for g in self.stages))
        if len(self.stages) != self.base.num_stages:
            raise SpecError(f"a Swin space needs one grid per stage: {self.base.num_stages} stages, "
                            f"{len(self.stages)} grids")
        for i, (grid, stage) in enumerate(zip(self.stages, self.base.stages, strict=True)):
            if stage.embed_dim not in grid.embed_dims:
                raise SpecError(f"stage {i}'s grid must hold the base's embedding width {stage.embed_dim} (the "
                                "skeleton's other stages are measured at it)")
        if not positive_int(self.batch_size):
            raise SpecError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        try:
            object.__setattr__(self, "precision", Precision(self.precision))
        except ValueError:
            raise SpecError(f"unknown precision {self.precision!r}") from None

    def configs(self) -> list[StagePart]:
        """Every configuration, stage by stage (the sweep shuffles them)."""
        return [StagePart(i, c) for i, grid in enumerate(self.stages) for c in grid.configs()]

    def counts(self) -> dict[str, int]:
        out = {k.value: 0 for k in PartKind}
        for part in self.configs():
            out[part.config.kind.value] += 1
        return out

    def sentinel(self) -> StagePart:
        """Re-timed during a sweep to record drift: the first stage's largest block (its most tokens)."""
        return StagePart(0, self.stages[0].largest_block(self.stages[0].embed_dims[-1]))

    @property
    def has_one_half_blocks(self) -> bool:
        return all(g.has_one_half_blocks for g in self.stages)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": SWIN_SPACE_KIND, "schema_version": SWIN_SPACE_SCHEMA_VERSION, "base": self.base.to_dict(),
                "stages": [g.to_dict() for g in self.stages], "batch_size": self.batch_size,
                "precision": self.precision.value, "name": self.name}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SwinSearchSpace:
        if not isinstance(data, Mapping) or data.get("kind") != SWIN_SPACE_KIND:
            raise SpecError("not a Swin search space")
        if data.get("schema_version") != SWIN_SPACE_SCHEMA_VERSION:
            raise SpecError(f"unsupported Swin space schema_version {data.get('schema_version')!r}")
        unknown = sorted(set(data) - {"kind", "schema_version", "base", "stages", "batch_size", "precision", "name"})
        if unknown:
            raise SpecError(f"unknown Swin space key(s): {', '.join(unknown)}")
        try:
            return cls(base=SwinSpec.from_dict(data["base"]), stages=tuple(data["stages"]),
                       batch_size=data.get("batch_size", 1), precision=data.get("precision", "fp32"),
                       name=data.get("name", ""))
        except (KeyError, TypeError) as exc:
            raise SpecError(f"invalid Swin search space: {exc}") from None

    def fingerprint(self) -> str:
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def derived_swin_space(base: SwinSpec, *, group_size: int = 8, batch_size: int = 1,
                       precision: Precision | str = Precision.FP32, name: str = "") -> SwinSearchSpace:
    """Per stage, the axes of :func:`~nvit.profiler.space_recipes.derive_axes` for the stage's widest block."""
    if not positive_int(group_size):
        raise SpecError(f"group size must be a positive integer, got {group_size!r}")
    grids = []
    for stage in base.stages:
        with_attn = [b for b in stage.blocks if b.has_attn] or [BlockSpec(1, group_size, group_size, 0)]
        with_mlp = [b for b in stage.blocks if b.has_mlp] or [BlockSpec(0, 0, 0, group_size)]
        axes = derive_axes(stage.embed_dim, heads=max(b.heads for b in with_attn),
                           qk_dim=max(b.qk_dim for b in with_attn), v_dim=max(b.v_dim for b in with_attn),
                           mlp_dim=max(b.mlp_dim for b in with_mlp), group_size=group_size)
        grids.append(SwinStageGrid(**axes))
    return SwinSearchSpace(base=base, stages=tuple(grids), batch_size=batch_size, precision=Precision(precision),
                           name=name or f"{base.name or 'swin'}-derived")


# ---- whole Swins for calibration and checks ------------------------------------------------------------
def _drawn(rng: np.random.Generator, values: Sequence[int], low: float, high: float) -> int:
    """A grid width between ``low`` and ``high`` of the grid's largest (the nearest grid point otherwise)."""
    top = values[-1]
    inside = [v for v in values if low * top <= v <= high * top] or [min(values, key=lambda v: abs(v - low * top))]
    return int(rng.choice(inside))


def random_swin(space: SwinSearchSpace, rng: np.random.Generator, *, low: float = 0.3, high: float = 1.0,
                removed: float = 0.0, name: str = "") -> SwinSpec:
    """A non-uniform Swin of the space: every stage's width and every block's widths drawn from the stage's
    grids between ``low`` and ``high`` of their largest, independently; with ``removed``, each block loses its
    attention or its MLP (never both) with that probability, as pruning leaves blocks."""
    embeds, blocks = [], []
    for grid, stage in zip(space.stages, space.base.stages, strict=True):
        embeds.append(_drawn(rng, grid.embed_dims, low, high))
        draw = lambda values: _drawn(rng, values, low, high)  # noqa: E731
        stage_blocks = []
        for _ in stage.blocks:
            b = BlockSpec(heads=draw(grid.heads), qk_dim=draw(grid.qk_dims), v_dim=draw(grid.v_dims),
                          mlp_dim=draw(grid.mlp_dims))
            if removed and rng.random() < removed:
                b = b.without_attn() if rng.random() < 0.5 else b.without_mlp()
            stage_blocks.append(b)
        blocks.append(stage_blocks)
    return _named(space.base, embeds, blocks, name)


def uniform_swin(space: SwinSearchSpace, fraction: float, *, align: int = 8, name: str = "") -> SwinSpec:
    """The base with every width scaled by ``fraction`` (rounded to ``align``, heads to at least one)."""
    def scaled(full: int) -> int:
        return max(align, round(fraction * full / align) * align)

    embeds = [scaled(s.embed_dim) for s in space.base.stages]
    blocks = [[BlockSpec(heads=max(1, math.floor(fraction * b.heads + 0.5)), qk_dim=scaled(b.qk_dim),
                         v_dim=scaled(b.v_dim), mlp_dim=scaled(b.mlp_dim)) if b.has_attn and b.has_mlp else b
               for b in s.blocks] for s in space.base.stages]
    return _named(space.base, embeds, blocks, name)


def _named(base: SwinSpec, embeds: Sequence[int], blocks: Sequence[Sequence[BlockSpec]], name: str) -> SwinSpec:
    stages = tuple(SwinStage(int(e), tuple(bs)) for e, bs in zip(embeds, blocks, strict=True))
    return dataclasses.replace(base, stages=stages, name=name or base.name)


#: Where the space prices removed sub-layers, the share of blocks a "removed" calibration or check Swin loses one in.
REMOVED_SHARE = 0.4


def swin_calibration_archs(space: SwinSearchSpace, count: int, *, seed: int = 1) -> list[SwinSpec]:
    """The dense base, a small uniform Swin, then random ones (seeded), every third of those with removed
    sub-layers where the space prices them: ``count`` in all."""
    out = [_named(space.base, [s.embed_dim for s in space.base.stages], [s.blocks for s in space.base.stages],
                  "cal-dense"),
           uniform_swin(space, SWIN_CALIBRATION_LOW_FRACTION, name="cal-uniform-low")][:count]
    rng = np.random.default_rng(seed)
    while len(out) < count:
        removed = space.has_one_half_blocks and len(out) % 3 == 1
        out.append(random_swin(space, rng, removed=REMOVED_SHARE if removed else 0.0,
                               name=f"cal-{'removed' if removed else 'random'}-{len(out)}"))
    return out


def swin_check_archs(space: SwinSearchSpace, count: int, *, seed: int = 500) -> list[SwinSpec]:
    """``count`` held-out Swins in turn: wide random ones (0.5–1 of the grid), narrow ones (0.2–0.6: the shapes
    pruning reaches) and, where the space prices them, narrow ones with removed sub-layers."""
    rng = np.random.default_rng(seed)
    kinds = ("random", "pruned", "removed") if space.has_one_half_blocks else ("random", "pruned")
    out = []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        low, high = (0.5, 1.0) if kind == "random" else (0.2, 0.6)
        out.append(random_swin(space, rng, low=low, high=high, removed=REMOVED_SHARE if kind == "removed" else 0.0,
                               name=f"check-{kind}-{i}"))
    return out


__all__ = ["GRID_AXES", "SWIN_SPACE_KIND", "StagePart", "SwinSearchSpace", "SwinStageGrid", "derived_swin_space",
           "random_swin", "swin_calibration_archs", "swin_check_archs", "uniform_swin"]
