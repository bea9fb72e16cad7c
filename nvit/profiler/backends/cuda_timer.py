"""GPU timing shared by the torch and TensorRT backends: CUDA events around K back-to-back iterations.

:class:`CudaTimer` wraps a ``launch`` callable that enqueues one iteration on the timer's stream. Before
timing it runs the workload a few times (lazy allocations, autotuning), then captures one iteration into a
CUDA graph and replays that (far less launch overhead for small blocks). A table is timed in one mode
(:class:`~nvit.vocab.TimingMode`, part of its identity): when graphs are asked for and a capture
fails, the timer raises instead of quietly timing that workload launch by launch. K is calibrated so one
sample lasts at least ``min_sample_ms``. Each call returns milliseconds per iteration, which is what
:func:`nvit.profiler.harness.measure_interleaved` expects with ``returns_ms=True``.

Streams, events, buffers and graphs come from a :class:`CudaApi`: :class:`TorchCuda` (torch.cuda, the
default, as Torch-TensorRT does: buffers are torch tensors whose ``data_ptr()`` TensorRT reads and writes,
work is enqueued on a torch stream, graphs are ``torch.cuda.graph`` captures) or :class:`PycudaCuda`, the
fallback for hosts with TensorRT but no CUDA build of torch (pycuda has no stream capture, so it times
plain launches). Every allocation and every launch happens on the device the API was opened for, and
buffers are zeroed on the stream that later uses them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
from collections.abc import Callable
from typing import Any, Protocol

from nvit.errors import BackendError
from nvit.profiler.gpu_probe import check_cuda_index
from nvit.vocab import TimingMode

logger = logging.getLogger(__name__)

_PRE_CAPTURE_RUNS = 3  # eager iterations before capture (allocator, autotuning, lazy module loading)
_CALIBRATION_RUNS = 3  # single-iteration timings; the fastest sets K
MAX_ITERS_PER_SAMPLE = 10_000
CUDA_APIS = ("auto", "torch", "pycuda")
PYCUDA_HINT = "pycuda is not installed: pip install pycuda (or use a CUDA build of torch)"


class CudaApi(Protocol):
    name: str
    index: int
    can_capture: bool

    @property
    def stream_handle(self) -> int: ...
    def on_device(self) -> contextlib.AbstractContextManager[Any]: ...
    def on_stream(self) -> contextlib.AbstractContextManager[Any]: ...
    def new_event(self) -> Any: ...
    def record(self, event: Any) -> None: ...
    def elapsed_ms(self, start: Any, end: Any) -> float: ...
    def synchronize(self) -> None: ...
    def capture(self, launch: Callable[[], object]) -> Callable[[], object]: ...
    def alloc_zeros(self, nbytes: int) -> tuple[int, Any]: ...
    def free(self, buf: Any) -> None: ...
    def device_name(self) -> str: ...
    def compute_capability(self) -> str: ...
    def close(self) -> None: ...


class TorchCuda:
    """torch.cuda on device ``index``: a dedicated stream, events, CUDA graphs and byte buffers."""

    name = "torch"
    can_capture = True

    def __init__(self, index: int = 0) -> None:
        import torch

        self._torch = torch
        self.index = index
        self.device = torch.device("cuda", index)
        with self.on_device():
            self.stream = torch.cuda.Stream(self.device)

    @property
    def stream_handle(self) -> int:
        return int(self.stream.cuda_stream)

    def on_device(self) -> contextlib.AbstractContextManager[Any]:
        return self._torch.cuda.device(self.index)

    def on_stream(self) -> contextlib.AbstractContextManager[Any]:
        stack = contextlib.ExitStack()
        stack.enter_context(self.on_device())
        stack.enter_context(self._torch.cuda.stream(self.stream))
        return stack

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
        with self.on_device(), self._torch.cuda.graph(graph, stream=self.stream):
            launch()
        return graph.replay  # replays on the current stream: the timer makes ours current

    def alloc_zeros(self, nbytes: int) -> tuple[int, Any]:
        """A zeroed byte buffer, allocated and zeroed on this API's stream (the one that will use it)."""
        with self.on_stream():
            buf = self._torch.zeros(max(nbytes, 1), dtype=self._torch.uint8, device=self.device)
        return int(buf.data_ptr()), buf

    def free(self, buf: Any) -> None:
        """Nothing to do: the caching allocator reclaims a tensor when its last reference goes."""

    def device_name(self) -> str:
        return self._torch.cuda.get_device_name(self.device)

    def compute_capability(self) -> str:
        major, minor = self._torch.cuda.get_device_capability(self.device)
        return f"{major}.{minor}"

    def close(self) -> None:
        self.stream.synchronize()


