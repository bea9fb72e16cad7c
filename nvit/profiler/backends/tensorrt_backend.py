"""TensorRT backend (the default with ``--gpu``): workload → ONNX → engine → CUDA-event timing.

Written against the TensorRT 10/11 Python API. The ONNX graph (the exporter ``nvit export`` uses, static
batch) carries the table's precision: the module is cast to fp16/bf16 before export and the network is
**strongly typed** (weak typing with FP16/BF16 builder flags was deprecated in 10.12 and removed in 11;
``strongly_typed=False`` keeps it for older 10.x). Settings whose defaults moved across versions are set
explicitly and recorded: TF32, builder optimisation level, workspace limit, timing iterations. Builds
share a timing cache per GPU model + TensorRT version (``<cache_dir>/timing-<gpu>-sm<cc>-trt<ver>.cache``,
see :mod:`~nvit.profiler.backends.trt_common`); the cache folder is a local setting, not part of a table.

Buffers, stream and CUDA graphs are torch.cuda's by default (``buffers="auto"``, as Torch-TensorRT does:
``set_tensor_address(tensor.data_ptr())``, ``execute_async_v3(stream.cuda_stream)`` captured inside
``torch.cuda.graph``); pycuda is the fallback for hosts with TensorRT but a CPU build of torch, and times
plain launches since it cannot capture graphs. The timing mode is part of the table's settings. Everything
(build, runtime, buffers, launches) happens on CUDA device ``cuda_index``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from nvit.errors import BackendError
from nvit.profiler.backends.common import OnnxCache, option, require
from nvit.profiler.backends.cuda_timer import (
    CUDA_APIS,
    CudaApi,
    CudaTimer,
    PycudaCuda,
    TorchCuda,
    available_cuda_apis,
    open_cuda,
    select_cuda_api,
    timing_mode,
)
from nvit.profiler.backends.trt_common import (
    TimingCacheFile,
    build_serialized,
    check_input_dtypes,
    default_cache_dir,
    deserialize,
    io_names,
    itemsize,
    shared_runtime,
    timing_cache_path,
)
from nvit.profiler.base import Backend, PreparedWorkload, Workload
from nvit.vocab import DeviceKind, Precision, TimingMode

INSTALL_HINT = "TensorRT is not installed: pip install 'nvit[trt]'"
_BYTES_PER_MIB = 1 << 20
_DEFAULTS: dict[str, Any] = {
    "builder_optimization_level": 3,  # TensorRT's default, set explicitly (0-5)
    "workspace_mib": 2048,
    "tf32": True,  # on by default since TensorRT 7.1; recorded because it changes fp32 results
    "avg_timing_iterations": 1,
    "strongly_typed": True,
    "cuda_graphs": True,
    "buffers": "auto",  # torch.cuda when torch has CUDA, else pycuda
    "cuda_index": 0,
    "cache_dir": None,  # local: where the timing cache lives, not part of what is measured
}


def builder_settings(options: dict[str, Any]) -> dict[str, Any]:
    """The builder/runtime settings a TensorRT table is measured under (defaults filled in, validated), and
    ``cuda_index``; the cache folder is not among them (see :meth:`TensorRTBackend.local_settings`)."""
    out = {k: option(options, k, v, type(v)) for k, v in _DEFAULTS.items() if v is not None}
    option(options, "cache_dir", None, (str, os.PathLike))
    if not 0 <= out["builder_optimization_level"] <= 5:
        raise BackendError("builder_optimization_level must be between 0 and 5")
    if out["workspace_mib"] < 1 or out["avg_timing_iterations"] < 1:
        raise BackendError("workspace_mib and avg_timing_iterations must be >= 1")
    if out["buffers"] not in CUDA_APIS:
        raise BackendError(f"option 'buffers' must be {', '.join(CUDA_APIS)}, got {out['buffers']!r}")
    if out["cuda_index"] < 0:
        raise BackendError("cuda_index must be >= 0")
    return out


class TensorRTBackend(Backend):
    name = "tensorrt"
    option_names = frozenset(_DEFAULTS)
    local_options = frozenset({"cache_dir", "cuda_index"})  # where files go, which of several identical GPUs

    def __init__(self, *, device: DeviceKind, precision: Precision, batch_size: int, **options: Any) -> None:
        super().__init__(device=device, precision=precision, batch_size=batch_size, **options)
        if self.device is not DeviceKind.CUDA:
            raise BackendError("the tensorrt backend runs on a GPU: use --gpu, or the onnxruntime backend on CPU")
        self.builder = builder_settings(self.options)
        self.cuda_index = self.builder.pop("cuda_index")
        given = self.options.get("cache_dir")
        self.cache_dir = Path(given).expanduser() if given else default_cache_dir()
        self._trt: Any = None
        self._runtime: Any = None
        self._api: CudaApi | None = None
        self._cache: OnnxCache | None = None
        self._timing_cache: TimingCacheFile | None = None
        self._applied: dict[str, Any] = {}
        self._timers: dict[str, dict[str, Any]] = {}

    def _activate(self) -> None:
        trt = require("tensorrt", INSTALL_HINT)
        self._applied = self._applied_settings(trt)
        self._api = open_cuda(self.builder["buffers"], self.cuda_index)
        try:
            self._trt = trt
            with self._api.on_device():
                self._runtime = shared_runtime(trt, self.cuda_index)
            self._timing_cache = TimingCacheFile(timing_cache_path(
                self.cache_dir, self._api.device_name(), self._api.compute_capability(), trt.__version__))
            self._cache = OnnxCache("tensorrt")
        except BaseException:
            self._deactivate()
            raise

    def _deactivate(self) -> None:
        if self._cache is not None:
            self._cache.close()
        if self._api is not None:
            self._api.close()
        self._cache = self._api = None

    @property
    def timing_mode(self) -> TimingMode:
        if self._api is not None:
            can_capture = self._api.can_capture
        else:  # not entered: what the API it would open here can do
            try:
                can_capture = select_cuda_api(self.builder["buffers"], **available_cuda_apis()) == TorchCuda.name
            except BackendError:
                can_capture = self.builder["buffers"] != PycudaCuda.name
        return timing_mode(can_capture, self.builder["cuda_graphs"])

    # -- build --
    def _applied_settings(self, trt: Any) -> dict[str, Any]:
        """What the builder config gets, for this TensorRT (TF32 only where the flag exists)."""
        b = self.builder
        applied: dict[str, Any] = {k: b[k] for k in ("workspace_mib", "builder_optimization_level",
                                                     "avg_timing_iterations")}
        if hasattr(trt.BuilderFlag, "TF32"):
            applied["tf32"] = b["tf32"]
        if not b["strongly_typed"] and self.precision is not Precision.FP32:
            if not hasattr(trt.BuilderFlag, "FP16" if self.precision is Precision.FP16 else "BF16"):
                raise BackendError(f"TensorRT {trt.__version__} has no weak typing; use strongly_typed=True")
            applied["precision_flag"] = self.precision.value
        return applied

    def _configure(self, config: Any) -> None:
        trt, a = self._trt, self._applied
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, a["workspace_mib"] * _BYTES_PER_MIB)
        config.builder_optimization_level = a["builder_optimization_level"]
        config.avg_timing_iterations = a["avg_timing_iterations"]
        if "tf32" in a:
            (config.set_flag if a["tf32"] else config.clear_flag)(trt.BuilderFlag.TF32)
        if "precision_flag" in a:
            config.set_flag(getattr(trt.BuilderFlag, "FP16" if self.precision is Precision.FP16 else "BF16"))

    @property
    def trt(self) -> Any:
        """The ``tensorrt`` module, while the backend is entered."""
        return self._require_active()[0]

    def _require_active(self) -> tuple[Any, CudaApi, OnnxCache, TimingCacheFile]:
        if self._api is None or self._cache is None or self._timing_cache is None:
            raise BackendError("use the backend as a context manager: `with backend: ...`")
        return self._trt, self._api, self._cache, self._timing_cache

    def serialize_workload(self, workload: Workload) -> bytes:
        """A serialized engine for ``workload`` (static batch, this backend's precision and settings):
        exactly what the profiler times, for ``nvit export --trt``."""
        _, _, cache, _ = self._require_active()
        self._check_batch(workload)
        return self.build_serialized(cache.path(workload, self.precision), workload.name)

    def build_serialized(self, onnx_path: Path, name: str) -> bytes:
        """Parse ``onnx_path`` and build a serialized engine with this backend's settings, on its device."""
        trt, api, _, timing_cache = self._require_active()
        with api.on_device():
            return build_serialized(trt, onnx_path, name, strongly_typed=self.builder["strongly_typed"],
                                    configure=self._configure, timing_cache=timing_cache)

    def engine(self, serialized: bytes, name: str) -> Any:
        """Deserialize an engine on this backend's device and check its inputs have the table's precision."""
        trt, api, _, _ = self._require_active()
        with api.on_device():
            engine = deserialize(trt, self._runtime, serialized, name)
        check_input_dtypes(trt, engine, self.precision, name)
        return engine

    # -- run --
    def _prepare_impl(self, workload: Workload) -> PreparedWorkload:
        trt, api, cache, _ = self._require_active()
        engine = self.engine(self.build_serialized(cache.path(workload, self.precision), workload.name),
                             workload.name)
        inputs, outputs = io_names(trt, engine)
        buffers = []
        with api.on_device():
            context = engine.create_execution_context()
            for n in inputs:
                context.set_input_shape(n, tuple(engine.get_tensor_shape(n)))
            for n in (*inputs, *outputs):  # inputs first set their shapes, so every output shape is known
                shape = tuple(context.get_tensor_shape(n))
                ptr, buf = api.alloc_zeros(math.prod(shape) * itemsize(engine.get_tensor_dtype(n)))
                context.set_tensor_address(n, ptr)
                buffers.append(buf)
        keep = (engine, context, buffers)  # alive as long as the timer that launches them

        def launch() -> None:
            if not keep[1].execute_async_v3(api.stream_handle):
                raise BackendError(f"TensorRT failed to enqueue {workload.name!r}")

        timer = CudaTimer(api, launch, min_sample_ms=self.harness.min_sample_ms,
                          use_graph=self.builder["cuda_graphs"]).prepare()
        self._timers[workload.name] = timer.describe()

        def release() -> None:
            api.synchronize()
            for buf in buffers:
                api.free(buf)
            buffers.clear()

        return PreparedWorkload(run=timer, returns_ms=True, release=release)

    def timer_info(self) -> dict[str, dict[str, Any]]:
        return dict(self._timers)

    def versions(self) -> dict[str, str]:
        import torch

        out = {"torch": torch.__version__}
        if self._trt is not None:
            out["tensorrt"] = self._trt.__version__
        if self._api is not None:
            out["cuda_api"] = self._api.name
        return out

    def local_settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {"cache_dir": str(self.cache_dir), "cuda_index": self.cuda_index}
        if self._timing_cache is not None:
            out["timing_cache"] = str(self._timing_cache.path)
        return out

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), **self.builder, "applied": dict(self._applied)}
