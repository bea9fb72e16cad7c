"""``nvit compare``: measured vs predicted latency of variants and the dense base."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from nvit.commands.options import STRICT_MEASUREMENTS


def variant_from_source(source: str, name: str | None = None) -> Any:
    """A :class:`~nvit.validation.compare.Variant` from a variant folder, checkpoint or preset name."""
    from nvit.models import load_model, variant_provenance
    from nvit.validation.compare import Variant

    model = load_model(source)
    prov = variant_provenance(source)
    target = prov.get("target") if isinstance(prov.get("target"), dict) else {}
    top1 = prov.get("top1")
    return Variant(name=name or Path(source).name, spec=model.spec, module=model,
                   path=source if Path(source).exists() else None,
                   target_ms=target.get("latency_ms"), top1=float(top1) if top1 is not None else None)


def report_table(report: Any) -> Table:
    table = Table(title=f"measured vs predicted ({report.context.get('lut_identity', {}).get('backend', '')})")
    from nvit.commands.trust_view import noise_cell

    for col in ("variant", "params M", "GMACs", "pred ms", "meas ms", "err %", "speedup m/p", "target", "top-1",
                "noise"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for r in report.results:
        target = ""
        if r.target_ms is not None:
            target = f"{r.target_ms:.3g} " + ("[green]met[/]" if r.target_met_measured else "[red]missed[/]")
        table.add_row(
            r.name, f"{r.params / 1e6:.2f}", f"{r.macs / 1e9:.3f}", f"{r.predicted_ms:.3f}", f"{r.measured_ms:.3f}",
            f"{r.error_pct:+.1f}", f"{r.speedup_measured:.2f}/{r.speedup_predicted:.2f}", target,
            "" if r.top1 is None else f"{100 * r.top1:.1f}%", noise_cell(r.noise),
        )
    table.caption = f"mean |error| {report.mean_abs_error_pct:.1f}% over {len(report.results)} models"
    return table


def compare(
    variants: list[str] = typer.Argument(..., help="Variant folders (or checkpoints / preset names) to compare."),
    lut: str = typer.Option(..., "--lut", help="The latency table the variants were pruned with (a file or a "
                            "service URL)."),
    base: str = typer.Option(None, "--base", help="Dense reference (variant folder, checkpoint or preset).",
                             show_default="the table's base architecture"),
    out: Path = typer.Option(Path("compare"), "--out", "-o", help="Folder for compare.json, .csv and .png."),
    allow_other_device: bool = typer.Option(False, "--allow-other-device",
                                            help="Measure even if this device is not the table's."),
    remote: str | None = typer.Option(None, "--remote", help="Measure on an nvit service's device (an agent on "
                                      "the table's device) instead of this machine."),
    strict: bool = STRICT_MEASUREMENTS,
) -> None:
    """Measure every variant (and the dense base) with the table's backend and settings, and report measured
    against predicted latency, error, speedup and whether each variant met its target."""
    from nvit.commands.service_access import following, local_lut, measuring_here
    from nvit.commands.trust_view import trust_markup
    from nvit.errors import NvitError
    from nvit.fileio import output_folder
    from nvit.lut import load_table, predictor_for
    from nvit.models.checkpoint import build_any
    from nvit.plots import save_compare
    from nvit.swin import spec_from_dict
    from nvit.validation.compare import Variant, compare_with_table

    console = Console(width=max(Console().width, 120))  # the report is wide; logs and pipes get 120 columns
    output_folder(out)
    lut = local_lut(lut)
    table = load_table(lut)
    if remote is not None and table.is_swin:
        raise NvitError("--remote compares with a ViT table; a Swin table is compared on this machine")
    if base is None:
        spec = spec_from_dict(table.meta.base_arch)
        base_variant = Variant(spec.name or "base", spec, build_any(spec, seed=0).eval())
    else:
        base_variant = variant_from_source(base, name=f"{Path(base).name} (base)")
    loaded = [variant_from_source(v) for v in variants]
    from nvit.lut.accuracy import trust_warnings

    for warning in trust_warnings(table.meta, predictor_for(table)):
        console.print(f"[yellow]warning:[/] {warning}")
    if remote is not None:
        from nvit.service.client import ServiceClient
        from nvit.service.remote_measure import compare_remote

        with ServiceClient(remote) as client, following(console, "measuring remotely") as update:
            report = compare_remote(client, table, lut, base_variant, loaded, same_device=not allow_other_device,
                                    on_update=update)
    else:
        with measuring_here(table.meta.device_kind, console, "compare"), console.status("measuring...") as status:
            report = compare_with_table(table, base_variant, loaded, same_device=not allow_other_device,
                                        progress=lambda msg: status.update(msg))
    console.print(report_table(report))
    paths = save_compare(report, out)
    console.print("saved " + ", ".join(str(p) for p in paths.values()))
    trust = report.trust()
    console.print(trust_markup(trust))
    trust.enforce(strict)


def register(app: typer.Typer) -> None:
    app.command("compare")(compare)
