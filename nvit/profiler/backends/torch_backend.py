"""torch backend: the workload's module run by PyTorch itself, eager or ``torch.compile``'d.

CPU: fp32, ``intra_op_threads`` torch threads (default: every core this process may use; restored on
exit), each call timed with the host clock. CUDA: the module cast to fp32/fp16/bf16 on GPU ``cuda_index``,
timed with :class:`~nvit.profiler.backends.cuda_timer.CudaTimer` (CUDA events around K back-to-back
iterations of a captured CUDA graph, or plain launches with ``cuda_graphs=False``). TF32 (``tf32``, on by
default like TensorRT's) and ``cudnn.benchmark`` are set for the session and restored after it; they and
the scaled-dot-product-attention backends torch may pick are recorded in :meth:`TorchBackend.settings`.

Every call runs in ``torch.inference_mode``. ``compile=True`` compiles each workload with
``dynamic=False`` and ``fullgraph=True`` (a graph break is an error, not a partly eager module), with
dynamo's recompile limit raised for the session (one compile per width must not hit the limit, which
would silently run eager) and, where torch has it, ``fail_on_recompile_limit_hit``. Compile modes that
capture their own CUDA graphs (``reduce-overhead``, ``max-autotune``) are refused: the timer captures one.
"""

from __future__ import annotations

import logging
from typing import Any

from nvit.errors import BackendError
from nvit.profiler.backends.common import example_input, module_copy, option, require_cuda_torch
from nvit.profiler.backends.cuda_timer import CudaTimer, TorchCuda, timing_mode
from nvit.profiler.base import Backend, PreparedWorkload, Workload
from nvit.profiler.device import available_cores
from nvit.profiler.gpu_probe import check_cuda_index
from nvit.vocab import DeviceKind, Precision, TimingMode

logger = logging.getLogger(__name__)

COMPILE_RECOMPILE_LIMIT = 100_000  # per session: every width is one compile, none may fall back to eager
_DYNAMO_LIMITS = ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                  "accumulated_recompile_limit")
_DYNAMO_FAIL_FLAGS = ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit")
_SDPA_BACKENDS = ("flash", "mem_efficient", "math", "cudnn")
#: The ``torch.compile`` modes a remote job may name (the local check asks torch itself, see below).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_compile_mode(mode: str | None) -> None:
    """Refuse unknown ``torch.compile`` modes and those that bring their own CUDA graphs."""
    if mode is None:
        return
    import torch._inductor

    try:
        mode_options = torch._inductor.list_mode_options(mode)
    except Exception as exc:
        raise BackendError(f"unknown torch.compile mode {mode!r}: {exc}") from None
    if mode_options.get("triton.cudagraphs"):
        raise BackendError(f"torch.compile mode {mode!r} captures its own CUDA graphs, which the timer does "
                           "itself; use the default mode or max-autotune-no-cudagraphs")


def dynamo_overrides(config: Any) -> dict[str, Any]:
    """The dynamo settings a compiled session runs under (only the keys this torch has)."""
    out: dict[str, Any] = {k: COMPILE_RECOMPILE_LIMIT for k in _DYNAMO_LIMITS if hasattr(config, k)}
    out |= {k: True for k in _DYNAMO_FAIL_FLAGS if hasattr(config, k)}
    return out


