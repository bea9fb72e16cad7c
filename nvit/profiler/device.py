"""Device fingerprints: what a latency table was measured on, recorded in its metadata.

A :class:`DeviceFingerprint` is a frozen, JSON-able record of the CPU (always) and the GPU (for CUDA
tables): model names, core/SM counts, compute capability, driver/CUDA/package versions, and GPU clocks and
power limit read through NVML (``pynvml``), else ``nvidia-smi``, else left out. :meth:`identity` is the
part that must match for two tables (or a table and a machine) to be interchangeable.

Nothing here imports torch or CUDA at module import; :func:`fingerprint` does, when asked for a GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nvit.errors import BackendError
from nvit.profiler.base import DeviceKind

logger = logging.getLogger(__name__)

FINGERPRINT_SCHEMA_VERSION = 1
_CPUINFO = Path("/proc/cpuinfo")
_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
_CPUINFO_MODEL_KEYS = ("model name", "Model", "Hardware", "cpu model", "Processor")
_SMI_FIELDS = ("driver_version", "clocks.sm", "clocks.mem", "clocks.max.sm", "clocks.max.mem", "power.limit",
               "temperature.gpu")
_SMI_TIMEOUT_S = 10.0
_MW_PER_W = 1000.0
_BYTES_PER_MIB = 1 << 20
# Distribution names a package may be installed under (GPU builds have their own names).
_DISTRIBUTIONS = {
    "torch": ("torch",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt-cu11", "tensorrt-libs"),
}


@dataclass(frozen=True)
class CpuInfo:
    model_name: str
    logical_cores: int  # what the OS reports
    available_cores: int  # what this process may use (affinity and cgroup quota)
    threads_used: int | None  # intra-op threads of the backend that measured, when known
    platform: str
    machine: str
    python_version: str


@dataclass(frozen=True)
class GpuClocks:
    """Clock and power state at fingerprint time; any field may be unknown (None)."""

    source: str  # "nvml" or "nvidia-smi"
    sm_clock_mhz: int | None = None
    mem_clock_mhz: int | None = None
    max_sm_clock_mhz: int | None = None
    max_mem_clock_mhz: int | None = None
    power_limit_w: float | None = None
    temperature_c: int | None = None


@dataclass(frozen=True)
class GpuInfo:
    name: str
    uuid: str
    index: int
    sm_count: int
    compute_capability: str  # "9.0"
    total_memory_mib: int
    driver_version: str | None
    cuda_version: str | None  # CUDA runtime torch was built with
    clocks: GpuClocks | None


@dataclass(frozen=True)
class DeviceFingerprint:
    kind: DeviceKind
    cpu: CpuInfo
    gpu: GpuInfo | None
    versions: dict[str, str]  # torch / onnxruntime / tensorrt versions that are installed
    schema_version: int = FINGERPRINT_SCHEMA_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", DeviceKind(self.kind))
        if (self.kind is DeviceKind.CUDA) != (self.gpu is not None):
            raise BackendError("a CUDA fingerprint needs GPU details and a CPU fingerprint has none")

    def identity(self) -> dict[str, Any]:
        """What must match for latencies to be interchangeable (clocks and versions are recorded, not
        compared: tables from another driver are comparable, only noted)."""
        if self.gpu is not None:
            return {"kind": self.kind.value, "gpu": self.gpu.name, "sm_count": self.gpu.sm_count,
                    "compute_capability": self.gpu.compute_capability}
        return {"kind": self.kind.value, "cpu": self.cpu.model_name, "threads_used": self.cpu.threads_used}

    def slug(self) -> str:
        """A short file-name-safe name, e.g. ``nvidia-h100-80gb-hbm3-sm90`` or ``cpu-amd-epyc-2t``."""
        if self.gpu is not None:
            cc = self.gpu.compute_capability.replace(".", "")
            return _slugify(f"{self.gpu.name}-sm{cc}")
        threads = f"-{self.cpu.threads_used}t" if self.cpu.threads_used else ""
        return _slugify(f"cpu-{self.cpu.model_name}{threads}")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["kind"] = self.kind.value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeviceFingerprint:
        try:
            version = data.get("schema_version", FINGERPRINT_SCHEMA_VERSION)
            if version != FINGERPRINT_SCHEMA_VERSION:
                raise BackendError(f"device fingerprint schema {version} is not supported "
                                   f"(this nvit reads {FINGERPRINT_SCHEMA_VERSION})")
            gpu = data.get("gpu")
            if gpu is not None:
                clocks = gpu.get("clocks")
                gpu = GpuInfo(**{**gpu, "clocks": GpuClocks(**clocks) if clocks is not None else None})
            return cls(kind=DeviceKind(data["kind"]), cpu=CpuInfo(**data["cpu"]), gpu=gpu,
                       versions=dict(data.get("versions", {})), schema_version=version)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BackendError(f"malformed device fingerprint: {exc}") from None

    @classmethod
    def from_json(cls, text: str) -> DeviceFingerprint:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BackendError(f"malformed device fingerprint JSON: {exc}") from None
        return cls.from_dict(data)


def _slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


# ---- CPU -----------------------------------------------------------------------------------------------
def parse_cpuinfo_model(text: str) -> str | None:
    """The CPU model from ``/proc/cpuinfo`` text (x86 ``model name``, or the ARM/other equivalents)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and value.strip():
            fields.setdefault(key.strip(), value.strip())
    for key in _CPUINFO_MODEL_KEYS:
        if key in fields:
            return fields[key]
    return None


