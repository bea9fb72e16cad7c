"""The TensorRT backend against a stand-in ``tensorrt`` module and CUDA API: which device builds and runs,
which stream launches, builder flags, parser errors, a corrupt timing cache, a failed deserialization and
engine input dtypes. (The real TensorRT runs in tests/profiler/test_gpu.py, marked trt.)"""

from __future__ import annotations

import logging

import pytest
import torch
from fake_gpu import DataType, Device, FakeCuda, install_fake_tensorrt

from nvit.errors import BackendError
from nvit.profiler.base import Workload, get_backend
from nvit.profiler.harness import HarnessConfig
from nvit.vocab import DeviceKind, Precision, TimingMode

FAST = HarnessConfig.gpu().replace(warmup_s=0.0, rewarm_s=0.0, time_cap_s=0.05, max_samples=20)
WORKLOAD = Workload("linear", torch.nn.Linear(32, 16), (1, 8, 32))


@pytest.fixture
def rig(monkeypatch, tmp_path):
    """A fake TensorRT on a fake two-GPU machine; ONNX exports are replaced by small text files."""
    machine = Device()
    apis: list[FakeCuda] = []

    def install(onnx_text: str = "ok", **trt_kwargs):
        trt, _ = install_fake_tensorrt(monkeypatch, machine, tmp_path / "w.onnx", onnx_text, apis=apis, **trt_kwargs)
        return trt

    def backend(precision=Precision.FP16, **options):
        return get_backend("tensorrt")(device=DeviceKind.CUDA, precision=precision, batch_size=1, harness=FAST,
                                       cache_dir=tmp_path / "cache", **options)

    return machine, apis, install, backend


def test_builds_runs_and_allocates_on_the_asked_device(rig, tmp_path):
    machine, apis, install, backend = rig
    trt = install()
    with backend(cuda_index=1) as be:
        stats = be.measure(WORKLOAD)
        assert be.timer_info()["linear"]["mode"] == "cuda_graph" and be.timing_mode is TimingMode.CUDA_GRAPH
    assert stats.latency_ms_median == 0.125  # the replayed graph's cost
    events = {event for event, _ in machine.log}
    assert events == {"runtime", "builder", "build", "deserialize", "context", "alloc"}
    assert {device for _, device in machine.log} == {1}  # never on GPU 0
    assert apis[0].index == 1 and apis[0].closed and apis[0].allocations == [1 * 8 * 32 * 2, 1 * 8 * 16 * 2]
    assert (tmp_path / "cache" / "timing-nvidia-h200-sm90-trt10.13.0.35.cache").read_bytes() == b"TC:tactic0"
    with backend(cuda_index=1) as be:  # one logger for the process, one runtime per device
        be.measure(WORKLOAD)
    assert trt.created == {"Logger": 1, "Runtime": 1}


def test_launches_use_the_timer_stream_and_the_allocated_buffers(rig):
    _, apis, install, backend = rig
    trt = install()
    with backend() as be:
        be.measure(WORKLOAD)
    (context,) = trt.engines[0].contexts
    assert context.streams == [apis[0].stream_handle] * 3  # eager runs before capture; replays follow
    assert context.addresses == {"input": 0x1000, "output": 0x2000}


@pytest.mark.parametrize(("precision", "tf32", "flags"), [
    (Precision.FP32, True, {"TF32"}),
    (Precision.FP32, False, set()),
    (Precision.FP16, True, {"TF32"}),
])
def test_builder_flags_are_set_explicitly_and_recorded(rig, precision, tf32, flags):
    _, _, install, backend = rig
    trt = install(input_dtype=DataType.FLOAT if precision is Precision.FP32 else DataType.HALF)
    with backend(precision, tf32=tf32) as be:
        be.measure(WORKLOAD)
        settings = be.settings()
    assert {f.name for f in trt.configs[0].flags} == flags
    assert trt.configs[0].pool == {"workspace": 2048 << 20}
    assert settings["applied"]["tf32"] is tf32 and settings["tf32"] is tf32
    assert settings["timing_mode"] == "cuda_graph" and "cache_dir" not in settings


