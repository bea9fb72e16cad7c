"""TensorRT pieces shared by the profiler's backend and ``nvit export --trt``: one logger for the process and
one runtime per device, ONNX parsing that reports every parser error, engine builds that share a timing
cache file (surviving a corrupt one), deserialization that checks its result, and engine I/O dtypes.

Written against the TensorRT 10/11 Python API (named I/O tensors); ``tensorrt`` is passed in by the caller,
so nothing here imports it. The timing-cache file helpers are pure Python.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from nvit.errors import BackendError
from nvit.fileio import atomic_write_bytes
from nvit.profiler.backends.common import nvit_cache_dir
from nvit.vocab import Precision

logger = logging.getLogger(__name__)

ENGINE_DTYPE = {Precision.FP32: "FLOAT", Precision.FP16: "HALF", Precision.BF16: "BF16"}
ITEMSIZE = {"FLOAT": 4, "HALF": 2, "BF16": 2, "INT32": 4, "INT64": 8, "INT8": 1, "UINT8": 1, "BOOL": 1, "FP8": 1}
TORCH_DTYPE = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
               "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}

_shared_lock = threading.Lock()
_shared: dict[Any, Any] = {}  # ("logger",) -> ILogger; ("runtime", device index) -> IRuntime


# ---- timing cache file (pure Python, tested without TensorRT) ---------------------------------------
def default_cache_dir() -> Path:
    return nvit_cache_dir() / "tensorrt"


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


# ---- process-wide TensorRT objects -------------------------------------------------------------------
def shared_logger(trt: Any) -> Any:
    """The process's one TensorRT logger (warnings and errors)."""
    with _shared_lock:
        if ("logger",) not in _shared:
            _shared[("logger",)] = trt.Logger(trt.Logger.WARNING)
        return _shared[("logger",)]


def shared_runtime(trt: Any, device_index: int) -> Any:
    """One runtime per CUDA device, created (by the caller) while that device is current."""
    log = shared_logger(trt)
    with _shared_lock:
        key = ("runtime", device_index)
        if key not in _shared:
            _shared[key] = trt.Runtime(log)
        return _shared[key]


# ---- build ---------------------------------------------------------------------------------------------
def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def parse_onnx(trt: Any, network: Any, onnx_path: Path, name: str) -> None:
    """Parse ``onnx_path`` into ``network``; on failure raise one error that lists every parser error."""
    parser = trt.OnnxParser(network, shared_logger(trt))
    ok = parser.parse_from_file(str(onnx_path))
    errors = [_one_line(parser.get_error(i)) for i in range(parser.num_errors)]
    if ok and not errors:
        return
    listed = "; ".join(f"({i}/{len(errors)}) {e}" for i, e in enumerate(errors, 1)) or "no error reported"
    raise BackendError(f"TensorRT could not parse {name!r} ({onnx_path.name}): {listed}")


def timing_cache_from(config: Any, data: bytes, source: str) -> Any:
    """A timing cache from serialized ``data``; unreadable data (corrupt, another TensorRT) starts a new
    one with a warning, since a timing cache only saves build time."""
    cache = None
    if data:
        try:
            cache = config.create_timing_cache(data)
        except Exception as exc:  # TensorRT raises or returns None depending on version and damage
            logger.warning("ignoring unreadable TensorRT timing cache %s: %s", source, _one_line(exc))
        else:
            if cache is None:
                logger.warning("ignoring unreadable TensorRT timing cache %s", source)
    if cache is None:
        cache = config.create_timing_cache(b"")
    if cache is None:
        raise BackendError("TensorRT could not create an empty timing cache")
    return cache


def build_serialized(trt: Any, onnx_path: Path, name: str, *, strongly_typed: bool,
                     configure: Callable[[Any], None], timing_cache: TimingCacheFile) -> bytes:
    """Parse and build ``onnx_path`` on the current device; the build reads the shared timing cache and
    merges what it learned back into it."""
    builder = trt.Builder(shared_logger(trt))
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parse_onnx(trt, network, onnx_path, name)
    config = builder.create_builder_config()
    configure(config)
    cache = timing_cache_from(config, timing_cache.load(), str(timing_cache.path))
    config.set_timing_cache(cache, False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"TensorRT failed to build an engine for {name!r} (see the TensorRT log above)")

    def merge(current: bytes) -> bytes:
        shared = timing_cache_from(config, current, str(timing_cache.path))
        if not shared.combine(cache, False):  # another TensorRT version wrote it: keep only ours
            shared = cache
        return bytes(memoryview(shared.serialize()))

    timing_cache.update(merge)
    return bytes(memoryview(serialized))


def deserialize(trt: Any, runtime: Any, serialized: bytes, name: str) -> Any:
    engine = runtime.deserialize_cuda_engine(serialized)
    if engine is None:
        raise BackendError(f"TensorRT could not deserialize the engine of {name!r} (built by another TensorRT or "
                           "for another GPU? see the TensorRT log above)")
    return engine


# ---- engine I/O ------------------------------------------------------------------------------------------
def io_names(trt: Any, engine: Any) -> tuple[list[str], list[str]]:
    """The engine's input and output tensor names, in engine order."""
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    return inputs, [n for n in names if n not in inputs]


def dtype_name(dtype: Any) -> str:
    return str(getattr(dtype, "name", dtype)).rsplit(".", 1)[-1]


def check_input_dtypes(trt: Any, engine: Any, precision: Precision, name: str) -> None:
    """Every input of the engine must have the table's precision (what the caller's buffers hold)."""
    want = ENGINE_DTYPE[Precision(precision)]
    inputs, _ = io_names(trt, engine)
    wrong = {n: dtype_name(engine.get_tensor_dtype(n)) for n in inputs}
    wrong = {n: d for n, d in wrong.items() if d != want}
    if wrong:
        listed = ", ".join(f"{n} is {d}" for n, d in wrong.items())
        raise BackendError(f"the engine of {name!r} takes {listed}; expected {want} for {Precision(precision).value}")


def itemsize(dtype: Any) -> int:
    size = getattr(dtype, "itemsize", None)
    return int(size) if size is not None else ITEMSIZE[dtype_name(dtype)]
