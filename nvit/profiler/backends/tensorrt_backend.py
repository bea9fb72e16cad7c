"""TensorRT backend (the default with ``--gpu``): workload → ONNX → engine → CUDA-event timing.

Written against the TensorRT 10/11 Python API. The ONNX graph (the exporter ``nvit export`` uses, static
batch) carries the table's precision: the module is cast to fp16/bf16 before export and the network is
**strongly typed** (weak typing with FP16/BF16 builder flags was deprecated in 10.12 and removed in 11;
``strongly_typed=False`` keeps it for older 10.x). Settings whose defaults moved across versions are set
explicitly and recorded: TF32, builder optimisation level, workspace limit, timing iterations. Builds
share a timing cache per GPU model + TensorRT version (``<cache_dir>/timing-<gpu>-sm<cc>-trt<ver>.cache``),
read and merged back under an ``fcntl`` lock so parallel profilers never lose or corrupt entries.
Execution uses named tensors (``set_input_shape``, ``set_tensor_address``) and ``execute_async_v3`` on the
timer's stream, timed by :class:`~nvit.profiler.backends.cuda_timer.CudaTimer` (CUDA events, graph capture
of the enqueue where it works). Buffers, stream and events come from pycuda when installed, else torch.cuda.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from nvit.errors import BackendError
from nvit.fileio import atomic_write_bytes
from nvit.profiler.backends.common import OnnxCache, option, require
from nvit.profiler.backends.cuda_timer import CudaApi, CudaTimer, open_cuda
from nvit.profiler.base import Backend, DeviceKind, Precision, PreparedWorkload, Workload

logger = logging.getLogger(__name__)

INSTALL_HINT = "TensorRT is not installed: pip install 'nvit[trt]'"
CACHE_ENV = "NVIT_CACHE_DIR"
_BYTES_PER_MIB = 1 << 20
_DEFAULTS: dict[str, Any] = {
    "builder_optimization_level": 3,  # TensorRT's default, set explicitly (0-5)
    "workspace_mib": 2048,
    "tf32": True,  # on by default since TensorRT 7.1; recorded because it changes fp32 results
    "avg_timing_iterations": 1,
    "strongly_typed": True,
    "cuda_graphs": True,
    "buffers": "auto",  # pycuda when installed, else torch.cuda
    "cuda_index": 0,
    "cache_dir": None,
}
_ITEMSIZE = {"FLOAT": 4, "HALF": 2, "BF16": 2, "INT32": 4, "INT64": 8, "INT8": 1, "UINT8": 1, "BOOL": 1, "FP8": 1}


# ---- timing cache file (pure Python, tested without TensorRT) ---------------------------------------
def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / "tensorrt"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nvit" / "tensorrt"


def timing_cache_path(cache_dir: str | os.PathLike[str], gpu_name: str, compute_capability: str,
                      trt_version: str) -> Path:
    """One timing cache per GPU model and TensorRT version (tactic timings do not carry across either)."""
    slug = re.sub(r"[^a-z0-9.]+", "-", f"{gpu_name}-sm{compute_capability.replace('.', '')}".lower()).strip("-")
    version = re.sub(r"[^0-9A-Za-z.]+", "-", trt_version)
    return Path(cache_dir) / f"timing-{slug}-trt{version}.cache"


@contextlib.contextmanager
def _locked(path: Path, exclusive: bool) -> Iterator[None]:
    lock_path = path.with_name(path.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


class TimingCacheFile:
    """A serialized timing cache shared by processes: read under a shared lock, updated (read, merge,
    atomic replace) under an exclusive one. The merge itself is the caller's (TensorRT's ``combine``)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self) -> bytes:
        with _locked(self.path, exclusive=False):
            return self.path.read_bytes() if self.path.exists() else b""

    def update(self, merge: Callable[[bytes], bytes]) -> None:
        with _locked(self.path, exclusive=True):
            current = self.path.read_bytes() if self.path.exists() else b""
            atomic_write_bytes(self.path, merge(current))


def builder_settings(options: dict[str, Any]) -> dict[str, Any]:
    """The builder/runtime settings a TensorRT table is measured under (defaults filled in, validated)."""
    out = {k: option(options, k, v, type(v)) for k, v in _DEFAULTS.items() if v is not None}
    out["cache_dir"] = option(options, "cache_dir", None, (str, os.PathLike))
    if not 0 <= out["builder_optimization_level"] <= 5:
        raise BackendError("builder_optimization_level must be between 0 and 5")
    if out["workspace_mib"] < 1 or out["avg_timing_iterations"] < 1:
        raise BackendError("workspace_mib and avg_timing_iterations must be >= 1")
    if out["buffers"] not in ("auto", "pycuda", "torch"):
        raise BackendError(f"option 'buffers' must be auto, pycuda or torch, got {out['buffers']!r}")
    out["cache_dir"] = str(Path(out["cache_dir"]).expanduser() if out["cache_dir"] else default_cache_dir())
    return out


