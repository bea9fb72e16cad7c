"""A fake device's Swin latencies (the ground truth Swin table tests check predictions against) and a small
Swin table profiled on it.

Blocks cost what :mod:`lut_fakes` charges a ViT block, times the stage's token count over 64; the skeleton
(patch embedding, merging layers, head) has a term per stage width and a bilinear term per merging layer (its
cost depends on both neighbouring widths, which a Swin table prices as separate changes); a whole Swin is
``SCALE · (blocks + skeleton) + OFFSET_MS``."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

from lut_fakes import OFFSET_MS, SCALE, FakeBackend, block_ms, fake_device

from nvit.profiler.swin_space import StagePart, SwinSearchSpace, derived_swin_space
from nvit.swin import SwinSpec, swin_preset
from nvit.vocab import PartKind

MERGE_MS_PER_CHANNEL2 = 2e-6


def stage_block_ms(spec: SwinSpec, stage: int, e: float, h: float, q: float, v: float, m: float) -> float:
    return block_ms(e, h, q, v, m) * spec.num_tokens(stage) / 64


def skeleton_ms(spec: SwinSpec) -> float:
    widths = [s.embed_dim for s in spec.stages]
    merges = sum(a * b for a, b in pairwise(widths))
    return 0.02 + 1e-4 * sum(widths) + MERGE_MS_PER_CHANNEL2 * merges


def swin_ms(spec: SwinSpec) -> float:
    blocks = sum(stage_block_ms(spec, i, s.embed_dim, b.heads, b.qk_dim, b.v_dim, b.mlp_dim)
                 for i, s in enumerate(spec.stages) for b in s.blocks)
    return SCALE * (blocks + skeleton_ms(spec)) + OFFSET_MS


def workload_ms(module: Any) -> float | None:
    """The fake latency of a Swin workload (``None``: not a Swin's)."""
    config, spec = getattr(module, "nvit_config", None), getattr(module, "spec", None)
    if isinstance(config, StagePart):
        c = config.config
        if c.kind is PartKind.FIXED:
            return skeleton_ms(module.spec)
        base = module.nvit_base
        ones = {PartKind.ATTN: (c.heads, c.qk_dim, c.v_dim, 0), PartKind.ATTN_BLOCK: (c.heads, c.qk_dim, c.v_dim, 0),
                PartKind.MLP: (0, 0, 0, c.mlp_dim), PartKind.MLP_BLOCK: (0, 0, 0, c.mlp_dim)}
        widths = ones.get(c.kind, (c.heads, c.qk_dim, c.v_dim, c.mlp_dim))
        return stage_block_ms(base, config.stage, c.embed_dim, *widths)
    if isinstance(spec, SwinSpec):
        return swin_ms(spec)
    return None


def swin_space(name: str = "swin_test") -> SwinSearchSpace:
    return derived_swin_space(swin_preset(name))


def swin_table(path: Any, *, name: str = "swin_test", calibration_models: int = 4, check_models: int = 4) -> Any:
    """Profile :func:`swin_space` with the fake backend into the folder ``path``; returns ``path``."""
    from nvit.profiler.sweep import SweepOptions
    from nvit.profiler.swin_sweep import run_swin_sweep

    with FakeBackend() as backend:
        run_swin_sweep(swin_space(name), backend, path, device=fake_device(),
                       options=SweepOptions(calibration_models=calibration_models, check_models=check_models))
    return path
