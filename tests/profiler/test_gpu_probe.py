"""GPU fingerprints on a CPU through stand-ins for torch.cuda, NVML and nvidia-smi: any NVML failure falls
back cleanly, clocks are read under load, MIG instances are found by their MIG- UUID, the device index is
the one asked for."""

from __future__ import annotations

import contextlib
import sys
import types

import pytest
import torch

from nvit.profiler import gpu_probe
from nvit.profiler.base import get_backend
from nvit.profiler.device import DeviceFingerprint, backend_fingerprint, fingerprint
from nvit.profiler.gpu_probe import GpuClocks, decode_clock_reasons, uuid_candidates
from nvit.vocab import DeviceKind, Precision

RAW_UUID = "8f2a6b1c-0000-1111-2222-333344445555"


class NVMLError(Exception):
    pass


def fake_pynvml(calls: list[str], *, mig: bool = False, broken: str | None = None) -> types.ModuleType:
    """NVML with one GPU (``GPU-<RAW_UUID>``) or one MIG instance (``MIG-<RAW_UUID>``) on a parent GPU.
    ``broken`` names a function that raises a TypeError (a binding mismatch, not an NVMLError)."""
    nvml = types.ModuleType("pynvml")
    nvml.NVMLError = NVMLError
    nvml.NVML_CLOCK_SM, nvml.NVML_CLOCK_MEM, nvml.NVML_TEMPERATURE_GPU = 0, 2, 0
    known = {f"{'MIG' if mig else 'GPU'}-{RAW_UUID}".encode(): "instance" if mig else "gpu"}

    def fn(name, result):
        def call(*args):
            calls.append(name)
            if name == broken:
                raise TypeError(f"{name}() takes 0 positional arguments")
            return result(*args) if callable(result) else result
        return call

    def by_uuid(uuid):
        if uuid not in known:
            raise NVMLError("Not Found")
        return known[uuid]

    def clock(handle, kind):
        if handle != "gpu" and handle != "parent":
            raise NVMLError("Not Supported")  # a MIG handle has no clocks of its own
        return {0: 1980, 2: 2619}[kind] if handle == "parent" or not mig else None

    nvml.nvmlInit = fn("nvmlInit", None)
    nvml.nvmlShutdown = fn("nvmlShutdown", None)
    nvml.nvmlDeviceGetHandleByUUID = fn("handle", by_uuid)
    nvml.nvmlDeviceIsMigDeviceHandle = fn("is_mig", lambda h: h == "instance")
    nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle = fn("parent", lambda h: "parent")
    nvml.nvmlDeviceGetClockInfo = fn("clock", clock)
    nvml.nvmlDeviceGetMaxClockInfo = fn("max_clock", lambda h, kind: {0: 1980, 2: 2619}[kind])
    nvml.nvmlDeviceGetPowerManagementLimit = fn("power", lambda h: 700_000)
    nvml.nvmlDeviceGetTemperature = fn("temperature", lambda h, kind: 41)
    nvml.nvmlDeviceGetCurrentClocksEventReasons = fn("reasons", lambda h: 0x4)
    nvml.nvmlSystemGetDriverVersion = fn("driver", b"570.86.15")
    return nvml


@pytest.fixture
def gpu_machine(monkeypatch):
    """torch sees two CUDA devices; the load is recorded instead of run; nvidia-smi is absent."""
    calls: list[str] = []
    props = types.SimpleNamespace(name="NVIDIA H200", uuid=RAW_UUID, multi_processor_count=132, major=9, minor=0,
                                  total_memory=141 << 30)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: calls.append(f"props{i}") or props)

    @contextlib.contextmanager
    def load(index, seconds):
        calls.append(f"load{index} {seconds}s")
        yield
        calls.append("load done")

    monkeypatch.setattr(gpu_probe, "under_load", load)
    monkeypatch.setattr(gpu_probe.shutil, "which", lambda name: None)

    def install(**kwargs):
        monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(calls, **kwargs))
        monkeypatch.setattr(gpu_probe.importlib.util, "find_spec", lambda name: object())

    return calls, install


def test_clocks_come_from_nvml_under_load_on_the_asked_device(gpu_machine):
    calls, install = gpu_machine
    install()
    gpu = fingerprint(DeviceKind.CUDA, cuda_index=1).gpu
    assert calls[0] == "props1" and calls[1] == "load1 0.5s" and calls[-1] == "load done"
    assert calls.index("clock") < calls.index("load done")  # read while the GPU works
    assert gpu.uuid == f"GPU-{RAW_UUID}" and gpu.index == 1 and not gpu.mig and gpu.driver_version == "570.86.15"
    assert gpu.clocks == GpuClocks(source="nvml", sm_clock_mhz=1980, mem_clock_mhz=2619, max_sm_clock_mhz=1980,
                                   max_mem_clock_mhz=2619, power_limit_w=700.0, temperature_c=41,
                                   clock_limit_reasons=("sw_power_cap",), under_load=True)
    fp = fingerprint(DeviceKind.CUDA, cuda_index=1)
    assert DeviceFingerprint.from_json(fp.to_json()) == fp


