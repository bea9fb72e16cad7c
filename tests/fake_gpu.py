"""Stand-ins for the CUDA, TensorRT and pycuda APIs, just enough of each to drive nvit's GPU paths on a CPU.

The fakes keep the facts the tests check: which device was current when an engine was built, deserialized
or given an execution context; which stream a launch used; what a timing cache file held. A fake device
clock advances by each launch's cost, so CUDA-event timings are exact.
"""

from __future__ import annotations

import contextlib
import enum
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Device:
    """Shared state of the fake machine: the current device and what happened on which."""

    current: int = 0
    clock_ms: float = 0.0
    log: list[tuple[str, int]] = field(default_factory=list)  # (event, device current at the time)

    def note(self, event: str) -> None:
        self.log.append((event, self.current))


class FakeCuda:
    """A :class:`~nvit.profiler.backends.cuda_timer.CudaApi` on a fake device."""

    name = "fake"
    can_capture = True

    def __init__(self, machine: Device, index: int = 0, capture_error: str | None = None,
                 replay_ms: float | None = None) -> None:
        self.machine, self.index = machine, index
        self.capture_error, self.replay_ms = capture_error, replay_ms
        self.stream_handle = 7
        self.allocations: list[int] = []
        self.closed = False

    @contextlib.contextmanager
    def on_device(self):
        before, self.machine.current = self.machine.current, self.index
        try:
            yield
        finally:
            self.machine.current = before

    on_stream = on_device

    def new_event(self):
        return {"t": None}

    def record(self, event):
        event["t"] = self.machine.clock_ms

    def elapsed_ms(self, start, end):
        return end["t"] - start["t"]

    def synchronize(self):
        pass

    def capture(self, launch):
        if self.capture_error:
            raise RuntimeError(self.capture_error)
        cost = self.replay_ms

        def replay():
            if cost is None:
                launch()
            else:
                self.machine.clock_ms += cost

        return replay

    def alloc_zeros(self, nbytes):
        self.machine.note("alloc")
        self.allocations.append(nbytes)
        return 0x1000 * len(self.allocations), bytearray(nbytes)

    def free(self, buf):
        pass

    def device_name(self):
        return "NVIDIA H200"

    def compute_capability(self):
        return "9.0"

    def close(self):
        self.closed = True


# ---- TensorRT ------------------------------------------------------------------------------------------------
class DataType(enum.Enum):
    FLOAT = ("float", 4)
    HALF = ("half", 2)
    BF16 = ("bf16", 2)

    @property
    def itemsize(self) -> int:
        return self.value[1]


class TensorIOMode(enum.Enum):
    INPUT = 1
    OUTPUT = 2


class BuilderFlag(enum.Enum):
    TF32 = 1
    FP16 = 2
    BF16 = 3


