"""``nvit export``: ONNX (verified against PyTorch), optionally a TensorRT engine, optionally timed."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from nvit.arch import resolve_arch
from nvit.profiler.base import DeviceKind, Precision


def export(
    model: str = typer.Argument(..., help="A variant folder (arch.json + weights), a timm/DeiT checkpoint file, "
                                          "or a preset name (random weights: for latency only)."),
    out: Path = typer.Option(None, "--out", "-o", help="Output folder.",
                             show_default="<variant>/export, else ./export"),
    arch: str = typer.Option(None, "--arch", help="Architecture of a checkpoint file (preset or arch.json); "
                                                  "inferred from the checkpoint when omitted."),
    trt: bool = typer.Option(False, "--trt", help="Also build a TensorRT engine (needs TensorRT and a GPU)."),
    precision: Precision = typer.Option(Precision.FP32, "--precision", help="Engine / timing precision."),
    tf32: bool = typer.Option(True, "--tf32/--no-tf32", help="Allow TF32 matrix products in an fp32 engine "
                              "(TensorRT's default; checked at the TF32 tolerance)."),
    batch_size: int = typer.Option(1, "--batch-size", min=1, help="Batch size of the engine and of the timing."),
    opset: int = typer.Option(18, "--opset", min=18, help="ONNX opset."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check ONNX Runtime outputs against PyTorch."),
    measure: bool = typer.Option(False, "--measure", help="Time the exported model with the profiler's harness."),
    backend: str = typer.Option(None, "--backend", help="Timing backend.",
                                 show_default="tensorrt with --trt, else onnxruntime"),
    gpu: bool = typer.Option(False, "--gpu", help="Time on the GPU (CUDA) instead of the CPU."),
) -> None:
    """Export a model to ONNX (opset >= 18, dynamic batch), verify it numerically in ONNX Runtime, and
    optionally build a TensorRT engine with the profiler's builder settings and time it."""
    from nvit.export.pipeline import ExportOptions, export_model
    from nvit.fileio import output_folder
    from nvit.models import load_model, variant_provenance

    console = Console()
    out_dir = output_folder(out or (Path(model) / "export" if Path(model).is_dir() else Path("export")))
    loaded = load_model(model, resolve_arch(arch) if arch else None)
    options = ExportOptions(
        out_dir=out_dir, opset=opset, verify=verify, trt=trt, precision=precision, tf32=tf32, batch_size=batch_size,
        measure_backend=(backend or ("tensorrt" if trt else "onnxruntime")) if measure else None,
        device=DeviceKind.CUDA if (gpu or trt) else DeviceKind.CPU,
    )
    with console.status(f"exporting {model} to ONNX..."):
        result = export_model(loaded, options, provenance={"source": str(model), **variant_provenance(model)})
    console.print(f"[green]ONNX[/] {result.onnx_path}")
    if result.verify is not None:
        console.print(f"[green]verified[/] {result.verify.summary()}")
    if result.engine_path is not None:
        console.print(f"[green]engine[/] {result.engine_path}")
    if result.timing is not None:
        t = result.timing
        console.print(f"[green]latency[/] median {t.latency_ms_median:.3f} ms (p10 {t.latency_ms_p10:.3f}, "
                      f"p90 {t.latency_ms_p90:.3f}, n={t.n_samples}) with {options.measure_backend}")
    console.print(f"metadata: {result.meta_path}")


def register(app: typer.Typer) -> None:
    app.command("export")(export)
