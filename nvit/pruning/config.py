"""A strict, frozen configuration for the pruning loop: unknown keys and ill-typed values are errors."""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from nvit.errors import NvitError
from nvit.pruning.groups import Minimums
from nvit.pruning.saliency import DEFAULT_EMA, SaliencyNorm

CONFIG_VERSION = 2
#: Fraction of the starting model's predicted latency removed per pruning step. NViT removes 2 groups every
#: 100 batches whatever their type; on DeiT-B two MLP groups of 16 neurons are 0.055% of its FLOPs and one
#: EMB group of 16 channels 2.0%, so 0.1% per 100 steps is of the order of its pace. A pace in latency is
#: resolution-independent: it does not depend on the group size, the model's size or the device, and
#: reaching a target ratio r takes about (1 − r) / pace pruning steps whatever the ranking.
DEFAULT_PACE = 0.001
DEFAULT_INTERVAL = 100


class ConfigError(NvitError):
    """A pruning configuration is malformed."""


class RankingMethod(enum.Enum):
    """How the groups to remove at each pruning step are chosen."""

    LATENCY = "latency"  # I − η·ΔLat, ΔLat from the latency table (nvit.pruning.regularizer)
    SALIENCY = "saliency"  # I alone (--no-latency); the table still decides when a target is met
    FLOPS = "flops"  # I − η·ΔFLOPs: a FLOPs-proportional predictor as the regularizer
    KNAPSACK = "knapsack"  # least saliency whose ΔLat meets the step's quota (nvit.pruning.knapsack)


#: Chosen by the Fashion-MNIST benchmark (BENCHMARKS.md §2): the knapsack had the best mean test top-1 at equal
#: measured latency, before and after fine-tuning, though within seed noise of the other gradual rankings;
#: λ = 3 had the best validation top-1 of the latency ranking (λ in 1, 3, 10).
DEFAULT_RANKING = RankingMethod.KNAPSACK
DEFAULT_LATENCY_WEIGHT = 3.0
#: The ranking ``nvit prune`` uses by default when it prunes widths only (a table without one-half blocks, or
#: ``--remove none``). Width-only, the knapsack is the worst ranking: −0.81 [−1.34, −0.27] test top-1 points
#: against saliency alone in BENCHMARKS.md §2b and −1.12 [−1.45, −0.79] in §2c (3 seeds each). Saliency alone
#: and the latency ranking (λ 3) cannot be told apart (latency − saliency: +0.05, +0.06, −0.23 points in
#: §2, §2b, §2c, every interval across 0); saliency alone measured best in the latest run and needs no λ.
WIDTH_ONLY_RANKING = RankingMethod.SALIENCY


class Sublayer(enum.Enum):
    """A whole sub-layer pruning may remove (``--remove``)."""

    ATTN = "attn"
    MLP = "mlp"


#: What may go when ``remove`` is not given, where the latency table can price it (BENCHMARKS.md §2b).
DEFAULT_REMOVE: tuple[Sublayer, ...] = (Sublayer.ATTN, Sublayer.MLP)


def parse_remove(text: str) -> tuple[Sublayer, ...]:
    """``attn,mlp``, ``attn``, ``mlp`` or ``none``."""
    words = [w.strip() for w in text.split(",") if w.strip()]
    if words == ["none"]:
        return ()
    if not words or "none" in words:
        raise ConfigError(f"--remove takes 'none' or a comma-separated list of attn, mlp; got {text!r}")
    out = tuple(dict.fromkeys(_enum(Sublayer, w, "sub-layer to remove") for w in words))
    return tuple(sorted(out, key=list(Sublayer).index))


class TargetKind(enum.Enum):
    LATENCY_MS = "latency_ms"  # predicted latency in the LUT's unit (ms)
    RATIO = "ratio"  # fraction of the starting model's predicted latency


_TIME_UNITS_MS = {"ms": 1.0, "us": 1e-3, "s": 1e3}
_TIME = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms|us|s)?\s*$")


