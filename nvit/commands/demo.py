"""``nvit demo``: the whole pipeline on the CPU in one command, with progress bars and a final table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from nvit.commands.options import STRICT_MEASUREMENTS
from nvit.commands.trust_view import noise_cell, trust_markup


class _RichReporter:
    def __init__(self, progress: Progress, console: Console) -> None:
        self.progress, self.console, self.task = progress, console, None

    def stage(self, name: str, total: float | None = None) -> None:
        if self.task is not None:
            self.progress.update(self.task, completed=self.progress.tasks[self.task].total or 1)
        self.task = self.progress.add_task(name, total=total or 1.0, status="")

    def advance(self, completed: float, status: str = "") -> None:
        if self.task is not None:
            self.progress.update(self.task, completed=completed, status=status[:60])

    def note(self, text: str) -> None:
        self.console.print(f"  {text}")


def results_table(rows: list[Any]) -> Table:
    from nvit.demo import arch_of

    table = Table(title="nvit demo: pruned variants of vit_test on digits (onnxruntime, CPU, batch 1)")
    for col in ("variant", "widths", "params M", "MFLOPs", "top-1", "pred ms", "meas ms", "err %", "err* %",
                "speedup", "noise"):
        table.add_column(col, justify="left" if col in ("variant", "widths") else "right")
    for r in rows:
        top1 = f"{100 * r.top1:.1f}%"
        if r.top1_before_finetune is not None:
            top1 += f" ({100 * r.top1_before_finetune:.1f})"
        table.add_row(r.variant, arch_of(r), f"{r.params / 1e6:.3f}", f"{2 * r.macs / 1e6:.2f}", top1,
                      f"{r.predicted_ms:.4f}", f"{r.measured_ms:.4f}", f"{r.error_pct:+.1f}",
                      "" if r.error_pct_drift_corrected is None else f"{r.error_pct_drift_corrected:+.1f}",
                      f"{r.speedup_measured:.2f}x", noise_cell(r.noise))
    table.caption = ("top-1 after brief KD fine-tuning (before it, in brackets); speedup measured against the "
                     "dense base; err = predicted vs measured; err* = against the measurement corrected for the "
                     "drift of the table's own rows re-timed beside the models")
    return table


def demo(
    out: Path = typer.Option(Path("nvit-demo"), "--out", "-o", help="Folder for every artifact (LUT, base model, "
                             "variants, ONNX, report, plots); rerunning resumes from it."),
    quick: bool = typer.Option(False, "--quick", help="Reduced budgets (a smaller table, fewer epochs) for tests."),
    seed: int = typer.Option(0, "--seed", help="Seed of training, pruning and the measurement order."),
    strict: bool = STRICT_MEASUREMENTS,
) -> None:
    """The whole promise of nvit on this CPU, without downloads: profile a latency table with ONNX Runtime,
    train a small ViT on the bundled digits, prune it to 70% and 50% of its predicted latency in one run,
    fine-tune with distillation, export and verify ONNX, then measure and compare with the predictions."""
    from nvit.demo import DemoConfig, run_demo
    from nvit.fileio import output_folder

    output_folder(out)
    config = DemoConfig.quick(out) if quick else DemoConfig(out_dir=out)
    config = DemoConfig(**{**config.__dict__, "seed": seed})
    console = Console(width=max(Console().width, 120))
    columns = (TextColumn("[bold]{task.description:<22}"), BarColumn(), TextColumn("{task.fields[status]}"),
               TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        result = run_demo(config, _RichReporter(progress, console))
    console.print(results_table(result.rows))
    console.print(f"artifacts in {out}/: lut.parquet, base/, variants/, report/ (compare.json/.csv/.png, "
                  f"widths.png, pareto.png, demo_report.json)")
    console.print(trust_markup(result.trust))
    result.trust.enforce(strict)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
