"""``nvit export``: ONNX (verified against PyTorch), optionally a TensorRT engine, optionally timed."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from nvit.commands.options import BACKEND_OPTIONS, THREADS
from nvit.presets import resolve_arch
from nvit.vocab import DeviceKind, Precision


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
    threads: int | None = THREADS,
    backend_option: list[str] = BACKEND_OPTIONS,
    remote: str = typer.Option(None, "--remote", help="With --measure: upload the ONNX file to this nvit service "
                               "and time it on its device."),
    strict: bool = typer.Option(False, "--strict", help="With --measure: fail (exit 1) instead of warning when the "
                                "machine was not quiet while timing (export.json is kept)."),
) -> None:
    """Export a model to ONNX (opset >= 18, dynamic batch), verify it numerically in ONNX Runtime, and
    optionally build a TensorRT engine with the profiler's builder settings and time it."""
    from nvit.commands.profile import parse_backend_options
    from nvit.commands.service_access import measuring_here
    from nvit.errors import NvitError
    from nvit.export.pipeline import ExportOptions, export_model
    from nvit.fileio import output_folder
    from nvit.models import load_model, variant_provenance

    if remote and not measure:
        raise NvitError("--remote times the model on a service's device: add --measure")
    console = Console()
    out_dir = output_folder(out or (Path(model) / "export" if Path(model).is_dir() else Path("export")))
    loaded = load_model(model, resolve_arch(arch) if arch else None)
    timing_backend = backend or ("tensorrt" if trt else "onnxruntime")
    options = ExportOptions(
        out_dir=out_dir, opset=opset, verify=verify, trt=trt, precision=precision, tf32=tf32, batch_size=batch_size,
        measure_backend=timing_backend if measure and not remote else None,
        device=DeviceKind.CUDA if (gpu or trt) else DeviceKind.CPU,
        backend_options=parse_backend_options(backend_option, threads),
    )
    lock = measuring_here(options.device, console, "export --measure") if options.measure_backend else nullcontext()
    with lock, console.status(f"exporting {model} to ONNX..."):
        result = export_model(loaded, options, provenance={"source": str(model), **variant_provenance(model)})
    console.print(f"[green]ONNX[/] {result.onnx_path}")
    if result.verify is not None:
        console.print(f"[green]verified[/] {result.verify.summary()}")
    if result.engine_path is not None:
        console.print(f"[green]engine[/] {result.engine_path}")
    timing, where = result.timing, options.measure_backend
    if remote:
        timing, where = _measure_remotely(remote, result.onnx_path, loaded, options, timing_backend, console)
    if timing is not None:
        console.print(f"[green]latency[/] median {timing.latency_ms_median:.3f} ms (p10 {timing.latency_ms_p10:.3f}, "
                      f"p90 {timing.latency_ms_p90:.3f}, n={timing.n_samples}) with {where}")
    console.print(f"metadata: {result.meta_path}")
    if result.conditions is not None:
        _judge_timing(result.conditions, console, strict)


def _judge_timing(conditions: dict[str, Any], console: Console, strict: bool) -> None:
    from nvit.commands.trust_view import conditions_markup
    from nvit.validation.trust import UntrustedMeasurement

    console.print(conditions_markup(conditions, "timing"))
    if strict and conditions.get("verdict") != "quiet":
        raise UntrustedMeasurement(f"--strict: the machine was {conditions.get('verdict')} while timing "
                                   f"({'; '.join(conditions.get('reasons') or [])}); re-run on a quiet machine")


def _measure_remotely(url: str, onnx_path: Path, model: Any, options: Any, backend: str, console: Console
                      ) -> tuple[Any, str]:
    from nvit.commands.service_access import following
    from nvit.export.pipeline import record_timing, timing_options
    from nvit.service.client import ServiceClient
    from nvit.service.remote_measure import measure_onnx_remote

    name = model.spec.name or "model"
    with ServiceClient(url) as client, following(console, "measuring remotely") as update:
        timing, job = measure_onnx_remote(client, onnx_path, name=name, arch=model.spec.to_dict(), backend=backend,
                                          device=options.device.value, precision=options.precision.value,
                                          batch_size=options.batch_size,
                                          backend_options=timing_options(options, backend), on_update=update)
        where = {"service": client.base_url, "job": job["id"], "agent": job["result"].get("agent"),
                 "device": job["result"].get("device"), "backend": job["result"]["context"]["backend"]}
    record_timing(options.out_dir, timing, where)
    device = (where["device"] or {}).get("cpu", {}).get("model_name", "")
    return timing, f"{backend} on {url} (job {job['id']}{', ' + device if device else ''})"


def register(app: typer.Typer) -> None:
    app.command("export")(export)