@dataclass(frozen=True)
class Target:
    """Stop (or save a variant) once the predicted latency is at or below this."""

    kind: TargetKind
    value: float

    def __post_init__(self) -> None:
        if not isinstance(self.value, int | float) or isinstance(self.value, bool) or not math.isfinite(self.value):
            raise ConfigError(f"target value must be a finite number, got {self.value!r}")
        if self.value <= 0:
            raise ConfigError(f"target must be positive, got {self.value}")
        if self.kind is TargetKind.RATIO and self.value >= 1:
            raise ConfigError(f"target ratio must be below 1 (a fraction of the dense latency), got {self.value}")

    @classmethod
    def latency(cls, text: str | float) -> Target:
        """``5ms``, ``5`` (ms), ``800us`` or ``0.005s``."""
        if isinstance(text, int | float):
            return cls(TargetKind.LATENCY_MS, float(text))
        match = _TIME.match(text)
        if not match:
            raise ConfigError(f"cannot read latency target {text!r}; write e.g. 5ms, 800us or 0.005s")
        return cls(TargetKind.LATENCY_MS, float(match.group(1)) * _TIME_UNITS_MS[match.group(2) or "ms"])

    @classmethod
    def ratio(cls, value: float) -> Target:
        return cls(TargetKind.RATIO, float(value))

    @property
    def label(self) -> str:
        """A folder-friendly name: ``latency_5ms`` or ``ratio_0.5``."""
        if self.kind is TargetKind.LATENCY_MS:
            return f"latency_{self.value:g}ms"
        return f"ratio_{self.value:g}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "value": self.value}

    @classmethod
    def from_dict(cls, data: Any) -> Target:
        if not isinstance(data, Mapping) or set(data) != {"kind", "value"}:
            raise ConfigError(f"a target must be an object with 'kind' and 'value', got {data!r}")
        return cls(_enum(TargetKind, data["kind"], "target kind"), data["value"])


