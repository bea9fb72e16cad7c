"""onnxruntime backend: the workload is exported to ONNX (the same exporter as ``nvit export``) and run in
an ``InferenceSession`` with I/O binding.

CPU (the default that runs everywhere): ``CPUExecutionProvider`` with ``intra_op_threads`` threads
(default: every core this process may use), fp32 only. ``allow_spinning=False`` stops idle pool threads
from busy-waiting: on a CPU shared with other jobs spinning threads fight them for cores (a DeiT-Small
block measured 2x slower with 2 spinning threads next to one busy process), at some cost for tiny blocks
on a quiet machine. onnxruntime's default (spinning) is kept unless asked, and recorded either way.

CUDA (onnxruntime-gpu): ``CUDAExecutionProvider``, or with ``provider="tensorrt"`` the providers
``[TensorrtExecutionProvider, CUDAExecutionProvider]`` so that nodes TensorRT does not take run on CUDA,
not on the CPU; TensorRT gets fp16 when the table is fp16 and keeps engine and timing caches under the
(local) ``cache_dir``. The provider options are recorded in :meth:`OnnxRuntimeBackend.settings`, paths
aside. Input and output live on the device, so no host↔device copy happens inside the timed call, and each
call waits for its outputs. onnxruntime silently falls back to other providers when one fails to load, so
every session is checked for the providers asked for. Times are host-clock times of one synchronous
``run_with_iobinding``.
"""

from __future__ import annotations

import enum
import logging
import os
from pathlib import Path
from typing import Any

from nvit.errors import BackendError
from nvit.profiler.backends.common import OnnxCache, example_input, nvit_cache_dir, option, require
from nvit.profiler.base import Backend, PreparedWorkload, Workload
from nvit.profiler.device import available_cores
from nvit.vocab import DeviceKind, Precision

logger = logging.getLogger(__name__)

_INTER_OP_THREADS = 1  # one block is one chain of ops: parallel branches would only add noise
_LOG_ERRORS_ONLY = 3


class OrtProvider(str, enum.Enum):
    CPU = "cpu"
    CUDA = "cuda"
    TENSORRT = "tensorrt"


