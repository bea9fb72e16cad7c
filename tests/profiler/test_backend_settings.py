"""Settings of the torch and onnxruntime backends that only matter on a GPU, checked on a CPU: torch.compile's
options and dynamo limits, inference mode, TF32 / cudnn.benchmark set and restored, the device index, and the
onnxruntime TensorRT provider chain."""

from __future__ import annotations

import sys

import pytest
import torch
import torch._dynamo
from fake_gpu import fake_onnxruntime

from nvit.errors import BackendError
from nvit.profiler.backends import torch_backend
from nvit.profiler.backends.torch_backend import COMPILE_RECOMPILE_LIMIT, check_compile_mode
from nvit.profiler.base import Workload, get_backend
from nvit.profiler.harness import HarnessConfig
from nvit.vocab import DeviceKind, Precision

FAST = HarnessConfig(warmup_s=0.0, rewarm_s=0.0, min_samples=3, max_samples=5, time_cap_s=0.05, repeats=1)
CPU32 = {"device": DeviceKind.CPU, "precision": Precision.FP32, "batch_size": 1}


class Recorder(torch.nn.Module):
    """Records whether each call ran in inference mode."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.modes: list[bool] = []

    def forward(self, x):
        self.modes.append(torch.is_inference_mode_enabled())
        return self.lin(x)


# ---- torch.compile ---------------------------------------------------------------------------------------
@pytest.fixture
def fake_compile(monkeypatch):
    calls = []

    def compile(model, **kwargs):
        calls.append({**kwargs, "recompile_limit": torch._dynamo.config.recompile_limit,
                      "fail": torch._dynamo.config.fail_on_recompile_limit_hit})
        return model

    monkeypatch.setattr(torch, "compile", compile)
    return calls


def test_compiled_workloads_are_static_whole_graph_and_in_inference_mode(fake_compile):
    limit_before = torch._dynamo.config.recompile_limit
    workload = Workload("rec", Recorder(), (1, 4))
    with get_backend("torch")(**CPU32, harness=FAST, compile=True, intra_op_threads=1) as backend:
        backend.measure(workload)
        settings = backend.settings()
    assert fake_compile == [{"mode": None, "dynamic": False, "fullgraph": True,
                             "recompile_limit": COMPILE_RECOMPILE_LIMIT, "fail": True}]
    assert torch._dynamo.config.recompile_limit == limit_before  # restored after the session
    assert torch._dynamo.config.fail_on_recompile_limit_hit is False
    assert settings["compile_options"]["dynamic"] is False and settings["compile_options"]["fullgraph"] is True
    assert settings["compile_options"]["dynamo"]["recompile_limit"] == COMPILE_RECOMPILE_LIMIT
    assert settings["inference_mode"] is True and settings["timing_mode"] == "host_clock"
    assert workload.module.modes == []  # the backend ran its own copy


def test_every_call_runs_in_inference_mode(monkeypatch):
    copies = []
    real_copy = torch_backend.module_copy

    def spy(workload, precision, device="cpu"):
        copies.append(real_copy(workload, precision, device))
        return copies[-1]

    monkeypatch.setattr(torch_backend, "module_copy", spy)
    with get_backend("torch")(**CPU32, harness=FAST, intra_op_threads=1) as backend:
        backend.measure(Workload("rec", Recorder(), (1, 4)))
    assert len(copies[0].modes) >= 1 + FAST.min_samples and all(copies[0].modes)


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_compile_modes_with_their_own_cuda_graphs_are_refused(mode):
    with pytest.raises(BackendError, match=f"mode '{mode}' captures its own CUDA graphs"):
        get_backend("torch")(**CPU32, compile=True, compile_mode=mode)
    check_compile_mode("max-autotune-no-cudagraphs")
    check_compile_mode(None)
    with pytest.raises(BackendError, match=r"unknown torch\.compile mode 'fastest'"):
        check_compile_mode("fastest")


def test_a_compile_failure_is_one_error_not_an_eager_fallback(monkeypatch):
    def broken(model, **kwargs):
        def run(x):
            raise RuntimeError("Unsupported: graph break in forward\n(long details)")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(BackendError, match=r"torch\.compile failed for 'rec': Unsupported: graph break in forward$"), \
            get_backend("torch")(**CPU32, harness=FAST, compile=True) as backend:
        backend.measure(Workload("rec", Recorder(), (1, 4)))


# ---- CUDA settings through a stand-in device ------------------------------------------------------------
class FakeTorchCuda:
    can_capture = True
    made: list[int] = []  # noqa: RUF012

    def __init__(self, index: int) -> None:
        self.made.append(index)

    def close(self) -> None:
        pass


@pytest.fixture
def two_gpus(monkeypatch):
    FakeTorchCuda.made = []
    monkeypatch.setattr(torch_backend, "require_cuda_torch", lambda: torch)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch_backend, "TorchCuda", FakeTorchCuda)
    return FakeTorchCuda.made


def test_tf32_and_cudnn_benchmark_are_set_for_the_session_recorded_and_restored(two_gpus):
    flags = (torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32"), \
            (torch.backends.cudnn, "benchmark")
    before = [getattr(o, a) for o, a in flags]
    backend = get_backend("torch")(device=DeviceKind.CUDA, precision=Precision.FP32, batch_size=1, tf32=False,
                                   cudnn_benchmark=True, cuda_index=1)
    with backend:
        assert [getattr(o, a) for o, a in flags] == [False, False, True]
        assert two_gpus == [1]  # the device asked for, not GPU 0
        settings = backend.settings()
    assert [getattr(o, a) for o, a in flags] == before
    assert settings["tf32"] is False and settings["cudnn_benchmark"] is True
    assert set(settings["sdpa_backends"]) == {"flash", "mem_efficient", "math", "cudnn"}
    assert settings["timing_mode"] == "cuda_graph" and "cuda_index" not in settings["options"]
    default = get_backend("torch")(device=DeviceKind.CUDA, precision=Precision.FP32, batch_size=1)
    with default:
        assert torch.backends.cuda.matmul.allow_tf32 is True  # explicit, like TensorRT's default
    assert default.settings()["tf32"] is True and default.settings()["cudnn_benchmark"] is False
    with pytest.raises(BackendError, match="no CUDA device 2 \\(this machine has 2\\)"):
        get_backend("torch")(device=DeviceKind.CUDA, precision=Precision.FP16, batch_size=1, cuda_index=2).__enter__()


# ---- onnxruntime's TensorRT provider ----------------------------------------------------------------------
def _ort_backend(monkeypatch, tmp_path, available, **kwargs):
    ort = fake_onnxruntime(available, **kwargs)
    monkeypatch.setitem(sys.modules, "onnxruntime", ort)
    backend = get_backend("onnxruntime")(device=DeviceKind.CUDA, precision=Precision.FP16, batch_size=1,
                                         provider="tensorrt", cuda_index=1, cache_dir=tmp_path)
    return ort, backend


def test_tensorrt_provider_falls_back_to_cuda_not_the_cpu_with_caches_and_fp16(monkeypatch, tmp_path):
    ort, backend = _ort_backend(monkeypatch, tmp_path, ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                                         "CPUExecutionProvider"])
    with backend:
        backend._session("model.onnx")
    (session,) = ort.sessions
    assert session.asked == [
        ("TensorrtExecutionProvider", {"device_id": 1, "trt_fp16_enable": True, "trt_engine_cache_enable": True,
                                       "trt_timing_cache_enable": True,
                                       "trt_engine_cache_path": str(tmp_path / "engines"),
                                       "trt_timing_cache_path": str(tmp_path)}),
        ("CUDAExecutionProvider", {"device_id": 1}),
    ]
    assert (tmp_path / "engines").is_dir()
    recorded = backend.settings()["providers"]  # what changes latency; not where the caches are
    assert recorded == [{"name": "TensorrtExecutionProvider",
                         "options": {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
                                     "trt_timing_cache_enable": True}},
                        {"name": "CUDAExecutionProvider", "options": {}}]


def test_a_session_without_a_provider_it_asked_for_is_refused(monkeypatch, tmp_path):
    _, backend = _ort_backend(monkeypatch, tmp_path, ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                                      "CPUExecutionProvider"],
                              session_gets=["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(BackendError, match="fell back to CUDAExecutionProvider, CPUExecutionProvider without "
                                           "TensorrtExecutionProvider"), backend:
        backend._session("model.onnx")
    _, backend = _ort_backend(monkeypatch, tmp_path, ["TensorrtExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(BackendError, match="has no CUDAExecutionProvider"), backend:
        pass