@dataclass(frozen=True)
class PruneConfig:
    """Everything that decides what the pruning loop does (saved with checkpoints and variants)."""

    targets: tuple[Target, ...]
    group_size: int = 8
    interval: int = DEFAULT_INTERVAL  # training steps between pruning steps
    pace: float = DEFAULT_PACE  # fraction of the starting predicted latency removed per pruning step
    saliency_window: int | None = None  # last N steps of each interval feed the saliency (None: all)
    ranking: RankingMethod = DEFAULT_RANKING
    latency_weight: float = DEFAULT_LATENCY_WEIGHT  # λ, unit-free (see nvit.pruning.regularizer)
    saliency_norm: SaliencyNorm = SaliencyNorm.NONE
    saliency_ema: float = DEFAULT_EMA  # momentum of the unit scores across pruning steps (0: off)
    min_heads: int = 1
    min_embed_dim: int | None = None  # None: the table's smallest measured width (or one group)
    remove: tuple[Sublayer, ...] | None = None  # whole sub-layers that may go; None: DEFAULT_REMOVE if priced
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.05
    seed: int = 0
    checkpoint_every: int | None = None  # steps between checkpoints (None: at every pruning step)
    extra: Mapping[str, Any] = field(default_factory=dict)  # free-form provenance, e.g. the loss recipe

    def __post_init__(self) -> None:
        if not isinstance(self.targets, tuple):
            object.__setattr__(self, "targets", tuple(self.targets))
        if not self.targets or not all(isinstance(t, Target) for t in self.targets):
            raise ConfigError("at least one target (latency or ratio) is required")
        if len(set(self.targets)) != len(self.targets):
            raise ConfigError("targets must be distinct")
        for name in ("group_size", "interval", "min_heads", "batch_size"):
            _positive_int(name, getattr(self, name))
        for name in ("saliency_window", "checkpoint_every", "min_embed_dim"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if self.saliency_window is not None and self.saliency_window > self.interval:
            raise ConfigError(f"saliency_window {self.saliency_window} exceeds interval {self.interval}")
        _int("seed", self.seed)
        for name in ("latency_weight", "lr", "weight_decay", "pace", "saliency_ema"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a finite non-negative number, got {value!r}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if not 0 < self.pace < 1:
            raise ConfigError(f"pace must be a fraction of the starting latency in (0, 1), got {self.pace}")
        if self.saliency_ema >= 1:
            raise ConfigError(f"saliency_ema must be below 1, got {self.saliency_ema}")
        if not isinstance(self.ranking, RankingMethod):
            raise ConfigError(f"ranking must be a RankingMethod, got {self.ranking!r}")
        if not isinstance(self.saliency_norm, SaliencyNorm):
            raise ConfigError(f"saliency_norm must be a SaliencyNorm, got {self.saliency_norm!r}")
        if not isinstance(self.extra, Mapping):
            raise ConfigError("extra must be an object")
        if self.remove is not None:
            if isinstance(self.remove, str) or not all(isinstance(r, Sublayer) for r in self.remove):
                raise ConfigError(f"remove must be a list of sub-layers (attn, mlp), got {self.remove!r}")
            object.__setattr__(self, "remove", tuple(sorted(set(self.remove), key=list(Sublayer).index)))

    @property
    def window(self) -> int:
        return self.saliency_window or self.interval

    @property
    def checkpoint_interval(self) -> int:
        return self.checkpoint_every or self.interval

    @property
    def uses_latency_term(self) -> bool:
        """Whether the ranking prices groups by a latency model (η fixed at the first step)."""
        return self.ranking in (RankingMethod.LATENCY, RankingMethod.FLOPS)

    def minimums(self) -> Minimums:
        """The configured minimums (the pruning loop raises them to the latency table's grid)."""
        return Minimums(heads=self.min_heads, embed_dim=self.min_embed_dim)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"version": CONFIG_VERSION}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "targets":
                value = [t.to_dict() for t in value]
            elif isinstance(value, enum.Enum):
                value = value.value
            elif f.name == "remove":
                value = None if value is None else [r.value for r in value]
            elif f.name == "extra":
                value = dict(value)
            data[f.name] = value
        return data

    @classmethod
    def from_dict(cls, data: Any) -> PruneConfig:
        if not isinstance(data, Mapping):
            raise ConfigError(f"a pruning config must be an object, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise ConfigError(f"unsupported pruning config version {version!r} (this nvit reads {CONFIG_VERSION})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown pruning config key(s): {', '.join(unknown)}")
        if "targets" not in data:
            raise ConfigError("pruning config is missing 'targets'")
        if not isinstance(data["targets"], list | tuple):
            raise ConfigError("'targets' must be a list")
        data["targets"] = tuple(Target.from_dict(t) for t in data["targets"])
        if "saliency_norm" in data:
            data["saliency_norm"] = _enum(SaliencyNorm, data["saliency_norm"], "saliency_norm")
        if "ranking" in data:
            data["ranking"] = _enum(RankingMethod, data["ranking"], "ranking")
        if data.get("remove") is not None:
            if not isinstance(data["remove"], list | tuple):
                raise ConfigError("'remove' must be a list of sub-layers (attn, mlp) or null")
            data["remove"] = tuple(_enum(Sublayer, r, "sub-layer to remove") for r in data["remove"])
        return cls(**data)


def _enum(cls: type[enum.Enum], value: Any, what: str) -> Any:
    if isinstance(value, cls):
        return value
    try:
        return cls(value)
    except ValueError:
        raise ConfigError(f"unknown {what} {value!r}; choose from {', '.join(str(m.value) for m in cls)}") from None


def _int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{name} must be an integer, got {value!r}")


def _positive_int(name: str, value: Any) -> None:
    _int(name, value)
    if value <= 0:
        raise ConfigError(f"{name} must be positive, got {value}")
