"""``nvit arch``: inspect architecture specs (presets or arch.json files)."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from nvit.arch import ArchSpec, block_params, preset, preset_names, resolve_arch

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
        f"({spec.flops() / 1e9:.2f} GFLOPs), image {spec.img_size}px/patch {spec.patch_size}"
        + (", distilled" if spec.distilled else "")
        + (f"; removed: {removed['attn']} attention, {removed['mlp']} MLP sub-layer(s)" if any(removed.values())
           else "")
    )
    return table


@arch_app.command("show")
def show(
    arch: str = typer.Argument(..., help="A preset name (see 'nvit arch list') or a path to an arch.json file."),
    as_json: bool = typer.Option(False, "--json", help="Print the spec and its costs as JSON."),
) -> None:
    """Per-block widths, parameter count and FLOPs of an architecture."""
    spec = resolve_arch(arch)
    dropped = _dropped_blocks(arch)
    if as_json:
        summary = {"params": spec.num_params(), "flops": spec.flops(), "macs": spec.macs()}
        typer.echo(json.dumps({"arch": spec.to_dict(), "summary": summary}, indent=2))
        return
    table = arch_table(spec)
    if dropped:
        table.caption += f"; blocks dropped (the base's numbering): {', '.join(map(str, dropped))}"
    Console().print(table)


def _dropped_blocks(arch: str) -> list[int]:
    """The base's blocks a pruned variant dropped, from its arch.json provenance (empty for anything else)."""
    from pathlib import Path

    from nvit.arch import load_arch_file

    path = Path(arch) / "arch.json" if Path(arch).is_dir() else Path(arch)
    if path.suffix != ".json" or not path.is_file():
        return []
    return [int(i) for i in load_arch_file(path)[1].get("dropped_blocks", [])]


@arch_app.command("list")
def list_presets() -> None:
    """List the built-in presets."""
    table = Table("preset", "embed", "depth", "heads", "params (M)", "GMACs")
    for name in preset_names():
        s = preset(name)
        table.add_row(name, str(s.embed_dim), str(s.depth), str(s.blocks[0].heads),
                      f"{s.num_params() / 1e6:.2f}", f"{s.macs() / 1e9:.2f}")
    Console().print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(arch_app, name="arch")