def parse_cgroup_cpu_max(text: str) -> float | None:
    """CPUs allowed by a cgroup-v2 ``cpu.max`` line (``"200000 100000"`` → 2.0; ``"max 100000"`` → None)."""
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if period > 0 else None


def available_cores() -> int:
    """Cores this process may use: CPU affinity, further limited by a cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    with contextlib.suppress(OSError):
        quota = parse_cgroup_cpu_max(_CGROUP_CPU_MAX.read_text())
        if quota is not None:
            cores = min(cores, max(1, int(quota)))
    return max(1, cores)


def cpu_info(threads_used: int | None = None) -> CpuInfo:
    model = None
    with contextlib.suppress(OSError):
        model = parse_cpuinfo_model(_CPUINFO.read_text())
    return CpuInfo(
        model_name=model or platform.processor() or platform.machine() or "unknown",
        logical_cores=os.cpu_count() or 1,
        available_cores=available_cores(),
        threads_used=threads_used,
        platform=platform.platform(),
        machine=platform.machine(),
        python_version=platform.python_version(),
    )


def package_versions() -> dict[str, str]:
    """Installed versions of the packages a backend may use, read from metadata (nothing is imported)."""
    out: dict[str, str] = {}
    for package, dists in _DISTRIBUTIONS.items():
        module = sys.modules.get(package)
        version = getattr(module, "__version__", None) if module is not None else None
        for dist in dists:
            if version is not None:
                break
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                version = importlib.metadata.version(dist)
        if version is not None:
            out[package] = str(version)
    return out


# ---- GPU -----------------------------------------------------------------------------------------------
def _int_or_none(value: str) -> int | None:
    try:
        return round(float(value))
    except ValueError:
        return None


def parse_nvidia_smi_csv(line: str) -> tuple[str | None, GpuClocks]:
    """Parse one ``nvidia-smi --query-gpu=<_SMI_FIELDS> --format=csv,noheader,nounits`` line into the
    driver version and clocks; ``[N/A]``/``[Not Supported]`` fields become None."""
    values = [v.strip() for v in line.strip().split(",")]
    if len(values) != len(_SMI_FIELDS):
        raise BackendError(f"unexpected nvidia-smi output {line.strip()!r}")
    driver = values[0] if values[0] and not values[0].startswith("[") else None
    power = None
    with contextlib.suppress(ValueError):
        power = float(values[5])
    return driver, GpuClocks(
        source="nvidia-smi",
        sm_clock_mhz=_int_or_none(values[1]),
        mem_clock_mhz=_int_or_none(values[2]),
        max_sm_clock_mhz=_int_or_none(values[3]),
        max_mem_clock_mhz=_int_or_none(values[4]),
        power_limit_w=power,
        temperature_c=_int_or_none(values[6]),
    )


def _nvml_clocks(uuid: str) -> tuple[str | None, GpuClocks] | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        logger.debug("NVML unavailable: %s", exc)
        return None
    try:
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid.encode())  # bytes work in old and new pynvml

        def ask(fn: Any, *args: Any) -> Any:
            try:
                return fn(handle, *args)
            except pynvml.NVMLError:
                return None

        power_mw = ask(pynvml.nvmlDeviceGetPowerManagementLimit)
        driver = pynvml.nvmlSystemGetDriverVersion()
        clocks = GpuClocks(
            source="nvml",
            sm_clock_mhz=ask(pynvml.nvmlDeviceGetClockInfo, pynvml.NVML_CLOCK_SM),
            mem_clock_mhz=ask(pynvml.nvmlDeviceGetClockInfo, pynvml.NVML_CLOCK_MEM),
            max_sm_clock_mhz=ask(pynvml.nvmlDeviceGetMaxClockInfo, pynvml.NVML_CLOCK_SM),
            max_mem_clock_mhz=ask(pynvml.nvmlDeviceGetMaxClockInfo, pynvml.NVML_CLOCK_MEM),
            power_limit_w=power_mw / _MW_PER_W if power_mw is not None else None,
            temperature_c=ask(pynvml.nvmlDeviceGetTemperature, pynvml.NVML_TEMPERATURE_GPU),
        )
        return (driver.decode() if isinstance(driver, bytes) else driver), clocks
    except pynvml.NVMLError as exc:
        logger.debug("NVML query failed: %s", exc)
        return None
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def _smi_clocks(uuid: str) -> tuple[str | None, GpuClocks] | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    cmd = [smi, f"--query-gpu={','.join(_SMI_FIELDS)}", "--format=csv,noheader,nounits", "-i", uuid]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=_SMI_TIMEOUT_S, check=True).stdout
        return parse_nvidia_smi_csv(out.splitlines()[0])
    except (OSError, subprocess.SubprocessError, IndexError, BackendError) as exc:
        logger.debug("nvidia-smi query failed: %s", exc)
        return None


def gpu_info(index: int = 0) -> GpuInfo:
    import torch

    if not torch.cuda.is_available():
        raise BackendError("a CUDA fingerprint needs a CUDA device but torch.cuda.is_available() is False")
    props = torch.cuda.get_device_properties(index)
    raw_uuid = str(getattr(props, "uuid", "") or "")
    uuid = raw_uuid if raw_uuid.startswith("GPU-") or not raw_uuid else f"GPU-{raw_uuid}"
    found = (_nvml_clocks(uuid) or _smi_clocks(uuid)) if uuid else None
    driver, clocks = found if found is not None else (None, None)
    return GpuInfo(
        name=props.name,
        uuid=uuid,
        index=index,
        sm_count=props.multi_processor_count,
        compute_capability=f"{props.major}.{props.minor}",
        total_memory_mib=props.total_memory // _BYTES_PER_MIB,
        driver_version=driver,
        cuda_version=torch.version.cuda,
        clocks=clocks,
    )


def fingerprint(device: DeviceKind, *, threads_used: int | None = None, cuda_index: int = 0) -> DeviceFingerprint:
    """Fingerprint this machine for ``device`` (the GPU ``cuda_index`` for CUDA)."""
    device = DeviceKind(device)
    gpu = gpu_info(cuda_index) if device is DeviceKind.CUDA else None
    return DeviceFingerprint(kind=device, cpu=cpu_info(threads_used), gpu=gpu, versions=package_versions())
