"""Whole-model measurements made against a table, read back as calibration rows for :mod:`nvit.lut.learn`.

Sources: a pruning run that measured its targets (its summary file; every measurement in the loop, met or
missed, with the variant's architecture and drift-corrected latency), a ``compare.json`` (rows whose
measurement was noisy are left out; the rest drift-corrected by their ratio), and the table's stored
self-check. Each must have been measured with the table's identity (device, backend, precision, batch,
tokens, timing mode): a table learns only from its own device.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from nvit.arch import ArchSpec
from nvit.errors import LutError
from nvit.lut.learn import MeasuredModel
from nvit.lut.meta import differing_keys

log = logging.getLogger(__name__)


def measurements_from(path: str | Path, table: Any) -> list[MeasuredModel]:
    """The whole-model measurements in ``path``: a pruning run folder (or its summary file) that measured its
    targets, a ``compare.json`` (or its folder). Each must have been measured with ``table``'s identity."""
    path = Path(path)
    from nvit.pruning.runstate import RUN_FILE, RUN_KIND

    candidates = [path] if path.is_file() else [path / RUN_FILE, path / "compare.json"]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise LutError(f"{path}: no {RUN_FILE} (a pruning run) or compare.json (nvit compare) to learn from")
    try:
        doc = json.loads(found.read_text())
    except json.JSONDecodeError as exc:
        raise LutError(f"{found} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    kind = doc.get("kind")
    if kind == "nvit.compare":
        identity = (doc.get("context") or {}).get("lut_identity")
        _check_identity(identity, table, found)
        out = []
        for r in doc.get("results", []):
            if r.get("arch") is None:
                raise LutError(f"{found}: written by an older nvit, its results carry no architecture; "
                               "run nvit compare again to learn from it")
            if r.get("noise"):
                log.info("%s: %s is left out (its measurement was noisy: %s)", found, r["name"], "; ".join(r["noise"]))
                continue
            out.append(MeasuredModel(r["name"], ArchSpec.from_dict(r["arch"]),
                                     float(r["measured_ms"]) / float(r.get("drift_ratio") or 1.0), "compare",
                                     str(found)))
        return out
    if kind == RUN_KIND:
        loop = doc.get("measured_targets")
        if not loop or not loop.get("measured"):
            raise LutError(f"{found}: this pruning run did not measure its targets (--measure-targets off, or a "
                           "table of another device); nothing to learn from")
        _check_identity(((doc.get("provenance") or {}).get("lut") or {}).get("identity"), table, found)
        out = []
        for i, r in enumerate(loop.get("records", [])):
            if r.get("arch") is None:
                raise LutError(f"{found}: written by an older nvit, its measurements carry no architecture")
            out.append(MeasuredModel(f"{r['target']}#{r.get('try', i)}", ArchSpec.from_dict(r["arch"]),
                                     float(r["corrected_ms"]), "prune", str(found)))
        return out
    raise LutError(f"{found}: neither a pruning run summary nor a compare report (kind {kind!r})")


def self_check_measurements(table: Any) -> list[MeasuredModel]:
    """The table's stored self-check models (``nvit lut check --save`` refreshes them)."""
    check = table.meta.self_check
    models = () if check is None else check.models
    return [MeasuredModel(m.name, ArchSpec.from_dict(m.arch), float(m.measured_ms), "self-check",
                          "the table's self-check") for m in models if m.arch]


def _check_identity(identity: Any, table: Any, where: Path) -> None:
    mine = table.meta.identity()
    if identity is None:
        raise LutError(f"{where}: it does not say which table's device it was measured on")
    diff = differing_keys(identity, mine)
    if diff:
        raise LutError(f"{where} was measured with another table's device or settings ({', '.join(diff)}); "
                       "a table learns only from its own device")
