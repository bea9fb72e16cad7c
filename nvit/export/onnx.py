"""ONNX export shared by the profiler (blocks) and ``nvit export`` (whole models).

One exporter for both, so the graph the LUT was measured on is the graph the user deploys: the
``torch.export``-based exporter (``torch.onnx.export(..., dynamo=True)``), opset 18 by default.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import onnx
import torch

from nvit.errors import ExportError
from nvit.fileio import atomic_path

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAME = "output"


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter warns about optional packages (torchvision ops) and prints progress; keep it quiet."""
    noisy = [logging.getLogger(n) for n in ("torch.onnx", "torch.onnx._internal.exporter._registration")]
    old = [lg.level for lg in noisy]
    for lg in noisy:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(noisy, old, strict=True):
            lg.setLevel(level)


def export_onnx(
    module: torch.nn.Module,
    example_input: torch.Tensor,
    path: str | os.PathLike[str],
    *,
    dynamic_batch: bool = True,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export ``module`` (put in eval mode) to ``path`` with one input and one output; atomic write.

    The batch dimension is dynamic unless ``dynamic_batch`` is False. Weights are embedded in the file.
    """
    path = Path(path)
    if opset < DEFAULT_OPSET:
        raise ExportError(f"opset {opset} is too old; nvit exports with opset >= {DEFAULT_OPSET}")
    module = module.eval()
    dynamic_shapes = None
    if dynamic_batch:
        dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},)
    try:
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(
                module,
                (example_input,),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=dynamic_shapes,
                verbose=False,
                optimize=True,
            )
    except Exception as exc:  # the exporter raises many types; report the first line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"ONNX export of {type(module).__name__} failed: {first}") from exc
    with atomic_path(path) as tmp:
        program.save(str(tmp))
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"exported ONNX graph fails onnx.checker: {str(exc).splitlines()[0]}") from exc
    logger.info("exported %s to %s (opset %d)", type(module).__name__, path, opset)
    return path
