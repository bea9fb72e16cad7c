"""Which block configurations a grid of widths expands into: the sampling every latency table shares.

A grid holds embedding widths ``e``, heads ``h``, per-head Q/K widths ``q``, per-head V widths ``v`` and MLP
widths ``m`` and expands into the separable sub-tables of DESIGN.md §4 (attention and MLP halves on their full
grids, sampled full blocks, one-half blocks, the narrow shapes pruning reaches and the fixed parts per ``e``).
A ViT's :class:`~nvit.profiler.space.SearchSpace` is one grid; a Swin's space holds one per stage
(:mod:`nvit.profiler.swin_space`). Both are frozen dataclasses with the fields :class:`GridConfigs` reads.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from nvit.errors import SpecError
from nvit.vocab import PartConfig, PartKind, positive_int

GRID_AXES = ("embed_dims", "heads", "qk_dims", "v_dims", "mlp_dims")
#: Narrow blocks: full blocks at the smallest ``NARROW_MLP_WIDTHS`` MLP widths, MLP-only blocks at the smallest
#: ``NARROW_MLP_ONLY_WIDTHS`` (every head count, smallest Q/K and V widths, for full and attention-only ones).
NARROW_MLP_WIDTHS = 2
NARROW_MLP_ONLY_WIDTHS = 3
#: ... at the smallest ``NARROW_HEADS`` head counts (a wide model's head grid is long; pruning ends at its start).
NARROW_HEADS = 4

#: One-half blocks per embedding width and sub-layer in a new space (spaces older than version 3 have none).
DEFAULT_HALF_BLOCKS_PER_EMBED = 2


class GridConfigs:
    """The expansion of a grid into configurations (mixed into frozen dataclasses with the grid fields
    ``embed_dims``, ``heads``, ``qk_dims``, ``v_dims``, ``mlp_dims``, ``blocks_per_embed``,
    ``half_blocks_per_embed``, ``narrow_blocks`` and ``sample_seed``)."""

    embed_dims: tuple[int, ...]
    heads: tuple[int, ...]
    qk_dims: tuple[int, ...]
    v_dims: tuple[int, ...]
    mlp_dims: tuple[int, ...]
    blocks_per_embed: int
    half_blocks_per_embed: int
    narrow_blocks: bool
    sample_seed: int

    def check_grids(self) -> None:
        """Validate and normalise the grid fields (called from ``__post_init__``)."""
        for axis in GRID_AXES:
            values = getattr(self, axis)
            if isinstance(values, str | bytes) or not isinstance(values, Sequence) or len(values) == 0:
                raise SpecError(f"space {axis} must be a non-empty list of positive integers")
            if not all(positive_int(v) for v in values):
                raise SpecError(f"space {axis} must hold positive integers, got {list(values)}")
            if list(values) != sorted(set(values)):
                raise SpecError(f"space {axis} must be strictly increasing, got {list(values)}")
            object.__setattr__(self, axis, tuple(int(v) for v in values))
        for key in ("blocks_per_embed", "half_blocks_per_embed", "sample_seed"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise SpecError(f"space {key} must be a non-negative integer, got {value!r}")
        if not isinstance(self.narrow_blocks, bool):
            raise SpecError(f"space narrow_blocks must be true or false, got {self.narrow_blocks!r}")

    def attn_configs(self) -> list[PartConfig]:
        return [PartConfig(PartKind.ATTN, e, heads=h, qk_dim=q, v_dim=v)
                for e in self.embed_dims for h in self.heads for q in self.qk_dims for v in self.v_dims]

    def mlp_configs(self) -> list[PartConfig]:
        return [PartConfig(PartKind.MLP, e, mlp_dim=m) for e in self.embed_dims for m in self.mlp_dims]

    def fixed_configs(self) -> list[PartConfig]:
        return [PartConfig(PartKind.FIXED, e) for e in self.embed_dims]

    def largest_block(self, embed_dim: int) -> PartConfig:
        return PartConfig(PartKind.BLOCK, embed_dim, heads=self.heads[-1], qk_dim=self.qk_dims[-1],
                          v_dim=self.v_dims[-1], mlp_dim=self.mlp_dims[-1])

    def smallest_block(self, embed_dim: int) -> PartConfig:
        return PartConfig(PartKind.BLOCK, embed_dim, heads=self.heads[0], qk_dim=self.qk_dims[0],
                          v_dim=self.v_dims[0], mlp_dim=self.mlp_dims[0])

    def block_configs(self) -> list[PartConfig]:
        """Per ``e``: the largest and the smallest block (the two ends of the interaction's fit), then distinct
        random grid blocks (seeded), ``blocks_per_embed`` in all."""
        rng = np.random.default_rng(self.sample_seed)
        grid_size = len(self.heads) * len(self.qk_dims) * len(self.v_dims) * len(self.mlp_dims)
        out: list[PartConfig] = []
        for e in self.embed_dims:
            corners = list(dict.fromkeys([self.largest_block(e), self.smallest_block(e)]))
            chosen = corners[:self.blocks_per_embed]
            while len(chosen) < min(self.blocks_per_embed, grid_size):
                c = PartConfig(PartKind.BLOCK, e, heads=int(rng.choice(self.heads)),
                               qk_dim=int(rng.choice(self.qk_dims)), v_dim=int(rng.choice(self.v_dims)),
                               mlp_dim=int(rng.choice(self.mlp_dims)))
                if c not in chosen:
                    chosen.append(c)
            out += chosen
        return out

    def one_half_block_configs(self) -> list[PartConfig]:
        """Per ``e`` and sub-layer, ``half_blocks_per_embed`` blocks that kept only that sub-layer: the
        smallest and the largest of its grid first, then distinct random grid points (seeded)."""
        rng = np.random.default_rng([self.sample_seed, 3])
        out: list[PartConfig] = []
        n = self.half_blocks_per_embed
        for e in self.embed_dims:
            attn = [PartConfig(PartKind.ATTN_BLOCK, e, heads=h, qk_dim=q, v_dim=v)
                    for h, q, v in ((self.heads[0], self.qk_dims[0], self.v_dims[0]),
                                    (self.heads[-1], self.qk_dims[-1], self.v_dims[-1]))]
            mlp = [PartConfig(PartKind.MLP_BLOCK, e, mlp_dim=m) for m in (self.mlp_dims[0], self.mlp_dims[-1])]
            for corners, grid_size, draw in (
                (attn, len(self.heads) * len(self.qk_dims) * len(self.v_dims),
                 lambda e=e: PartConfig(PartKind.ATTN_BLOCK, e, heads=int(rng.choice(self.heads)),
                                        qk_dim=int(rng.choice(self.qk_dims)), v_dim=int(rng.choice(self.v_dims)))),
                (mlp, len(self.mlp_dims), lambda e=e: PartConfig(PartKind.MLP_BLOCK, e,
                                                                 mlp_dim=int(rng.choice(self.mlp_dims)))),
            ):
                chosen = list(dict.fromkeys(corners))[:n]
                while len(chosen) < min(n, grid_size):
                    c = draw()
                    if c not in chosen:
                        chosen.append(c)
                out += chosen
        return out

    def narrow_block_configs(self) -> list[PartConfig]:
        """Per ``e``, the narrow shapes a pruning run reaches (none unless ``narrow_blocks``): each of the smallest
        head counts at the smallest Q/K and V widths as a full block with each of the smallest MLP widths and as an
        attention-only block (one-half blocks only where the space measures them), and MLP-only blocks at the
        smallest MLP widths. Configurations the other samples already hold are left out."""
        if not self.narrow_blocks:
            return []
        taken = set(self.block_configs()) | set(self.one_half_block_configs())
        out: list[PartConfig] = []
        q, v, heads = self.qk_dims[0], self.v_dims[0], self.heads[:NARROW_HEADS]
        for e in self.embed_dims:
            chosen = [PartConfig(PartKind.BLOCK, e, heads=h, qk_dim=q, v_dim=v, mlp_dim=m)
                      for m in self.mlp_dims[:NARROW_MLP_WIDTHS] for h in heads]
            if self.has_one_half_blocks:
                chosen += [PartConfig(PartKind.ATTN_BLOCK, e, heads=h, qk_dim=q, v_dim=v) for h in heads]
                chosen += [PartConfig(PartKind.MLP_BLOCK, e, mlp_dim=m)
                           for m in self.mlp_dims[:NARROW_MLP_ONLY_WIDTHS]]
            out += [c for c in chosen if c not in taken]
        return out

    @property
    def has_one_half_blocks(self) -> bool:
        """Whether tables of this space can price removing a whole sub-layer."""
        return self.half_blocks_per_embed > 0

    def configs(self) -> list[PartConfig]:
        """Every configuration of the space, in a canonical order (the sweep shuffles it)."""
        return (self.attn_configs() + self.mlp_configs() + self.block_configs() + self.fixed_configs()
                + self.one_half_block_configs() + self.narrow_block_configs())

    def counts(self) -> dict[str, int]:
        narrow = self.narrow_block_configs()
        halves = self.one_half_block_configs() + narrow
        return {
            PartKind.ATTN.value: len(self.attn_configs()), PartKind.MLP.value: len(self.mlp_configs()),
            PartKind.BLOCK.value: len(self.block_configs()) + sum(c.kind is PartKind.BLOCK for c in narrow),
            PartKind.FIXED.value: len(self.fixed_configs()),
            PartKind.ATTN_BLOCK.value: sum(c.kind is PartKind.ATTN_BLOCK for c in halves),
            PartKind.MLP_BLOCK.value: sum(c.kind is PartKind.MLP_BLOCK for c in halves),
        }

