"""Putting a pruning run together from files: base model, latency predictor, data and loss, with provenance.

Shared by ``nvit prune`` and the benchmarks so that both record the same provenance in every variant.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nvit.arch import ArchSpec
from nvit.errors import NvitError
from nvit.fileio import file_sha256
from nvit.lut.base import Predictor, flops_predictor
from nvit.models.vit import VisionTransformer
from nvit.presets import resolve_arch

log = logging.getLogger(__name__)

FLOPS_LUT = "flops"  # --lut flops: latency proportional to FLOPs, for ratio targets only


class RecipeError(NvitError):
    """The inputs of a pruning run do not fit together."""


@dataclass(frozen=True)
class LoadedBase:
    model: VisionTransformer
    provenance: dict[str, Any]


def load_base(
    *, checkpoint: str | os.PathLike[str] | None = None, variant: str | os.PathLike[str] | None = None,
    arch: str | None = None,
) -> LoadedBase:
    """The model to prune: a timm/DeiT/nvit checkpoint file (``arch`` or inferred) or a variant folder."""
    from nvit.models import load_checkpoint, load_variant

    if (checkpoint is None) == (variant is None):
        raise RecipeError("give exactly one of --checkpoint (a .pth/.safetensors file) or --variant (a folder)")
    if variant is not None:
        if arch is not None:
            raise RecipeError("--arch applies to --checkpoint only; a variant folder carries its own arch.json")
        folder = Path(variant)
        model = load_variant(folder)
        weights = folder / "model.safetensors"
        prov = {"source": "variant", "path": str(folder), "sha256": file_sha256(weights)}
    else:
        path = Path(checkpoint)  # type: ignore[arg-type]
        spec = resolve_arch(arch) if arch is not None else None
        model = load_checkpoint(path, spec)
        prov = {"source": "checkpoint", "path": str(path), "sha256": file_sha256(path)}
    prov |= {"arch_name": model.spec.name, "params": model.spec.num_params(), "macs": model.spec.macs(),
             "arch": model.spec.to_dict()}  # the dense widths: what nvit arch redistribute measures shares by
    return LoadedBase(model, prov)


@dataclass(frozen=True)
class LoadedPredictor:
    predictor: Predictor
    provenance: dict[str, Any]
    has_time_unit: bool  # False for the FLOPs-proportional stand-in: only ratio targets make sense


def load_latency_predictor(
    lut: str, spec: ArchSpec, *, device: str | None = None, precision: str | None = None,
    batch_size: int | None = None,
) -> LoadedPredictor:
    """The LUT predictor (refusing a table of another device, precision or batch than asked), or ``flops``."""
    if lut == FLOPS_LUT:
        if any(v is not None for v in (device, precision, batch_size)):
            raise RecipeError("--lut flops has no device, precision or batch size to check")
        return LoadedPredictor(flops_predictor(spec, 1.0), {"kind": "flops"}, has_time_unit=False)
    from nvit.lut import load_predictor
    from nvit.lut.swin_table import is_swin_table, table_sha256
    from nvit.swin import SwinSpec

    path = Path(lut)
    if isinstance(spec, SwinSpec) and not is_swin_table(path):
        raise RecipeError(f"{path} is a ViT latency table; a Swin needs a Swin table (nvit profile --arch "
                          f"{spec.name or 'ARCH'}: a .swinlut folder)")
    predictor = load_predictor(path, device=device, precision=precision, batch_size=batch_size)
    check = getattr(predictor, "check_spec", None)
    if check is not None:
        check(spec)
    meta = predictor.meta
    prov = {"kind": "lut", "path": str(path), "sha256": table_sha256(path), "identity": meta.identity(),
            "device_name": meta.device_name(), "created_at": meta.created_at, "calibrated": predictor.calibrated}
    return LoadedPredictor(predictor, prov, has_time_unit=True)


def record_top1(folder: str | os.PathLike[str], accuracy: float, *, split: str, stage: str) -> None:
    """Add the measured top-1 to a variant's ``arch.json`` provenance (rewritten atomically)."""
    from nvit.arch import save_arch
    from nvit.swin import load_any_arch_file

    path = Path(folder) / "arch.json"
    spec, prov = load_any_arch_file(path)
    save_arch(spec, path, {**prov, "top1": accuracy, "top1_split": split, "top1_stage": stage})