@pytest.mark.parametrize("broken", ["nvmlInit", "handle", "power", "clock", "driver"])
def test_any_nvml_exception_falls_back_cleanly(gpu_machine, broken):
    calls, install = gpu_machine
    install(broken=broken)
    gpu = fingerprint(DeviceKind.CUDA).gpu  # a TypeError is not an NVMLError: still no crash
    assert gpu.sm_count == 132 and gpu.uuid == f"GPU-{RAW_UUID}"
    if broken in ("nvmlInit", "handle"):
        assert gpu.clocks is None and gpu.driver_version is None
    else:
        assert gpu.clocks is not None and gpu.clocks.max_sm_clock_mhz == 1980
    assert calls[-1] == "load done"


def test_a_mig_instance_is_found_by_its_mig_uuid_and_clocked_by_its_parent(gpu_machine):
    calls, install = gpu_machine
    install(mig=True)
    gpu = fingerprint(DeviceKind.CUDA).gpu
    assert gpu.uuid == f"MIG-{RAW_UUID}" and gpu.mig
    assert gpu.clocks.sm_clock_mhz == 1980 and gpu.clocks.power_limit_w == 700.0
    assert calls.count("handle") == 2 and "parent" in calls  # GPU- tried first, then MIG-


def test_no_nvml_and_no_nvidia_smi_leaves_clocks_unknown(gpu_machine, monkeypatch):
    calls, _ = gpu_machine
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    gpu = fingerprint(DeviceKind.CUDA, warm_up_s=0.0).gpu
    assert gpu.clocks is None and gpu.driver_version is None and calls == ["props0"]  # no pointless warm-up


def test_backend_fingerprint_uses_the_backend_device_index(gpu_machine):
    calls, install = gpu_machine
    install()
    backend = get_backend("torch")(device=DeviceKind.CUDA, precision=Precision.FP16, batch_size=1, cuda_index=1)
    assert backend_fingerprint(backend, warm_up_s=0.0).gpu.index == 1 and calls[0] == "props1"


CLOCK_READS = ("clock", "max_clock", "power", "temperature", "reasons", "driver")


@pytest.mark.parametrize("mig", [False, True])
def test_the_uuid_and_name_alone_are_those_gpu_info_reports_without_reading_clocks(gpu_machine, mig):
    calls, install = gpu_machine
    install(mig=mig)
    info = gpu_probe.gpu_info(1, warm_up_s=0.0)
    calls.clear()
    assert gpu_probe.gpu_uuid(1) == info.uuid == f"{'MIG' if mig else 'GPU'}-{RAW_UUID}"
    assert gpu_probe.gpu_name(1) == info.name
    assert not any(c in CLOCK_READS or c.startswith("load") for c in calls)
    assert calls.count("nvmlInit") == calls.count("nvmlShutdown") == 1


@pytest.mark.parametrize("mig", [False, True])
def test_without_nvml_the_uuid_takes_one_nvidia_smi_call_per_candidate_tried(gpu_machine, monkeypatch, mig):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    monkeypatch.setattr(gpu_probe.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    known = f"{'MIG' if mig else 'GPU'}-{RAW_UUID}"
    smi_calls: list[list[str]] = []

    def run(cmd, **kwargs):
        smi_calls.append(cmd)
        if cmd[-1] != known:
            raise gpu_probe.subprocess.CalledProcessError(6, cmd)
        out = "0x4" if "active" in cmd[1] else "570.86.15, 1980, 2619, 1980, 2619, 700.00, 41"
        return types.SimpleNamespace(stdout=out + "\n")

    monkeypatch.setattr(gpu_probe.subprocess, "run", run)
    info = gpu_probe.gpu_info(0, warm_up_s=0.0)
    smi_calls.clear()
    assert gpu_probe.gpu_uuid(0) == info.uuid == known
    assert len(smi_calls) == (2 if mig else 1)  # GPU- tried first, then MIG-; never the clock-reason fields
    assert not any("active" in cmd[1] for cmd in smi_calls)


def test_a_gpu_lock_is_named_by_the_uuid_gpu_info_reports(gpu_machine, monkeypatch, tmp_path):
    from nvit.profiler import devicelock

    calls, install = gpu_machine
    install()
    monkeypatch.setenv("NVIT_LOCK_DIR", str(tmp_path))
    uuid = gpu_probe.gpu_info(1, warm_up_s=0.0).uuid
    calls.clear()
    devicelock._gpu_uuid.cache_clear()
    try:
        assert devicelock.lock_path(DeviceKind.CUDA, 1) == tmp_path / f"cuda-{uuid}.lock"
    finally:
        devicelock._gpu_uuid.cache_clear()
    assert not any(c in CLOCK_READS or c.startswith("load") for c in calls)


def test_reason_masks_and_uuid_forms():
    assert decode_clock_reasons(0) == ()
    assert decode_clock_reasons(0x1 | 0x40 | 0x800) == ("gpu_idle", "hw_thermal_slowdown", "0x800")
    assert uuid_candidates(RAW_UUID) == [f"GPU-{RAW_UUID}", f"MIG-{RAW_UUID}"]
    assert uuid_candidates(f"MIG-{RAW_UUID}") == [f"MIG-{RAW_UUID}"] and uuid_candidates("") == []


def test_fingerprints_of_the_previous_schema_still_load():
    fp = fingerprint(DeviceKind.CPU, threads_used=2)
    old = fp.to_dict() | {"schema_version": 1}
    assert DeviceFingerprint.from_dict(old).cpu == fp.cpu
