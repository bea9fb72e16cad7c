"""A fake latency backend whose latency is a known function of the widths: the oracle for LUT tests.

Attention and MLP halves are multilinear in their widths (like their FLOPs), a block is ``RATIO`` times
the sum of its halves, a block that kept one sub-layer ``ONE_HALF_RATIO`` times that half, and a whole
model is ``SCALE · (Σ blocks + fixed) + OFFSET``, so a correct
sweep + predictor + calibration reproduces every latency exactly.
"""

from __future__ import annotations

from typing import Any

from nvit.arch import ArchSpec
from nvit.profiler.base import Backend, Workload
from nvit.profiler.device import CpuInfo, DeviceFingerprint
from nvit.profiler.harness import TimingStats
from nvit.profiler.space import SearchSpace
from nvit.vocab import DeviceKind, PartConfig, PartKind, Precision

RATIO = 0.95  # block / (attn + mlp)
ONE_HALF_RATIO = 0.98  # attention-only block / attn, MLP-only block / mlp
SCALE = 1.05  # whole model / sum of parts
OFFSET_MS = -0.01  # within the floor: a fixed part (>= 0.02 ms) keeps more than half its own time


def attn_ms(e: float, h: float, q: float, v: float) -> float:
    return 0.01 + 2e-7 * e * h * (2 * q + v) + 1e-5 * h * (q + v) + 3e-7 * h * v * e + 1e-5 * e


def mlp_ms(e: float, m: float) -> float:
    return 0.005 + 4e-7 * e * m + 2e-5 * e


def fixed_ms(e: float) -> float:
    return 0.02 + 1e-4 * e


def block_ms(e: float, h: float, q: float, v: float, m: float) -> float:
    """A block; ``h = 0`` (no attention) or ``m = 0`` (no MLP) is a one-half block."""
    if h and m:
        return RATIO * (attn_ms(e, h, q, v) + mlp_ms(e, m))
    return ONE_HALF_RATIO * (attn_ms(e, h, q, v) if h else mlp_ms(e, m))


def model_ms(spec: ArchSpec) -> float:
    e = spec.embed_dim
    total = sum(block_ms(e, b.heads, b.qk_dim, b.v_dim, b.mlp_dim) for b in spec.blocks) + fixed_ms(e)
    return SCALE * total + OFFSET_MS


def config_ms(c: PartConfig) -> float:
    if c.kind is PartKind.ATTN:
        return attn_ms(c.embed_dim, c.heads, c.qk_dim, c.v_dim)
    if c.kind is PartKind.MLP:
        return mlp_ms(c.embed_dim, c.mlp_dim)
    if c.kind in (PartKind.BLOCK, PartKind.ATTN_BLOCK, PartKind.MLP_BLOCK):
        return block_ms(c.embed_dim, c.heads, c.qk_dim, c.v_dim, c.mlp_dim)
    return fixed_ms(c.embed_dim)


def stats(latency_ms: float) -> TimingStats:
    return TimingStats(latency_ms_median=latency_ms, latency_ms_mean=latency_ms * 1.01,
                       latency_ms_p10=latency_ms * 0.99, latency_ms_p90=latency_ms * 1.02,
                       latency_ms_p99=latency_ms * 1.05, latency_ms_std=latency_ms * 0.01, cov=0.01,
                       ci95_halfwidth_ms=latency_ms * 0.005, n_samples=50, n_repeats=3, repeat_rel_spread=0.01,
                       repeat_settle_gap=0.01,
                       stop_reason="converged")


class Killed(Exception):
    """Raised by the fake backend to simulate the process dying in the middle of a measurement."""


class FakeBackend(Backend):
    """``drift_per_call`` multiplies every latency by ``1 + drift_per_call · calls`` (a slowly heating
    machine); ``kill_after`` raises :class:`Killed` on that measurement; ``sleep_s`` slows each one."""

    name = "fake"

    def __init__(self, *, device: DeviceKind = DeviceKind.CPU, precision: Precision = Precision.FP32,
                 batch_size: int = 1, drift_per_call: float = 0.0, kill_after: int | None = None,
                 sleep_s: float = 0.0, **options: Any) -> None:
        super().__init__(device=device, precision=precision, batch_size=batch_size, **options)
        self.drift_per_call = drift_per_call
        self.kill_after = kill_after
        self.sleep_s = sleep_s
        self.calls: list[str] = []

    def latency_of(self, workload: Workload) -> float:
        from swin_fakes import workload_ms

        swin = workload_ms(workload.module)
        config = getattr(workload.module, "nvit_config", None)
        if swin is None:
            swin = config_ms(config) if config is not None else model_ms(workload.module.spec)
        base = swin
        return base * (1.0 + self.drift_per_call * len(self.calls))

    def _measure_impl(self, workload: Workload) -> TimingStats:
        if self.kill_after is not None and len(self.calls) >= self.kill_after:
            raise Killed(workload.name)
        if self.sleep_s:
            import time

            time.sleep(self.sleep_s)
        latency = self.latency_of(workload)
        self.calls.append(workload.name)
        return stats(latency)

    def versions(self) -> dict[str, str]:
        return {"fake": "1.0"}


def register_fake(monkeypatch: Any, name: str = "fake", cls: type[Backend] = FakeBackend) -> None:
    """Register ``cls`` as backend ``name`` until the test ends (the registry is global)."""
    from nvit.profiler import base

    base.get_backend("onnxruntime")  # load the built-in backends first
    monkeypatch.setitem(base._REGISTRY, name, lambda: cls)


def fake_device(cpu: str = "Test CPU 9000") -> DeviceFingerprint:
    info = CpuInfo(model_name=cpu, logical_cores=2, available_cores=2, threads_used=1, platform="test",
                   machine="x86_64", python_version="3.11")
    return DeviceFingerprint(kind=DeviceKind.CPU, cpu=info, gpu=None, versions={"torch": "test"})


def tiny_space(**changes: Any) -> SearchSpace:
    """A small space on ``vit_test`` (17 tokens): 2 x 2 x 2 x 2 attention, 2 x 3 MLP; no one-half blocks unless
    ``half_blocks_per_embed`` is given (a width-only table, as tables were before sub-layer removal), no narrow
    blocks unless ``narrow_blocks=True``."""
    from nvit.presets import preset

    kwargs: dict[str, Any] = dict(base=preset("vit_test"), embed_dims=(32, 64), heads=(2, 4), qk_dims=(8, 16),
                                  v_dims=(8, 16), mlp_dims=(64, 128, 256), blocks_per_embed=2,
                                  half_blocks_per_embed=0, narrow_blocks=False, name="tiny")
    kwargs.update(changes)
    return SearchSpace(**kwargs)


def tiny_table(path: Any, *, calibration_models: int = 2) -> Any:
    """Profile :func:`tiny_space` with the fake backend into ``path`` (a calibrated table); returns ``path``."""
    from nvit.profiler.sweep import SweepOptions, run_sweep

    with FakeBackend() as backend:
        run_sweep(tiny_space(), backend, path, device=fake_device(),
                  options=SweepOptions(calibration_models=calibration_models))
    return path
