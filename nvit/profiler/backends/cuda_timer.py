"""GPU timing shared by the torch and TensorRT backends: CUDA events around K back-to-back iterations.

:class:`CudaTimer` wraps a ``launch`` callable that enqueues one iteration on the timer's stream. Before
timing it runs the workload once (lazy allocations), then tries to capture one iteration into a CUDA graph
and replay that (far less launch overhead for small blocks); if capture fails it falls back to plain
launches and records why (:attr:`CudaTimer.mode`, :attr:`CudaTimer.fallback_reason`). K is calibrated so
one sample lasts at least ``min_sample_ms``. Each call of the timer returns milliseconds per iteration,
which is what :func:`nvit.profiler.harness.measure_interleaved` expects with ``returns_ms=True``.

Streams, events, buffers and graphs come from a :class:`CudaApi`: :class:`TorchCuda` (torch.cuda) or
:class:`PycudaCuda` (pycuda, the ``trt`` extra; it shares the device's primary context with the CUDA
runtime so TensorRT and pycuda see the same memory).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
from collections.abc import Callable
from typing import Any, Protocol

from nvit.errors import BackendError

logger = logging.getLogger(__name__)

_PRE_CAPTURE_RUNS = 3  # eager iterations before capture (allocator, autotuning, lazy module loading)
_CALIBRATION_RUNS = 3  # single-iteration timings; the fastest sets K
MAX_ITERS_PER_SAMPLE = 10_000


class TimerMode(str, enum.Enum):
    CUDA_GRAPH = "cuda_graph"  # one iteration captured, the graph replayed K times per sample
    LAUNCH = "launch"  # the iteration enqueued K times per sample


class CudaApi(Protocol):
    name: str

    @property
    def stream_handle(self) -> int: ...
    def on_stream(self) -> contextlib.AbstractContextManager[Any]: ...
    def new_event(self) -> Any: ...
    def record(self, event: Any) -> None: ...
    def elapsed_ms(self, start: Any, end: Any) -> float: ...
    def synchronize(self) -> None: ...
    def capture(self, launch: Callable[[], object]) -> Callable[[], object]: ...
    def alloc_zeros(self, nbytes: int) -> tuple[int, Any]: ...
    def device_name(self) -> str: ...
    def compute_capability(self) -> str: ...
    def close(self) -> None: ...


class TorchCuda:
    """torch.cuda: a dedicated stream made current while timing, events, CUDA graphs, byte buffers."""

    name = "torch"

    def __init__(self, index: int = 0) -> None:
        import torch

        self._torch = torch
        self.device = torch.device("cuda", index)
        self.stream = torch.cuda.Stream(self.device)

    @property
    def stream_handle(self) -> int:
        return int(self.stream.cuda_stream)

    def on_stream(self) -> contextlib.AbstractContextManager[Any]:
        return self._torch.cuda.stream(self.stream)

    def new_event(self) -> Any:
        return self._torch.cuda.Event(enable_timing=True)

    def record(self, event: Any) -> None:
        event.record(self.stream)

    def elapsed_ms(self, start: Any, end: Any) -> float:
        end.synchronize()
        return float(start.elapsed_time(end))

    def synchronize(self) -> None:
        self.stream.synchronize()

    def capture(self, launch: Callable[[], object]) -> Callable[[], object]:
        graph = self._torch.cuda.CUDAGraph()
        with self._torch.cuda.graph(graph, stream=self.stream):
            launch()
        return graph.replay  # replays on the current stream: the timer makes ours current

    def alloc_zeros(self, nbytes: int) -> tuple[int, Any]:
        buf = self._torch.zeros(max(nbytes, 1), dtype=self._torch.uint8, device=self.device)
        return int(buf.data_ptr()), buf

    def device_name(self) -> str:
        return self._torch.cuda.get_device_name(self.device)

    def compute_capability(self) -> str:
        major, minor = self._torch.cuda.get_device_capability(self.device)
        return f"{major}.{minor}"

    def close(self) -> None:
        self.stream.synchronize()


class PycudaCuda:
    """pycuda on the device's primary context. Graph capture needs a pycuda with stream capture."""

    name = "pycuda"

    def __init__(self, index: int = 0) -> None:
        import pycuda.driver as cuda

        self._cuda = cuda
        try:
            cuda.init()
            self._device = cuda.Device(index)
            self._context = self._device.retain_primary_context()
            self._context.push()
        except cuda.Error as exc:
            raise BackendError(f"pycuda could not open CUDA device {index}: {exc}") from None
        self.stream = cuda.Stream()

    @property
    def stream_handle(self) -> int:
        return int(self.stream.handle)

    def on_stream(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()  # launches name the stream explicitly

    def new_event(self) -> Any:
        return self._cuda.Event()

    def record(self, event: Any) -> None:
        event.record(self.stream)

    def elapsed_ms(self, start: Any, end: Any) -> float:
        end.synchronize()
        return float(start.time_till(end))

    def synchronize(self) -> None:
        self.stream.synchronize()

    def capture(self, launch: Callable[[], object]) -> Callable[[], object]:
        if not hasattr(self.stream, "begin_capture"):
            raise BackendError("this pycuda has no CUDA stream capture")
        self.stream.begin_capture()
        try:
            launch()
        finally:
            graph = self.stream.end_capture()
        executable = graph.instantiate()
        return lambda: executable.launch(self.stream)

    def alloc_zeros(self, nbytes: int) -> tuple[int, Any]:
        buf = self._cuda.mem_alloc(max(nbytes, 1))
        self._cuda.memset_d8(buf, 0, max(nbytes, 1))
        return int(buf), buf

    def device_name(self) -> str:
        return str(self._device.name())

    def compute_capability(self) -> str:
        major, minor = self._device.compute_capability()
        return f"{major}.{minor}"

    def close(self) -> None:
        self.stream.synchronize()
        self._context.pop()
        self._context.detach()


def open_cuda(preferred: str, index: int = 0) -> CudaApi:
    """``preferred``: ``pycuda``, ``torch``, or ``auto`` (pycuda when installed, else torch.cuda)."""
    from nvit.profiler.backends.common import require_cuda_torch

    if preferred not in ("auto", "pycuda", "torch"):
        raise BackendError(f"unknown CUDA buffer API {preferred!r}; choose auto, pycuda or torch")
    if preferred in ("auto", "pycuda"):
        try:
            import pycuda.driver  # noqa: F401
        except ImportError:
            if preferred == "pycuda":
                raise BackendError("pycuda is not installed: pip install 'nvit[trt]'") from None
        else:
            return PycudaCuda(index)
    require_cuda_torch()
    return TorchCuda(index)


class CudaTimer:
    """Callable: one sample = K iterations between two CUDA events; returns ms per iteration."""

    def __init__(self, api: CudaApi, launch: Callable[[], object], *, min_sample_ms: float,
                 use_graph: bool = True) -> None:
        self.api = api
        self._launch = launch
        self._step = launch
        self.min_sample_ms = min_sample_ms
        self.use_graph = use_graph
        self.mode = TimerMode.LAUNCH
        self.fallback_reason = "" if use_graph else "CUDA graphs disabled"
        self.iters_per_sample = 1
        self._start, self._end = api.new_event(), api.new_event()

    def prepare(self) -> CudaTimer:
        with self.api.on_stream():
            for _ in range(_PRE_CAPTURE_RUNS):
                self._launch()
        self.api.synchronize()
        if self.use_graph:
            self._try_capture()
        fastest_ms = min(self._time(1) for _ in range(_CALIBRATION_RUNS))
        if fastest_ms > 0:
            wanted = math.ceil(self.min_sample_ms / fastest_ms)
            self.iters_per_sample = max(1, min(MAX_ITERS_PER_SAMPLE, wanted))
        logger.debug("CUDA timer: %s, %d iterations per sample (%.4f ms each)", self.mode.value,
                     self.iters_per_sample, fastest_ms)
        return self

    def _try_capture(self) -> None:
        try:
            replay = self.api.capture(self._launch)
            with self.api.on_stream():
                replay()
            self.api.synchronize()
        except Exception as exc:  # capture support varies by op, driver and package: fall back, say why
            self.fallback_reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            logger.info("CUDA graph capture failed, timing plain launches: %s", self.fallback_reason)
            with contextlib.suppress(Exception):
                self.api.synchronize()
            return
        self._step = replay
        self.mode = TimerMode.CUDA_GRAPH

    def _time(self, iters: int) -> float:
        step = self._step
        with self.api.on_stream():
            self.api.record(self._start)
            for _ in range(iters):
                step()
            self.api.record(self._end)
        return self.api.elapsed_ms(self._start, self._end) / iters

    def __call__(self) -> float:
        return self._time(self.iters_per_sample)

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode.value, "iters_per_sample": self.iters_per_sample,
                "fallback_reason": self.fallback_reason}

