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
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nvit.errors import BackendError
from nvit.profiler.base import Backend
from nvit.profiler.gpu_probe import WARM_UP_S, GpuClocks, GpuInfo, gpu_info, parse_nvidia_smi_csv
from nvit.vocab import DeviceKind

__all__ = ["CpuInfo", "DeviceFingerprint", "GpuClocks", "GpuInfo", "available_cores", "backend_fingerprint",
           "cpu_info", "fingerprint", "gpu_info", "package_versions", "parse_cgroup_cpu_max", "parse_cpuinfo_model",
           "parse_nvidia_smi_csv"]

logger = logging.getLogger(__name__)

FINGERPRINT_SCHEMA_VERSION = 2  # 2: clock-limit reasons, clocks read under load, MIG
_READABLE_SCHEMAS = (1, 2)
_CPUINFO = Path("/proc/cpuinfo")
_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
_CPUINFO_MODEL_KEYS = ("model name", "Model", "Hardware", "cpu model", "Processor")
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
            if version not in _READABLE_SCHEMAS:
                raise BackendError(f"device fingerprint schema {version} is not supported "
                                   f"(this nvit reads {', '.join(map(str, _READABLE_SCHEMAS))})")
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


def fingerprint(device: DeviceKind, *, threads_used: int | None = None, cuda_index: int = 0,
                warm_up_s: float = WARM_UP_S) -> DeviceFingerprint:
    """Fingerprint this machine for ``device`` (the GPU ``cuda_index`` for CUDA, its clocks read under load
    after ``warm_up_s`` of work; 0 reads them as they are, for callers that only need the identity)."""
    device = DeviceKind(device)
    gpu = gpu_info(cuda_index, warm_up_s=warm_up_s) if device is DeviceKind.CUDA else None
    return DeviceFingerprint(kind=device, cpu=cpu_info(threads_used), gpu=gpu, versions=package_versions())


def backend_fingerprint(backend: Backend, *, warm_up_s: float = WARM_UP_S) -> DeviceFingerprint:
    """The fingerprint of the device ``backend`` measures on: its GPU index, its CPU thread count."""
    return fingerprint(backend.device, threads_used=backend.settings().get("intra_op_threads"),
                       cuda_index=backend.cuda_index, warm_up_s=warm_up_s)
