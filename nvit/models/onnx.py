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
from typing import Any

import onnx
import torch

from nvit.errors import ExportError
from nvit.fileio import atomic_path

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAME = "output"


_REGISTRIES: dict[int, Any] = {}


@contextlib.contextmanager
def _shared_torchlib_registry() -> Iterator[None]:
    """Build the exporter's ATen -> ONNX registry once per process instead of once per export.

    ``torch.onnx.export`` rebuilds it from onnxscript's torchlib on every call (parsing the source of
    ~1,500 functions: about half of a small block's export time); the registry only depends on the opset,
    and the exported graph is byte-for-byte the same (tests/export/test_export.py). Where the exporter's
    internals differ from what this expects, exports simply build their own registry.
    """
    try:
        from torch.onnx._internal.exporter import _registration

        registry_cls = _registration.ONNXRegistry
        original = registry_cls.__dict__["from_torchlib"]
        build = original.__func__
    except (ImportError, AttributeError, KeyError):
        yield
        return

    def from_torchlib(cls: Any, opset_version: int = DEFAULT_OPSET) -> Any:
        if opset_version not in _REGISTRIES:
            _REGISTRIES[opset_version] = build(cls, opset_version=opset_version)
        return _REGISTRIES[opset_version]

    registry_cls.from_torchlib = classmethod(from_torchlib)
    try:
        yield
    finally:
        registry_cls.from_torchlib = original


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
        with _quiet_exporter(), _shared_torchlib_registry(), torch.no_grad():
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
