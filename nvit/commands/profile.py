"""``nvit profile``: time ViT blocks of many widths on a device and write a latency lookup table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from nvit.commands.lut import calibration_line, conditions_line, self_check_line, tokens_text
from nvit.commands.options import BACKEND_OPTIONS, THREADS
from nvit.errors import NvitError

# SweepOptions' defaults (literal so the CLI starts without numpy; tests/commands/test_cli.py compares them)
DEFAULT_CALIBRATION_MODELS = 8
DEFAULT_CHECK_MODELS = 6


def parse_backend_options(items: list[str], threads: int | None) -> dict[str, Any]:
    """``KEY=VALUE`` pairs (JSON values, else strings) plus ``--threads`` as ``intra_op_threads``."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise NvitError(f"backend option {item!r} must look like KEY=VALUE")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    if threads is not None:
        options["intra_op_threads"] = threads
    return options


def default_out(space_name: str, device_slug: str, precision: str, batch_size: int, *,
                suffix: str = ".parquet") -> Path:
    """``lut-<space>-<device>-<precision>-b<batch>.parquet`` (a Swin table is a ``.swinlut`` folder)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(space_name).stem)
    return Path(f"lut-{safe}-{device_slug}-{precision}-b{batch_size}{suffix}")


def counts_text(space: Any) -> str:
    """``200 attn, 56 mlp, ...``: a space's configurations per part kind."""
    return ", ".join(f"{n} {k}" for k, n in space.counts().items() if n)


def summary_table(result: Any) -> Table:
    table = result.table
    out = Table(title=f"{result.path} ({len(table)} rows)")
    for col in ("part", "rows", "min ms", "median ms", "max ms", "mean CoV"):
        out.add_column(col, justify="right" if col != "part" else "left")
    for i, part_table in enumerate(table.stage_tables):  # a Swin table: one table per stage
        rows = part_table.rows
        for kind, count in part_table.counts().items():
            part = rows[rows["kind"] == kind]
            if count:
                lat = part["latency_ms_median"]
                out.add_row(f"stage {i} {kind}" if table.is_swin else kind, str(count), f"{lat.min():.4f}",
                            f"{lat.median():.4f}", f"{lat.max():.4f}", f"{part['cov'].mean():.3f}")
    meta = table.meta
    drift = max((abs(s["drift"]) for s in meta.sentinel), default=0.0)
    lines = [f"device {meta.device_name()} · {meta.backend} · {meta.precision.value} · batch {meta.batch_size} · "
             f"{tokens_text(table)}",
             f"sentinel re-timed {len(meta.sentinel)}x, max drift {drift * 100:.1f}%"]
    lines.append(calibration_line(table))
    lines.append(conditions_line(meta.conditions))
    lines.append(self_check_line(meta.self_check))
    n = len(table)
    lines.append(f"this run: {result.measured} measured, {result.resumed} resumed, {result.seconds:.0f} s; "
                 f"profiling time in table {meta.profile_seconds_total:.0f} s "
                 f"({meta.profile_seconds_total / max(n, 1):.2f} s per configuration)")
    out.caption = "\n".join(lines)
    return out