# ---- backend -----------------------------------------------------------------------------------------
class TensorRTBackend(Backend):
    name = "tensorrt"
    option_names = frozenset(_DEFAULTS)

    def __init__(self, *, device: DeviceKind, precision: Precision, batch_size: int, **options: Any) -> None:
        super().__init__(device=device, precision=precision, batch_size=batch_size, **options)
        if self.device is not DeviceKind.CUDA:
            raise BackendError("the tensorrt backend runs on a GPU: use --gpu, or the onnxruntime backend on CPU")
        self.builder = builder_settings(self.options)
        self._trt: Any = None
        self._api: CudaApi | None = None
        self._cache: OnnxCache | None = None
        self._timing_cache: TimingCacheFile | None = None
        self._applied: dict[str, Any] = {}
        self._timers: dict[str, dict[str, Any]] = {}

    def _activate(self) -> None:
        trt = require("tensorrt", INSTALL_HINT)
        self._api = open_cuda(self.builder["buffers"], self.builder["cuda_index"])
        try:
            self._trt = trt
            self._logger = trt.Logger(trt.Logger.WARNING)
            self._runtime = trt.Runtime(self._logger)
            self._timing_cache = TimingCacheFile(timing_cache_path(
                self.builder["cache_dir"], self._api.device_name(), self._api.compute_capability(), trt.__version__))
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

    # -- build --
    def _configure(self, config: Any) -> None:
        trt, b = self._trt, self.builder
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, b["workspace_mib"] * _BYTES_PER_MIB)
        config.builder_optimization_level = b["builder_optimization_level"]
        config.avg_timing_iterations = b["avg_timing_iterations"]
        applied = {"workspace_mib": b["workspace_mib"], "builder_optimization_level": b["builder_optimization_level"],
                   "avg_timing_iterations": b["avg_timing_iterations"]}
        if hasattr(trt.BuilderFlag, "TF32"):
            (config.set_flag if b["tf32"] else config.clear_flag)(trt.BuilderFlag.TF32)
            applied["tf32"] = b["tf32"]
        if not b["strongly_typed"] and self.precision is not Precision.FP32:
            flag = getattr(trt.BuilderFlag, "FP16" if self.precision is Precision.FP16 else "BF16", None)
            if flag is None:
                raise BackendError(f"TensorRT {trt.__version__} has no weak typing; use strongly_typed=True")
            config.set_flag(flag)
            applied["precision_flag"] = self.precision.value
        self._applied = applied

    def serialize_workload(self, workload: Workload) -> bytes:
        """A serialized engine for ``workload`` (static batch, this backend's precision and settings):
        exactly what the profiler times, for ``nvit export --trt``."""
        if self._cache is None:
            raise BackendError("use the backend as a context manager: `with backend: backend.serialize_workload(...)`")
        self._check_batch(workload)
        return self.build_serialized(self._cache.path(workload, self.precision), workload.name)

    def build_serialized(self, onnx_path: Path, name: str) -> bytes:
        """Parse ``onnx_path`` and build a serialized engine with this backend's settings."""
        if self._trt is None or self._timing_cache is None:
            raise BackendError("use the backend as a context manager: `with backend: backend.build_serialized(...)`")
        trt = self._trt
        builder = trt.Builder(self._logger)
        flags = 0
        if self.builder["strongly_typed"]:
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise BackendError(f"TensorRT could not parse {name!r}: {errors[0] if errors else 'unknown error'}")
        config = builder.create_builder_config()
        self._configure(config)
        cache = config.create_timing_cache(self._timing_cache.load())
        config.set_timing_cache(cache, False)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise BackendError(f"TensorRT failed to build an engine for {name!r} (see the TensorRT log above)")

        def merge(current: bytes) -> bytes:
            shared = config.create_timing_cache(current)
            shared.combine(cache, False)
            return bytes(memoryview(shared.serialize()))

        self._timing_cache.update(merge)
        return bytes(memoryview(serialized))

    def _build(self, onnx_path: Path, name: str) -> Any:
        engine = self._runtime.deserialize_cuda_engine(self.build_serialized(onnx_path, name))
        if engine is None:
            raise BackendError(f"TensorRT could not deserialize the engine it built for {name!r}")
        return engine

    # -- run --
    def _itemsize(self, dtype: Any) -> int:
        size = getattr(dtype, "itemsize", None)
        return int(size) if size is not None else _ITEMSIZE[dtype.name]

    def _prepare_impl(self, workload: Workload) -> PreparedWorkload:
        if self._api is None or self._cache is None:
            raise BackendError("use the backend as a context manager: `with backend: backend.measure(...)`")
        trt, api = self._trt, self._api
        engine = self._build(self._cache.path(workload, self.precision), workload.name)
        context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        for n in names:
            if is_input[n]:
                context.set_input_shape(n, tuple(engine.get_tensor_shape(n)))
        buffers = []
        for n in names:  # inputs first set their shapes, so every output shape is known here
            shape = tuple(context.get_tensor_shape(n))
            ptr, buf = api.alloc_zeros(math.prod(shape) * self._itemsize(engine.get_tensor_dtype(n)))
            context.set_tensor_address(n, ptr)
            buffers.append(buf)

        keep = (engine, context, buffers)  # alive as long as the timer that launches them

        def launch() -> None:
            if not keep[1].execute_async_v3(api.stream_handle):
                raise BackendError(f"TensorRT failed to enqueue {workload.name!r}")

        timer = CudaTimer(api, launch, min_sample_ms=self.harness.min_sample_ms,
                          use_graph=self.builder["cuda_graphs"]).prepare()
        self._timers[workload.name] = timer.describe()
        return PreparedWorkload(run=timer, returns_ms=True, release=api.synchronize)

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

    def settings(self) -> dict[str, Any]:
        out = {**super().settings(), **self.builder, "applied": dict(self._applied)}
        if self._timing_cache is not None:
            out["timing_cache"] = str(self._timing_cache.path)
        out["timer_modes"] = sorted({t["mode"] for t in self._timers.values()})
        return out
