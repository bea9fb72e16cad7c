"""Loading timm / official Swin checkpoints by explicit key mapping.

Two layouts exist: timm's current one (a stage's patch merging is ``layers.S.downsample`` *before* stage S, the
classifier ``head.fc``) and the original one of the paper's code and older timm (merging at the *end* of stage
S−1, ``layers.(S−1).downsample``; classifier ``head``). Both map onto nvit's Swin (:mod:`nvit.models.swin`):
merging keys move to the stage they feed, ``head.fc.`` becomes ``head.`` (as for ViT checkpoints), and the
buffers derived from the geometry (``relative_position_index``, ``attn_mask``) are dropped, since nvit rebuilds
them. Every other tensor must find its place with its shape, and anything left over is an error naming it.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from nvit.arch import BlockSpec
from nvit.errors import CheckpointError, SpecError
from nvit.models.checkpoint import load_into, read_state_dict
from nvit.models.swin import SwinTransformer
from nvit.swin import SwinSpec, SwinStage

_DERIVED_BUFFERS = ("relative_position_index", "attn_mask")
_OLD_MERGE = re.compile(r"^layers\.(\d+)\.downsample\.")
_BLOCK = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.")


def canonical_swin_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` in nvit's Swin key layout (module doc); keys already canonical pass unchanged."""
    old_layout = any(k.startswith("layers.0.downsample.") for k in state)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.rsplit(".", 1)[-1] in _DERIVED_BUFFERS:
            continue
        if old_layout:
            key = _OLD_MERGE.sub(lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", key)
        out[key] = value
    return out


def infer_swin_arch(state: Mapping[str, torch.Tensor], *, img_size: int = 224, head_dim: int = 32,
                    name: str = "") -> SwinSpec:
    """The :class:`~nvit.swin.SwinSpec` a (canonical) Swin state dict was saved from: stage widths from the
    block norms, heads from the bias tables, the window from the tables' rows, the patch from the projection;
    ``img_size`` (not stored) and ``head_dim`` (Q/K and V per head, when the widths are uniform) are given."""
    try:
        proj = state["patch_embed.proj.weight"]
        head = state["head.weight"]
    except KeyError as exc:
        raise CheckpointError(f"cannot infer the Swin architecture: no tensor {exc.args[0]!r}") from None
    blocks: dict[int, dict[int, str]] = {}
    for key in state:
        m = _BLOCK.match(key)
        if m:
            blocks.setdefault(int(m.group(1)), {})[int(m.group(2))] = f"layers.{m.group(1)}.blocks.{m.group(2)}."
    if not blocks or sorted(blocks) != list(range(len(blocks))):
        raise CheckpointError("cannot infer the Swin architecture: its stages ('layers.N.blocks.M.') are not 0..N")
    stages, window = [], None
    for s in sorted(blocks):
        specs = []
        for b in sorted(blocks[s]):
            prefix = blocks[s][b]
            table = state.get(prefix + "attn.relative_position_bias_table")
            heads = 0 if table is None else int(table.shape[1])
            if table is not None:
                side = (math.isqrt(int(table.shape[0])) + 1) // 2
                window = side if window is None else window
            qkv = state.get(prefix + "attn.qkv.weight")
            fc1 = state.get(prefix + "mlp.fc1.weight")
            if qkv is not None and int(qkv.shape[0]) != 3 * heads * head_dim:
                raise CheckpointError(f"stage {s} block {b}: qkv width {int(qkv.shape[0])} is not 3 x {heads} heads "
                                      f"x {head_dim}")
            try:
                specs.append(BlockSpec(heads=heads, qk_dim=head_dim if heads else 0, v_dim=head_dim if heads else 0,
                                       mlp_dim=0 if fc1 is None else int(fc1.shape[0])))
            except SpecError as exc:
                raise CheckpointError(f"cannot infer the Swin architecture: stage {s} block {b}: {exc}") from None
        first = blocks[s][min(blocks[s])]
        norm = state.get(f"{first}norm1.weight", state.get(f"{first}norm2.weight"))
        if norm is None:
            raise CheckpointError(f"cannot infer the Swin architecture: stage {s} has no block norms")
        stages.append(SwinStage(int(norm.shape[0]), tuple(specs)))
    try:
        return SwinSpec(stages=tuple(stages), img_size=img_size, patch_size=int(proj.shape[-1]),
                        in_chans=int(proj.shape[1]), num_classes=int(head.shape[0]), window_size=window or 7,
                        name=name)
    except SpecError as exc:
        raise CheckpointError(f"cannot infer the Swin architecture: {exc}") from None


def load_swin_checkpoint(path: str | os.PathLike[str], spec: SwinSpec | None = None, *, img_size: int = 224,
                         head_dim: int = 32) -> SwinTransformer:
    """A Swin for ``spec`` (inferred from the file when ``None``) with the file's weights, in eval mode."""
    state = canonical_swin_state(read_state_dict(path))
    if spec is None:
        spec = infer_swin_arch(state, img_size=img_size, head_dim=head_dim, name=Path(path).stem)
    model = SwinTransformer(spec)
    load_into(model, state, source=str(path))
    return model.eval()
