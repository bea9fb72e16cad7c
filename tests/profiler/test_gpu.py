"""On a real GPU (marked ``gpu``; TensorRT ones also ``trt``; all skip without one): the CUDA-event timer
agrees with the wall clock and scales with the work, a captured graph replays the real work, each backend
times in CUDA-graph mode, the fingerprint describes the device under load, and missing GPU packages are
refused in one line. ``scripts/gpu_check.sh`` runs these with ``pytest -m gpu``."""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch

from nvit.errors import BackendError
from nvit.presets import preset
from nvit.profiler.backends.cuda_timer import CudaTimer, TorchCuda
from nvit.profiler.base import get_backend
from nvit.profiler.harness import HarnessConfig
from nvit.profiler.workloads import part_workload
from nvit.vocab import DeviceKind, PartConfig, PartKind, Precision, TimingMode

HAS_CUDA = torch.cuda.is_available()
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]
QUICK = HarnessConfig.gpu().replace(warmup_s=0.2, time_cap_s=0.5)
DEIT_S = preset("deit_small")


def _gemm(api: TorchCuda, n_out: int):
    """A fp16 GEMM of 4096 x 4096 x n_out (2·4096²·n_out FLOPs), enqueued on ``api``'s stream."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    with api.on_stream():
        x = torch.randn(4096, 4096, device=api.device, dtype=torch.float16, generator=gen)
        w = torch.randn(n_out, 4096, device=api.device, dtype=torch.float16, generator=gen)
        out = torch.empty(4096, n_out, device=api.device, dtype=torch.float16)
    return lambda: torch.mm(x, w.t(), out=out)


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def test_cuda_event_time_matches_the_wall_clock_and_scales_with_the_work():
    api = TorchCuda(0)
    per_iter_ms = {}
    for n_out in (4096, 8192):
        timer = CudaTimer(api, _gemm(api, n_out), min_sample_ms=20.0).prepare()
        assert timer.mode is TimingMode.CUDA_GRAPH
        events, walls = [], []
        for _ in range(9):
            t0 = time.perf_counter()
            events.append(timer())  # K replays between two events, then waits for the end event
            walls.append((time.perf_counter() - t0) * 1e3 / timer.iters_per_sample)
        event_ms, wall_ms = _median(events), _median(walls)
        assert 0.85 <= event_ms / wall_ms <= 1.15, (n_out, event_ms, wall_ms, timer.iters_per_sample)
        per_iter_ms[n_out] = event_ms
    assert 1.7 <= per_iter_ms[8192] / per_iter_ms[4096] <= 2.3, per_iter_ms  # twice the FLOPs


def test_a_captured_graph_replays_the_real_work():
    api = TorchCuda(0)
    block = part_workload(PartConfig(PartKind.BLOCK, 384, 6, 64, 64, 1536), DEIT_S, 1)
    model = block.module.to("cuda").eval()
    torch.cuda.synchronize()  # the weights are on the device before another stream reads them
    with api.on_stream():
        x = torch.randn(block.input_shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    result = {}

    def launch():
        with torch.inference_mode():
            result["y"] = model(x)

    with api.on_stream():
        launch()
    api.synchronize()
    eager = result["y"].clone()
    replay = api.capture(launch)  # result["y"] is now the graph's static output
    with api.on_stream():
        result["y"].zero_()
        replay()
    api.synchronize()
    assert result["y"].abs().sum() > 0 and torch.allclose(result["y"], eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("precision", [Precision.FP32, Precision.FP16, Precision.BF16])
def test_torch_backend_times_deit_small_parts_with_cuda_graphs(precision):
    configs = [PartConfig(PartKind.MLP, 384, mlp_dim=384), PartConfig(PartKind.MLP, 384, mlp_dim=1536),
               PartConfig(PartKind.ATTN, 384, heads=6, qk_dim=64, v_dim=64),
               PartConfig(PartKind.BLOCK, 384, 6, 64, 64, 1536), PartConfig(PartKind.FIXED, 384)]
    with get_backend("torch")(device=DeviceKind.CUDA, precision=precision, batch_size=1, harness=QUICK) as backend:
        stats = backend.measure_many([part_workload(c, DEIT_S, 1) for c in configs])
        info, settings = backend.timer_info(), backend.settings()
    assert {i["mode"] for i in info.values()} == {"cuda_graph"} and settings["timing_mode"] == "cuda_graph"
    assert all(s.latency_ms_median > 0 and s.stop_reason for s in stats)
    assert stats[1].latency_ms_median >= 0.9 * stats[0].latency_ms_median  # 4x the MLP is not faster
    assert stats[3].latency_ms_median >= 0.9 * stats[2].latency_ms_median  # a block holds the attention
    assert settings["tf32"] is True and settings["sdpa_backends"]["math"] in (True, False)


def test_plain_launches_when_graphs_are_off():
    w = part_workload(PartConfig(PartKind.MLP, 384, mlp_dim=768), DEIT_S, 1)
    with get_backend("torch")(device=DeviceKind.CUDA, precision=Precision.FP16, batch_size=1, harness=QUICK,
                              cuda_graphs=False) as backend:
        assert backend.measure(w).latency_ms_median > 0
        assert backend.timer_info()[w.name]["mode"] == "launch" and backend.settings()["timing_mode"] == "launch"


def test_torch_compile_compiles_each_width_once():
    from torch._dynamo.utils import counters

    workloads = [part_workload(PartConfig(PartKind.MLP, 384, mlp_dim=m), DEIT_S, 1) for m in (768, 1536)]
    with get_backend("torch")(device=DeviceKind.CUDA, precision=Precision.FP16, batch_size=1, harness=QUICK,
                              compile=True) as backend:
        before = counters["stats"]["unique_graphs"]
        stats = backend.measure_many(workloads)
        graphs = counters["stats"]["unique_graphs"] - before
        assert {i["mode"] for i in backend.timer_info().values()} == {"cuda_graph"}
    assert graphs == len(workloads) and all(s.latency_ms_median > 0 for s in stats)  # no recompile per call


def test_fingerprint_of_this_device():
    from nvit.profiler.device import backend_fingerprint, fingerprint

    fp = fingerprint(DeviceKind.CUDA)
    gpu, props = fp.gpu, torch.cuda.get_device_properties(0)
    assert gpu.name == props.name and gpu.sm_count == props.multi_processor_count
    assert gpu.compute_capability == "{}.{}".format(*torch.cuda.get_device_capability(0))
    assert gpu.uuid[:4] in ("GPU-", "MIG-") and len(gpu.uuid) == 40 and gpu.mig == gpu.uuid.startswith("MIG-")
    if gpu.clocks is not None:  # NVML or nvidia-smi is there
        assert gpu.clocks.under_load and gpu.driver_version
        if gpu.clocks.sm_clock_mhz and gpu.clocks.max_sm_clock_mhz:
            assert gpu.clocks.sm_clock_mhz >= 0.5 * gpu.clocks.max_sm_clock_mhz, gpu.clocks  # not the idle clock
    backend = get_backend("torch")(device=DeviceKind.CUDA, precision=Precision.FP16, batch_size=1)
    assert backend_fingerprint(backend, warm_up_s=0.0).identity() == fp.identity()


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed")
def test_missing_tensorrt_is_refused_in_one_line():
    with pytest.raises(BackendError) as err, get_backend("tensorrt")(device=DeviceKind.CUDA,
                                                                     precision=Precision.FP16, batch_size=1):
        pass
    assert str(err.value) == "TensorRT is not installed: pip install 'nvit[trt]'"


def test_onnxruntime_without_its_cuda_provider_is_refused_in_one_line():
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed")
    with pytest.raises(BackendError, match=r"has no CUDAExecutionProvider .*onnxruntime-gpu"), \
            get_backend("onnxruntime")(device=DeviceKind.CUDA, precision=Precision.FP16, batch_size=1):
        pass


# ---- TensorRT ------------------------------------------------------------------------------------------------
@pytest.mark.trt
@pytest.mark.skipif(not HAS_TRT, reason="needs TensorRT")
@pytest.mark.parametrize("precision", [Precision.FP16, Precision.FP32])
def test_tensorrt_times_a_block_with_torch_buffers_and_cuda_graphs(tmp_path, precision):
    w = part_workload(PartConfig(PartKind.BLOCK, 384, 6, 64, 64, 1536), DEIT_S, 1)
    with get_backend("tensorrt")(device=DeviceKind.CUDA, precision=precision, batch_size=1, harness=QUICK,
                                 cache_dir=tmp_path) as backend:
        stats = backend.measure(w)
        assert backend.timer_info()[w.name]["mode"] == "cuda_graph" and backend.versions()["cuda_api"] == "torch"
    assert stats.latency_ms_median > 0 and list(tmp_path.glob("timing-*.cache"))


@pytest.mark.trt
@pytest.mark.skipif(not HAS_TRT, reason="needs TensorRT")
@pytest.mark.parametrize("tf32", [True, False])
def test_an_exported_fp32_engine_passes_its_own_check(tmp_path, tf32):
    from nvit.export.engine import build_engine_file
    from nvit.models import build_model

    model = build_model(preset("vit_test"), seed=0).eval()
    _, meta = build_engine_file(model, tmp_path / "m.engine", (2, 1, 8, 8), Precision.FP32, tf32=tf32,
                                cache_dir=tmp_path)
    assert meta["tf32"] is tf32 and meta["check"]["passed"]
    assert meta["check"]["tolerance"] == ("tf32" if tf32 else "fp32")
