"""torch backend: the workload's module run by PyTorch itself, eager or ``torch.compile``'d.

CPU: fp32, ``intra_op_threads`` torch threads (default: every core this process may use; restored on
exit), each call timed with the host clock. CUDA: the module cast to fp32/fp16/bf16 on the GPU, timed with
:class:`~nvit.profiler.backends.cuda_timer.CudaTimer` (CUDA events around K back-to-back iterations, a CUDA
graph of one iteration when capture works; which one was used is in :meth:`TorchBackend.settings`).
"""

from __future__ import annotations

import logging
from typing import Any

from nvit.errors import BackendError
from nvit.profiler.backends.common import example_input, module_copy, option, require_cuda_torch
from nvit.profiler.backends.cuda_timer import CudaTimer, TorchCuda
from nvit.profiler.base import Backend, DeviceKind, Precision, PreparedWorkload, Workload
from nvit.profiler.device import available_cores

logger = logging.getLogger(__name__)


class TorchBackend(Backend):
    name = "torch"
    option_names = frozenset({"compile", "compile_mode", "intra_op_threads", "cuda_graphs", "cuda_index"})

    def __init__(self, *, device: DeviceKind, precision: Precision, batch_size: int, **options: Any) -> None:
        super().__init__(device=device, precision=precision, batch_size=batch_size, **options)
        if self.device is DeviceKind.CPU and self.precision is not Precision.FP32:
            raise BackendError(f"CPU tables are fp32; the torch CPU backend does not time {self.precision.value}")
        self.compile = option(self.options, "compile", False, bool)
        self.compile_mode = option(self.options, "compile_mode", None, str)
        if self.compile_mode is not None and not self.compile:
            raise BackendError("option 'compile_mode' needs compile=True")
        self.intra_op_threads = option(self.options, "intra_op_threads", available_cores(), int)
        if self.intra_op_threads < 1:
            raise BackendError("intra_op_threads must be >= 1")
        self.cuda_graphs = option(self.options, "cuda_graphs", True, bool)
        self.cuda_index = option(self.options, "cuda_index", 0, int)
        self._cuda: TorchCuda | None = None
        self._saved_threads: int | None = None
        self._timers: dict[str, dict[str, Any]] = {}

    def _activate(self) -> None:
        import torch

        if self.device is DeviceKind.CUDA:
            require_cuda_torch()
            if self.cuda_index >= torch.cuda.device_count():
                raise BackendError(f"no CUDA device {self.cuda_index} (this machine has {torch.cuda.device_count()})")
            self._cuda = TorchCuda(self.cuda_index)
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

    def _model(self, workload: Workload) -> Any:
        import torch

        device = "cpu" if self.device is DeviceKind.CPU else f"cuda:{self.cuda_index}"
        model = module_copy(workload, self.precision, device)
        if self.compile:
            model = torch.compile(model, mode=self.compile_mode)
        return model, example_input(workload, self.precision, device)

    def _prepare_impl(self, workload: Workload) -> PreparedWorkload:
        if self._saved_threads is None:
            raise BackendError("use the backend as a context manager: `with backend: backend.measure(...)`")
        import torch

        model, x = self._model(workload)

        def launch() -> None:
            model(x)  # weights and input need no grad, so no autograd graph is built

        try:
            with torch.no_grad():
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
        """Per workload (CUDA only): CUDA graph or plain launches, iterations per sample, fallback reason."""
        return dict(self._timers)

    def versions(self) -> dict[str, str]:
        import torch

        out = {"torch": torch.__version__}
        if self.device is DeviceKind.CUDA and torch.version.cuda:
            out["cuda"] = torch.version.cuda
        return out

    def settings(self) -> dict[str, Any]:
        out = {
            **super().settings(),
            "compile": self.compile,
            "compile_mode": self.compile_mode,
            "intra_op_threads": self.intra_op_threads,
        }
        if self.device is DeviceKind.CUDA:
            out["cuda_graphs"] = self.cuda_graphs
            out["timer_modes"] = sorted({t["mode"] for t in self._timers.values()})
        return out