def profile(
    gpu: bool = typer.Option(False, "--gpu", help="Profile the CUDA device (default backend: tensorrt)."),
    backend: str | None = typer.Option(None, "--backend", help="tensorrt | onnxruntime | torch "
                                       "(default: tensorrt with --gpu, else onnxruntime on the CPU)."),
    space: str | None = typer.Option(None, "--space", help="A space preset (vit_test, deit_tiny, deit_small, "
                                     "deit_base, and their _distilled variants) or a JSON space file, a ViT's or "
                                     "a Swin's (default: deit_small)."),
    arch: str | None = typer.Option(None, "--arch", help="Derive the space from any ViT or Swin instead: an "
                                    "arch.json, a preset name (swin_tiny...), a variant folder or a ViT checkpoint "
                                    "file (every width from --group-size up to the model's own; a Swin gets one "
                                    "grid per stage and a .swinlut table folder)."),
    group_size: int = typer.Option(8, "--group-size", help="With --arch: the pruning group size, the grid's "
                                   "smallest width and its alignment."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Batch size (default: the space's, 1)."),
    precision: str | None = typer.Option(None, "--precision", help="fp32 | fp16 | bf16 (default: the space's, fp32)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output Parquet file "
                                    "(default: lut-<space>-<device>-<precision>-b<batch>.parquet)."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue an interrupted run (default)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the randomised measurement order."),
    sentinel_every: int = typer.Option(25, "--sentinel-every", help="Re-time the sentinel block every N configs."),
    calibrate: int = typer.Option(DEFAULT_CALIBRATION_MODELS, "--calibrate",
                                  help="Whole models measured to fit the calibration (0: none)."),
    check: int = typer.Option(DEFAULT_CHECK_MODELS, "--check", help="Held-out whole models measured after the fit, "
                              "their accuracy stored in the table (0: no self-check)."),
    passes: int = typer.Option(1, "--passes", help="Measure everything N times, each pass in a new order, and keep "
                               "the fastest (2 on a CPU shared with other jobs)."),
    strict: bool = typer.Option(False, "--strict", help="Fail (exit 1) when the machine was not quiet while "
                                "profiling or the self-check missed (the table is still saved, its verdict in it)."),
    threads: int | None = THREADS,
    backend_option: list[str] = BACKEND_OPTIONS,
    write_space: Path | None = typer.Option(None, "--write-space", help="Write the space (given or derived from "
                                            "--arch) to this JSON file and stop without profiling: edit its grids "
                                            "(fewer widths: a faster, coarser table) and pass it back with --space."),
    remote: str | None = typer.Option(None, "--remote", help="Profile on an nvit service's device instead: "
                                      "submit a job to this URL, follow it, download the table to --out if given."),
) -> None:
    """Benchmark ViT blocks of many widths on a device and write a latency lookup table."""
    from nvit.fileio import output_file
    from nvit.lut.swin_table import is_swin_table

    if out is not None and not is_swin_table(out):  # a Swin table's folder is rewritten whole, atomically
        output_file(out)
    if remote is not None and write_space is not None:
        raise NvitError("give --write-space or --remote, not both")
    if remote is not None:
        from nvit.commands.service_access import profile_remotely

        if arch is not None:
            raise NvitError("--remote profiles a --space; write one from --arch first (--write-space FILE)")
        body = {"kind": "profile", "space": space or "deit_small", "device": "cuda" if gpu else "cpu",
                "backend": backend, "precision": precision, "batch_size": batch_size, "seed": seed,
                "sentinel_every": sentinel_every, "calibrate": calibrate, "check": check, "passes": passes,
                "backend_options": parse_backend_options(backend_option, threads)}
        profile_remotely(remote, body, out, Console())
        return
    from nvit.commands.service_access import measuring_here
    from nvit.profiler.backends import default_backend
    from nvit.profiler.base import get_backend
    from nvit.profiler.device import backend_fingerprint
    from nvit.profiler.space import arch_for_space, derived_space, resolve_space
    from nvit.profiler.sweep import SweepOptions, run_sweep
    from nvit.profiler.swin_space import SwinSearchSpace, derived_swin_space
    from nvit.profiler.swin_sweep import run_swin_sweep
    from nvit.swin import SwinSpec
    from nvit.vocab import DeviceKind

    device_kind = DeviceKind.CUDA if gpu else DeviceKind.CPU
    if arch is not None:
        if space is not None:
            raise NvitError("give --space or --arch, not both")
        source = arch_for_space(arch)
        derive = derived_swin_space if isinstance(source, SwinSpec) else derived_space
        the_space = derive(source, group_size=group_size, batch_size=batch_size or 1, precision=precision or "fp32")
        space = the_space.name
    else:
        space = space or "deit_small"
        the_space = resolve_space(space, batch_size=batch_size, precision=precision)
    if write_space is not None:
        from nvit.profiler.space import save_space

        output_file(write_space)
        save_space(the_space, write_space)
        Console().print(f"wrote the space {the_space.name or space} to {write_space}: {counts_text(the_space)}; "
                        "profile it with --space")
        return
    options = SweepOptions(seed=seed, sentinel_every=sentinel_every, calibration_models=calibrate, passes=passes,
                           check_models=check)
    backend_cls = get_backend(backend or default_backend(device_kind))
    be = backend_cls(device=device_kind, precision=the_space.precision, batch_size=the_space.batch_size,
                     **parse_backend_options(backend_option, threads))
    console = Console()
    with measuring_here(device_kind, console, f"profile --space {space}", be.cuda_index), be:
        device = backend_fingerprint(be)  # its GPU index; clocks read under load
        is_swin = isinstance(the_space, SwinSearchSpace)
        path = out or default_out(space, device.slug(), the_space.precision.value, the_space.batch_size,
                                  suffix=".swinlut" if is_swin else ".parquet")
        console.print(f"profiling [bold]{the_space.name or space}[/] with {be.name} on {device.slug()}: "
                      + counts_text(the_space) + f", {calibrate} calibration + {check} check models"
                      + (f", {passes} passes" if passes > 1 else "") + f" → {path}")
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("ETA"), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=False) as bar:
            task = bar.add_task("starting", total=None)

            def on_progress(p: Any) -> None:
                if bar.tasks[task].total is None:
                    bar.update(task, total=p.total, completed=p.resumed)
                    if p.resumed:
                        console.print(f"resuming: {p.resumed} configurations already measured")
                bar.update(task, completed=p.done, description=f"{p.phase.value:<11} {p.name:<28}")

            sweep = run_swin_sweep if is_swin else run_sweep
            result = sweep(the_space, be, path, options=options, resume=resume, progress=on_progress, device=device)
    if result.already_complete:
        console.print(f"{path} is already complete (use --no-resume to profile again)")
    console.print(summary_table(result))
    if strict:
        from nvit.lut.accuracy import trust_warnings
        from nvit.validation.trust import UntrustedMeasurement

        problems = trust_warnings(result.table.meta)
        if problems:
            raise UntrustedMeasurement(f"--strict: {problems[0]} (the table is saved in {path})")


def register(app: typer.Typer) -> None:
    app.command("profile")(profile)
