"""The words the profiler, the latency table and the predictor share: what a table row measures
(:class:`PartKind` at a :class:`PartConfig`), and the precision, device kind and timing mode that are part
of a table's identity. Imports nothing of nvit but its errors, so every room can stand on it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import numpy as np

from nvit.errors import SpecError


class Precision(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


class DeviceKind(str, enum.Enum):
    CPU = "cpu"
    CUDA = "cuda"


class TimingMode(str, enum.Enum):
    """How a backend times one call. Part of a table's identity: the modes give different figures."""

    HOST_CLOCK = "host_clock"  # the call waits for its result and is timed with the host clock
    CUDA_GRAPH = "cuda_graph"  # one iteration captured in a CUDA graph, replayed K times between CUDA events
    LAUNCH = "launch"  # the iteration enqueued K times between CUDA events


class PartKind(str, enum.Enum):
    """What one LUT row measures."""

    ATTN = "attn"  # x + attn(norm1(x))
    MLP = "mlp"  # x + mlp(norm2(x))
    BLOCK = "block"  # a whole block
    FIXED = "fixed"  # patch embedding, tokens, final norm, head(s)
    ATTN_BLOCK = "attn_block"  # a block whose MLP was removed (the price of removing a sub-layer)
    MLP_BLOCK = "mlp_block"  # a block whose attention was removed


#: The width fields each kind uses; the others are 0.
KIND_FIELDS: dict[PartKind, tuple[str, ...]] = {
    PartKind.ATTN: ("heads", "qk_dim", "v_dim"),
    PartKind.MLP: ("mlp_dim",),
    PartKind.BLOCK: ("heads", "qk_dim", "v_dim", "mlp_dim"),
    PartKind.FIXED: (),
    PartKind.ATTN_BLOCK: ("heads", "qk_dim", "v_dim"),
    PartKind.MLP_BLOCK: ("mlp_dim",),
}
#: The one-half blocks and the half each one is: a block that kept only that sub-layer.
ONE_HALF_BLOCKS: dict[PartKind, PartKind] = {PartKind.ATTN_BLOCK: PartKind.ATTN, PartKind.MLP_BLOCK: PartKind.MLP}
WIDTH_FIELDS = ("heads", "qk_dim", "v_dim", "mlp_dim")


@dataclass(frozen=True, order=True)
class PartConfig:
    """One configuration to time. Widths a kind does not use are 0."""

    kind: PartKind
    embed_dim: int
    heads: int = 0
    qk_dim: int = 0
    v_dim: int = 0
    mlp_dim: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", PartKind(self.kind))
        used = KIND_FIELDS[self.kind]
        if not positive_int(self.embed_dim):
            raise SpecError(f"{self.kind.value} config: embed_dim must be a positive integer, got {self.embed_dim!r}")
        for name in WIDTH_FIELDS:
            value = getattr(self, name)
            if name in used and not positive_int(value):
                raise SpecError(f"{self.kind.value} config: {name} must be a positive integer, got {value!r}")
            if name not in used and value != 0:
                raise SpecError(f"{self.kind.value} config: {name} must be 0 (unused by this kind), got {value!r}")

    @property
    def key(self) -> str:
        """A stable unique name, e.g. ``attn/e384/h6/q64/v64``."""
        parts = [self.kind.value, f"e{self.embed_dim}"]
        tags = {"heads": "h", "qk_dim": "q", "v_dim": "v", "mlp_dim": "m"}
        parts += [f"{tags[n]}{getattr(self, n)}" for n in KIND_FIELDS[self.kind]]
        return "/".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "embed_dim": self.embed_dim,
                **{n: getattr(self, n) for n in WIDTH_FIELDS}}


def positive_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool) and value > 0

