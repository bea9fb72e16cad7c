"""Pieces the backends share: dependency checks that name the fix, dtypes, example inputs, and the
per-session cache of ONNX exports (one export per workload and precision, in a temporary directory)."""

from __future__ import annotations

import copy
import hashlib
import importlib
import logging
import shutil
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

from nvit.errors import BackendError
from nvit.fileio import nvit_cache_dir as nvit_cache_dir  # where backends keep build caches
from nvit.profiler.base import Workload
from nvit.profiler.onnx_store import content_key, default_store
from nvit.vocab import Precision

logger = logging.getLogger(__name__)

INPUT_SEED = 0  # inputs are random normal with this seed: timing must not depend on the run
NO_CUDA = "--gpu needs a CUDA device but torch.cuda.is_available() is False"
_TORCH_DTYPES = {Precision.FP32: "float32", Precision.FP16: "float16", Precision.BF16: "bfloat16"}


def require(module: str, fix: str) -> ModuleType:
    """Import ``module`` or fail with one line that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if exc.name == module.split(".")[0]:  # the package itself is missing
            raise BackendError(fix) from None
        raise BackendError(f"{module} is installed but failed to import ({exc}); {fix}") from None


def require_cuda_torch() -> Any:
    """torch, with a usable CUDA device."""
    import torch

    if not torch.cuda.is_available():
        raise BackendError(NO_CUDA)
    return torch


def option(options: dict[str, Any], name: str, default: Any, kind: type | tuple[type, ...]) -> Any:
    """Read one backend option, checking its type (``None`` means the default)."""
    value = options.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BackendError(f"option {name!r} must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def torch_dtype(precision: Precision) -> Any:
    import torch

    return getattr(torch, _TORCH_DTYPES[Precision(precision)])


def example_input(workload: Workload, precision: Precision, device: str = "cpu") -> Any:
    import torch

    gen = torch.Generator().manual_seed(INPUT_SEED)
    x = torch.randn(workload.input_shape, generator=gen)
    return x.to(device=device, dtype=torch_dtype(precision))


def module_copy(workload: Workload, precision: Precision, device: str = "cpu") -> Any:
    """An eval-mode copy of the workload's module in ``precision`` on ``device``; the workload's own module
    (CPU, fp32, shared with other backends) is never modified."""
    if workload.module is None:
        raise BackendError(f"{workload.name!r} is an ONNX file; this backend times torch modules")
    module = copy.deepcopy(workload.module).eval()
    module.requires_grad_(False)
    return module.to(device=device, dtype=torch_dtype(precision))


def workload_key(workload: Workload, precision: Precision) -> str:
    """Identity of an export: name, input shape, precision and every parameter's name and shape."""
    h = hashlib.sha256()
    h.update(repr((workload.name, tuple(workload.input_shape), Precision(precision).value)).encode())
    for name, p in workload.module.state_dict().items():
        h.update(f"{name}:{tuple(p.shape)};".encode())
    return h.hexdigest()[:16]


class OnnxCache:
    """ONNX exports of workloads for one backend session, in a temporary directory removed by ``close``.

    Exports use :func:`nvit.models.onnx.export_onnx` (the exporter ``nvit export`` uses) with a static
    batch; one already in the machine's content-addressed store (:mod:`nvit.profiler.onnx_store`) is
    reused from there, and every new one is added to it. The module is cast to the table's precision
    before export, so fp16/bf16 graphs carry their own types (what strongly typed TensorRT networks and
    onnxruntime CUDA need).
    """

    def __init__(self, prefix: str) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix=f"nvit-{prefix}-"))
        self._paths: dict[str, Path] = {}
        self._store = default_store()

    def path(self, workload: Workload, precision: Precision) -> Path:
        if workload.onnx_path is not None:  # made elsewhere (an upload to the service): used as it is
            return Path(workload.onnx_path)
        key = workload_key(workload, precision)
        if key not in self._paths:
            from nvit.models.onnx import DEFAULT_OPSET, export_onnx

            module = module_copy(workload, precision)
            stored = None
            if self._store is not None:
                content = content_key(module, workload.input_shape, Precision(precision).value, DEFAULT_OPSET)
                stored = self._store.get(content)
            if stored is None:
                safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in workload.name)[:60]
                path = self._dir / f"{safe}-{key}.onnx"
                export_onnx(module, example_input(workload, precision), path, dynamic_batch=False)
                logger.info("exported %s (%s) to %s", workload.name, Precision(precision).value, path)
                if self._store is not None:
                    stored = self._store.put(content, path)
            self._paths[key] = stored or path
        return self._paths[key]

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)
        self._paths.clear()
