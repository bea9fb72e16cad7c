"""Backends (registry, onnxruntime, torch, TensorRT), their error paths, and the device fingerprint."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import threading

import pytest
import torch

from nvit.errors import BackendError
from nvit.profiler.backends import default_backend
from nvit.profiler.backends.common import workload_key
from nvit.profiler.backends.tensorrt_backend import INSTALL_HINT, builder_settings
from nvit.profiler.backends.trt_common import TimingCacheFile, default_cache_dir, timing_cache_path
from nvit.profiler.base import Backend, PreparedWorkload, Workload, backend_names, get_backend
from nvit.profiler.device import (
    CpuInfo,
    DeviceFingerprint,
    GpuClocks,
    GpuInfo,
    fingerprint,
    parse_cgroup_cpu_max,
    parse_cpuinfo_model,
    parse_nvidia_smi_csv,
)
from nvit.profiler.harness import HarnessConfig
from nvit.vocab import DeviceKind, Precision

FAST = HarnessConfig(warmup_s=0.02, rewarm_s=0.01, min_samples=10, max_samples=500, time_cap_s=0.3, repeats=2)
CPU32 = {"device": DeviceKind.CPU, "precision": Precision.FP32, "batch_size": 1}
HAS_CUDA = torch.cuda.is_available()
HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def linear_workload(d_in: int = 32, d_out: int = 16, tokens: int = 8, name: str = "linear") -> Workload:
    torch.manual_seed(0)
    return Workload(name, torch.nn.Linear(d_in, d_out), (1, tokens, d_in))


def assert_sane(stats, cfg=FAST):
    assert stats.latency_ms_median > 0
    assert stats.latency_ms_p10 <= stats.latency_ms_median <= stats.latency_ms_p90 <= stats.latency_ms_p99
    assert stats.n_samples >= cfg.min_samples
    assert cfg.repeats <= stats.n_repeats <= cfg.repeats + cfg.recover_rounds  # recovery rounds when unsettled


# ---- registry and base class ------------------------------------------------------------------------
def test_registry_names_and_defaults():
    assert {"onnxruntime", "torch", "tensorrt"} <= set(backend_names())
    assert default_backend(DeviceKind.CPU) == "onnxruntime" and default_backend(DeviceKind.CUDA) == "tensorrt"
    with pytest.raises(BackendError, match="unknown backend 'nope'; known: onnxruntime"):
        get_backend("nope")


def test_strict_options_and_batch_check():
    with pytest.raises(BackendError, match="has no option"):
        get_backend("onnxruntime")(**CPU32, intra_op_thread=2)
    with pytest.raises(BackendError, match="unknown harness setting"):
        get_backend("torch")(**CPU32, harness={"repeat": 3})
    backend = get_backend("torch")(**CPU32)
    with pytest.raises(BackendError, match="has batch 4, backend expects 1"):
        backend.measure(Workload("w", torch.nn.Identity(), (4, 2)))


class _FakeBackend(Backend):
    """Host-timed workloads whose cost is a busy loop proportional to their input size."""

    name = "fake"
    released: list[str] = []  # noqa: RUF012

    def _prepare_impl(self, workload):
        n = workload.input_shape[-1]
        return PreparedWorkload(run=lambda: sum(range(n)), release=lambda: self.released.append(workload.name))


def test_measure_many_prepares_interleaves_and_releases():
    backend = _FakeBackend(**CPU32, harness=FAST)
    small, big = Workload("small", None, (1, 10)), Workload("big", None, (1, 100_000))
    s_small, s_big = backend.measure_many([small, big])
    assert_sane(s_small) and assert_sane(s_big)
    assert s_big.latency_ms_median > 20 * s_small.latency_ms_median  # 10^4 x the work
    assert backend.released == ["small", "big"]
    assert backend.settings()["harness"] == FAST.to_dict()


# ---- onnxruntime --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ort_backend():
    with get_backend("onnxruntime")(**CPU32, harness=FAST, intra_op_threads=1) as backend:
        yield backend


def test_onnxruntime_cpu_times_a_linear_layer(ort_backend):
    small = linear_workload()
    big = linear_workload(512, 512, 128, name="big")
    s_small, s_big = ort_backend.measure_many([small, big])
    assert_sane(s_small) and assert_sane(s_big)
    assert s_big.latency_ms_median > 5 * s_small.latency_ms_median  # ~2000x the multiply-adds
    settings = ort_backend.settings()
    assert settings["provider"] == "CPUExecutionProvider" and settings["intra_op_threads"] == 1
    assert "onnxruntime" in ort_backend.versions()


def test_onnxruntime_export_cache_is_per_workload(ort_backend):
    w = linear_workload()
    assert ort_backend._cache.path(w, Precision.FP32) == ort_backend._cache.path(linear_workload(), Precision.FP32)
    assert workload_key(w, Precision.FP32) != workload_key(linear_workload(tokens=9), Precision.FP32)
    assert workload_key(w, Precision.FP32) != workload_key(w, Precision.FP16)


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")
def test_onnxruntime_cuda_is_refused_without_the_provider():
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed")
    backend = get_backend("onnxruntime")(device=DeviceKind.CUDA, precision=Precision.FP16, batch_size=1)
    with pytest.raises(BackendError, match=r"has no CUDAExecutionProvider.*onnxruntime-gpu"), backend:
        pass


def test_onnxruntime_bad_configurations():
    with pytest.raises(BackendError, match="CPU tables are fp32"):
        get_backend("onnxruntime")(device=DeviceKind.CPU, precision=Precision.FP16, batch_size=1)
    with pytest.raises(BackendError, match="does not run on cpu"):
        get_backend("onnxruntime")(**CPU32, provider="cuda")
    with pytest.raises(BackendError, match="unknown onnxruntime provider"):
        get_backend("onnxruntime")(**CPU32, provider="rocm")
    with pytest.raises(BackendError, match="context manager"):
        get_backend("onnxruntime")(**CPU32).measure(linear_workload())


# ---- torch ----------------------------------------------------------------------------------------------
def test_torch_cpu_times_a_linear_layer_and_restores_threads():
    before = torch.get_num_threads()
    with get_backend("torch")(**CPU32, harness=FAST, intra_op_threads=1) as backend:
        assert torch.get_num_threads() == 1
        stats = backend.measure(linear_workload())
    assert torch.get_num_threads() == before
    assert_sane(stats)
    assert backend.settings()["compile"] is False and backend.settings()["intra_op_threads"] == 1


def test_torch_leaves_the_workload_module_untouched():
    w = linear_workload()
    weight = w.module.weight.detach().clone()
    with get_backend("torch")(**CPU32, harness=FAST) as backend:
        backend.measure(w)
    assert w.module.weight.requires_grad and torch.equal(w.module.weight, weight)


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")
def test_torch_cuda_without_a_gpu_names_the_problem():
    backend = get_backend("torch")(device=DeviceKind.CUDA, precision=Precision.FP16, batch_size=1)
    with pytest.raises(BackendError, match=r"--gpu needs a CUDA device but torch.cuda.is_available\(\) is False"):
        backend.__enter__()


# ---- TensorRT -------------------------------------------------------------------------------------------
@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed")
def test_tensorrt_missing_names_the_fix():
    backend = get_backend("tensorrt")(device=DeviceKind.CUDA, precision=Precision.FP16, batch_size=1)
    with pytest.raises(BackendError) as err, backend:
        pass
    assert str(err.value) == INSTALL_HINT == "TensorRT is not installed: pip install 'nvit[trt]'"


def test_tensorrt_settings_and_validation(tmp_path):
    with pytest.raises(BackendError, match="runs on a GPU"):
        get_backend("tensorrt")(**CPU32)
    backend = get_backend("tensorrt")(device=DeviceKind.CUDA, precision=Precision.FP16, batch_size=8,
                                      builder_optimization_level=5, cache_dir=tmp_path)
    s = backend.settings()
    assert s["builder_optimization_level"] == 5 and s["strongly_typed"] is True and s["tf32"] is True
    assert s["workspace_mib"] == 2048 and s["batch_size"] == 8 and s["buffers"] == "auto"
    assert s["harness"] == HarnessConfig.gpu().to_dict()
    # the cache folder and the device index say where, not what: recorded locally, never part of a table
    assert "cache_dir" not in s and "cuda_index" not in s and "cache_dir" not in s["options"]
    assert backend.local_settings() == {"cache_dir": str(tmp_path), "cuda_index": 0}
    other = get_backend("tensorrt")(device=DeviceKind.CUDA, precision=Precision.FP16, batch_size=8,
                                    builder_optimization_level=5, cache_dir=tmp_path / "elsewhere", cuda_index=1)
    assert other.settings() == s
    with pytest.raises(BackendError, match="between 0 and 5"):
        builder_settings({"builder_optimization_level": 7})
    with pytest.raises(BackendError, match="must be int"):
        builder_settings({"workspace_mib": "big"})
    with pytest.raises(BackendError, match="has no option"):
        get_backend("tensorrt")(device=DeviceKind.CUDA, precision=Precision.FP16, batch_size=1, fp16=True)


def test_tensorrt_timing_cache_path(tmp_path, monkeypatch):
    p = timing_cache_path(tmp_path, "NVIDIA H100 80GB HBM3", "9.0", "10.13.0.35")
    assert p == tmp_path / "timing-nvidia-h100-80gb-hbm3-sm90-trt10.13.0.35.cache"
    assert timing_cache_path(tmp_path, "NVIDIA H100 80GB HBM3", "9.0", "10.14.1") != p
    assert timing_cache_path(tmp_path, "NVIDIA A100-SXM4-40GB", "8.0", "10.13.0.35") != p
    monkeypatch.setenv("NVIT_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path / "tensorrt"


def _append_many(path: str, tag: bytes, times: int) -> None:
    cache = TimingCacheFile(path)
    for _ in range(times):
        cache.update(lambda current: current + tag)


def test_timing_cache_updates_are_serialised_across_threads_and_processes(tmp_path):
    path = tmp_path / "t.cache"
    assert TimingCacheFile(path).load() == b""
    threads = [threading.Thread(target=_append_many, args=(str(path), bytes([65 + i]), 25)) for i in range(3)]
    procs = [multiprocessing.get_context("fork").Process(target=_append_many, args=(str(path), b"z", 25))
             for _ in range(2)]
    for t in [*procs, *threads]:  # fork before starting threads
        t.start()
    for t in threads:
        t.join()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    data = TimingCacheFile(path).load()
    assert len(data) == 125 and data.count(b"A") == data.count(b"B") == data.count(b"C") == 25
    assert data.count(b"z") == 50  # no update lost
    assert not list(tmp_path.glob(".t.cache.*.tmp"))  # atomic writes leave nothing behind


# ---- device fingerprint -----------------------------------------------------------------------------
X86_CPUINFO = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nflags\t: fpu\n\n" \
              "processor\t: 1\nmodel name\t: AMD EPYC 7B13\n"
ARM_CPUINFO = "processor\t: 0\nBogoMIPS\t: 50.00\nCPU part\t: 0xd0c\n\nHardware\t: Neoverse-N1 board\n"


def test_cpuinfo_and_cgroup_parsing():
    assert parse_cpuinfo_model(X86_CPUINFO) == "AMD EPYC 7B13"
    assert parse_cpuinfo_model(ARM_CPUINFO) == "Neoverse-N1 board"
    assert parse_cpuinfo_model("processor : 0\n") is None
    assert parse_cgroup_cpu_max("200000 100000\n") == 2.0
    assert parse_cgroup_cpu_max("150000 100000") == 1.5
    assert parse_cgroup_cpu_max("max 100000") is None
    assert parse_cgroup_cpu_max("garbage") is None


def test_nvidia_smi_parsing():
    driver, clocks = parse_nvidia_smi_csv("550.54.15, 1980, 2619, 1980, 2619, 700.00, 34\n")
    assert driver == "550.54.15"
    assert clocks == GpuClocks(source="nvidia-smi", sm_clock_mhz=1980, mem_clock_mhz=2619, max_sm_clock_mhz=1980,
                               max_mem_clock_mhz=2619, power_limit_w=700.0, temperature_c=34)
    _, partial = parse_nvidia_smi_csv("535.1, 345, [N/A], 1410, 1215, [Not Supported], 40")
    assert partial.mem_clock_mhz is None and partial.power_limit_w is None and partial.sm_clock_mhz == 345
    with pytest.raises(BackendError, match="unexpected nvidia-smi output"):
        parse_nvidia_smi_csv("only, three, fields")


def _gpu_fingerprint() -> DeviceFingerprint:
    cpu = CpuInfo("Intel Xeon", 32, 16, None, "Linux-x", "x86_64", "3.11.7")
    gpu = GpuInfo(name="NVIDIA H100 80GB HBM3", uuid="GPU-1234", index=0, sm_count=132, compute_capability="9.0",
                  total_memory_mib=81559, driver_version="550.54.15", cuda_version="12.4",
                  clocks=GpuClocks(source="nvml", sm_clock_mhz=1980, power_limit_w=700.0))
    return DeviceFingerprint(kind=DeviceKind.CUDA, cpu=cpu, gpu=gpu, versions={"tensorrt": "10.13.0.35"})


def test_fingerprint_json_round_trip_identity_and_slug():
    cpu_fp = fingerprint(DeviceKind.CPU, threads_used=2)
    assert cpu_fp.gpu is None and cpu_fp.cpu.threads_used == 2 and cpu_fp.cpu.available_cores >= 1
    assert "torch" in cpu_fp.versions and "onnxruntime" in cpu_fp.versions
    for fp in (cpu_fp, _gpu_fingerprint()):
        text = fp.to_json()
        assert json.loads(text)["schema_version"] == 2
        assert DeviceFingerprint.from_json(text) == fp
    gpu_fp = _gpu_fingerprint()
    assert gpu_fp.identity() == {"kind": "cuda", "gpu": "NVIDIA H100 80GB HBM3", "sm_count": 132,
                                 "compute_capability": "9.0"}
    assert gpu_fp.slug() == "nvidia-h100-80gb-hbm3-sm90"
    assert cpu_fp.slug().startswith("cpu-") and cpu_fp.slug().endswith("-2t")
    assert cpu_fp.identity()["threads_used"] == 2


def test_fingerprint_errors():
    with pytest.raises(BackendError, match="malformed device fingerprint JSON"):
        DeviceFingerprint.from_json("{not json")
    with pytest.raises(BackendError, match="malformed device fingerprint"):
        DeviceFingerprint.from_dict({"kind": "cpu"})
    bad = _gpu_fingerprint().to_dict() | {"schema_version": 99}
    with pytest.raises(BackendError, match="schema 99 is not supported"):
        DeviceFingerprint.from_dict(bad)
    with pytest.raises(BackendError, match="needs GPU details"):
        DeviceFingerprint(kind=DeviceKind.CUDA, cpu=_gpu_fingerprint().cpu, gpu=None, versions={})
    if not HAS_CUDA:
        with pytest.raises(BackendError, match="needs a CUDA device"):
            fingerprint(DeviceKind.CUDA)


def test_onnxruntime_spinning_option_is_recorded():
    backend = get_backend("onnxruntime")(**CPU32, allow_spinning=False)
    assert backend.settings()["allow_spinning"] is False
    with pytest.raises(BackendError, match="must be bool"):
        get_backend("onnxruntime")(**CPU32, allow_spinning="no")


def test_half_precision_exports_carry_their_type():
    onnx = pytest.importorskip("onnx")
    from nvit.profiler.backends.common import OnnxCache

    cache = OnnxCache("test")
    try:
        model = onnx.load(str(cache.path(linear_workload(), Precision.FP16)))
    finally:
        cache.close()
    float16 = onnx.TensorProto.FLOAT16
    assert model.graph.input[0].type.tensor_type.elem_type == float16
    assert model.graph.output[0].type.tensor_type.elem_type == float16
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [1, 8, 32]  # static batch
