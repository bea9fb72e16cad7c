"""``nvit export --trt``: a TensorRT engine built exactly as the profiler builds the blocks it times.

The engine comes from :class:`~nvit.profiler.backends.tensorrt_backend.TensorRTBackend` (same ONNX
exporter, precision handling, builder flags and timing cache), has a static batch, and is saved next to a
metadata JSON (versions, device, precision, input shape, builder settings). An optional check runs the
engine on seeded inputs and compares its logits with PyTorch's at per-precision tolerances.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from nvit import __version__
from nvit.errors import BackendError, ExportError
from nvit.export.verify import Tolerance
from nvit.fileio import atomic_write_bytes, atomic_write_text
from nvit.profiler.base import DeviceKind, Precision, Workload, get_backend

ENGINE_META_SUFFIX = ".json"
_TOLERANCE = {Precision.FP32: Tolerance.FP32, Precision.FP16: Tolerance.FP16, Precision.BF16: Tolerance.BF16}


def build_engine_file(model: torch.nn.Module, engine_path: str | os.PathLike[str], shape: tuple[int, ...],
                      precision: Precision, *, check: bool = True, **builder_options: Any
                      ) -> tuple[Path, dict[str, Any]]:
    """Build, save and (optionally) check an engine for ``model`` at input ``shape``; returns its metadata."""
    from nvit.profiler.device import fingerprint

    engine_path = Path(engine_path)
    backend = get_backend("tensorrt")(device=DeviceKind.CUDA, precision=precision, batch_size=shape[0],
                                      **builder_options)
    with backend:
        serialized = backend.serialize_workload(Workload("model", model, tuple(shape)))
        atomic_write_bytes(engine_path, serialized)
        meta: dict[str, Any] = {
            "schema_version": 1, "kind": "nvit.engine", "nvit_version": __version__,
            "created_unix_s": time.time(), "engine_file": engine_path.name, "input_shape": list(shape),
            "precision": precision.value, "settings": backend.settings(), "versions": backend.versions(),
            "device": fingerprint(DeviceKind.CUDA).to_dict(),
        }
        if check:
            meta["check"] = check_engine(serialized, model, shape, precision)
    atomic_write_text(engine_path.with_suffix(engine_path.suffix + ENGINE_META_SUFFIX),
                      json.dumps(meta, indent=2, default=str) + "\n")
    return engine_path, meta


def check_engine(serialized: bytes, model: torch.nn.Module, shape: tuple[int, ...], precision: Precision,
                 *, seed: int = 0) -> dict[str, Any]:
    """Run the engine on a seeded input (torch.cuda buffers) and compare with PyTorch fp32 on the CPU."""
    import tensorrt as trt

    if not torch.cuda.is_available():
        raise BackendError("checking a TensorRT engine needs CUDA torch and a GPU")
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(serialized)
    context = engine.create_execution_context()
    dtype = {Precision.FP32: torch.float32, Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16}[precision]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if n not in inputs]
    if len(inputs) != 1 or len(outputs) != 1:
        raise ExportError(f"expected one input and one output, the engine has {inputs} / {outputs}")
    device_in = x.to("cuda", dtype).contiguous()
    context.set_input_shape(inputs[0], tuple(device_in.shape))
    device_out = torch.empty(tuple(context.get_tensor_shape(outputs[0])), device="cuda", dtype=dtype)
    context.set_tensor_address(inputs[0], device_in.data_ptr())
    context.set_tensor_address(outputs[0], device_out.data_ptr())
    stream = torch.cuda.Stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise ExportError("TensorRT failed to run the engine")
    stream.synchronize()
    with torch.no_grad():
        expected = model.eval()(x)
    got = device_out.float().cpu()
    tol = _TOLERANCE[precision]
    abs_err = (got - expected).abs()
    passed = bool((abs_err <= tol.atol + tol.rtol * expected.abs()).all())
    result = {"max_abs_error": float(abs_err.max()), "atol": tol.atol, "rtol": tol.rtol, "passed": passed,
              "top1_agreement": float((got.argmax(-1) == expected.argmax(-1)).float().mean())}
    if not passed:
        raise ExportError(f"TensorRT engine differs from PyTorch: max abs error {result['max_abs_error']:.3g} "
                          f"(atol {tol.atol:g}, rtol {tol.rtol:g}, {precision.value})")
    return result


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
