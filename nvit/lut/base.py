"""What the pruning engine needs from a latency model: total latency and the latency of removing one unit.

:class:`Predictor` is the interface (the LUT-backed :class:`~nvit.lut.predictor.LatencyPredictor` and the
FLOPs-proportional baseline both implement it). ``delta_ms`` has a generic finite-difference
implementation; subclasses may override it with something faster but must return the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from nvit.arch import ArchSpec, BlockSpec, WidthSteps

#: One pruning unit by default: one head, eight channels of everything else.
UNIT_STEPS = WidthSteps()


@dataclass(frozen=True)
class LatencyDeltas:
    """Latency saved (ms) by removing one unit of each group: ``P(arch) - P(arch minus one unit)``.

    Per-block arrays have one entry per block; a group that cannot shrink further (it would reach zero
    width) gets ``nan``.
    """

    emb_ms: float
    heads_ms: np.ndarray
    qk_ms: np.ndarray
    v_ms: np.ndarray
    mlp_ms: np.ndarray


def _shrunk(block: BlockSpec, field: str, step: int) -> BlockSpec | None:
    width = getattr(block, field) - step
    return replace(block, **{field: width}) if width > 0 else None


@dataclass(frozen=True)
class SublayerDeltas:
    """Latency saved (ms) by removing each block's whole attention and whole MLP (``nan`` where absent)."""

    attn_ms: np.ndarray
    mlp_ms: np.ndarray


class Predictor:
    """Latency model of whole architectures, in milliseconds."""

    #: Why this predictor cannot price a removed sub-layer (``None``: it can).
    removal_unavailable: str | None = None

    def block_latency_ms(self, embed_dim: int, block: BlockSpec) -> float:
        raise NotImplementedError

    def fixed_latency_ms(self, embed_dim: int) -> float:
        """Patch embedding + tokens + final norm + head(s) at this embedding width."""
        raise NotImplementedError

    def offset_ms(self) -> float:
        """Calibrated constant added to every whole-model prediction."""
        return 0.0

    def block_latencies_ms(self, spec: ArchSpec) -> list[float]:
        return [self.block_latency_ms(spec.embed_dim, b) for b in spec.blocks]

    def predict_ms(self, spec: ArchSpec) -> float:
        return sum(self.block_latencies_ms(spec)) + self.fixed_latency_ms(spec.embed_dim) + self.offset_ms()

    def sublayer_deltas_ms(self, embed_dim: int, blocks: tuple[BlockSpec, ...]) -> SublayerDeltas:
        """Per block, ``block − block without its attention`` and ``block − block without its MLP`` (a block
        left with nothing is dropped: its whole latency). Removal keeps the embedding width, so the fixed
        parts and the offset do not change."""
        out = np.full((2, len(blocks)), np.nan)
        for i, b in enumerate(blocks):
            full = self.block_latency_ms(embed_dim, b)
            for row, present, smaller in ((0, b.has_attn, b.without_attn()), (1, b.has_mlp, b.without_mlp())):
                if present:
                    out[row, i] = full - (self.block_latency_ms(embed_dim, smaller) if smaller else 0.0)
        return SublayerDeltas(attn_ms=out[0], mlp_ms=out[1])

    def delta_ms(self, spec: ArchSpec, step: WidthSteps = UNIT_STEPS) -> LatencyDeltas:
        e = spec.embed_dim
        base_blocks = self.block_latencies_ms(spec)
        per_type: dict[str, np.ndarray] = {}
        for name, field in (("heads", "heads"), ("qk", "qk_dim"), ("v", "v_dim"), ("mlp", "mlp_dim")):
            out = np.full(spec.depth, np.nan)
            for i, block in enumerate(spec.blocks):
                smaller = _shrunk(block, field, step.step(field))
                if smaller is not None:
                    out[i] = base_blocks[i] - self.block_latency_ms(e, smaller)
            per_type[name] = out
        if e - step.embed_dim > 0:
            smaller_spec = replace(spec, embed_dim=e - step.embed_dim)
            emb = self.predict_ms(spec) - self.predict_ms(smaller_spec)
        else:
            emb = float("nan")
        return LatencyDeltas(emb_ms=emb, heads_ms=per_type["heads"], qk_ms=per_type["qk"],
                             v_ms=per_type["v"], mlp_ms=per_type["mlp"])


class FlopsPredictor(Predictor):
    """Baseline: latency proportional to FLOPs, scaled so that ``reference`` takes ``reference_ms``."""

    def __init__(self, reference: ArchSpec, reference_ms: float) -> None:
        self.reference = reference
        self.num_tokens = reference.num_tokens
        self.ms_per_flop = reference_ms / reference.flops()

    def block_latency_ms(self, embed_dim: int, block: BlockSpec) -> float:
        from nvit.arch import block_flops

        return block_flops(embed_dim, block, self.num_tokens) * self.ms_per_flop

    def fixed_latency_ms(self, embed_dim: int) -> float:
        r = self.reference
        stem = 2 * r.num_patches * embed_dim * r.in_chans * r.patch_size**2
        head = 2 * embed_dim * r.num_classes * (2 if r.distilled else 1)
        return (stem + head) * self.ms_per_flop


class SwinFlopsPredictor:
    """Baseline for a Swin: latency proportional to its FLOPs (:meth:`nvit.swin.SwinSpec.flops`), scaled so that
    ``reference`` takes ``reference_ms``. Whole-model predictions only: pruning prices each group by finite
    differences of them (:func:`nvit.pruning.regularizer.gate_latency_deltas_ms`)."""

    removal_unavailable: str | None = None  # FLOPs price a block without a sub-layer as they price any block

    def __init__(self, reference: Any, reference_ms: float) -> None:
        self.reference = reference
        self.ms_per_flop = reference_ms / reference.flops()

    def predict_ms(self, spec: Any) -> float:
        return spec.flops() * self.ms_per_flop


def flops_predictor(reference: Any, reference_ms: float) -> Any:
    """The FLOPs-proportional stand-in for the reference's family (a ViT or a Swin)."""
    from nvit.swin import SwinSpec

    if isinstance(reference, SwinSpec):
        return SwinFlopsPredictor(reference, reference_ms)
    return FlopsPredictor(reference, reference_ms=reference_ms)
