"""Named architectures: DeiT's uniform presets, the small test model, and NViT's ReViT family.

:func:`preset` builds an :class:`~nvit.arch.ArchSpec` by name (``deit_small``, ``deit_base_distilled``,
``revit_tiny``); :func:`revit_widths` is NViT's published rule for redistributing widths across blocks, at any
embedding width and depth; :func:`resolve_arch` takes a preset name or an ``arch.json`` path, as the CLI does.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nvit.arch import ArchSpec, BlockSpec, load_arch_file
from nvit.errors import SpecError


# ---- uniform presets --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Preset:
    embed_dim: int
    depth: int
    heads: int
    head_dim: int = 64
    mlp_ratio: int = 4
    extra: Mapping[str, Any] = field(default_factory=dict)


_PRESETS: dict[str, _Preset] = {
    "deit_tiny": _Preset(192, 12, 3),
    "deit_small": _Preset(384, 12, 6),
    "deit_base": _Preset(768, 12, 12),
    # A small model for tests and the CPU demo: 8x8 images (scikit-learn digits), 2x2 patches.
    "vit_test": _Preset(
        64, 4, 4, head_dim=16, extra={"img_size": 8, "patch_size": 2, "in_chans": 1, "num_classes": 10}
    ),
}


# ---- ReViT: the per-block preset family NViT published ---------------------------------------------
# NViT's pruned models moved parameters from QK to the MLP and from the first and last blocks to the middle
# ones; its official code turns that into a rule for embedding ``E``, with ``r = round(0.005·E)`` and
# ``s = round(0.05·E/8)`` (Python's rounding), for blocks 1..12:
#
# ==========  ==========================================
# heads       10, 2r, 2r, 4r ×6, 2r, 2r, 10
# qk per head 16s, 8s, 8s, 16s ×6, 8s, 8s, 16s
# v per head  64 everywhere
# MLP         3E ×3, 6E ×6, 3E ×3
# ==========  ==========================================
#
# **Other depths.** Block ``j`` of ``D`` (0-based) takes the widths of the 12-block pattern at
# pattern_index: its relative position ``j/(D−1)`` mapped onto 0..11 (endpoints onto endpoints, halves
# rounded up in the first half of the model and mirrored into the second, so the stretched rule stays
# symmetric like the pattern); one block takes the middle pattern. ``D = 12`` is the pattern itself.
PATTERN_DEPTH = 12
V_DIM = 64
#: Multipliers of the 12-block pattern: heads ×r (0 means the constant EDGE_HEADS), QK ×s, MLP ×E.
_HEADS_R = (0, 2, 2, 4, 4, 4, 4, 4, 4, 2, 2, 0)
EDGE_HEADS = 10
_QK_S = (16, 8, 8, 16, 16, 16, 16, 16, 16, 8, 8, 16)
_MLP_E = (3, 3, 3, 6, 6, 6, 6, 6, 6, 3, 3, 3)
MIDDLE_INDEX = 5

#: Presets: ReViT-T and ReViT-S of the paper (224 px, 16 px patches, 1000 classes).
REVIT_PRESETS = {"revit_tiny": 176, "revit_small": 384}


@dataclass(frozen=True)
class RevitFactors:
    """The rule's two integers for one embedding width."""

    embed_dim: int
    r: int
    s: int

    @classmethod
    def of(cls, embed_dim: int) -> RevitFactors:
        return cls(embed_dim, round(0.005 * embed_dim), round(0.05 * embed_dim / 8))


def pattern_index(block: int, depth: int) -> int:
    """Which of the 12 pattern blocks block ``block`` (0-based) of a ``depth``-block model takes."""
    if depth < 1 or not 0 <= block < depth:
        raise SpecError(f"block {block} of a {depth}-block model does not exist")
    if depth == 1:
        return MIDDLE_INDEX
    last = PATTERN_DEPTH - 1
    mirrored = block > (depth - 1) / 2
    j = depth - 1 - block if mirrored else block
    index = math.floor(j * last / (depth - 1) + 0.5)
    return last - index if mirrored else index