class TorchBackend(Backend):
    name = "torch"
    option_names = frozenset({"compile", "compile_mode", "intra_op_threads", "cuda_graphs", "cuda_index", "tf32",
                              "cudnn_benchmark"})
    local_options = frozenset({"cuda_index"})  # which of several identical GPUs: not part of a table

    def __init__(self, *, device: DeviceKind, precision: Precision, batch_size: int, **options: Any) -> None:
        super().__init__(device=device, precision=precision, batch_size=batch_size, **options)
        if self.device is DeviceKind.CPU and self.precision is not Precision.FP32:
            raise BackendError(f"CPU tables are fp32; the torch CPU backend does not time {self.precision.value}")
        self.compile = option(self.options, "compile", False, bool)
        self.compile_mode = option(self.options, "compile_mode", None, str)
        if self.compile_mode is not None and not self.compile:
            raise BackendError("option 'compile_mode' needs compile=True")
        check_compile_mode(self.compile_mode)
        self.intra_op_threads = option(self.options, "intra_op_threads", available_cores(), int)
        if self.intra_op_threads < 1:
            raise BackendError("intra_op_threads must be >= 1")
        self.cuda_graphs = option(self.options, "cuda_graphs", True, bool)
        self.cuda_index = option(self.options, "cuda_index", 0, int)
        self.tf32 = option(self.options, "tf32", True, bool)
        self.cudnn_benchmark = option(self.options, "cudnn_benchmark", False, bool)
        self._cuda: TorchCuda | None = None
        self._saved_threads: int | None = None
        self._restore: list[tuple[Any, str, Any]] = []  # (object, attribute, value before the session)
        self._dynamo: dict[str, Any] = {}
        self._timers: dict[str, dict[str, Any]] = {}

    def _set(self, obj: Any, attr: str, value: Any) -> None:
        self._restore.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    def _activate(self) -> None:
        import torch

        if self.device is DeviceKind.CUDA:
            require_cuda_torch()
            check_cuda_index(self.cuda_index)
            self._cuda = TorchCuda(self.cuda_index)
            self._set(torch.backends.cuda.matmul, "allow_tf32", self.tf32)
            self._set(torch.backends.cudnn, "allow_tf32", self.tf32)
            self._set(torch.backends.cudnn, "benchmark", self.cudnn_benchmark)
        if self.compile:
            import torch._dynamo

            torch._dynamo.reset()  # what earlier sessions compiled must not count against this one's limit
            self._dynamo = dynamo_overrides(torch._dynamo.config)
            for key, value in self._dynamo.items():
                self._set(torch._dynamo.config, key, value)
        self._saved_threads = torch.get_num_threads()
        torch.set_num_threads(self.intra_op_threads)

    def _deactivate(self) -> None:
        import torch

        if self._saved_threads is not None:
            torch.set_num_threads(self._saved_threads)
            self._saved_threads = None
        if self._cuda is not None:
            self._cuda.close()
            self._cuda = None
        if self.compile:
            import torch._dynamo

            torch._dynamo.reset()
        while self._restore:
            obj, attr, value = self._restore.pop()
            setattr(obj, attr, value)

    @property
    def timing_mode(self) -> TimingMode:
        if self.device is DeviceKind.CPU:
            return TimingMode.HOST_CLOCK
        return timing_mode(TorchCuda.can_capture, self.cuda_graphs)

    def _model(self, workload: Workload) -> Any:
        import torch

        device = "cpu" if self.device is DeviceKind.CPU else f"cuda:{self.cuda_index}"
        model = module_copy(workload, self.precision, device)
        if self.compile:
            model = torch.compile(model, mode=self.compile_mode, dynamic=False, fullgraph=True)
        return model, example_input(workload, self.precision, device)

    def _prepare_impl(self, workload: Workload) -> PreparedWorkload:
        if self._saved_threads is None:
            raise BackendError("use the backend as a context manager: `with backend: backend.measure(...)`")
        import contextlib

        import torch

        # on the GPU, weights and input are copied on the stream that runs them (no cross-stream race)
        with self._cuda.on_stream() if self._cuda is not None else contextlib.nullcontext():
            model, x = self._model(workload)

        def launch() -> None:
            with torch.inference_mode():
                model(x)

        try:
            with self._cuda.on_stream() if self._cuda is not None else contextlib.nullcontext():
                launch()  # first call: compilation when compiled, lazy initialisation otherwise
        except Exception as exc:
            if not self.compile:
                raise
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise BackendError(f"torch.compile failed for {workload.name!r}: {first}") from exc
        if self._cuda is None:
            return PreparedWorkload(run=launch)
        timer = CudaTimer(self._cuda, launch, min_sample_ms=self.harness.min_sample_ms,
                          use_graph=self.cuda_graphs).prepare()
        self._timers[workload.name] = timer.describe()
        return PreparedWorkload(run=timer, returns_ms=True)

    def timer_info(self) -> dict[str, dict[str, Any]]:
        """Per workload (CUDA only): timing mode, iterations per sample, a note on why graphs were not used."""
        return dict(self._timers)

    def versions(self) -> dict[str, str]:
        import torch

        out = {"torch": torch.__version__}
        if self.device is DeviceKind.CUDA and torch.version.cuda:
            out["cuda"] = torch.version.cuda
        return out

    def settings(self) -> dict[str, Any]:
        import torch

        out = {
            **super().settings(),
            "compile": self.compile,
            "compile_mode": self.compile_mode,
            "intra_op_threads": self.intra_op_threads,
            "inference_mode": True,
        }
        if self.compile:
            out["compile_options"] = {"dynamic": False, "fullgraph": True, "dynamo": dict(self._dynamo)}
        if self.device is DeviceKind.CUDA:
            out |= {"cuda_graphs": self.cuda_graphs, "tf32": self.tf32,
                    "cudnn_benchmark": self.cudnn_benchmark,
                    "sdpa_backends": {b: bool(getattr(torch.backends.cuda, f"{b}_sdp_enabled", lambda: False)())
                                      for b in _SDPA_BACKENDS}}
        return out
