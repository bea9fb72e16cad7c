"""Built-in latency backends, registered by name. Registering is cheap: each backend's module (and its
heavy packages) is imported only when that backend is asked for with :func:`nvit.profiler.base.get_backend`.
"""

from __future__ import annotations

from nvit.profiler.base import Backend, register_backend
from nvit.vocab import DeviceKind

DEFAULT_CPU_BACKEND = "onnxruntime"  # runs everywhere, including CI
DEFAULT_GPU_BACKEND = "tensorrt"


def _onnxruntime() -> type[Backend]:
    from nvit.profiler.backends.onnxruntime_backend import OnnxRuntimeBackend

    return OnnxRuntimeBackend


def _torch() -> type[Backend]:
    from nvit.profiler.backends.torch_backend import TorchBackend

    return TorchBackend


def _tensorrt() -> type[Backend]:
    from nvit.profiler.backends.tensorrt_backend import TensorRTBackend

    return TensorRTBackend


def default_backend(device: DeviceKind) -> str:
    """The backend a command uses when none is named: TensorRT on a GPU, onnxruntime on a CPU."""
    return DEFAULT_GPU_BACKEND if DeviceKind(device) is DeviceKind.CUDA else DEFAULT_CPU_BACKEND


register_backend("onnxruntime", _onnxruntime)
register_backend("torch", _torch)
register_backend("tensorrt", _tensorrt)
