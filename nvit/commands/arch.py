"""``nvit arch``: inspect architecture specs (presets or arch.json files)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from nvit import __version__
from nvit.arch import ArchSpec, block_params, save_arch
from nvit.errors import SpecError
from nvit.fileio import output_file
from nvit.presets import preset, preset_names
from nvit.redesign.family import resolve_base
from nvit.redesign.learned import DEFAULT_BANDWIDTH
from nvit.swin import SwinSpec, resolve_any_arch, swin_preset, swin_preset_names

arch_app = typer.Typer(help="Inspect architecture specs: presets and arch.json files.", no_args_is_help=True)


def arch_table(spec: ArchSpec) -> Table:
    table = Table(title=f"{spec.name or 'custom'}: e={spec.embed_dim}, {spec.depth} blocks, {spec.num_tokens} tokens")
    for col in ("block", "heads", "qk_dim", "v_dim", "mlp_dim", "params (M)", "GMACs"):
        table.add_column(col, justify="right")
    for i, b in enumerate(spec.blocks):
        attn = [str(b.heads), str(b.qk_dim), str(b.v_dim)] if b.has_attn else ["attn removed", "–", "–"]
        table.add_row(
            str(i), *attn, str(b.mlp_dim) if b.has_mlp else "mlp removed",
            f"{block_params(spec.embed_dim, b) / 1e6:.3f}", f"{spec.block_flops(i) / 2e9:.3f}",
        )
    removed = spec.removed_sublayers
    table.caption = (
        f"total: {spec.num_params() / 1e6:.2f} M params, {spec.macs() / 1e9:.2f} GMACs "
        f"({spec.flops() / 1e9:.2f} GFLOPs)\nimage {spec.img_size}px/patch {spec.patch_size}"
        + (", distilled" if spec.distilled else "")
        + (f"; removed: {removed['attn']} attention, {removed['mlp']} MLP sub-layer(s)" if any(removed.values())
           else "")
    )
    return table


def swin_table(spec: SwinSpec) -> Table:
    """A Swin's widths per block, with its stage's resolution, window and shift, params and GMACs."""
    table = Table(title=f"{spec.name or 'custom swin'}: {spec.num_stages} stages, {spec.depth} blocks, "
                        f"window {spec.window_size}")
    for col in ("stage", "block", "embed", "tokens", "window/shift", "heads", "qk_dim", "v_dim", "mlp_dim",
                "params (M)", "GMACs"):
        table.add_column(col, justify="right")
    for s, stage in enumerate(spec.stages):
        for j, b in enumerate(stage.blocks):
            attn = [str(b.heads), str(b.qk_dim), str(b.v_dim)] if b.has_attn else ["attn removed", "–", "–"]
            table.add_row(str(s), str(j), str(stage.embed_dim), f"{spec.resolution(s)}²",
                          f"{spec.window(s)}/{spec.shift(s, j)}", *attn, str(b.mlp_dim) if b.has_mlp else "mlp removed",
                          f"{spec.block_params(s, b) / 1e6:.3f}", f"{spec.block_flops(s, b) / 2e9:.3f}")
    table.caption = (f"total: {spec.num_params() / 1e6:.2f} M params, {spec.macs() / 1e9:.2f} GMACs "
                     f"({spec.flops() / 1e9:.2f} GFLOPs)\nimage {spec.img_size}px/patch {spec.patch_size}; patch "
                     "merging before every stage but the first")
    return table


@arch_app.command("show")
def show(
    arch: str = typer.Argument(..., help="A preset name (see 'nvit arch list') or a path to an arch.json file."),
    as_json: bool = typer.Option(False, "--json", help="Print the spec and its costs as JSON."),
) -> None:
    """Per-block widths, parameter count and FLOPs of an architecture (a ViT/DeiT/ReViT or a Swin)."""
    spec = resolve_any_arch(arch)
    if as_json:
        _echo_json(spec)
        return
    if isinstance(spec, SwinSpec):
        Console().print(swin_table(spec))
        return
    table = arch_table(spec)
    dropped = _dropped_blocks(arch)
    if dropped:
        table.caption += f"; blocks dropped (the base's numbering): {', '.join(map(str, dropped))}"
    Console().print(table)


def _echo_json(spec: ArchSpec | SwinSpec) -> None:
    summary = {"params": spec.num_params(), "flops": spec.flops(), "macs": spec.macs()}
    typer.echo(json.dumps({"arch": spec.to_dict(), "summary": summary}, indent=2))


def _dropped_blocks(arch: str) -> list[int]:
    """The base's blocks a pruned variant dropped, from its arch.json provenance (empty for anything else)."""
    from pathlib import Path

    from nvit.arch import read_arch_doc

    path = Path(arch) / "arch.json" if Path(arch).is_dir() else Path(arch)
    if path.suffix != ".json" or not path.is_file():
        return []
    return [int(i) for i in read_arch_doc(path)[1].get("dropped_blocks", [])]


@arch_app.command("list")
def list_presets() -> None:
    """List the built-in presets."""
    table = Table("preset", "embed", "depth", "heads", "params (M)", "GMACs")
    for name in preset_names():
        s = preset(name)
        heads = sorted({b.heads for b in s.blocks})
        table.add_row(name, str(s.embed_dim), str(s.depth), "-".join(map(str, (heads[0], heads[-1]) if len(heads) > 1
                                                                           else heads)),
                      f"{s.num_params() / 1e6:.2f}", f"{s.macs() / 1e9:.2f}")
    for name in swin_preset_names():
        w = swin_preset(name)
        heads = [b.heads for b in w.blocks]
        table.add_row(name, "-".join(str(st.embed_dim) for st in w.stages), str(w.depth),
                      f"{min(heads)}-{max(heads)}", f"{w.num_params() / 1e6:.2f}", f"{w.macs() / 1e9:.2f}")
    Console().print(table)


