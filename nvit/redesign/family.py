"""From files to a redistributed design: read a family of pruned variants, find their dense base, fit the
rule (:mod:`nvit.redesign.learned`), size it by embedding or by a latency target, and describe where it came from.

A variant is given as an ``arch.json``, a variant folder holding one, or a whole ``nvit prune`` output folder
(its ``prune_run.json`` lists the variants). The dense base is ``base`` when given, else what the variants'
provenance names: the base's widths (``base.arch``), its variant folder (``base.path``) or its preset
(``base.arch_name``); variants of different bases are refused.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nvit import __version__
from nvit.arch import ArchSpec, WidthSteps, load_arch_file
from nvit.errors import SpecError
from nvit.presets import preset, preset_names, resolve_arch
from nvit.redesign.learned import (
    DEFAULT_BANDWIDTH,
    DEFAULT_ROUNDING,
    Reference,
    ScaledDesign,
    Shape,
    Shares,
    build_arch,
    fit_shares,
    scale_to_latency,
    variant_shares,
)
from nvit.swin import load_any_arch_file, require_vit

logger = logging.getLogger(__name__)

RUN_FILE = "prune_run.json"
ARCH_FILE = "arch.json"
PROVENANCE_KIND = "nvit.redistribute"


@dataclass(frozen=True)
class LoadedVariant:
    name: str
    path: str
    spec: ArchSpec
    provenance: Mapping[str, Any]


def load_family(paths: Sequence[str | os.PathLike[str]]) -> list[LoadedVariant]:
    """Every variant named by ``paths`` (arch.json files, variant folders, prune output folders)."""
    if not paths:
        raise SpecError("give at least one pruned variant (an arch.json, a variant folder or a prune output folder)")
    out: list[LoadedVariant] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir() and (path / RUN_FILE).is_file():
            out.extend(_load_one(Path(v["path"]) if Path(v["path"]).is_dir() else path / v["label"], v["label"])
                       for v in _run_variants(path / RUN_FILE))
        elif path.is_dir():
            if not (path / ARCH_FILE).is_file():
                raise SpecError(f"{path} is neither a variant folder (no {ARCH_FILE}) nor a prune output folder "
                                f"(no {RUN_FILE})")
            out.append(_load_one(path, path.name))
        else:
            out.append(_load_one(path, path.parent.name if path.name == ARCH_FILE else path.stem))
    return out


def _run_variants(path: Path) -> list[dict[str, Any]]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SpecError(f"cannot read the prune run summary {path}: {exc}") from None
    variants = doc.get("variants") if isinstance(doc, dict) else None
    if not isinstance(variants, list) or not variants or not all(
            isinstance(v, dict) and "path" in v and "label" in v for v in variants):
        raise SpecError(f"{path} lists no variants (is the prune run finished?)")
    return variants


def _load_one(path: Path, name: str) -> LoadedVariant:
    folder_or_file = path / ARCH_FILE if path.is_dir() else path
    spec, prov = load_any_arch_file(folder_or_file)
    require_vit(spec, "nvit arch redistribute")
    return LoadedVariant(name, str(folder_or_file), spec, prov)


def resolve_base(family: Sequence[LoadedVariant], base: str | None = None) -> tuple[ArchSpec, str]:
    """The dense base of ``family`` and how it was found."""
    if base is not None:
        path = Path(base)
        spec = load_arch_file(path / ARCH_FILE)[0] if path.is_dir() else resolve_arch(base)
        return spec, f"--base {base}"
    found: dict[str, tuple[ArchSpec, str]] = {}
    for v in family:
        spec, how = _base_from_provenance(v)
        found.setdefault(json.dumps(spec.to_dict(), sort_keys=True), (spec, how))
    if len(found) > 1:
        raise SpecError("the variants come from different dense bases; give variants of one base (or --base)")
    return next(iter(found.values()))


def _base_from_provenance(v: LoadedVariant) -> tuple[ArchSpec, str]:
    base = v.provenance.get("base")
    if isinstance(base, Mapping):
        if isinstance(base.get("arch"), Mapping):
            try:
                return ArchSpec.from_dict(base["arch"]), f"provenance of {v.path} (base.arch)"
            except (SpecError, TypeError) as exc:
                raise SpecError(f"{v.path}: its provenance's base.arch is not an architecture ({exc})") from None
        folder = Path(str(base.get("path", "")))
        if base.get("source") == "variant" and (folder / ARCH_FILE).is_file():
            return load_arch_file(folder / ARCH_FILE)[0], f"base variant {folder}"
        if base.get("arch_name") in preset_names():
            return preset(str(base["arch_name"])), f"preset {base['arch_name']}"
    raise SpecError(f"cannot tell the dense base of {v.path} from its provenance; give --base (a preset, an "
                    "arch.json or the base's variant folder)")


@dataclass(frozen=True)
class Redesign:
    """A redistributed design, the rule it came from and the shares of every source variant."""

    spec: ArchSpec
    rule: Shares
    sources: tuple[Shares, ...]
    base: ArchSpec
    provenance: Mapping[str, Any]
    scaled: ScaledDesign | None = None


def redistribute(family: Sequence[LoadedVariant], *, base: ArchSpec, base_how: str = "",
                 embed_dim: int | None = None, predictor: Any = None, target_ms: float | None = None,
                 depth: int | None = None, bandwidth: float = DEFAULT_BANDWIDTH,
                 rounding: WidthSteps = DEFAULT_ROUNDING,
                 name: str = "", lut_provenance: Mapping[str, Any] | None = None) -> Redesign:
    """Fit the rule on ``family`` and build it at ``embed_dim``, or at the largest embedding whose predicted
    latency (``predictor``) meets ``target_ms``."""
    if (embed_dim is None) == (target_ms is None):
        raise SpecError("give exactly one of --embed (an embedding width) or --target-latency (with --lut)")
    if target_ms is not None and predictor is None:
        raise SpecError("--target-latency needs a latency table (--lut)")
    if embed_dim is not None and embed_dim <= 0:
        raise SpecError(f"--embed must be a positive integer, got {embed_dim}")
    reference = Reference.of(base)
    sources = []
    for v in family:
        if v.spec.depth != base.depth:
            raise SpecError(f"{v.path} has {v.spec.depth} blocks, its base {base.depth}: not a pruned variant of it")
        sources.append(variant_shares(Shape.of(v.spec, v.name), reference))
    depth = depth or base.depth
    rule = fit_shares(sources, depth, bandwidth)
    label = name or f"{base.name or 'base'}-redistributed"

    def build(e: int) -> ArchSpec:
        return build_arch(rule, reference, e, base, rounding, name=label)

    scaled = None
    if target_ms is not None:
        scaled = scale_to_latency(build, predictor, target_ms, rounding.embed_dim)
        spec = scaled.spec
    else:
        spec = build(int(embed_dim))  # type: ignore[arg-type]
    prov: dict[str, Any] = {
        "kind": PROVENANCE_KIND, "rule": "learned", "nvit_version": __version__,
        "base": {"name": base.name, "arch": base.to_dict(), "found": base_how},
        "reference": reference.to_dict(), "bandwidth": bandwidth, "rounding": rounding.to_dict(), "depth": depth,
        "shares": rule.to_dict(),
        "sources": [{"name": v.name, "path": v.path, "embed_dim": v.spec.embed_dim,
                     "target": v.provenance.get("target"),
                     "predicted_latency_ms": v.provenance.get("predicted_latency_ms"), "shares": s.to_dict()}
                    for v, s in zip(family, sources, strict=True)],
        "embed": ({"mode": "given", "embed_dim": spec.embed_dim} if scaled is None else
                  {"mode": "latency_target", **scaled.to_dict(), "lut": dict(lut_provenance or {})}),
    }
    if predictor is not None and scaled is None:
        prov["predicted_latency_ms"] = float(predictor.predict_ms(spec))
    elif scaled is not None:
        prov["predicted_latency_ms"] = scaled.predicted_ms
    return Redesign(spec, rule, tuple(sources), base, prov, scaled)
