"""``nvit export --trt``: a TensorRT engine built exactly as the profiler builds the blocks it times.

The engine comes from :class:`~nvit.profiler.backends.tensorrt_backend.TensorRTBackend` (same ONNX
exporter, precision handling, builder flags, timing cache and device), has a static batch, and is saved next
to a metadata JSON (versions, device, precision, whether TF32 was allowed, input shape, builder settings).
An optional check runs the engine on seeded inputs (torch.cuda buffers on the backend's device, its own
stream) and compares its logits with PyTorch's fp32 ones at the engine's tolerance
(:meth:`~nvit.export.verify.Tolerance.for_engine`: TF32's for fp32 engines built with TF32) plus top-1
agreement on decisive samples.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nvit import __version__
from nvit.errors import BackendError, ExportError
from nvit.export.verify import Tolerance, compare_logits
from nvit.fileio import atomic_write_bytes, atomic_write_text
from nvit.profiler.base import Workload, get_backend
from nvit.vocab import DeviceKind, Precision

ENGINE_META_SUFFIX = ".json"
CHECK_BATCHES = 4  # seeded inputs the engine is checked on (each of the engine's static batch)


def build_engine_file(model: torch.nn.Module, engine_path: str | os.PathLike[str], shape: tuple[int, ...],
                      precision: Precision, *, check: bool = True, tf32: bool = True, **builder_options: Any
                      ) -> tuple[Path, dict[str, Any]]:
    """Build, save and (optionally) check an engine for ``model`` at input ``shape``; returns its metadata.
    ``tf32`` allows TF32 matrix products in fp32 layers (TensorRT's default; recorded, and checked at the TF32
    tolerance)."""
    from nvit.profiler.device import backend_fingerprint

    engine_path = Path(engine_path)
    backend = get_backend("tensorrt")(device=DeviceKind.CUDA, precision=precision, batch_size=shape[0],
                                      tf32=tf32, **builder_options)
    with backend:
        serialized = backend.serialize_workload(Workload("model", model, tuple(shape)))
        settings = backend.settings()
        tf32_allowed = bool(settings["applied"].get("tf32", False))
        meta: dict[str, Any] = {
            "schema_version": 1, "kind": "nvit.engine", "nvit_version": __version__,
            "created_unix_s": time.time(), "engine_file": engine_path.name, "input_shape": list(shape),
            "precision": Precision(precision).value, "tf32": tf32_allowed, "settings": settings,
            "local_settings": backend.local_settings(), "versions": backend.versions(),
            "device": backend_fingerprint(backend).to_dict(),
        }
        if check:
            meta["check"] = check_engine(backend, serialized, model, shape, precision, tf32=tf32_allowed)
    atomic_write_bytes(engine_path, serialized)  # only an engine that passed its check is written
    atomic_write_text(engine_path.with_suffix(engine_path.suffix + ENGINE_META_SUFFIX),
                      json.dumps(meta, indent=2, default=str) + "\n")
    return engine_path, meta


def run_engine(backend: Any, engine: Any, inputs: list[torch.Tensor]) -> list[np.ndarray]:
    """Run ``engine`` (one input, one output) on each CPU tensor of ``inputs``; returns the outputs (fp32).
    Buffers are torch tensors made on the backend's device and stream, the stream the engine runs on."""
    from nvit.profiler.backends.trt_common import TORCH_DTYPE, dtype_name, io_names

    if not torch.cuda.is_available():
        raise BackendError("checking a TensorRT engine needs a CUDA build of torch (skip the check to build only)")
    trt = backend.trt
    names_in, names_out = io_names(trt, engine)
    if len(names_in) != 1 or len(names_out) != 1:
        raise ExportError(f"expected one input and one output, the engine has {names_in} / {names_out}")
    (name_in,), (name_out,) = names_in, names_out
    dtype_in = getattr(torch, TORCH_DTYPE[dtype_name(engine.get_tensor_dtype(name_in))])
    dtype_out = getattr(torch, TORCH_DTYPE[dtype_name(engine.get_tensor_dtype(name_out))])
    device = torch.device("cuda", backend.cuda_index)
    outputs = []
    with torch.cuda.device(device):
        stream = torch.cuda.Stream(device)
        context = engine.create_execution_context()
        with torch.cuda.stream(stream):
            for x in inputs:
                x_dev = x.to(device=device, dtype=dtype_in).contiguous()
                context.set_input_shape(name_in, tuple(x_dev.shape))
                y_dev = torch.empty(tuple(context.get_tensor_shape(name_out)), device=device, dtype=dtype_out)
                context.set_tensor_address(name_in, x_dev.data_ptr())
                context.set_tensor_address(name_out, y_dev.data_ptr())
                if not context.execute_async_v3(stream.cuda_stream):
                    raise ExportError("TensorRT failed to run the engine")
                outputs.append(y_dev.float().cpu().numpy())  # waits for the stream
    return outputs


def check_engine(backend: Any, serialized: bytes, model: torch.nn.Module, shape: tuple[int, ...],
                 precision: Precision, *, tf32: bool, seed: int = 0, batches: int = CHECK_BATCHES
                 ) -> dict[str, Any]:
    """Compare the engine's logits with PyTorch fp32 on the CPU over ``batches`` seeded inputs."""
    engine = backend.engine(serialized, "model")  # deserialized on the backend's device, input dtype checked
    generator = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(shape, generator=generator) for _ in range(batches)]
    got = run_engine(backend, engine, inputs)
    with torch.no_grad():
        expected = [model.eval()(x).numpy() for x in inputs]
    tol = Tolerance.for_engine(precision, tf32)
    result = compare_logits(np.concatenate(got), np.concatenate(expected), tol)
    out = {"tolerance": tol.name.lower(), "atol": tol.atol, "rtol": tol.rtol, "samples": batches * shape[0],
           **result.__dict__, "passed": result.passed}
    if not result.passed:
        raise ExportError(
            f"TensorRT engine differs from PyTorch: max abs error {result.max_abs_error:.3g} (atol {tol.atol:g}, "
            f"rtol {tol.rtol:g}, {tol.name.lower()}), top-1 differs on {result.decisive_disagreements} of "
            f"{result.decisive_samples} clear-cut samples")
    return out


def read_engine_meta(engine_path: str | os.PathLike[str], *, device_name: str | None = None) -> dict[str, Any]:
    """Metadata of a saved engine; refuses an engine built on another GPU model (engines do not carry over)."""
    engine_path = Path(engine_path)
    meta_path = engine_path.with_suffix(engine_path.suffix + ENGINE_META_SUFFIX)
    if not engine_path.is_file():
        raise ExportError(f"engine not found: {engine_path}")
    if not meta_path.is_file():
        raise ExportError(f"engine {engine_path} has no metadata file {meta_path.name}")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ExportError(f"{meta_path} is not valid JSON (line {exc.lineno})") from None
    built_on = str(((meta.get("device") or {}).get("gpu") or {}).get("name") or "")
    if device_name is not None and built_on.lower() != device_name.lower():
        raise ExportError(f"engine {engine_path.name} was built for {built_on or 'an unknown device'}, "
                          f"this device is {device_name}: rebuild it with 'nvit export --trt' here")
    return meta