def _print_or_save(spec: ArchSpec, out: Path | None, as_json: bool, provenance: dict[str, Any]) -> None:
    if out is not None:
        save_arch(spec, output_file(out), provenance)
    if as_json:
        _echo_json(spec)
        return
    Console().print(arch_table(spec))
    if out is not None:
        Console().print(f"wrote {out}")


@arch_app.command("revit")
def revit(
    embed: int = typer.Option(..., "--embed", help="Embedding width E (the rule needs E > 100)."),
    depth: int = typer.Option(12, "--depth", help="Blocks; other depths than 12 stretch the 12-block pattern."),
    distilled: bool = typer.Option(False, "--distilled", help="With a distillation token (DeiT/NViT style)."),
    out: Path | None = typer.Option(None, "--out", help="Write the design as an arch.json here."),
    as_json: bool = typer.Option(False, "--json", help="Print the spec and its costs as JSON."),
) -> None:
    """NViT's published redistribution rule (ReViT) at embedding E: widths per block, params and MACs."""
    from nvit.presets import revit_spec

    if depth < 1:
        raise SpecError(f"--depth must be at least 1, got {depth}")
    spec = revit_spec(embed, depth, distilled=distilled)
    _print_or_save(spec, out, as_json, {"kind": "nvit.revit", "rule": "published (NViT)", "embed_dim": embed,
                                        "depth": depth, "nvit_version": __version__})


@arch_app.command("redistribute")
def redistribute(
    variants: list[str] = typer.Argument(..., help="Pruned variants: arch.json files, variant folders or "
                                         "'nvit prune' output folders (every variant of the run)."),
    embed: int | None = typer.Option(None, "--embed", help="Build the rule at this embedding width."),
    lut: str | None = typer.Option(None, "--lut", help="Latency table: with --target-latency, choose the "
                                   "embedding; with --embed, print the predicted latency."),
    target_latency: str | None = typer.Option(None, "--target-latency", help="Predicted latency to meet, e.g. "
                                              "0.15ms: the largest embedding on the table's grid that meets it."),
    base: str | None = typer.Option(None, "--base", help="The dense base (preset, arch.json or variant folder); "
                                    "default: the one the variants' provenance names."),
    depth: int | None = typer.Option(None, "--depth", help="Blocks of the design (default: the base's)."),
    bandwidth: float = typer.Option(DEFAULT_BANDWIDTH, "--bandwidth", help="Smoothing over relative block "
                                    "position (0: per-block means)."),
    heads_step: int = typer.Option(2, "--heads-step", help="Heads are rounded to multiples of this (even)."),
    width_step: int = typer.Option(8, "--width-step", help="QK/V per head, MLP and embedding step."),
    name: str = typer.Option("", "--name", help="Name of the design (default: BASE-redistributed)."),
    out: Path = typer.Option(Path("redistributed.json"), "--out", help="Where to write the design's arch.json."),
    plot: Path | None = typer.Option(None, "--plot", help="Also draw widths per block relative to dense (PNG)."),
) -> None:
    """Learn a redistribution rule from pruned variants (width shares per relative block position, smoothed,
    rounded to hardware-friendly steps) and write the design it gives as an arch.json."""
    from nvit.arch import WidthSteps
    from nvit.pruning.config import Target
    from nvit.redesign.family import load_family
    from nvit.redesign.family import redistribute as fit

    if depth is not None and depth < 1:
        raise SpecError(f"--depth must be at least 1, got {depth}")
    if target_latency is not None and lut is None:
        raise SpecError("--target-latency needs --lut (a latency table)")
    output_file(out)
    if plot is not None:
        output_file(plot, "--plot")
    target_ms = None if target_latency is None else Target.latency(target_latency).value
    family = load_family(variants)
    base_spec, how = resolve_base(family, base)
    predictor, lut_prov = _predictor(lut, base_spec)
    rounding = WidthSteps(heads=heads_step, qk_dim=width_step, v_dim=width_step, mlp_dim=width_step,
                        embed_dim=width_step)
    design = fit(family, base=base_spec, base_how=how, embed_dim=embed, predictor=predictor, target_ms=target_ms,
                 depth=depth, bandwidth=bandwidth, rounding=rounding, name=name, lut_provenance=lut_prov)
    if plot is not None:
        from nvit.plots import plot_shares

        plot_shares(design.sources, design.rule, plot)
    save_arch(design.spec, out, design.provenance)
    console = Console()
    console.print(arch_table(design.spec))
    predicted = design.provenance.get("predicted_latency_ms")
    base_line = f"base {base_spec.name or 'custom'} ({how}); {len(family)} variant(s)"
    if predicted is not None:
        target = "" if target_ms is None else f" (target {target_ms:.4g} ms)"
        base_line += f"; predicted {predicted:.4g} ms{target}"
    console.print(base_line)
    console.print(f"wrote {out}" + (f" and {plot}" if plot is not None else ""))


def _predictor(lut: str | None, base: ArchSpec) -> tuple[Any, dict[str, Any]]:
    if lut is None:
        return None, {}
    from nvit.commands.service_access import local_lut
    from nvit.pruning.recipe import load_latency_predictor

    loaded = load_latency_predictor(local_lut(lut), base)
    if not loaded.has_time_unit:
        raise SpecError("--lut flops has no time unit; give a latency table")
    return loaded.predictor, loaded.provenance


def register(app: typer.Typer) -> None:
    app.add_typer(arch_app, name="arch")
