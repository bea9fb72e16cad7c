"""Loading timm/DeiT checkpoint files and nvit weights by explicit key mapping.

A checkpoint maps onto the model key by key; names that differ between sources are renamed by one
explicit table, and every tensor must find a place of the right shape. Anything left over on either side
is an error that names it: a silently half-loaded model is worse than none.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from nvit.arch import ArchSpec, BlockSpec
from nvit.errors import CheckpointError, SpecError
from nvit.models.vit import VisionTransformer

# Wrapper keys used by training scripts (DeiT stores {"model": ...}; others use these).
_WRAPPER_KEYS = ("model", "state_dict", "model_state_dict")
# Prefixes added by DataParallel/DDP or torch.compile.
_STRIP_PREFIXES = ("module.", "_orig_mod.")
# Renames from other naming schemes to nvit's (timm naming is nvit's naming).
_RENAMES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^head\.fc\."), "head."),  # some timm heads are a module with .fc
)


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read tensors from ``.pth``/``.pt``/``.bin`` (torch) or ``.safetensors``; unwrap training wrappers."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw: object = load_file(str(path))
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated, or pickled arbitrary objects
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {first}") from None
    if isinstance(raw, Mapping):
        for key in _WRAPPER_KEYS:
            if key in raw and isinstance(raw[key], Mapping):
                raw = raw[key]
                break
    if not isinstance(raw, Mapping) or not raw:
        raise CheckpointError(f"{path} holds no state dict")
    state: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is not a tensor ({type(value).__name__})")
        state[_canonical_key(key)] = value
    return state


def _canonical_key(key: str) -> str:
    for prefix in _STRIP_PREFIXES:
        key = key.removeprefix(prefix)
    for pattern, repl in _RENAMES:
        key = pattern.sub(repl, key)
    return key


def load_into(model: torch.nn.Module, state: Mapping[str, torch.Tensor], *, source: str = "checkpoint") -> None:
    """Copy ``state`` into ``model``; every key must match exactly once with the right shape."""
    expected = model.state_dict()
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    if unexpected:
        raise CheckpointError(f"{source}: tensor(s) with no place in the model: {_few(unexpected)}")
    if missing:
        raise CheckpointError(f"{source}: model tensor(s) missing from the checkpoint: {_few(missing)}")
    for key, target in expected.items():
        if tuple(state[key].shape) != tuple(target.shape):
            raise CheckpointError(
                f"{source}: tensor {key!r} has shape {tuple(state[key].shape)}, the model expects "
                f"{tuple(target.shape)}"
            )
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(state[key].to(dtype=target.dtype))


def _few(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def infer_arch(state: Mapping[str, torch.Tensor], *, head_dim: int = 64, name: str = "") -> ArchSpec:
    """Infer a uniform-head-dim ArchSpec from a timm/DeiT state dict (heads = qkv width / 3 / head_dim).

    Fused ``qkv`` weights do not record the number of heads, so ``head_dim`` is assumed (64 for DeiT).
    """
    try:
        proj = state["patch_embed.proj.weight"]
        embed_dim, in_chans, patch, _ = proj.shape
        num_tokens = state["pos_embed"].shape[1]
        num_classes = state["head.weight"].shape[0]
    except KeyError as exc:
        raise CheckpointError(f"cannot infer the architecture: no tensor {exc.args[0]!r}") from None
    distilled = "dist_token" in state
    num_patches = num_tokens - (2 if distilled else 1)
    side = round(num_patches**0.5)
    if side * side != num_patches:
        raise CheckpointError(f"pos_embed has {num_tokens} tokens, which is not a square patch grid")
    blocks = []
    i = 0
    while any(k.startswith(f"blocks.{i}.") for k in state):  # a block may lack its attention or its MLP
        qkv = state.get(f"blocks.{i}.attn.qkv.weight")
        fc1 = state.get(f"blocks.{i}.mlp.fc1.weight")
        qkv_out = 0 if qkv is None else qkv.shape[0]
        if qkv_out % (3 * head_dim):
            raise CheckpointError(f"block {i}: qkv width {qkv_out} is not 3 x heads x {head_dim}")
        dim = head_dim if qkv_out else 0
        try:
            blocks.append(BlockSpec(heads=qkv_out // (3 * head_dim), qk_dim=dim, v_dim=dim,
                                    mlp_dim=0 if fc1 is None else fc1.shape[0]))
        except SpecError as exc:
            raise CheckpointError(f"cannot infer the architecture: block {i}: {exc}") from None
        i += 1
    if not blocks:
        raise CheckpointError("cannot infer the architecture: no 'blocks.N.' tensors")
    return ArchSpec(
        embed_dim=int(embed_dim), blocks=tuple(blocks), img_size=side * int(patch), patch_size=int(patch),
        in_chans=int(in_chans), num_classes=int(num_classes), distilled=distilled, name=name,
    )


def load_checkpoint(
    path: str | os.PathLike[str], spec: ArchSpec | None = None, *, head_dim: int = 64
) -> VisionTransformer:
    """Build a model for ``spec`` (inferred from the file when ``None``) and load the file into it."""
    state = read_state_dict(path)
    if spec is None:
        spec = infer_arch(state, head_dim=head_dim, name=Path(path).stem)
    model = VisionTransformer(spec)
    load_into(model, state, source=str(path))
    return model.eval()


WEIGHTS_FILE = "model.safetensors"
ARCH_FILE = "arch.json"


def save_variant(
    model: Any, folder: str | os.PathLike[str], provenance: Mapping[str, object] | None = None
) -> Path:
    """Save ``arch.json`` + ``model.safetensors`` (plain tensors, never a pickled module), atomically."""
    from safetensors.torch import save_file

    from nvit.arch import save_arch
    from nvit.fileio import atomic_path

    folder = Path(folder)
    gate_ids = {id(g) for g in getattr(model, "gate_parameters", list)()}  # a Swin has no gates yet
    named = dict(model.named_parameters())
    tensors = {
        k: v.detach().contiguous().cpu()
        for k, v in model.state_dict().items()
        if not (k in named and id(named[k]) in gate_ids)
    }
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp))
    save_arch(model.spec, folder / ARCH_FILE, provenance)  # written last: its presence marks completion
    return folder


def build_any(spec: Any, *, seed: int | None = None) -> torch.nn.Module:
    """A randomly initialised model of either kind: a :class:`VisionTransformer` for an
    :class:`~nvit.arch.ArchSpec`, a :class:`~nvit.models.swin.SwinTransformer` for a
    :class:`~nvit.swin.SwinSpec`."""
    from nvit.models.swin import build_swin
    from nvit.models.vit import build_model
    from nvit.swin import SwinSpec

    return build_swin(spec, seed=seed) if isinstance(spec, SwinSpec) else build_model(spec, seed=seed)


def slice_any(model: torch.nn.Module) -> torch.nn.Module:
    """A new dense model of either kind holding only the units its gates keep
    (:func:`~nvit.models.slicing.slice_model`, :func:`~nvit.models.swin_slicing.slice_swin`)."""
    from nvit.models.slicing import slice_model
    from nvit.models.swin import SwinTransformer
    from nvit.models.swin_slicing import slice_swin

    return slice_swin(model) if isinstance(model, SwinTransformer) else slice_model(model)


def load_variant(folder: str | os.PathLike[str]) -> Any:
    """Load a variant folder written by :func:`save_variant` (or any folder with arch.json + weights): a ViT,
    or a Swin when its ``arch.json`` holds one."""
    from nvit.swin import load_any_arch_file

    folder = Path(folder)
    if not (folder / ARCH_FILE).is_file():
        raise CheckpointError(f"{folder} is not an nvit variant (no {ARCH_FILE})")
    spec, _ = load_any_arch_file(folder / ARCH_FILE)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{folder}: weights file {WEIGHTS_FILE} is missing")
    model = build_any(spec)
    load_into(model, read_state_dict(weights), source=str(weights))
    return model.eval()


def load_model(source: str | os.PathLike[str], arch: ArchSpec | None = None, *, seed: int = 0) -> VisionTransformer:
    """A model from a variant folder, a checkpoint file (``arch`` or inferred), or a preset name.

    A preset name gives randomly initialised weights (seeded): enough for latency, not for accuracy.
    """
    from nvit.models.vit import build_model
    from nvit.presets import preset, preset_names

    text = str(source)
    path = Path(text)
    if path.is_dir():
        return load_variant(path)
    if path.is_file():
        return load_checkpoint(path, arch)
    if text in preset_names():
        return build_model(arch or preset(text), seed=seed).eval()
    raise CheckpointError(f"{text!r} is not a variant folder, a checkpoint file or a preset name")


def variant_provenance(source: str | os.PathLike[str]) -> dict[str, object]:
    """The provenance stored in a variant folder's arch.json (empty for anything else)."""
    from nvit.arch import read_arch_doc

    arch_file = Path(source) / ARCH_FILE
    return read_arch_doc(arch_file)[1] if arch_file.is_file() else {}
