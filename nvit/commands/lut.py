"""``nvit lut show|validate|merge`` and ``nvit predict``: inspect latency tables and use them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from nvit.commands.options import REQUIRE_PRECISION
from nvit.errors import LutError, NvitError
from nvit.lut.records import SelfCheck

lut_app = typer.Typer(help="Inspect, validate and merge latency lookup tables.", no_args_is_help=True)

_LUT_ARG = typer.Argument(..., help="A latency table (.parquet) written by 'nvit profile'.")


def _axis(values: list[int]) -> str:
    return ",".join(str(v) for v in values) if len(values) <= 8 else f"{values[0]}..{values[-1]} ({len(values)})"


def tokens_text(table: Any) -> str:
    """``197 tokens``, or a Swin table's ``196/49 tokens per stage``."""
    if table.is_swin:
        return "/".join(str(t.meta.num_tokens) for t in table.stage_tables) + " tokens per stage"
    return f"{table.meta.num_tokens} tokens"


def _show_parts(console: Console, table: Any) -> None:
    """One ViT-format table's rows per kind, grids and ranges, and its block model's fits."""
    from nvit.lut.table import grid_axes
    from nvit.vocab import KIND_FIELDS, PartKind

    grid = Table("part", "rows", "grid", "min ms", "median ms", "max ms", "mean CoV")
    for kind in PartKind:
        part = table.of_kind(kind)
        if part.empty:
            continue
        axes = grid_axes(table.rows, kind)
        tags = {"embed_dim": "e", "heads": "h", "qk_dim": "q", "v_dim": "v", "mlp_dim": "m"}
        desc = " ".join(f"{tags[a]}={_axis(axes[a].tolist())}" for a in ("embed_dim", *KIND_FIELDS[kind])
                        if kind is not PartKind.BLOCK or a == "embed_dim")
        lat = part["latency_ms_median"]
        grid.add_row(kind.value, str(len(part)), desc, f"{lat.min():.4f}", f"{lat.median():.4f}",
                     f"{lat.max():.4f}", f"{part['cov'].mean():.3f}")
    console.print(grid)
    if not table.problems():
        from nvit.lut.predictor import LatencyPredictor

        raw = LatencyPredictor(table, calibrated=False)
        console.print(interaction_line(raw.interaction))
        for kind, fit in raw.one_half.items():
            half = "attention half" if kind is PartKind.ATTN_BLOCK else "MLP half"
            console.print(interaction_line(fit, block=f"{half}-only block", halves=half,
                                           rows=f"{kind.value} rows"))
        if raw.removal_unavailable:
            console.print(f"[yellow]sub-layer removal unavailable:[/] {raw.removal_unavailable}")
        console.print(measured_blocks_line(raw))


@lut_app.command("show")
def show(lut: Path = _LUT_ARG) -> None:
    """Summary of a table: identity, grids, latency ranges, drift and calibration (a Swin table's per stage)."""
    from nvit.lut import load_table

    table = load_table(lut)
    meta = table.meta
    console = Console()
    base = meta.base_arch.get("name") or "custom"
    tokens = tokens_text(table)
    console.print(f"[bold]{lut}[/]: {len(table)} rows · {meta.backend} on {meta.device_name()} · "
                  f"{meta.precision.value} · batch {meta.batch_size} · {tokens} · base {base} · "
                  f"timing {meta.timing_mode()}")
    console.print(f"created {meta.created_at} by nvit {meta.nvit_version}; versions: "
                  + ", ".join(f"{k} {v}" for k, v in sorted(meta.versions.items())))
    for i, part_table in enumerate(table.stage_tables):
        if table.is_swin:
            console.print(f"[bold]stage {i}[/] ({part_table.meta.num_tokens} tokens)")
        _show_parts(console, part_table)
    drift = max((abs(s["drift"]) for s in meta.sentinel), default=0.0)
    console.print(f"sentinel {meta.protocol.get('sentinel', '?')}: re-timed {len(meta.sentinel)}x, "
                  f"max drift {drift * 100:.1f}%; profiling time {meta.profile_seconds_total:.0f} s")
    console.print(calibration_line(table))
    from nvit.lut.learn import learned_line

    learned = learned_line(meta.calibration)
    if learned:
        console.print(learned)
    console.print(conditions_line(meta.conditions))
    console.print(self_check_line(meta.self_check))