def revit_widths(embed_dim: int, depth: int = PATTERN_DEPTH) -> tuple[tuple[int, int, int, int], ...]:
    """The rule's (heads, qk_dim, v_dim, mlp_dim) per block for embedding ``embed_dim``
    (:func:`revit_spec` builds the architecture); a width the rule makes 0 (``E`` of 100 or less)
    is an error."""
    if not isinstance(embed_dim, int) or isinstance(embed_dim, bool) or embed_dim <= 0:
        raise SpecError(f"--embed must be a positive integer, got {embed_dim!r}")
    f = RevitFactors.of(embed_dim)
    if f.r == 0 or f.s == 0:
        raise SpecError(f"NViT's rule gives r = round(0.005·{embed_dim}) = {f.r} and s = round(0.05·{embed_dim}/8) "
                        f"= {f.s}: zero heads or QK channels; the rule needs an embedding above 100")
    out = []
    for j in range(depth):
        i = pattern_index(j, depth)
        heads = EDGE_HEADS if _HEADS_R[i] == 0 else _HEADS_R[i] * f.r
        out.append((heads, _QK_S[i] * f.s, V_DIM, _MLP_E[i] * embed_dim))
    return tuple(out)


def _distillable(name: str) -> bool:
    return name.startswith(("deit_", "revit_"))


def preset_names() -> list[str]:
    names = []
    for name in (*_PRESETS, *REVIT_PRESETS):
        names.append(name)
        if _distillable(name):
            names.append(f"{name}_distilled")
    return names


def preset(name: str, **overrides: Any) -> ArchSpec:
    """An architecture by name: uniform (``deit_base``, ``deit_small_distilled``) or NViT's redistributed
    ReViT (``revit_tiny``, ``revit_small``: :func:`revit_widths`)."""
    base_name = name.removesuffix("_distilled")
    distilled = name.endswith("_distilled")
    if base_name not in {*_PRESETS, *REVIT_PRESETS} or (distilled and not _distillable(base_name)):
        raise SpecError(f"unknown architecture preset {name!r}; known: {', '.join(preset_names())}")
    if base_name in REVIT_PRESETS:
        return revit_spec(REVIT_PRESETS[base_name], **{"name": name, "distilled": distilled, **overrides})
    p = _PRESETS[base_name]
    block = BlockSpec(heads=p.heads, qk_dim=p.head_dim, v_dim=p.head_dim, mlp_dim=p.embed_dim * p.mlp_ratio)
    kwargs: dict[str, Any] = {"name": name, "distilled": distilled, **p.extra, **overrides}
    return ArchSpec(embed_dim=p.embed_dim, blocks=(block,) * p.depth, **kwargs)


def revit_spec(embed_dim: int, depth: int = PATTERN_DEPTH, *, name: str | None = None, **arch: Any) -> ArchSpec:
    """NViT's published redistribution rule (:func:`revit_widths`) at ``embed_dim`` as an architecture
    (ImageNet defaults: 224 px, 16 px patches, 1000 classes)."""
    blocks = tuple(BlockSpec(heads=h, qk_dim=q, v_dim=v, mlp_dim=m) for h, q, v, m in revit_widths(embed_dim, depth))
    label = name if name is not None else f"revit_e{embed_dim}" + (f"_d{depth}" if depth != PATTERN_DEPTH else "")
    return ArchSpec(embed_dim=embed_dim, blocks=blocks, name=label, **arch)


def resolve_arch(name_or_path: str) -> ArchSpec:
    """A preset name or a path to an arch JSON file."""
    if name_or_path in preset_names():
        return preset(name_or_path)
    if name_or_path.endswith(".json") or os.path.sep in name_or_path or Path(name_or_path).exists():
        return load_arch_file(name_or_path)[0]
    raise SpecError(f"{name_or_path!r} is neither a preset ({', '.join(preset_names())}) nor a JSON file")