class PycudaCuda:
    """pycuda on device ``index``'s primary context (shared with the CUDA runtime TensorRT uses), pushed
    while the API is open and popped by :meth:`close`, which also frees the buffers it allocated."""

    name = "pycuda"
    can_capture = False

    def __init__(self, index: int = 0) -> None:
        import pycuda.driver as cuda

        self._cuda = cuda
        self.index = index
        self._buffers: list[Any] = []
        self._context: Any = None
        try:
            cuda.init()
            self._device = cuda.Device(index)
            self._context = self._device.retain_primary_context()
            self._context.push()
            self.stream = cuda.Stream()
        except cuda.Error as exc:
            self._release_context()
            raise BackendError(f"pycuda could not open CUDA device {index}: {exc}") from None
        except BaseException:
            self._release_context()
            raise

    @property
    def stream_handle(self) -> int:
        return int(self.stream.handle)

    def on_device(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()  # the context stays pushed on this thread while the API is open

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
        raise BackendError("pycuda cannot capture CUDA graphs")

    def alloc_zeros(self, nbytes: int) -> tuple[int, Any]:
        n = max(nbytes, 1)
        buf = self._cuda.mem_alloc(n)
        self._buffers.append(buf)
        self._cuda.memset_d8_async(buf, 0, n, self.stream)
        return int(buf), buf

    def free(self, buf: Any) -> None:
        for i, mine in enumerate(self._buffers):
            if mine is buf:
                del self._buffers[i]
                buf.free()
                return

    def device_name(self) -> str:
        return str(self._device.name())

    def compute_capability(self) -> str:
        major, minor = self._device.compute_capability()
        return f"{major}.{minor}"

    def close(self) -> None:
        try:
            self.stream.synchronize()
        finally:
            self._release_context()

    def _release_context(self) -> None:
        """Free the buffers, pop the context if it is the current one, and release the primary context."""
        if self._context is None:
            return
        for buf in self._buffers:
            with contextlib.suppress(Exception):
                buf.free()
        self._buffers.clear()
        context, self._context = self._context, None
        try:
            if self._cuda.Context.get_current() == context:
                context.pop()
        finally:
            context.detach()


def select_cuda_api(preferred: str, *, torch_cuda: bool, pycuda: bool) -> str:
    """Which CUDA API to open: ``torch`` or ``pycuda`` as asked, or for ``auto`` torch.cuda when torch has a
    usable CUDA device (CUDA graphs), else pycuda (hosts with TensorRT but a CPU build of torch)."""
    from nvit.profiler.backends.common import NO_CUDA

    if preferred not in CUDA_APIS:
        raise BackendError(f"unknown CUDA buffer API {preferred!r}; choose {', '.join(CUDA_APIS)}")
    if preferred == "pycuda" and not pycuda:
        raise BackendError(PYCUDA_HINT)
    if preferred == "torch" and not torch_cuda:
        raise BackendError(NO_CUDA)
    if preferred != "auto":
        return preferred
    if torch_cuda:
        return "torch"
    if pycuda:
        return "pycuda"
    raise BackendError(f"{NO_CUDA}, and pycuda is not installed either")


def available_cuda_apis() -> dict[str, bool]:
    """Which APIs could open a device here (checked without opening one)."""
    import torch

    return {"torch_cuda": bool(torch.cuda.is_available()), "pycuda": importlib.util.find_spec("pycuda") is not None}


def open_cuda(preferred: str, index: int = 0) -> CudaApi:
    """Open the API :func:`select_cuda_api` chooses, on CUDA device ``index``."""
    choice = select_cuda_api(preferred, **available_cuda_apis())
    if choice == "pycuda":
        return PycudaCuda(index)
    check_cuda_index(index)
    return TorchCuda(index)


def timing_mode(can_capture: bool, cuda_graphs: bool) -> TimingMode:
    """The mode a timer uses: CUDA graphs when asked for and its API can capture them, else plain launches."""
    return TimingMode.CUDA_GRAPH if cuda_graphs and can_capture else TimingMode.LAUNCH


class CudaTimer:
    """Callable: one sample = K iterations between two CUDA events; returns ms per iteration."""

    def __init__(self, api: CudaApi, launch: Callable[[], object], *, min_sample_ms: float,
                 use_graph: bool = True) -> None:
        self.api = api
        self._launch = launch
        self._step = launch
        self.min_sample_ms = min_sample_ms
        self.use_graph = use_graph and api.can_capture
        self.mode = TimingMode.LAUNCH
        self.note = "" if self.use_graph else ("CUDA graphs disabled" if not use_graph
                                               else f"{api.name} cannot capture CUDA graphs")
        self.iters_per_sample = 1
        self._start, self._end = api.new_event(), api.new_event()

    def prepare(self) -> CudaTimer:
        with self.api.on_stream():
            for _ in range(_PRE_CAPTURE_RUNS):
                self._launch()
        self.api.synchronize()
        if self.use_graph:
            self._capture()
        fastest_ms = min(self._time(1) for _ in range(_CALIBRATION_RUNS))
        if fastest_ms > 0:
            wanted = math.ceil(self.min_sample_ms / fastest_ms)
            self.iters_per_sample = max(1, min(MAX_ITERS_PER_SAMPLE, wanted))
        logger.debug("CUDA timer: %s, %d iterations per sample (%.4f ms each)", self.mode.value,
                     self.iters_per_sample, fastest_ms)
        return self

    def _capture(self) -> None:
        try:
            replay = self.api.capture(self._launch)
            with self.api.on_stream():
                replay()
            self.api.synchronize()
        except Exception as exc:  # capture support varies by op, driver and package: say which and why
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            with contextlib.suppress(Exception):
                self.api.synchronize()
            raise BackendError(f"CUDA graph capture failed ({reason}); to time plain launches instead, profile "
                               "with the backend option cuda_graphs=false (a different timing mode)") from exc
        self._step = replay
        self.mode = TimingMode.CUDA_GRAPH

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
        return {"mode": self.mode.value, "iters_per_sample": self.iters_per_sample, "note": self.note}