def interaction_line(interaction: Any, *, block: str = "block", halves: str = "halves",
                     rows: str = "full blocks") -> str:
    """How a full block relates to its halves (:class:`~nvit.lut.interaction.BlockInteraction`), or a one-half
    block to its half."""
    i = interaction
    if i.method == "affine":
        return (f"{block} = {i.slope:.3f} x {halves} {i.overhead_ms * 1e3:+.1f} us "
                f"{i.overhead_ms_per_embed * 1e3:+.3f} us x e (fitted on {i.blocks} {rows}, "
                f"mean residual {i.residual_pct_mean_abs:.1f}%)")
    if i.method == "ratio":
        return (f"{block} = {i.slope:.3f} x {halves} (mean ratio of {i.blocks} {rows} of too similar sizes for a "
                f"size-dependent fit; mean residual {i.residual_pct_mean_abs:.1f}%)")
    return f"{block} = sum of {halves} (no {rows} measured)"


def measured_blocks_line(predictor: Any) -> str:
    """How many blocks the table prices by their own rows, and how far those rows are from the block model at
    the narrow shapes (the largest misses are where the model alone would misprice a pruned block)."""
    n = len(predictor.measured_blocks)
    if not n:
        return "no block is priced by its own row"
    gaps = predictor.measured_blocks.model_gaps_pct(predictor)
    worst = max(gaps, key=lambda kv: abs(kv[1])) if gaps else None
    tail = f"; largest gap to the block model {worst[1]:+.1f}% ({worst[0]})" if worst else ""
    return f"{n} measured blocks (full and one-half) are priced by their own rows{tail}"


def calibration_line(table: Any) -> str:
    """The table's calibration, its verdict and the numbers behind it, one line (rich markup)."""
    from nvit.lut import predictor_for
    from nvit.lut.accuracy import calibration_status

    try:
        predictor = predictor_for(table)
    except NvitError:  # an invalid table: its problems are printed elsewhere
        predictor = None
    verdict, line = calibration_status(table.meta, predictor)
    cal = table.meta.calibration
    if cal is not None:
        line += f" on {len(cal.models)} whole models"
    colour = {"plausible": "green", "none": "yellow", "implausible": "yellow"}.get(verdict, "red")
    return f"[{colour}]{line}[/]"


def conditions_line(conditions: dict[str, Any] | None) -> str:
    """The machine's state while the table was profiled, judged (rich markup)."""
    from nvit.commands.trust_view import conditions_markup

    return conditions_markup(conditions, "profiling")


def self_check_line(check: SelfCheck | None) -> str:
    """The table's own accuracy on held-out whole models, one line (rich markup)."""
    if check is None:
        return ("[yellow]no self-check[/]: this table was never tested on whole models it was not fitted to "
                "(run 'nvit lut check')")
    return f"self-check on held-out whole models (seed {check.seed}, measured {check.measured_at}): " + (
        check_figures(check))


def check_figures(check: SelfCheck) -> str:
    """A self-check's figures, one line (rich markup): yellow when it missed."""
    from nvit.lut.accuracy import self_check_missed, summary_line

    colour = "yellow" if self_check_missed(check) else "green"
    text = f"[{colour}]{summary_line(check.figures())}[/]"
    if check.pruned_shapes:
        text += f"; pruned shapes alone: {summary_line(check.pruned_shapes)}"
    if check.removed_shapes:
        text += f"; with removed sub-layers alone: {summary_line(check.removed_shapes)}"
    return text


