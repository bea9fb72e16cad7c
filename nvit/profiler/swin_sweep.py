"""Profile a Swin's search space into a Swin latency table, with the ViT sweep's protocol
(:func:`nvit.profiler.sweep.sweep_into` around this module's parts and table).

The same rules as :mod:`nvit.profiler.sweep`: configurations (every stage's) shuffled with a seed, measured once
per pass in a new order and kept at their fastest pass; a sentinel (the first stage's largest block) re-timed
every ``sentinel_every`` configurations, each row recording the drift seen last; every measurement journaled
(fsynced) beside the output so a rerun resumes; whole Swins (calibration and held-out checks) measured
interleaved before the parts and after each pass, each kept at its fastest; the machine's conditions judged;
the calibration fitted on whole Swins (:func:`nvit.lut.calibration.fit_calibration`) and the self-check
stored; the folder written atomically, then the journal removed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nvit.errors import LutError
from nvit.lut.meta import utc_now
from nvit.profiler.base import Backend
from nvit.profiler.journal import Journal
from nvit.profiler.selfcheck import measure_archs
from nvit.profiler.sweep import (
    Phase,
    SweepOptions,
    SweepProgress,
    SweepResult,
    fastest_part_records,
    fitted_table,
    model_rounds,
    pass_order,
    run_median,
    sweep_into,
    sweep_meta,
)
from nvit.profiler.swin_space import StagePart, SwinSearchSpace, swin_calibration_archs, swin_check_archs
from nvit.profiler.swin_workloads import swin_part_workload
from nvit.swin import SwinSpec


def run_swin_sweep(space: SwinSearchSpace, backend: Backend, out: str | os.PathLike[str], *,
                   options: SweepOptions | None = None, resume: bool = True,
                   progress: Callable[[SweepProgress], None] | None = None, device: Any = None) -> SweepResult:
    """Measure every configuration of ``space`` with ``backend`` (entered) and write the Swin table folder
    ``out``; with ``resume`` a journal is continued and a complete table of the same identity returned."""
    from nvit.lut.swin_table import SwinLatencyTable, is_swin_table

    if Path(out).exists() and not is_swin_table(out):
        raise LutError(f"{out} exists and is not a Swin latency table; choose another --out")
    return sweep_into(space, backend, out, run_parts=run_swin_parts, build=build_swin_table,
                      load=SwinLatencyTable.load, options=options or SweepOptions(), resume=resume,
                      progress=progress, device=device)


@dataclass
class SwinSweep:
    """What one run measured, and what it found in the journal."""

    measured: int = 0
    resumed: int = 0


def run_swin_parts(space: SwinSearchSpace, backend: Backend, journal: Journal, options: SweepOptions,
                   progress: Callable[[SweepProgress], None] | None) -> SwinSweep:
    """The sentinel, every configuration not in the journal and the whole Swins (calibration and check) in rounds
    spread over the sweep."""
    configs = space.configs()
    archs = swin_calibration_archs(space, options.calibration_models, seed=options.calibration_seed)
    checks = swin_check_archs(space, options.check_models, seed=options.check_seed)
    done = {(StagePart.from_dict(r["config"]).key, r["pass"]) for r in journal.of_type("part")}
    names = {a.name for a in archs} | {a.name for a in checks}
    resumed = len(done) + sum(r["name"] in names for r in journal.of_type("model") + journal.of_type("check"))
    rounds = model_rounds(options)
    n_parts = options.passes * len(configs)
    sentinels = (n_parts + options.sentinel_every - 1) // options.sentinel_every + 1 if n_parts else 0
    total = n_parts + rounds * (len(archs) + len(checks)) + sentinels
    state = {"done": resumed, "measured": 0}

    def report(phase: Phase, name: str, latency_ms: float) -> None:
        state["done"] += 1
        state["measured"] += 1
        if progress is not None:
            progress(SweepProgress(phase, state["done"], total, name, latency_ms, resumed))

    def sentinel(parts_done: int) -> float:
        part = space.sentinel()
        stats = backend.measure(swin_part_workload(part, space.base, space.batch_size))
        first = journal.of_type("sentinel")
        ref = first[0]["latency_ms"] if first else stats.latency_ms_median
        drift = stats.latency_ms_median / ref - 1.0
        journal.append({"type": "sentinel", "after": parts_done, "latency_ms": stats.latency_ms_median,
                        "drift": drift, "stats": stats.as_dict(), "measured_at": utc_now()})
        report(Phase.SENTINEL, part.key, stats.latency_ms_median)
        return drift

    def whole(models: list[SwinSpec], record_type: str, phase: Phase, round_index: int) -> None:
        by_name = {a.name: a for a in models}
        have = {(r["name"], r["pass"]): run_median(r) for r in journal.of_type(record_type) if r["name"] in by_name}

        def on_timing(t: Any) -> None:
            journal.append({"type": record_type, "name": t.name, "arch": by_name[t.name].to_dict(),
                            "stats": t.stats, "seconds": t.seconds, "pass": t.pass_index, "measured_at": utc_now()})
            report(phase, t.name, t.latency_ms)

        measure_archs(backend, models, passes=1, first_pass=round_index, seed=options.seed, done=have,
                      on_timing=on_timing)

    def whole_models(round_index: int) -> None:
        whole(archs, "model", Phase.CALIBRATION, round_index)
        whole(checks, "check", Phase.CHECK, round_index)

    todo = [(p, configs[i]) for p in range(options.passes) for i in pass_order(options.seed, p, len(configs))
            if (configs[i].key, p) not in done]
    drift = journal.of_type("sentinel")[-1]["drift"] if journal.of_type("sentinel") else 0.0
    parts_done, since = len(done), options.sentinel_every
    whole_models(0)
    current = todo[0][0] if todo else None
    for pass_index, part in todo:
        if pass_index != current:
            whole_models(pass_index)
            current = pass_index
        if since >= options.sentinel_every:
            drift, since = sentinel(parts_done), 0
        t0 = time.perf_counter()
        stats = backend.measure(swin_part_workload(part, space.base, space.batch_size))
        journal.append({"type": "part", "config": part.to_dict(), "stats": stats.as_dict(),
                        "seconds": time.perf_counter() - t0, "index": parts_done, "pass": pass_index,
                        "sentinel_drift": drift, "measured_at": utc_now()})
        report(Phase.PART, part.key, stats.latency_ms_median)
        parts_done += 1
        since += 1
    if todo:
        sentinel(parts_done)
    for round_index in range(1, rounds):
        whole_models(round_index)
    return SwinSweep(measured=state["measured"], resumed=resumed)


def build_swin_table(space: SwinSearchSpace, backend: Backend, device: Any, journal: Journal,
                     options: SweepOptions, header: Mapping[str, Any]) -> Any:
    """The Swin table (per-stage tables, calibration, self-check) from a complete journal."""
    from nvit.lut.swin_table import SwinLatencyPredictor, SwinLatencyTable
    from nvit.lut.table import LatencyTable, rows_from_records

    per_stage: list[list[dict[str, Any]]] = [[] for _ in space.stages]
    for record in fastest_part_records(journal.of_type("part"), lambda c: StagePart.from_dict(c).key):
        per_stage[record.pop("stage")].append(record)
    meta = sweep_meta(space, backend, device, journal, options, header, num_tokens=space.base.num_tokens(0))
    stages = tuple(
        LatencyTable(rows_from_records(rows), meta.replace(
            num_tokens=space.base.num_tokens(i), space={"stage": i, **grid.to_dict()},
            calibration=None, conditions=None, sentinel=[])).validate()
        for i, (rows, grid) in enumerate(zip(per_stage, space.stages, strict=True)))
    return fitted_table(SwinLatencyTable(stages, meta), journal, options, predictor=SwinLatencyPredictor,
                        arch=SwinSpec.from_dict)
