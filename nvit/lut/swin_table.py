"""Swin latency tables: one ViT-format table per stage, and the predictor that prices a whole Swin from them.

A Swin table is a folder: ``swin_table.json`` (its kind, schema version, the shared :class:`~nvit.lut.meta.LutMeta`
with the Swin, the space, the calibration and the self-check, and each stage file's SHA-256) and one Parquet
table per stage (``stage0.parquet``...), each a complete :class:`~nvit.lut.table.LatencyTable` of that stage's
blocks at its token count (:mod:`nvit.profiler.swin_space`). Files are written to a temporary folder and
renamed into place; a folder whose stage files do not match the manifest's hashes is refused.

Prediction (all raw prices from each stage's own table, with the ViT block model: halves, interaction,
one-half blocks, measured rows; :mod:`nvit.lut.predictor`)::

    skeleton(e₀…e_S) = S_dense + Σ_s (fixed_s(e_s) − fixed_s(dense e_s))
    whole = scale · (Σ_s Σ blocks_s + skeleton) + per_block · Σ r_block + offset · r_fixed

``fixed_s(e)`` is the skeleton with stage ``s`` at ``e`` and the others dense, so the skeleton is priced by each
stage's change from the dense one; a merging layer's cost depends on two neighbouring widths, which this sum
treats as separate (the error is the product of the two stages' changes, on the skeleton's small share; the
self-check measures what it leaves). The calibration is the ViT table's (:mod:`nvit.lut.calibration`),
fitted on whole Swins.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from nvit.errors import LutError
from nvit.lut.calibration import Composition, Floors, apply_stored
from nvit.lut.coverage import GridStatus
from nvit.lut.meta import LutMeta
from nvit.lut.predictor import LatencyPredictor
from nvit.lut.table import LatencyTable

SWIN_LUT_KIND = "nvit.swin_lut"
SWIN_LUT_SCHEMA_VERSION = 1
MANIFEST = "swin_table.json"
#: Swin fields the skeleton was measured with; a Swin that differs cannot be predicted by the table.
SWIN_FIXED_FIELDS = ("img_size", "patch_size", "in_chans", "num_classes", "window_size", "num_stages")


def is_swin_table(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / MANIFEST).is_file()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def table_sha256(path: str | os.PathLike[str]) -> str:
    """A table's digest: the Parquet file's, or a Swin table's manifest's (which holds its stage files')."""
    path = Path(path)
    return _sha256(path / MANIFEST if is_swin_table(path) else path)


class SwinLatencyTable:
    """Per-stage tables and the shared metadata (module doc)."""

    is_swin = True

    def __init__(self, stages: tuple[LatencyTable, ...], meta: LutMeta) -> None:
        from nvit.swin import SwinSpec

        self.stages = tuple(stages)
        self.meta = meta
        self.base = SwinSpec.from_dict(meta.base_arch)
        if len(self.stages) != self.base.num_stages:
            raise LutError(f"a Swin table needs one table per stage: {self.base.num_stages} stages, "
                           f"{len(self.stages)} tables")

    @property
    def stage_tables(self) -> tuple[LatencyTable, ...]:
        return self.stages

    def __len__(self) -> int:
        return sum(len(t) for t in self.stages)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.stages:
            for k, n in t.counts().items():
                out[k] = out.get(k, 0) + n
        return out

    def with_meta(self, **changes: Any) -> SwinLatencyTable:
        return SwinLatencyTable(self.stages, self.meta.replace(**changes))

    def validate(self) -> SwinLatencyTable:
        for t in self.stages:
            t.validate()
        return self

    # ---- files ---------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the folder atomically (a temporary folder renamed into place)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        files = {}
        for i, t in enumerate(self.stages):
            name = f"stage{i}.parquet"
            t.save(tmp / name)
            files[name] = _sha256(tmp / name)
        manifest = {"kind": SWIN_LUT_KIND, "schema_version": SWIN_LUT_SCHEMA_VERSION, "stages": files,
                    "meta": self.meta.to_dict()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        old = path.with_name(path.name + ".old")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SwinLatencyTable:
        path = Path(path)
        if not is_swin_table(path):
            raise LutError(f"{path} is not a Swin latency table (no {MANIFEST})")
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise LutError(f"cannot read {path / MANIFEST}: {exc}") from None
        if manifest.get("kind") != SWIN_LUT_KIND:
            raise LutError(f"{path / MANIFEST} is not a Swin latency table (kind {manifest.get('kind')!r})")
        if manifest.get("schema_version") != SWIN_LUT_SCHEMA_VERSION:
            raise LutError(f"unsupported Swin table schema_version {manifest.get('schema_version')!r}")
        stages = []
        for name, digest in manifest["stages"].items():
            file = path / name
            if not file.is_file() or _sha256(file) != digest:
                raise LutError(f"{file} is missing or does not match {MANIFEST} (an incomplete or edited table)")
            stages.append(LatencyTable.load(file))
        return cls(tuple(stages), LutMeta.from_dict(manifest["meta"]))



class SwinLatencyPredictor:
    """The latency of any Swin of the table's family (module doc). With ``calibrated=False`` the stored
    calibration is ignored; one that would price a part below its floor is refused, as for a ViT table."""

    def __init__(self, table: SwinLatencyTable, *, calibrated: bool = True) -> None:
        table.validate()
        self.table, self.meta, self.base = table, table.meta, table.base
        self.stages = [LatencyPredictor(t, calibrated=False) for t in table.stages]
        for p in self.stages:
            p.warn_outside = False
        self._dense_fixed = [float(p.fixed_ms(s.embed_dim)) for p, s in zip(self.stages, self.base.stages,
                                                                             strict=True)]
        self.dense_skeleton_ms = float(np.mean(self._dense_fixed))
        smallest_fixed = min(p.smallest_fixed_ms for p in self.stages)
        self.floors = Floors(block_ms=min(p.floors.block_ms for p in self.stages), fixed_ms=smallest_fixed)
        #: A Swin block without a sub-layer is priced by its stage's one-half blocks, where every stage has them.
        removal = [p.removal_unavailable for p in self.stages if p.removal_unavailable]
        self.removal_unavailable = removal[0] if removal else None
        applied = apply_stored(table.meta.calibration if calibrated else None, self.floors)
        self.floors, self.calibration_refused, self.calibrated = applied.floors, applied.refused, applied.calibrated
        self.scale, self._offset_ms, self.per_block_ms = applied.scale, applied.offset_ms, applied.per_block_ms

    # ---- raw parts -----------------------------------------------------------------------------
    def raw_stage_blocks_ms(self, spec: Any) -> list[np.ndarray]:
        """Each stage's blocks priced from the parts alone."""
        out = []
        for p, stage in zip(self.stages, spec.stages, strict=True):
            w = [np.array([getattr(b, f) for b in stage.blocks], dtype=np.float64)
                 for f in ("heads", "qk_dim", "v_dim", "mlp_dim")]
            out.append(p.blocks_ms(float(stage.embed_dim), *w))
        return out

    def raw_skeleton_ms(self, spec: Any) -> float:
        changes = sum(float(p.fixed_ms(s.embed_dim)) - d
                      for p, s, d in zip(self.stages, spec.stages, self._dense_fixed, strict=True))
        return max(self.dense_skeleton_ms + changes, 0.0)

    def composition(self, spec: Any, floors: Floors | None = None) -> Composition:
        floors = floors or self.floors
        raw = np.concatenate(self.raw_stage_blocks_ms(spec))
        fixed = self.raw_skeleton_ms(spec)
        return Composition(raw_ms=float(raw.sum()) + fixed, blocks=float(floors.block_share(raw).sum()),
                           fixed=float(floors.fixed_share(fixed)))

    def floors_for(self, specs: list[Any]) -> Floors:
        floors = self.floors
        for spec in specs:
            raw = np.concatenate(self.raw_stage_blocks_ms(spec))
            floors = floors.lowered(float(np.nanmin(raw)), self.raw_skeleton_ms(spec))
        return floors

    # ---- predictions ---------------------------------------------------------------------------
    def check_spec(self, spec: Any) -> None:
        """A ViT, a Swin of another geometry or widths far outside a stage's grid is a :class:`LutError`."""
        from nvit.swin import SwinSpec

        if not isinstance(spec, SwinSpec):
            raise LutError("the latency table is a Swin table; the architecture is not a Swin")
        for key in SWIN_FIXED_FIELDS:
            if getattr(spec, key) != getattr(self.base, key):
                raise LutError(f"the Swin table was measured with {key}={getattr(self.base, key)!r}, the "
                               f"architecture has {getattr(spec, key)!r}")
        if any(spec.removed_sublayers.values()) and self.removal_unavailable:
            raise LutError(self.removal_unavailable)
        for i, (p, stage) in enumerate(zip(self.stages, spec.stages, strict=True)):
            view = SimpleNamespace(embed_dim=stage.embed_dim, blocks=stage.blocks)
            report = p.grid.locate(view)
            far = [e.describe() for e in report.extents if e.status is GridStatus.FAR]
            if far:
                raise LutError(f"stage {i} of {spec.name or 'the Swin'} lies far outside the table's measured grid "
                               f"({'; '.join(far)}); profile a table whose space covers these widths")

    def predict_ms(self, spec: Any) -> float:
        self.check_spec(spec)
        comp = self.composition(spec)
        return (self.scale * comp.raw_ms + self.per_block_ms * comp.blocks + self._offset_ms * comp.fixed)

    def offset_ms(self) -> float:
        return self._offset_ms

    def stage_latencies_ms(self, spec: Any) -> list[float]:
        """Each stage's blocks, calibrated (scale and per-block term; the offset belongs to the whole)."""
        self.check_spec(spec)
        return [float(self.scale * raw.sum() + self.per_block_ms * self.floors.block_share(raw).sum())
                for raw in self.raw_stage_blocks_ms(spec)]


def load_swin_predictor(path: str | os.PathLike[str], *, device: str | None = None, precision: str | None = None,
                        batch_size: int | None = None) -> SwinLatencyPredictor:
    """The predictor of a Swin table folder, refusing one of another device, precision or batch than asked."""
    from nvit.lut.meta import check_compatible

    table = SwinLatencyTable.load(path)
    check_compatible(table.meta, device=device, precision=precision, batch_size=batch_size, source=str(path))
    return SwinLatencyPredictor(table)
