"""Numerical verification of exported models against PyTorch: ONNX in ONNX Runtime here, TensorRT engines in
:mod:`nvit.export.engine`, both through :func:`compare_logits`.

Tolerances are per precision. An fp32 TensorRT engine built with TF32 (TensorRT's default) multiplies with
10-bit mantissas, so its logits differ from PyTorch's fp32 by ~1e-3, far beyond fp32 tolerance: it is
checked at the TF32 tolerance. Every check also asks for top-1 agreement on each sample whose top-1 lead in
the reference is larger than the tolerance allows the outputs to move (closer calls may flip legitimately).
The comparator returns a report that is truthy when every output passes, and carries the figures either way.
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
from nvit.vocab import Precision

logger = logging.getLogger(__name__)


class Tolerance(enum.Enum):
    """Per-precision tolerances (absolute, relative) for logits of a ViT."""

    FP32 = (1e-4, 1e-3)
    TF32 = (1e-2, 1e-2)  # fp32 with TF32 matrix products: 10-bit mantissas, like fp16's
    FP16 = (2e-2, 2e-2)
    BF16 = (1e-1, 5e-2)

    @property
    def atol(self) -> float:
        return self.value[0]

    @property
    def rtol(self) -> float:
        return self.value[1]

    @classmethod
    def for_engine(cls, precision: Precision, tf32: bool) -> Tolerance:
        """The tolerance of an engine of ``precision`` (fp32 engines: TF32's when TF32 was allowed)."""
        precision = Precision(precision)
        if precision is Precision.FP32:
            return cls.TF32 if tf32 else cls.FP32
        return cls.FP16 if precision is Precision.FP16 else cls.BF16


@dataclass(frozen=True)
class LogitCheck:
    """Outputs against reference logits: errors, tolerance, and top-1 agreement on the decisive samples
    (those whose reference top-1 lead exceeds twice the tolerance at their top-1 logit)."""

    max_abs_error: float
    max_rel_error: float
    within_tolerance: bool
    top1_agreement: float  # over every sample
    decisive_samples: int
    decisive_disagreements: int

    @property
    def passed(self) -> bool:
        return self.within_tolerance and self.decisive_disagreements == 0


def compare_logits(got: np.ndarray, expected: np.ndarray, tolerance: Tolerance) -> LogitCheck:
    """Compare ``got`` with reference ``expected`` (same shape; last axis: classes)."""
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    if got.shape != expected.shape:
        raise ExportError(f"output shape {got.shape} differs from PyTorch's {expected.shape}")
    abs_err = np.abs(got - expected)
    rel_err = abs_err / np.maximum(np.abs(expected), 1e-6)
    flat_got, flat_exp = got.reshape(-1, got.shape[-1]), expected.reshape(-1, expected.shape[-1])
    agree = flat_got.argmax(-1) == flat_exp.argmax(-1)
    top2 = np.sort(flat_exp, axis=-1)[:, -2:] if flat_exp.shape[-1] > 1 else np.repeat(flat_exp, 2, -1)
    lead = top2[:, 1] - top2[:, 0]
    decisive = lead > 2 * (tolerance.atol + tolerance.rtol * np.abs(top2[:, 1]))
    return LogitCheck(
        max_abs_error=float(abs_err.max()), max_rel_error=float(rel_err.max()),
        within_tolerance=bool(np.all(abs_err <= tolerance.atol + tolerance.rtol * np.abs(expected))),
        top1_agreement=float(agree.mean()), decisive_samples=int(decisive.sum()),
        decisive_disagreements=int((decisive & ~agree).sum()),
    )


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
        check = compare_logits(got, expected, tolerance)
        checks.append(OutputCheck(batch, check.max_abs_error, check.max_rel_error, check.passed))
    report = VerifyReport(str(Path(onnx_path)), provider, tolerance.atol, tolerance.rtol, tuple(checks))
    logger.info(report.summary())
    return report