@lut_app.command("validate")
def validate(
    lut: Path = _LUT_ARG,
    device: str | None = typer.Option(None, "--device", help="Require this device kind (cpu/cuda) or name."),
    precision: str | None = typer.Option(None, "--precision", help="Require this precision."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Require this batch size."),
) -> None:
    """Check a table: readable, typed, complete grids, sane latencies, and (optionally) the conditions."""
    from nvit.lut import predictor_for
    from nvit.lut.swin_table import SwinLatencyTable, is_swin_table
    from nvit.lut.table import LatencyTable, check_compatible

    table = SwinLatencyTable.load(lut) if is_swin_table(lut) else LatencyTable.load(lut, validate=False)
    console = Console()
    parts = table.stage_tables
    problems = [f"stage {i}: {p}" if len(parts) > 1 else p for i, t in enumerate(parts) for p in t.problems()]
    for p in problems:
        console.print(f"[yellow]problem:[/] {p}")
    if problems:
        raise LutError(f"{lut}: {len(problems)} problem(s), first: {problems[0]}")
    check_compatible(table.meta, device=device, precision=precision, batch_size=batch_size, source=str(lut))
    predictor_for(table)  # the predictor can be built
    counts = ", ".join(f"{n} {k}" for k, n in table.counts().items())
    console.print(f"[green]valid[/]: {lut} ({counts})")


@lut_app.command("merge")
def merge(
    luts: list[Path] = typer.Argument(..., help="Tables to merge (shards of one space, same device kind)."),
    out: Path = typer.Option(..., "--out", "-o", help="The merged table."),
) -> None:
    """Merge tables profiled on the same kind of device, precision, batch and tokens."""
    from nvit.fileio import output_file
    from nvit.lut.table import LatencyTable, merge_tables

    if len(luts) < 2:
        raise LutError("merge needs at least two tables")
    output_file(out)
    merged = merge_tables([LatencyTable.load(p) for p in luts])
    problems = merged.problems(coverage=False)
    if problems:
        raise LutError(f"the merged table would be invalid: {problems[0]}")
    merged.save(out)
    console = Console()
    console.print(f"merged {len(luts)} tables into {out} ({len(merged)} rows)"
                  + ("" if merged.meta.calibration else "; uncalibrated"))
    for gap in merged.problems():
        console.print(f"[yellow]not yet usable for prediction:[/] {gap}")


@lut_app.command("learn")
def learn(
    lut: Path = _LUT_ARG,
    sources: list[Path] = typer.Argument(None, help="Pruning run folders that measured their targets, and "
                                         "compare.json files (or their folders), measured with this table."),
    out: Path = typer.Option(..., "--out", "-o", help="The new table (the table given is never changed)."),
    self_check: bool = typer.Option(False, "--self-check", help="Learn from the table's stored self-check models "
                                    "too (refresh them with 'nvit lut check --save')."),
) -> None:
    """Refit the table's calibration with whole models measured against it, into a new table, and say how
    well it predicts each of them when left out of the fit."""
    from nvit.fileio import file_sha256, output_file
    from nvit.lut.learn import learn as learn_table
    from nvit.lut.learn import learned_line
    from nvit.lut.table import LatencyTable
    from nvit.validation.measured_models import measurements_from, self_check_measurements

    output_file(out)
    if out.resolve() == lut.resolve():
        raise LutError("--out must be a new file: a learned table is a new version, the table given stays as it is")
    table = LatencyTable.load(lut)
    table.validate()
    measured = [m for source in sources or [] for m in measurements_from(source, table)]
    if self_check:
        measured += self_check_measurements(table)
    if not measured:
        raise LutError("nothing to learn from: give pruning run folders or compare reports, or --self-check")
    learned = learn_table(table, measured, parent_sha256=file_sha256(lut))
    learned.save(out)
    console = Console()
    console.print(f"wrote {out}: {len(measured)} measurements of {learned.meta.calibration.learned['new_models']} "
                  "models added to the calibration")
    console.print(calibration_line(learned))
    console.print(learned_line(learned.meta.calibration))


@lut_app.command("check")
def check(
    lut: Path = _LUT_ARG,
    models: int = typer.Option(6, "--models", help="Held-out whole models to measure now."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the models (default: the table's own check "
                                    "seed, so the same models are measured again)."),
    passes: int = typer.Option(2, "--passes", help="Passes over the models; each keeps its fastest."),
    save: bool = typer.Option(False, "--save", help="Store the result as the table's self-check."),
    strict: bool = typer.Option(False, "--strict", help="Fail (exit 1) when the machine was not quiet."),
) -> None:
    """Measure held-out whole models now and report the table's accuracy on them (tables age: clocks,
    drivers, load). Run it on the table's device, with the machine otherwise idle."""
    from nvit.commands.service_access import measuring_here
    from nvit.lut.table import LatencyTable
    from nvit.profiler.conditions import ConditionsMonitor
    from nvit.profiler.selfcheck import DEFAULT_CHECK_SEED, recheck
    from nvit.validation.compare import backend_for_table, check_same_device

    table = LatencyTable.load(lut)
    table.validate()
    before = table.meta.self_check
    if seed is None:
        seed = int(table.meta.protocol.get("check_seed", DEFAULT_CHECK_SEED))
    console = Console()
    backend = backend_for_table(table.meta)
    with measuring_here(table.meta.device_kind, console, "lut check", backend.cuda_index), backend:
        check_same_device(table.meta, backend)
        console.print(f"measuring {models} held-out models (seed {seed}, {passes} passes) with {backend.name}")
        with ConditionsMonitor(gpu_index=backend.cuda_index) as monitor:
            report = recheck(table, backend, count=models, seed=seed, passes=passes,
                             on_timing=lambda t: console.print(f"  {t.name}: {t.latency_ms:.4f} ms", highlight=False))
        report = report.replace(conditions=monitor.conditions().to_dict())
    out = Table("model", "measured ms", "predicted ms", "error", title=f"{lut}: predicted vs measured now")
    for m in report.models:
        out.add_row(m.name, f"{m.measured_ms:.4f}", f"{m.predicted_ms:.4f}", f"{m.error_pct:+.2f}%")
    console.print(out)
    console.print(f"now:    {check_figures(report)}")
    console.print(calibration_line(table))
    console.print(conditions_line(report.conditions).replace("while profiling", "while checking"))
    if before:
        console.print(f"stored: {check_figures(before)} (measured {before.measured_at})")
    if save:
        table.with_meta(self_check=report).save(lut)
        console.print(f"stored as the self-check of {lut}")
    if strict and report["conditions"]["verdict"] != "quiet":
        from nvit.validation.trust import UntrustedMeasurement

        raise UntrustedMeasurement(f"--strict: the check was measured on a {report['conditions']['verdict']} "
                                   f"machine: {'; '.join(report['conditions']['reasons'])}")


def predict(
    lut: str = typer.Option(..., "--lut", help="The latency table: a file, or a service URL "
                            "(http://HOST:PORT/v1/luts/<sha256>, or ?device=... for the newest match)."),
    arch: str = typer.Option(..., "--arch", help="An arch.json file or a preset name."),
    device: str | None = typer.Option(None, "--device", help="Require a table for this device kind or name."),
    precision: str | None = REQUIRE_PRECISION,
    batch_size: int | None = typer.Option(None, "--batch-size", help="Require a table of this batch size."),
    as_json: bool = typer.Option(False, "--json", help="Print the prediction as JSON."),
) -> None:
    """Predicted latency of an architecture, per block and in total."""
    from nvit.commands.service_access import local_lut
    from nvit.lut import load_predictor
    from nvit.presets import resolve_arch

    spec = resolve_arch(arch)
    predictor = load_predictor(local_lut(lut), device=device, precision=precision, batch_size=batch_size)
    predictor.warn_outside = False  # the grid report below says it
    report = predictor.check_spec(spec)  # far outside the measured grid: one error line
    blocks = predictor.block_latencies_ms(spec)
    fixed = predictor.fixed_latency_ms(spec.embed_dim)
    offset = predictor.offset_ms()
    total = predictor.predict_ms(spec)
    if as_json:
        doc = {"arch": spec.name or arch, "lut": str(lut), "blocks_ms": blocks, "fixed_ms": fixed,
               "offset_ms": offset, "total_ms": total, "calibrated": predictor.calibrated,
               "grid": report.to_dict()}
        typer.echo(json.dumps(doc, indent=2))
        return
    meta = predictor.meta
    table = Table(title=f"{spec.name or arch} on {meta.device_name()} ({meta.backend}, {meta.precision.value}, "
                        f"batch {meta.batch_size})")
    for col in ("block", "heads", "qk_dim", "v_dim", "mlp_dim", "latency ms"):
        table.add_column(col, justify="right")
    for i, (b, ms) in enumerate(zip(spec.blocks, blocks, strict=True)):
        attn = [str(b.heads), str(b.qk_dim), str(b.v_dim)] if b.has_attn else ["attn removed", "–", "–"]
        table.add_row(str(i), *attn, str(b.mlp_dim) if b.has_mlp else "mlp removed", f"{ms:.4f}")
    table.add_row("fixed", "", "", "", f"e={spec.embed_dim}", f"{fixed:.4f}")
    table.add_row("offset", "", "", "", "", f"{offset:+.4f}")
    table.add_row("[bold]total", "", "", "", "", f"[bold]{total:.4f}")
    if not predictor.calibrated:
        table.caption = "uncalibrated table: total is the plain sum of parts"
    console = Console()
    console.print(table)
    console.print(grid_table(report))
    if not report.inside:
        console.print(f"[yellow]outside the measured grid, extrapolated:[/] {report.describe()}")


def grid_table(report: Any) -> Table:
    """The spec's widths against the table's measured range, per axis (a :class:`~nvit.lut.coverage.GridReport`)."""
    out = Table("axis", "measured", "this arch", "steps below", "steps above", "", title="measured grid")
    for x in report.extents:
        style = {"inside": "green", "outside": "yellow", "far": "red"}[x.status.value]
        spec_range = f"{x.spec_min:g}" if x.spec_min == x.spec_max else f"{x.spec_min:g}..{x.spec_max:g}"
        out.add_row(x.axis, f"{x.grid_min}..{x.grid_max}", spec_range, f"{x.steps_below:.2g}",
                    f"{x.steps_above:.3g}", f"[{style}]{x.status.value}[/]")
    return out


def register(app: typer.Typer) -> None:
    app.add_typer(lut_app, name="lut")
    app.command("predict")(predict)
