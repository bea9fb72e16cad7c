"""What a GPU is and what state it is in: model, SMs, memory from torch; driver, clocks, power limit,
temperature and clock-limiting reasons from NVML (``pynvml``), else ``nvidia-smi``, else left unknown.

Clocks are read while the GPU works (:func:`under_load`): an idle GPU sits at its lowest clock (an idle
H200 reports 345 MHz), which says nothing about the clock a measurement ran at. MIG instances are looked
up by their ``MIG-`` UUID and their clocks read from the parent GPU. Any failure of NVML (not only an
``NVMLError``: a binding that lacks a function, a library that fails to load) or of ``nvidia-smi`` leaves
the fields unknown instead of failing the fingerprint.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from nvit.errors import BackendError

logger = logging.getLogger(__name__)

_SMI_FIELDS = ("driver_version", "clocks.sm", "clocks.mem", "clocks.max.sm", "clocks.max.mem", "power.limit",
               "temperature.gpu")
_SMI_REASON_FIELDS = ("clocks_event_reasons.active", "clocks_throttle_reasons.active")  # newer, older drivers
_SMI_TIMEOUT_S = 10.0
_MW_PER_W = 1000.0
_BYTES_PER_MIB = 1 << 20
WARM_UP_S = 0.5  # matrix products before clocks are read
_LOAD_MATRIX = 4096  # fp16 square matrices: 32 MiB each, ~0.2 ms per product on an H100
_MAX_QUEUED = 512  # products queued while reading (a launch queue holds about a thousand)
# NVML clocks event (throttle) reason bits, nvml.h
CLOCK_REASONS = {
    0x1: "gpu_idle", 0x2: "applications_clocks_setting", 0x4: "sw_power_cap", 0x8: "hw_slowdown",
    0x10: "sync_boost", 0x20: "sw_thermal_slowdown", 0x40: "hw_thermal_slowdown", 0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}


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
    clock_limit_reasons: tuple[str, ...] | None = None  # why the clock is below its maximum (NVML names)
    under_load: bool = False  # read while the GPU was busy

    def __post_init__(self) -> None:
        if self.clock_limit_reasons is not None:
            object.__setattr__(self, "clock_limit_reasons", tuple(self.clock_limit_reasons))


@dataclass(frozen=True)
class GpuInfo:
    name: str
    uuid: str  # GPU-... or, for a MIG instance, MIG-...
    index: int
    sm_count: int
    compute_capability: str  # "9.0"
    total_memory_mib: int
    driver_version: str | None
    cuda_version: str | None  # CUDA runtime torch was built with
    clocks: GpuClocks | None
    mig: bool = False


def decode_clock_reasons(mask: int) -> tuple[str, ...]:
    """Names of the bits set in an NVML clocks-event-reasons mask (unknown bits as hex)."""
    return tuple(CLOCK_REASONS.get(1 << b, f"0x{1 << b:x}") for b in range(mask.bit_length()) if mask >> b & 1)


def uuid_candidates(raw: str) -> list[str]:
    """NVML/nvidia-smi UUIDs a torch device UUID may stand for: as given when prefixed, else the GPU form
    then the MIG form (torch prints a bare UUID for both)."""
    if not raw:
        return []
    if raw.startswith(("GPU-", "MIG-")):
        return [raw]
    return [f"GPU-{raw}", f"MIG-{raw}"]


# ---- nvidia-smi -----------------------------------------------------------------------------------------
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


def _smi(smi: str, fields: tuple[str, ...], uuid: str) -> str | None:
    cmd = [smi, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits", "-i", uuid]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=_SMI_TIMEOUT_S, check=True).stdout
        return out.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError) as exc:
        logger.debug("nvidia-smi %s failed: %s", uuid, exc)
        return None


def _smi_find(smi: str, uuids: list[str]) -> tuple[str, str | None, GpuClocks] | None:
    """``(uuid, driver, clocks)`` for the first UUID whose ``_SMI_FIELDS`` line nvidia-smi prints and
    :func:`parse_nvidia_smi_csv` reads (one call per UUID tried; no clock-limit reasons), else None."""
    for uuid in uuids:
        line = _smi(smi, _SMI_FIELDS, uuid)
        if line is None:
            continue
        try:
            driver, clocks = parse_nvidia_smi_csv(line)
        except BackendError as exc:
            logger.debug("%s", exc)
            continue
        return uuid, driver, clocks
    return None


def smi_query(uuids: list[str]) -> tuple[str, str | None, GpuClocks] | None:
    """``(uuid, driver, clocks)`` from nvidia-smi for the first UUID it knows, else None."""
    smi = shutil.which("nvidia-smi")
    found = _smi_find(smi, uuids) if smi is not None else None
    if smi is None or found is None:
        return None
    uuid, driver, clocks = found
    for field in _SMI_REASON_FIELDS:
        mask = _smi(smi, (field,), uuid)
        with contextlib.suppress(TypeError, ValueError):
            reasons = decode_clock_reasons(int(mask.strip(), 16))  # type: ignore[union-attr]
            clocks = GpuClocks(**{**clocks.__dict__, "clock_limit_reasons": reasons})
            break
    return uuid, driver, clocks


# ---- NVML -----------------------------------------------------------------------------------------------
def _nvml_handle(nvml: Any, uuids: list[str]) -> tuple[str, Any, Any] | None:
    """``(uuid, handle, handle to read clocks from)``: a MIG instance's clocks are its parent GPU's."""
    for uuid in uuids:
        try:
            handle = nvml.nvmlDeviceGetHandleByUUID(uuid.encode())  # bytes work in old and new pynvml
        except Exception as exc:
            logger.debug("NVML has no device %s: %s", uuid, exc)
            continue
        clock_handle = handle
        with contextlib.suppress(Exception):
            if nvml.nvmlDeviceIsMigDeviceHandle(handle):
                clock_handle = nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle)
        return uuid, handle, clock_handle
    return None


def _nvml_init() -> Any:
    """pynvml, initialised (the caller shuts it down), or None where it is missing or fails to load."""
    try:
        import pynvml as nvml

        nvml.nvmlInit()
    except Exception as exc:  # missing, or a library that fails to load: any exception type
        logger.debug("NVML unavailable: %s", exc)
        return None
    return nvml


def _nvml_shutdown(nvml: Any) -> None:
    with contextlib.suppress(Exception):
        nvml.nvmlShutdown()


def nvml_uuid(uuids: list[str]) -> str | None:
    """The first of ``uuids`` NVML knows (no clocks read), else None. Never raises."""
    nvml = _nvml_init()
    if nvml is None:
        return None
    try:
        found = _nvml_handle(nvml, uuids)
        return found[0] if found is not None else None
    except Exception as exc:
        logger.debug("NVML query failed: %s", exc)
        return None
    finally:
        _nvml_shutdown(nvml)


def nvml_query(uuids: list[str]) -> tuple[str, str | None, GpuClocks] | None:
    """``(uuid, driver, clocks)`` from NVML for the first UUID it knows, else None. Never raises."""
    nvml = _nvml_init()
    if nvml is None:
        return None
    try:
        found = _nvml_handle(nvml, uuids)
        if found is None:
            return None
        uuid, _, handle = found

        def ask(name: str, *args: Any) -> Any:
            fn = getattr(nvml, name, None)
            try:
                return fn(handle, *args) if fn is not None else None
            except Exception as exc:
                logger.debug("NVML %s failed: %s", name, exc)
                return None

        reasons = ask("nvmlDeviceGetCurrentClocksEventReasons")
        if reasons is None:
            reasons = ask("nvmlDeviceGetCurrentClocksThrottleReasons")
        power_mw = ask("nvmlDeviceGetPowerManagementLimit")
        clocks = GpuClocks(
            source="nvml",
            sm_clock_mhz=ask("nvmlDeviceGetClockInfo", nvml.NVML_CLOCK_SM),
            mem_clock_mhz=ask("nvmlDeviceGetClockInfo", nvml.NVML_CLOCK_MEM),
            max_sm_clock_mhz=ask("nvmlDeviceGetMaxClockInfo", nvml.NVML_CLOCK_SM),
            max_mem_clock_mhz=ask("nvmlDeviceGetMaxClockInfo", nvml.NVML_CLOCK_MEM),
            power_limit_w=power_mw / _MW_PER_W if isinstance(power_mw, int | float) else None,
            temperature_c=ask("nvmlDeviceGetTemperature", nvml.NVML_TEMPERATURE_GPU),
            clock_limit_reasons=decode_clock_reasons(int(reasons)) if isinstance(reasons, int) else None,
        )
        driver = None
        with contextlib.suppress(Exception):
            driver = nvml.nvmlSystemGetDriverVersion()
        return uuid, (driver.decode() if isinstance(driver, bytes) else driver), clocks
    except Exception as exc:
        logger.debug("NVML query failed: %s", exc)
        return None
    finally:
        _nvml_shutdown(nvml)


# ---- the device ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def under_load(index: int, seconds: float = WARM_UP_S) -> Iterator[None]:
    """Warm GPU ``index`` up with ``seconds`` of matrix products, then keep products queued while the body
    runs, so that what the body reads is the state of a working GPU."""
    import torch

    if seconds <= 0:
        yield
        return
    with torch.cuda.device(index):
        a = torch.randn(_LOAD_MATRIX, _LOAD_MATRIX, device=f"cuda:{index}", dtype=torch.float16)
        out = torch.empty_like(a)
        start, done = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            for _ in range(8):
                torch.mm(a, a, out=out)
            torch.cuda.synchronize(index)
            done += 8
        per_s = done / max(time.perf_counter() - start, 1e-9)
        for _ in range(min(_MAX_QUEUED, max(8, int(per_s * seconds)))):
            torch.mm(a, a, out=out)
        try:
            yield
        finally:
            torch.cuda.synchronize(index)


def check_cuda_index(index: int) -> None:
    """Refuse a CUDA device index this machine does not have."""
    import torch

    if not 0 <= index < torch.cuda.device_count():
        raise BackendError(f"no CUDA device {index} (this machine has {torch.cuda.device_count()})")


def _cuda_properties(index: int) -> Any:
    import torch

    if not torch.cuda.is_available():
        raise BackendError("a CUDA fingerprint needs a CUDA device but torch.cuda.is_available() is False")
    check_cuda_index(index)
    return torch.cuda.get_device_properties(index)


def gpu_name(index: int = 0) -> str:
    """The model name :func:`gpu_info` reports for CUDA device ``index`` (nothing else is probed)."""
    return _cuda_properties(index).name


def gpu_uuid(index: int = 0) -> str:
    """The UUID :func:`gpu_info` reports for CUDA device ``index``, resolved the same way (the first candidate
    NVML knows, else the first nvidia-smi describes, else the first candidate) without reading clocks or
    clock-limit reasons: one nvidia-smi call per candidate tried, where NVML is missing. ``""`` when torch
    reports no UUID."""
    candidates = uuid_candidates(str(getattr(_cuda_properties(index), "uuid", "") or ""))
    if not candidates:
        return ""
    found = nvml_uuid(candidates)
    if found is None and (smi := shutil.which("nvidia-smi")) is not None:
        described = _smi_find(smi, candidates)
        found = described[0] if described is not None else None
    return found if found is not None else candidates[0]


def gpu_info(index: int = 0, *, warm_up_s: float = WARM_UP_S) -> GpuInfo:
    """Describe CUDA device ``index``; clocks are read under load after ``warm_up_s`` (0: as they are)."""
    import torch

    props = _cuda_properties(index)
    candidates = uuid_candidates(str(getattr(props, "uuid", "") or ""))
    found = None
    if candidates and (importlib.util.find_spec("pynvml") is not None or shutil.which("nvidia-smi")):
        with under_load(index, warm_up_s):
            found = nvml_query(candidates) or smi_query(candidates)
    uuid, driver, clocks = found if found is not None else ((candidates or [""])[0], None, None)
    if clocks is not None and warm_up_s > 0:
        clocks = GpuClocks(**{**clocks.__dict__, "under_load": True})
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
        mig=uuid.startswith("MIG-"),
    )