def test_every_parser_error_is_reported(rig):
    _, _, install, backend = rig
    install(onnx_text="error: Unsupported operator Foo\nerror: Unsupported operator Bar\n")
    with pytest.raises(BackendError) as err, backend() as be:
        be.measure(WORKLOAD)
    message = str(err.value)
    assert message.startswith("TensorRT could not parse 'linear' (w.onnx): (1/2) In node -1 (parseGraph): ")
    assert "Unsupported operator Foo; (2/2) " in message and message.endswith("Unsupported operator Bar")
    assert "\n" not in message


@pytest.mark.parametrize("damage", ["raise", "none"])
def test_a_corrupt_timing_cache_is_replaced_not_fatal(rig, tmp_path, caplog, damage):
    _, _, install, backend = rig
    install(corrupt_cache=damage)
    cache = tmp_path / "cache" / "timing-nvidia-h200-sm90-trt10.13.0.35.cache"
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"\x00garbage from a crashed writer")
    with caplog.at_level(logging.WARNING, logger="nvit.profiler.backends.trt_common"), backend() as be:
        stats = be.measure(WORKLOAD)
    assert stats.latency_ms_median == 0.125
    assert "ignoring unreadable TensorRT timing cache" in caplog.text
    assert cache.read_bytes() == b"TC:tactic0"  # a valid cache again


def test_an_engine_that_does_not_deserialize_is_an_error(rig):
    _, _, install, backend = rig
    install(deserialize_none=True)
    with pytest.raises(BackendError, match="TensorRT could not deserialize the engine of 'linear'"), backend() as be:
        be.measure(WORKLOAD)


def test_engine_inputs_must_have_the_table_precision(rig):
    _, _, install, backend = rig
    install(input_dtype=DataType.FLOAT)
    with pytest.raises(BackendError, match="the engine of 'linear' takes input is FLOAT; expected HALF for fp16"), \
            backend() as be:
        be.measure(WORKLOAD)


def test_the_cache_folder_and_device_index_are_not_part_of_the_settings(rig, tmp_path):
    _, _, _, backend = rig
    a = backend()
    b = get_backend("tensorrt")(device=DeviceKind.CUDA, precision=Precision.FP16, batch_size=1, harness=FAST,
                                cache_dir=tmp_path / "other", cuda_index=1)
    assert a.settings() == b.settings()
    assert a.local_settings()["cache_dir"] != b.local_settings()["cache_dir"]
    pycuda = backend(buffers="pycuda")
    assert pycuda.timing_mode is TimingMode.LAUNCH and pycuda.settings()["timing_mode"] == "launch"
    assert backend(cuda_graphs=False).settings()["timing_mode"] == "launch"


def test_a_sweep_resumes_from_another_cache_folder_but_not_in_another_timing_mode(rig, tmp_path):
    import lut_fakes as fk

    from nvit.errors import LutError
    from nvit.profiler.device import CpuInfo, DeviceFingerprint, GpuInfo
    from nvit.profiler.sweep import SweepOptions, run_sweep

    _, _, install, _ = rig
    install(input_dtype=DataType.FLOAT)
    cpu = CpuInfo("Test CPU", 2, 2, None, "test", "x86_64", "3.11")
    gpu = GpuInfo("NVIDIA H200", "GPU-1", 0, 132, "9.0", 143771, "570.86.15", "12.8", None)
    device = DeviceFingerprint(kind=DeviceKind.CUDA, cpu=cpu, gpu=gpu, versions={})
    out = tmp_path / "trt.parquet"

    def sweep(**options):
        backend = get_backend("tensorrt")(device=DeviceKind.CUDA, precision=Precision.FP32, batch_size=1,
                                          harness=FAST, **options)
        with backend:
            return run_sweep(fk.tiny_space(), backend, out, options=SweepOptions(calibration_models=0),
                             device=device)

    first = sweep(cache_dir=str(tmp_path / "cache-a"))
    assert first.table.meta.timing_mode() == "cuda_graph" and first.table.meta.identity()["timing_mode"] == "cuda_graph"
    again = sweep(cache_dir=str(tmp_path / "cache-b"), cuda_index=1)  # another folder, another identical GPU
    assert again.already_complete and again.measured == 0
    with pytest.raises(LutError, match="already exists and was profiled with other settings"):
        sweep(cache_dir=str(tmp_path / "cache-a"), cuda_graphs=False)
