"""The small interface every latency backend implements, and the registry that finds them by name.

A backend turns a workload (a torch module + an input shape, exported the same way as the final model)
into a :class:`TimingStats`. Heavy imports (onnxruntime, tensorrt, pycuda, CUDA torch) happen inside the
backend, never at import of this module.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from nvit.errors import BackendError
from nvit.profiler.harness import HarnessConfig, TimingStats, measure_interleaved
from nvit.vocab import DeviceKind, Precision, TimingMode

__all__ = ["Backend", "PreparedWorkload", "Workload", "backend_names", "get_backend", "register_backend"]


@dataclass(frozen=True)
class Workload:
    """What to time: a torch module (eval mode, CPU, fp32 weights) fed one input of ``input_shape``; or,
    with ``onnx_path`` (and no module), an ONNX file made elsewhere, for the backends that run ONNX."""

    name: str
    module: Any  # torch.nn.Module; typed loosely to keep torch out of this module's import
    input_shape: tuple[int, ...]
    onnx_path: str | None = None


@dataclass(frozen=True)
class PreparedWorkload:
    """A workload made ready to run: ``run()`` executes it once. With ``returns_ms`` the call returns its
    own per-iteration time in ms (device timer); otherwise the harness times the call with a host clock.
    ``release`` frees what preparing it allocated (sessions, engines, device buffers)."""

    run: Callable[[], object]
    returns_ms: bool = False
    release: Callable[[], None] | None = None


class Backend:
    """Base class. Subclasses implement ``_prepare_impl`` (or ``_measure_impl``); callers use ``measure`` /
    ``measure_many`` inside the context manager.

    ``__enter__`` acquires the device/session state (and raises :class:`BackendError` when the backend's
    package or device is missing), ``__exit__`` releases it. The option ``harness`` (a
    :class:`~nvit.profiler.harness.HarnessConfig` or a dict of its fields) sets the timing protocol; the
    default depends on the device. Subclasses that set ``option_names`` reject any other option; options in
    ``local_options`` (cache folders) change where files go, not what is measured, so :meth:`settings`
    leaves them out (a table resumed or compared with another cache folder is the same table).
    """

    name: str = ""
    option_names: ClassVar[frozenset[str] | None] = None  # None: accept any option (no validation)
    local_options: ClassVar[frozenset[str]] = frozenset()
    cuda_index: int = 0  # the CUDA device a GPU backend runs on

    def __init__(self, *, device: DeviceKind, precision: Precision, batch_size: int, **options: Any) -> None:
        self.device = DeviceKind(device)
        self.precision = Precision(precision)
        if batch_size < 1:
            raise BackendError(f"batch size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.harness = _harness_config(options.pop("harness", None), self.device)
        if self.option_names is not None:
            unknown = sorted(set(options) - self.option_names)
            if unknown:
                known = ", ".join(sorted(self.option_names | {"harness"}))
                raise BackendError(f"backend {self.name!r} has no option(s) {', '.join(unknown)}; options: {known}")
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

    def _check_batch(self, workload: Workload) -> None:
        if workload.input_shape[0] != self.batch_size:
            raise BackendError(
                f"workload {workload.name!r} has batch {workload.input_shape[0]}, backend expects {self.batch_size}"
            )

    def measure(self, workload: Workload) -> TimingStats:
        """Time ``workload`` with the shared harness; the batch dimension is ``self.batch_size``."""
        self._check_batch(workload)
        return self._measure_impl(workload)

    def measure_many(self, workloads: Sequence[Workload]) -> list[TimingStats]:
        """Time several workloads together: their repeats interleave round-robin, so they share the
        machine's state (see :func:`nvit.profiler.harness.measure_interleaved`). All are prepared (built,
        exported) first, so memory grows with their number: pass a handful at a time."""
        for w in workloads:
            self._check_batch(w)
        if type(self)._prepare_impl is Backend._prepare_impl:
            return [self._measure_impl(w) for w in workloads]
        prepared: list[PreparedWorkload] = []
        try:
            for w in workloads:
                prepared.append(self._prepare_impl(w))
            kinds = {p.returns_ms for p in prepared}
            if len(kinds) > 1:
                raise BackendError(f"backend {self.name!r} mixed host- and device-timed workloads")
            return measure_interleaved([p.run for p in prepared], self.harness, returns_ms=kinds.pop())
        finally:
            for p in prepared:
                if p.release is not None:
                    p.release()

    def _measure_impl(self, workload: Workload) -> TimingStats:
        if type(self)._prepare_impl is Backend._prepare_impl:
            raise NotImplementedError
        return self.measure_many([workload])[0]

    def _prepare_impl(self, workload: Workload) -> PreparedWorkload:
        raise NotImplementedError

    @property
    def timing_mode(self) -> TimingMode:
        """How one call is timed (GPU backends: CUDA graphs or plain launches between CUDA events)."""
        return TimingMode.HOST_CLOCK

    def versions(self) -> dict[str, str]:
        """Versions of the packages this backend uses (recorded in LUT metadata)."""
        return {}

    def local_settings(self) -> dict[str, Any]:
        """This host's settings that do not change latency (cache folders): recorded, never compared."""
        return {k: str(self.options[k]) for k in sorted(self.local_options) if self.options.get(k) is not None}

    def settings(self) -> dict[str, Any]:
        """Backend settings that affect latency (recorded in LUT metadata), the timing protocol included."""
        return {
            "device": self.device.value,
            "precision": self.precision.value,
            "batch_size": self.batch_size,
            "harness": self.harness.to_dict(),
            "timing_mode": self.timing_mode.value,
            # as given to the constructor, local options aside: enough to rebuild this backend
            "options": {k: v for k, v in self.options.items() if k not in self.local_options},
        }


def _harness_config(value: Any, device: DeviceKind) -> HarnessConfig:
    """A :class:`HarnessConfig` as given, or the device's defaults with a dict's keys overridden."""
    if isinstance(value, HarnessConfig):
        return value
    defaults = HarnessConfig.for_device(device)
    if value is None:
        return defaults
    if isinstance(value, Mapping):
        return defaults.updated(value)
    raise BackendError(f"option 'harness' must be a HarnessConfig or a dict, got {type(value).__name__}")


_REGISTRY: dict[str, Callable[[], type[Backend]]] = {}


def register_backend(name: str, loader: Callable[[], type[Backend]]) -> None:
    """Register a backend class by name; ``loader`` imports its module lazily."""
    _REGISTRY[name] = loader


_BUILTIN_BACKENDS = "nvit.profiler.backends"  # registers tensorrt, onnxruntime, torch (cheap: loaders only)


def _load_builtin() -> None:
    importlib.import_module(_BUILTIN_BACKENDS)


def backend_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_backend(name: str) -> type[Backend]:
    _load_builtin()
    try:
        loader = _REGISTRY[name]
    except KeyError:
        raise BackendError(f"unknown backend {name!r}; known: {', '.join(backend_names())}") from None
    return loader()