def fake_tensorrt(machine: Device, *, input_dtype: DataType = DataType.HALF, corrupt_cache: str = "raise",
                  deserialize_none: bool = False) -> types.ModuleType:
    """A ``tensorrt`` module. ONNX "files" are text: lines ``error: <message>`` make parsing fail. Timing
    caches serialize as ``TC:`` + entries; other bytes are corrupt (``corrupt_cache``: raise or none)."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.13.0.35"
    trt.DataType, trt.TensorIOMode, trt.BuilderFlag = DataType, TensorIOMode, BuilderFlag
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=0)
    trt.created = {"Logger": 0, "Runtime": 0}
    trt.configs, trt.engines = [], []

    class Logger:
        WARNING = "warning"

        def __init__(self, severity):
            trt.created["Logger"] += 1

    class TimingCache:
        def __init__(self, entries):
            self.entries = list(entries)

        def combine(self, other, ignore_mismatch):
            self.entries += [e for e in other.entries if e not in self.entries]
            return True

        def serialize(self):
            return ("TC:" + ",".join(self.entries)).encode()

    class Config:
        def __init__(self):
            self.flags, self.cache, self.pool = set(), None, {}
            trt.configs.append(self)

        def set_memory_pool_limit(self, pool, size):
            self.pool[pool] = size

        def set_flag(self, flag):
            self.flags.add(flag)

        def clear_flag(self, flag):
            self.flags.discard(flag)

        def create_timing_cache(self, data):
            data = bytes(data)
            if not data:
                return TimingCache([])
            if data.startswith(b"TC:"):
                return TimingCache([e for e in data[3:].decode().split(",") if e])
            if corrupt_cache == "raise":
                raise RuntimeError("Serialization assertion magicTagRead == kMAGIC_TAG failed")
            return None

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache

    class Network:
        def __init__(self, flags):
            self.flags = flags

    class ParserError:
        def __init__(self, text):
            self.text = text

        def __str__(self):
            return f"In node -1 (parseGraph):\n  INVALID_NODE: {self.text}"

    class OnnxParser:
        def __init__(self, network, logger):
            self.errors = []

        def parse_from_file(self, path):
            with open(path) as fh:
                self.errors = [ParserError(line[7:].strip()) for line in fh if line.startswith("error: ")]
            return not self.errors

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, i):
            return self.errors[i]

    class Builder:
        def __init__(self, logger):
            machine.note("builder")

        def create_network(self, flags):
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def build_serialized_network(self, network, config):
            machine.note("build")
            config.cache.entries.append(f"tactic{len(config.cache.entries)}")
            return memoryview(b"ENGINE")

    class Context:
        def __init__(self, engine):
            self.engine, self.addresses, self.streams = engine, {}, []

        def set_input_shape(self, name, shape):
            pass

        def get_tensor_shape(self, name):
            return self.engine.shapes[name]

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr

        def execute_async_v3(self, stream):
            self.streams.append(stream)
            machine.clock_ms += 0.25
            return True

    class Engine:
        names = ("input", "output")

        def __init__(self):
            self.shapes = {"input": (1, 8, 32), "output": (1, 8, 16)}
            self.contexts = []

        num_io_tensors = 2

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return TensorIOMode.INPUT if name == "input" else TensorIOMode.OUTPUT

        def get_tensor_shape(self, name):
            return self.shapes[name]

        def get_tensor_dtype(self, name):
            return input_dtype

        def create_execution_context(self):
            machine.note("context")
            self.contexts.append(Context(self))
            return self.contexts[-1]

    class Runtime:
        def __init__(self, logger):
            trt.created["Runtime"] += 1
            machine.note("runtime")

        def deserialize_cuda_engine(self, data):
            machine.note("deserialize")
            if deserialize_none:
                return None
            trt.engines.append(Engine())
            return trt.engines[-1]

    trt.Logger, trt.Runtime, trt.Builder, trt.OnnxParser = Logger, Runtime, Builder, OnnxParser
    return trt


# ---- pycuda ------------------------------------------------------------------------------------------------
def fake_pycuda(stack: list[str], *, fail_stream: bool = False) -> types.ModuleType:
    """``pycuda.driver`` keeping a context stack; ``fail_stream`` makes creating a stream fail."""
    cuda = types.ModuleType("pycuda.driver")
    cuda.freed, cuda.released = [], []

    class Error(Exception):
        pass

    class Context:
        def __init__(self, name):
            self.name = name

        def push(self):
            stack.append(self.name)

        def pop(self):
            stack.pop()

        def detach(self):
            cuda.released.append(self.name)

        @staticmethod
        def get_current():
            return _contexts.get(stack[-1]) if stack else None

    _contexts: dict[str, Context] = {}

    class Device:
        def __init__(self, index):
            self.index = index

        def retain_primary_context(self):
            return _contexts.setdefault(f"primary{self.index}", Context(f"primary{self.index}"))

    class Stream:
        def __init__(self):
            if fail_stream:
                raise Error("out of memory")
            self.handle = 11

        def synchronize(self):
            pass

    class Allocation(int):
        def free(self):
            cuda.freed.append(int(self))

    allocated = iter(range(0x100, 0x10000, 0x100))
    cuda.Error, cuda.Context, cuda.Device, cuda.Stream = Error, Context, Device, Stream
    cuda.init = lambda: None
    cuda.Event = lambda: types.SimpleNamespace(record=lambda stream: None)
    cuda.mem_alloc = lambda n: Allocation(next(allocated))
    cuda.memset_d8_async = lambda buf, value, n, stream: None
    return cuda


# ---- onnxruntime -------------------------------------------------------------------------------------------
def fake_onnxruntime(available: list[str], *, session_gets: list[str] | None = None) -> Any:
    """An ``onnxruntime`` whose sessions record the providers they were asked for; a session gets
    ``session_gets`` (default: what it asked for, plus the CPU)."""
    ort = types.ModuleType("onnxruntime")
    ort.__version__ = "1.22.0"
    ort.sessions = []
    ort.get_available_providers = lambda: list(available)
    ort.ExecutionMode = types.SimpleNamespace(ORT_SEQUENTIAL="sequential")
    ort.GraphOptimizationLevel = types.SimpleNamespace(ORT_ENABLE_ALL="all")

    class SessionOptions:
        def add_session_config_entry(self, key, value):
            pass

    class InferenceSession:
        def __init__(self, path, sess_options=None, providers=()):
            self.asked = list(providers)
            ort.sessions.append(self)

        def get_providers(self):
            if session_gets is not None:
                return list(session_gets)
            return [name for name, _ in self.asked] + ["CPUExecutionProvider"]

    ort.SessionOptions, ort.InferenceSession = SessionOptions, InferenceSession
    return ort


def install_fake_tensorrt(monkeypatch: Any, machine: Device, onnx_path: Path, onnx_text: str = "ok",
                          replay_ms: float = 0.125, apis: list[FakeCuda] | None = None,
                          **trt_kwargs: Any) -> tuple[types.ModuleType, list[FakeCuda]]:
    """Make the TensorRT backend use a fake ``tensorrt`` and fake CUDA APIs (one per session, appended to
    ``apis``); ONNX exports become the text file ``onnx_path``."""
    from nvit.profiler.backends import tensorrt_backend, trt_common
    from nvit.profiler.backends.common import OnnxCache

    trt = fake_tensorrt(machine, **trt_kwargs)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(trt_common, "_shared", {})
    apis = [] if apis is None else apis

    def open_cuda(preferred: str, index: int) -> FakeCuda:
        apis.append(FakeCuda(machine, index, replay_ms=replay_ms))
        return apis[-1]

    monkeypatch.setattr(tensorrt_backend, "open_cuda", open_cuda)
    onnx_path.write_text(onnx_text)
    monkeypatch.setattr(OnnxCache, "path", lambda self, workload, precision: onnx_path)
    return trt, apis
