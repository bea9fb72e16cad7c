"""Numerical verification of an exported ONNX model against PyTorch, in ONNX Runtime.

The comparator returns a report that is truthy when every output is within tolerance, and carries the
figures (max absolute and relative error per batch size) either way.
"""

from __future__ import annotations

import enum
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nvit.errors import BackendError, ExportError

logger = logging.getLogger(__name__)


class Tolerance(enum.Enum):
    """Per-precision tolerances (absolute, relative) for logits of a ViT."""

    FP32 = (1e-4, 1e-3)
    FP16 = (2e-2, 2e-2)
    BF16 = (1e-1, 5e-2)

    @property
    def atol(self) -> float:
        return self.value[0]

    @property
    def rtol(self) -> float:
        return self.value[1]


@dataclass(frozen=True)
class OutputCheck:
    batch_size: int
    max_abs_error: float
    max_rel_error: float
    passed: bool


@dataclass(frozen=True)
class VerifyReport:
    onnx_path: str
    provider: str
    atol: float
    rtol: float
    checks: tuple[OutputCheck, ...]

    def __bool__(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def max_abs_error(self) -> float:
        return max(c.max_abs_error for c in self.checks)

    @property
    def max_rel_error(self) -> float:
        return max(c.max_rel_error for c in self.checks)

    def summary(self) -> str:
        verdict = "passed" if self else "FAILED"
        return (
            f"ONNX vs PyTorch {verdict}: max abs error {self.max_abs_error:.3g}, max rel error "
            f"{self.max_rel_error:.3g} (atol {self.atol:g}, rtol {self.rtol:g}, batches "
            f"{', '.join(str(c.batch_size) for c in self.checks)}, {self.provider})"
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "onnx_path": self.onnx_path, "provider": self.provider, "atol": self.atol, "rtol": self.rtol,
            "passed": bool(self), "max_abs_error": self.max_abs_error, "max_rel_error": self.max_rel_error,
            "checks": [c.__dict__ for c in self.checks],
        }


def ort_session(path: str | os.PathLike[str], provider: str = "CPUExecutionProvider", threads: int | None = None):
    """An ONNX Runtime session that really runs on ``provider`` (ORT falls back to CPU silently otherwise)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    available = ort.get_available_providers()
    if provider not in available:
        raise BackendError(
            f"ONNX Runtime has no {provider} here (available: {', '.join(available)}); on a GPU host run "
            "'pip uninstall -y onnxruntime && pip install onnxruntime-gpu'"
        )
    session = ort.InferenceSession(str(path), options, providers=[provider])
    if session.get_providers()[0] != provider:
        raise BackendError(f"ONNX Runtime session fell back to {session.get_providers()[0]} instead of {provider}")
    return session


def verify_onnx(
    model: torch.nn.Module,
    onnx_path: str | os.PathLike[str],
    *,
    input_shape: tuple[int, ...],
    batch_sizes: tuple[int, ...] = (1, 3),
    tolerance: Tolerance = Tolerance.FP32,
    seed: int = 0,
    provider: str = "CPUExecutionProvider",
) -> VerifyReport:
    """Run seeded random inputs through PyTorch and ONNX Runtime; compare the outputs."""
    session = ort_session(onnx_path, provider)
    input_name = session.get_inputs()[0].name
    generator = torch.Generator().manual_seed(seed)
    checks = []
    model = model.eval()
    for batch in batch_sizes:
        x = torch.randn((batch, *input_shape[1:]), generator=generator)
        with torch.no_grad():
            expected = model(x).numpy()
        (got,) = session.run(None, {input_name: x.numpy()})
        if got.shape != expected.shape:
            raise ExportError(f"ONNX output shape {got.shape} differs from PyTorch's {expected.shape}")
        abs_err = np.abs(got - expected)
        rel_err = abs_err / np.maximum(np.abs(expected), 1e-6)
        passed = bool(np.all(abs_err <= tolerance.atol + tolerance.rtol * np.abs(expected)))
        checks.append(OutputCheck(batch, float(abs_err.max()), float(rel_err.max()), passed))
    report = VerifyReport(str(Path(onnx_path)), provider, tolerance.atol, tolerance.rtol, tuple(checks))
    logger.info(report.summary())
    return report
