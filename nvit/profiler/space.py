"""Search spaces: which block configurations a latency table measures.

A space is a base architecture (token count, image, classes) plus hardware-aligned grids for the embedding
width ``e``, heads ``h``, per-head Q/K width ``q``, per-head V width ``v`` and MLP width ``m``, a batch size
and a precision. It expands into separable sub-tables (DESIGN.md §4):

- ``attn``: the attention half of a block on the full ``e × h × q × v`` grid;
- ``mlp``: the MLP half on the ``e × m`` grid;
- ``block``: a few full blocks per ``e`` (the largest widths plus a seeded random sample of grid points),
  which measure how far a block is from the sum of its halves;
- ``attn_block`` / ``mlp_block``: per ``e``, a few blocks that kept only their attention or only their MLP
  (the smallest and the largest of the half's grid, then random ones): what a block costs once a pruning
  run has removed one of its sub-layers, measured rather than extrapolated to zero width;
- narrow blocks: per ``e``, full and one-half blocks at the narrow end a pruning run reaches (the smallest
  head counts at the smallest Q/K and V widths, with the smallest MLP widths or none; MLP-only blocks at the
  smallest MLP widths). There a block is furthest from the sum of its halves (one attention shape is faster
  alone than inside a block) and the predictor prices a block the table measured by its own row;
- ``fixed``: patch embedding + tokens + final norm + head(s), once per ``e``.

The expansion into configurations is shared with a Swin's per-stage grids (:mod:`nvit.profiler.grid_configs`).
Presets are derived from the architecture presets (recipes in :mod:`nvit.profiler.space_recipes`); custom spaces
are JSON files with strict keys. Row configurations live in :mod:`nvit.vocab`, architectures
drawn from a space in :mod:`nvit.profiler.sampling`; their names are re-exported here.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from nvit.arch import ArchSpec
from nvit.errors import SpecError
from nvit.fileio import atomic_write_text
from nvit.presets import preset, preset_names
from nvit.profiler.grid_configs import DEFAULT_HALF_BLOCKS_PER_EMBED, GRID_AXES, GridConfigs
from nvit.profiler.sampling import CALIBRATION_LOW_FRACTION, calibration_archs, random_arch, uniform_arch
from nvit.profiler.space_recipes import (
    GENERIC_BLOCKS_PER_EMBED,
    RECIPES,
    GridRecipe,
    aligned_span,
    derive_axes,
    doubling_span,
    head_span,
    low_dense_span,
)
from nvit.profiler.swin_space import SWIN_SPACE_KIND, SwinSearchSpace
from nvit.vocab import PartConfig, Precision, positive_int

__all__ = [
    "CALIBRATION_LOW_FRACTION", "GRID_AXES", "SPACE_FILE_KIND", "SPACE_SCHEMA_VERSION",
    "GridRecipe", "SearchSpace", "aligned_span", "arch_for_space", "calibration_archs",
    "derived_space", "doubling_span",
    "load_space", "preset_space", "random_arch", "resolve_space", "save_space", "space_preset_names",
    "uniform_arch", "with_overrides",
]

SPACE_SCHEMA_VERSION = 4  # 4: narrow blocks; 3: one-half blocks (half_blocks_per_embed); 2: smallest corner
READABLE_SPACE_VERSIONS = (1, 2, 3, 4)
SPACE_FILE_KIND = "nvit.space"


@dataclass(frozen=True)
class SearchSpace(GridConfigs):
    """Grids over block widths for one base architecture, batch size and precision."""

    base: ArchSpec
    embed_dims: tuple[int, ...]
    heads: tuple[int, ...]
    qk_dims: tuple[int, ...]
    v_dims: tuple[int, ...]
    mlp_dims: tuple[int, ...]
    blocks_per_embed: int = 3
    half_blocks_per_embed: int = DEFAULT_HALF_BLOCKS_PER_EMBED
    narrow_blocks: bool = True
    sample_seed: int = 0
    batch_size: int = 1
    precision: Precision = Precision.FP32
    name: str = ""

    def __post_init__(self) -> None:
        self.check_grids()
        if not positive_int(self.batch_size):
            raise SpecError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        try:
            object.__setattr__(self, "precision", Precision(self.precision))
        except ValueError:
            known = ", ".join(p.value for p in Precision)
            raise SpecError(f"unknown precision {self.precision!r}; known: {known}") from None

    @property
    def num_tokens(self) -> int:
        return self.base.num_tokens

    def sentinel(self) -> PartConfig:
        """The configuration re-timed during a sweep to record drift: the largest block at the largest ``e``."""
        return self.largest_block(self.embed_dims[-1])

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"schema_version": SPACE_SCHEMA_VERSION, "kind": SPACE_FILE_KIND}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "base":
                value = value.to_dict()
            elif f.name == "precision":
                value = value.value
            elif isinstance(value, tuple):
                value = list(value)
            data[f.name] = value
        return data

    def fingerprint(self) -> str:
        """A short hash of everything that decides which configurations are measured and how."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchSpace:
        if not isinstance(data, Mapping):
            raise SpecError(f"a search space must be a JSON object, got {type(data).__name__}")
        allowed = {f.name for f in fields(cls)} | {"schema_version", "kind"}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise SpecError(f"unknown search space key(s): {', '.join(unknown)}")
        missing = sorted({"base", *GRID_AXES} - set(data))
        if missing:
            raise SpecError(f"search space is missing key(s): {', '.join(missing)}")
        version = data.get("schema_version", SPACE_SCHEMA_VERSION)
        if version not in READABLE_SPACE_VERSIONS:  # a version-1 file is read as version 2 (same grids)
            raise SpecError(f"unsupported search space schema_version {version!r} "
                            f"(this nvit reads {', '.join(map(str, READABLE_SPACE_VERSIONS))})")
        if data.get("kind", SPACE_FILE_KIND) != SPACE_FILE_KIND:
            raise SpecError(f"not a search space file (kind {data.get('kind')!r})")
        kwargs = {k: v for k, v in data.items() if k not in ("schema_version", "kind")}
        if version < 3:  # older spaces measured no one-half blocks; reading one must not change what it measures
            kwargs.setdefault("half_blocks_per_embed", 0)
        if version < 4:  # nor narrow blocks
            kwargs.setdefault("narrow_blocks", False)
        base = kwargs["base"]
        if isinstance(base, str):
            if base not in preset_names():
                raise SpecError(f"unknown base architecture preset {base!r}; known: {', '.join(preset_names())}")
            kwargs["base"] = preset(base)
        else:
            kwargs["base"] = ArchSpec.from_dict(base)
        for axis in GRID_AXES:
            if not isinstance(kwargs[axis], list):
                raise SpecError(f"space {axis} must be a list of positive integers")
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise SpecError(f"invalid search space: {exc}") from None


