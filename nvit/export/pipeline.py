"""``nvit export`` as a library call: ONNX, verification, optional TensorRT engine, optional timing."""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nvit import __version__
from nvit.errors import ExportError
from nvit.export.verify import Tolerance, VerifyReport, verify_onnx
from nvit.fileio import atomic_write_text
from nvit.models.onnx import DEFAULT_OPSET, export_onnx
from nvit.models.vit import VisionTransformer
from nvit.profiler.base import Workload, get_backend
from nvit.profiler.harness import TimingStats
from nvit.vocab import DeviceKind, Precision

logger = logging.getLogger(__name__)

EXPORT_SCHEMA_VERSION = 2  # 2: the machine's conditions while timing ("conditions")
ONNX_FILE = "model.onnx"
ENGINE_FILE = "model.engine"
EXPORT_META_FILE = "export.json"
_TF32_BACKENDS = ("tensorrt", "torch")  # backends with a tf32 option: timing follows --tf32/--no-tf32


@dataclass(frozen=True)
class ExportOptions:
    out_dir: Path
    opset: int = DEFAULT_OPSET
    verify: bool = True
    verify_batch_sizes: tuple[int, ...] = (1, 3)
    trt: bool = False
    precision: Precision = Precision.FP32
    tf32: bool = True  # allow TF32 in an fp32 engine (TensorRT's default; checked at the TF32 tolerance)
    batch_size: int = 1
    measure_backend: str | None = None  # time the exported model with this backend (None: no timing)
    device: DeviceKind = DeviceKind.CPU
    backend_options: dict[str, Any] = field(default_factory=dict)  # e.g. intra_op_threads, as nvit profile's


@dataclass(frozen=True)
class ExportResult:
    onnx_path: Path
    verify: VerifyReport | None
    engine_path: Path | None
    timing: TimingStats | None
    meta_path: Path
    conditions: dict[str, Any] | None = None  # the machine while timing (nvit.profiler.conditions)


def input_shape(model: VisionTransformer, batch_size: int) -> tuple[int, int, int, int]:
    s = model.spec
    return (batch_size, s.in_chans, s.img_size, s.img_size)


def export_model(model: VisionTransformer, options: ExportOptions, provenance: dict[str, Any] | None = None
                 ) -> ExportResult:
    """Export ``model`` into ``options.out_dir``; a failed verification raises ExportError with the figures."""
    out = Path(options.out_dir)
    model = model.eval()
    if options.trt:  # fail before any work when the engine cannot be built here
        from nvit.profiler.backends.common import require, require_cuda_torch
        from nvit.profiler.backends.tensorrt_backend import INSTALL_HINT

        require("tensorrt", INSTALL_HINT)
        require_cuda_torch()
    shape = input_shape(model, options.batch_size)
    onnx_path = export_onnx(model, torch.randn(shape), out / ONNX_FILE, opset=options.opset)
    report = None
    if options.verify:
        report = verify_onnx(model, onnx_path, input_shape=shape, batch_sizes=options.verify_batch_sizes,
                             tolerance=Tolerance.FP32)
        if not report:
            _write_meta(out, model, options, report, None, None, provenance)
            raise ExportError(report.summary())
    engine_path = None
    engine_meta: dict[str, Any] | None = None
    if options.trt:
        from nvit.export.engine import build_engine_file

        engine_path, engine_meta = build_engine_file(model, out / ENGINE_FILE, shape, options.precision,
                                                     tf32=options.tf32)
    timing = conditions = None
    if options.measure_backend:
        from nvit.profiler.conditions import ConditionsMonitor

        backend_cls = get_backend(options.measure_backend)
        with backend_cls(device=options.device, precision=options.precision, batch_size=options.batch_size,
                         **timing_options(options, options.measure_backend)) as be:
            with ConditionsMonitor(gpu_index=getattr(be, "cuda_index", None)) as monitor:
                timing = be.measure(Workload(model.spec.name or "model", model, shape))
            conditions = monitor.conditions(repeat_spread=timing.repeat_settle_gap,
                                            runs_hit=timing.runs_hit / max(1, timing.n_repeats)).to_dict()
            engine_meta = {**(engine_meta or {}), "timing_backend": be.settings(), "timing_versions": be.versions()}
    meta = _write_meta(out, model, options, report, timing, engine_meta, provenance, conditions)
    return ExportResult(onnx_path, report, engine_path, timing, meta, conditions)


def timing_options(options: ExportOptions, backend: str) -> dict[str, Any]:
    """Backend options the export's timing uses: the ones given, and TF32 following --tf32/--no-tf32 where a
    backend has it."""
    return {**({"tf32": options.tf32} if backend in _TF32_BACKENDS else {}), **options.backend_options}


def _write_meta(out: Path, model: VisionTransformer, options: ExportOptions, report: VerifyReport | None,
                timing: TimingStats | None, engine_meta: dict[str, Any] | None,
                provenance: dict[str, Any] | None, conditions: dict[str, Any] | None = None) -> Path:
    import onnx
    import onnxruntime

    doc = {
        "schema_version": EXPORT_SCHEMA_VERSION,
        "kind": "nvit.export",
        "created_unix_s": time.time(),
        "nvit_version": __version__,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                     "python": platform.python_version()},
        "arch": model.spec.to_dict(),
        "onnx": {"file": ONNX_FILE, "opset": options.opset, "input": "input", "output": "output",
                 "input_shape": ["batch", *input_shape(model, 1)[1:]]},
        "verify": report.as_dict() if report is not None else None,
        "engine": engine_meta,
        "timing": timing.as_dict() if timing is not None else None,
        "conditions": conditions,
        "provenance": provenance or {},
    }
    path = out / EXPORT_META_FILE
    atomic_write_text(path, json.dumps(doc, indent=2, default=str) + "\n")
    return path


def read_export_meta(folder: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(folder) / EXPORT_META_FILE
    if not path.is_file():
        raise ExportError(f"{folder} holds no {EXPORT_META_FILE}")
    return json.loads(path.read_text())


def record_timing(folder: str | os.PathLike[str], timing: TimingStats, where: dict[str, Any]) -> Path:
    """Add a timing measured elsewhere (by a service's agent, on its device) to ``export.json``."""
    doc = read_export_meta(folder)
    doc["timing"] = timing.as_dict()
    doc["timing_remote"] = where
    path = Path(folder) / EXPORT_META_FILE
    atomic_write_text(path, json.dumps(doc, indent=2, default=str) + "\n")
    return path