_PROVIDER_NAMES = {
    OrtProvider.CPU: "CPUExecutionProvider",
    OrtProvider.CUDA: "CUDAExecutionProvider",
    OrtProvider.TENSORRT: "TensorrtExecutionProvider",
}
_INSTALL = {
    OrtProvider.CPU: "pip install onnxruntime",
    OrtProvider.CUDA: "pip install onnxruntime-gpu (and a CUDA driver)",
    OrtProvider.TENSORRT: "pip install onnxruntime-gpu and TensorRT: pip install 'nvit[trt]'",
}


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    option_names = frozenset({"intra_op_threads", "provider", "cuda_index", "allow_spinning", "cache_dir"})
    local_options = frozenset({"cuda_index", "cache_dir"})

    def __init__(self, *, device: DeviceKind, precision: Precision, batch_size: int, **options: Any) -> None:
        super().__init__(device=device, precision=precision, batch_size=batch_size, **options)
        default_provider = OrtProvider.CUDA if self.device is DeviceKind.CUDA else OrtProvider.CPU
        try:
            self.provider = OrtProvider(option(self.options, "provider", default_provider.value, str))
        except ValueError:
            choices = ", ".join(p.value for p in OrtProvider)
            raise BackendError(f"unknown onnxruntime provider {self.options['provider']!r}; choose {choices}") from None
        if (self.provider is OrtProvider.CPU) != (self.device is DeviceKind.CPU):
            raise BackendError(f"onnxruntime provider {self.provider.value!r} does not run on {self.device.value}")
        if self.device is DeviceKind.CPU and self.precision is not Precision.FP32:
            raise BackendError(f"CPU tables are fp32; the onnxruntime CPU backend does not time {self.precision.value}")
        if self.precision is Precision.BF16:
            raise BackendError("the onnxruntime backend times fp32 or fp16; use the torch or tensorrt backend for bf16")
        self.intra_op_threads = option(self.options, "intra_op_threads", available_cores(), int)
        if self.intra_op_threads < 1:
            raise BackendError("intra_op_threads must be >= 1")
        self.cuda_index = option(self.options, "cuda_index", 0, int)
        self.allow_spinning = option(self.options, "allow_spinning", True, bool)
        given = option(self.options, "cache_dir", None, (str, os.PathLike))
        self.cache_dir = Path(given).expanduser() if given else nvit_cache_dir() / "onnxruntime-tensorrt"
        self._ort: Any = None
        self._cache: OnnxCache | None = None

    @property
    def provider_name(self) -> str:
        return _PROVIDER_NAMES[self.provider]

    def providers(self, *, local: bool = True) -> list[tuple[str, dict[str, Any]]]:
        """The execution providers a session asks for, in priority order, with their options; ``local=False``
        leaves out what only says where (device index, cache paths), as recorded in :meth:`settings`."""
        if self.provider is OrtProvider.CPU:
            return [(self.provider_name, {})]
        where = {"device_id": self.cuda_index} if local else {}
        cuda = (_PROVIDER_NAMES[OrtProvider.CUDA], dict(where))
        if self.provider is OrtProvider.CUDA:
            return [cuda]
        trt: dict[str, Any] = {**where, "trt_fp16_enable": self.precision is Precision.FP16,
                               "trt_engine_cache_enable": True, "trt_timing_cache_enable": True}
        if local:
            trt |= {"trt_engine_cache_path": str(self.cache_dir / "engines"),
                    "trt_timing_cache_path": str(self.cache_dir)}
        return [(self.provider_name, trt), cuda]

    def _activate(self) -> None:
        ort = require("onnxruntime", f"onnxruntime is not installed: {_INSTALL[self.provider]}")
        available = ort.get_available_providers()
        for name, _ in self.providers():
            if name not in available:
                raise BackendError(f"onnxruntime {ort.__version__} has no {name} (it has {', '.join(available)}): "
                                   f"{_INSTALL[self.provider]}")
        if self.provider is OrtProvider.TENSORRT:
            (self.cache_dir / "engines").mkdir(parents=True, exist_ok=True)
        self._ort = ort
        self._cache = OnnxCache("onnxruntime")

    def _deactivate(self) -> None:
        if self._cache is not None:
            self._cache.close()
        self._cache = None

    def _session(self, path: str) -> Any:
        ort = self._ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.intra_op_threads
        so.inter_op_num_threads = _INTER_OP_THREADS
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = _LOG_ERRORS_ONLY
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.allow_spinning else "0")
        providers = self.providers()
        try:
            session = ort.InferenceSession(path, sess_options=so, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise BackendError(f"onnxruntime could not load the model: {first}") from exc
        got = session.get_providers()
        missing = [name for name, _ in providers if name not in got]
        if missing:
            raise BackendError(f"onnxruntime fell back to {', '.join(got)} without {', '.join(missing)}; "
                               f"check the CUDA/TensorRT libraries ({_INSTALL[self.provider]})")
        return session

    def _prepare_impl(self, workload: Workload) -> PreparedWorkload:
        if self._cache is None:
            raise BackendError("use the backend as a context manager: `with backend: backend.measure(...)`")
        path = self._cache.path(workload, self.precision)
        session = self._session(str(path))
        x = example_input(workload, self.precision).numpy()
        (inp,), (out,) = session.get_inputs(), session.get_outputs()
        binding = session.io_binding()
        if self.provider is OrtProvider.CPU:
            binding.bind_cpu_input(inp.name, x)
            binding.bind_output(out.name, "cpu")
        else:
            x_dev = self._ort.OrtValue.ortvalue_from_numpy(x, "cuda", self.cuda_index)
            binding.bind_ortvalue_input(inp.name, x_dev)
            binding.bind_output(out.name, "cuda", self.cuda_index)
        session.run_with_iobinding(binding)  # first run: allocations, and the output to reuse from now on
        binding.bind_ortvalue_output(out.name, binding.get_outputs()[0])
        on_device = self.provider is not OrtProvider.CPU

        def run() -> None:
            session.run_with_iobinding(binding)
            if on_device:
                binding.synchronize_outputs()

        return PreparedWorkload(run=run)

    def versions(self) -> dict[str, str]:
        import onnx
        import torch

        out = {"torch": torch.__version__, "onnx": onnx.__version__}
        if self._ort is not None:
            out["onnxruntime"] = self._ort.__version__
        return out

    def settings(self) -> dict[str, Any]:
        from nvit.models.onnx import DEFAULT_OPSET

        return {
            **super().settings(),
            "provider": self.provider_name,
            "providers": [{"name": name, "options": opts} for name, opts in self.providers(local=False)],
            "intra_op_threads": self.intra_op_threads,
            "inter_op_threads": _INTER_OP_THREADS,
            "allow_spinning": self.allow_spinning,
            "graph_optimization": "ORT_ENABLE_ALL",
            "onnx_opset": DEFAULT_OPSET,
            "onnx_batch": "static",
            "io_binding": True,
        }