def save_space(space: SearchSpace | SwinSearchSpace, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    atomic_write_text(path, json.dumps(space.to_dict(), indent=2) + "\n")
    return path


def load_space(path: str | os.PathLike[str]) -> SearchSpace | SwinSearchSpace:
    """A space file: a ViT's (:class:`SearchSpace`) or, by its ``kind``, a Swin's (one grid per stage)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"search space file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise SpecError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except OSError as exc:
        raise SpecError(f"cannot read search space file {path}: {exc.strerror}") from None
    try:
        if isinstance(data, Mapping) and data.get("kind") == SWIN_SPACE_KIND:
            return SwinSearchSpace.from_dict(data)
        return SearchSpace.from_dict(data)
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from None


# ---- presets --------------------------------------------------------------------------------------
def space_preset_names() -> list[str]:
    return [n for n in preset_names() if n.removesuffix("_distilled") in RECIPES]


def preset_space(name: str, *, batch_size: int = 1, precision: Precision | str = Precision.FP32) -> SearchSpace:
    """The preset space of an architecture preset (``vit_test``, ``deit_small``, ``deit_base_distilled``...)."""
    recipe = RECIPES.get(name.removesuffix("_distilled"))
    if recipe is None or name not in preset_names():
        raise SpecError(f"unknown search space preset {name!r}; known: {', '.join(space_preset_names())}")
    base = preset(name)
    dense = base.blocks[0]
    e = base.embed_dim
    heads = head_span(dense.heads, recipe.max_head_points)
    if recipe.mlp_low_dense:
        unit = recipe.head_dim_unit
        mlp_dims = low_dense_span(unit, dense.mlp_dim, recipe.mlp_points, unit)
    else:
        mlp_dims = aligned_span(int(dense.mlp_dim * recipe.min_mlp_ratio), dense.mlp_dim, recipe.mlp_points,
                                recipe.mlp_align)
    return SearchSpace(
        base=base,
        embed_dims=aligned_span(recipe.min_embed, e, recipe.embed_points, recipe.embed_align),
        heads=heads,
        qk_dims=doubling_span(recipe.head_dim_unit, dense.qk_dim),
        v_dims=doubling_span(recipe.head_dim_unit, dense.v_dim),
        mlp_dims=mlp_dims,
        blocks_per_embed=recipe.blocks_per_embed,
        batch_size=batch_size,
        precision=Precision(precision),
        name=name,
    )


def derived_space(base: ArchSpec, *, group_size: int = 8, batch_size: int = 1,
                  precision: Precision | str = Precision.FP32, name: str = "") -> SearchSpace:
    """A space for any ViT by the generic recipe (:func:`~nvit.profiler.space_recipes.derive_axes`): every axis
    from the pruning ``group_size`` up to the widest block's width."""
    if not positive_int(group_size):
        raise SpecError(f"group size must be a positive integer, got {group_size!r}")
    widest = {f: max(getattr(b, f) for b in base.blocks) for f in ("heads", "qk_dim", "v_dim", "mlp_dim")}
    axes = derive_axes(base.embed_dim, **widest, group_size=group_size)
    return SearchSpace(base=base, **axes, blocks_per_embed=GENERIC_BLOCKS_PER_EMBED, batch_size=batch_size,
                       precision=Precision(precision), name=name or f"{base.name or 'custom'}-derived")


def arch_for_space(source: str) -> Any:
    """The architecture a space is derived for: a preset name (a ViT's or a Swin's), an ``arch.json`` (or bare
    spec) file, a variant folder (its ``arch.json``) or a ViT checkpoint file (``.pth``/``.pt``/``.bin``/
    ``.safetensors``, the architecture inferred from its tensors). A Swin gets a Swin space
    (:func:`nvit.profiler.swin_space.derived_swin_space`)."""
    from nvit.swin import load_any_arch_file, swin_preset, swin_preset_names

    if source in preset_names():
        return preset(source)
    if source in swin_preset_names():
        return swin_preset(source)
    path = Path(source)
    if path.is_dir():
        if not (path / "arch.json").is_file():
            raise SpecError(f"{path} is a folder without arch.json (not an nvit variant)")
        path = path / "arch.json"
    if path.suffix == ".json":
        return load_any_arch_file(path)[0]
    if path.is_file():
        from nvit.models.checkpoint import infer_arch, read_state_dict

        return infer_arch(read_state_dict(path), name=path.stem)
    raise SpecError(f"{source!r} is neither an architecture preset ({', '.join(preset_names())}), an arch JSON "
                    "file, a variant folder nor a checkpoint file")


def resolve_space(name_or_path: str, *, batch_size: int | None = None,
                  precision: Precision | str | None = None) -> SearchSpace | SwinSearchSpace:
    """A preset name or a JSON file (a ViT's space or a Swin's); ``batch_size``/``precision`` override the space's
    own when given."""
    if name_or_path in space_preset_names():
        space = preset_space(name_or_path)
    elif name_or_path.endswith(".json") or os.path.sep in name_or_path or Path(name_or_path).exists():
        space = load_space(name_or_path)
    else:
        raise SpecError(
            f"{name_or_path!r} is neither a space preset ({', '.join(space_preset_names())}) nor a JSON file"
        )
    return with_overrides(space, batch_size=batch_size, precision=precision)


def with_overrides(space: Any, *, batch_size: int | None = None, precision: Precision | str | None = None) -> Any:
    """``space`` with ``batch_size``/``precision`` replaced where given."""
    changes: dict[str, Any] = {}
    if batch_size is not None:
        changes["batch_size"] = batch_size
    if precision is not None:
        changes["precision"] = precision
    return replace(space, **changes) if changes else space


