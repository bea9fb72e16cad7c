"""The small interface every latency backend implements, and the registry that finds them by name.

A backend turns a workload (a torch module + an input shape, exported the same way as the final model)
into a :class:`TimingStats`. Heavy imports (onnxruntime, tensorrt, pycuda, CUDA torch) happen inside the
backend, never at import of this module.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nvit.errors import BackendError


class Precision(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


class DeviceKind(str, enum.Enum):
    CPU = "cpu"
    CUDA = "cuda"


@dataclass(frozen=True)
class TimingStats:
    """Summary of repeated latency measurements of one workload, in milliseconds."""

    latency_ms_median: float
    latency_ms_mean: float
    latency_ms_p10: float
    latency_ms_p90: float
    latency_ms_p99: float
    latency_ms_std: float
    cov: float  # coefficient of variation, std / mean
    ci95_halfwidth_ms: float  # 95% confidence half-width of the median
    n_samples: int

    def as_dict(self) -> dict[str, float | int]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class Workload:
    """What to time: a torch module (eval mode, CPU, fp32 weights) fed one input of ``input_shape``."""

    name: str
    module: Any  # torch.nn.Module; typed loosely to keep torch out of this module's import
    input_shape: tuple[int, ...]


class Backend:
    """Base class. Subclasses implement ``_measure_impl``; callers use ``measure`` and the context manager.

    ``__enter__`` acquires the device/session state (and raises :class:`BackendError` when the backend's
    package or device is missing), ``__exit__`` releases it.
    """

    name: str = ""

    def __init__(self, *, device: DeviceKind, precision: Precision, batch_size: int, **options: Any) -> None:
        self.device = device
        self.precision = precision
        self.batch_size = batch_size
        self.options = options

    def __enter__(self) -> Backend:
        self._activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self._deactivate()

    def _activate(self) -> None:
        """Import packages and check the device; raise BackendError naming the fix if unavailable."""

    def _deactivate(self) -> None:
        """Release engines, sessions, streams."""

    def measure(self, workload: Workload) -> TimingStats:
        """Time ``workload`` with the shared harness; the batch dimension is ``self.batch_size``."""
        if workload.input_shape[0] != self.batch_size:
            raise BackendError(
                f"workload {workload.name!r} has batch {workload.input_shape[0]}, backend expects {self.batch_size}"
            )
        return self._measure_impl(workload)

    def _measure_impl(self, workload: Workload) -> TimingStats:
        raise NotImplementedError

    def versions(self) -> dict[str, str]:
        """Versions of the packages this backend uses (recorded in LUT metadata)."""
        return {}

    def settings(self) -> dict[str, Any]:
        """Backend settings that affect latency (recorded in LUT metadata)."""
        return {"device": self.device.value, "precision": self.precision.value, "batch_size": self.batch_size}


_REGISTRY: dict[str, Callable[[], type[Backend]]] = {}


def register_backend(name: str, loader: Callable[[], type[Backend]]) -> None:
    """Register a backend class by name; ``loader`` imports its module lazily."""
    _REGISTRY[name] = loader


def backend_names() -> list[str]:
    return sorted(_REGISTRY)


def get_backend(name: str) -> type[Backend]:
    try:
        loader = _REGISTRY[name]
    except KeyError:
        raise BackendError(f"unknown backend {name!r}; known: {', '.join(backend_names())}") from None
    return loader()
