"""Profile a Swin's search space into a Swin latency table, with the ViT sweep's protocol.

The same rules as :mod:`nvit.profiler.sweep`: configurations (every stage's) shuffled with a seed, measured once
per pass in a new order and kept at their fastest pass; a sentinel (the first stage's largest block) re-timed
every ``sentinel_every`` configurations, each row recording the drift seen last; every measurement journaled
(fsynced) beside the output so a rerun resumes; whole Swins (calibration and held-out checks) measured
interleaved before the parts and after each pass, each kept at its fastest; the machine's conditions judged;
the calibration fitted on whole Swins (:func:`nvit.lut.calibration.fit_calibration`) and the self-check
stored; the folder written atomically, then the journal removed.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from nvit.errors import LutError
from nvit.lut.meta import utc_now
from nvit.profiler.base import Backend
from nvit.profiler.conditions import ConditionsMonitor, sweep_conditions
from nvit.profiler.journal import JOURNAL_KIND, JOURNAL_SCHEMA_VERSION, Journal, journal_path
from nvit.profiler.selfcheck import measure_archs
from nvit.profiler.sweep import (
    Phase,
    SweepOptions,
    SweepProgress,
    SweepResult,
    fastest_runs,
    header_fingerprint,
    model_rounds,
    pass_order,
    run_median,
)
from nvit.profiler.swin_space import StagePart, SwinSearchSpace, swin_calibration_archs, swin_check_archs
from nvit.profiler.swin_workloads import swin_part_workload
from nvit.swin import SwinSpec


def swin_sweep_header(space: SwinSearchSpace, backend: Backend, device_identity: Mapping[str, Any],
                      options: SweepOptions) -> dict[str, Any]:
    return {"kind": JOURNAL_KIND, "schema_version": JOURNAL_SCHEMA_VERSION, "space": space.to_dict(),
            "space_fingerprint": space.fingerprint(), "backend": backend.name, "settings": backend.settings(),
            "versions": backend.versions(), "device_identity": dict(device_identity),
            "options": dataclasses.asdict(options), "created_at": utc_now()}


def run_swin_sweep(space: SwinSearchSpace, backend: Backend, out: str | os.PathLike[str], *,
                   options: SweepOptions | None = None, resume: bool = True,
                   progress: Callable[[SweepProgress], None] | None = None, device: Any = None) -> SweepResult:
    """Measure every configuration of ``space`` with ``backend`` (entered) and write the Swin table folder
    ``out``; with ``resume`` a journal is continued and a complete table of the same identity returned."""
    from nvit.lut.swin_table import SwinLatencyTable, is_swin_table

    options = options or SweepOptions()
    out = Path(out)
    if space.batch_size != backend.batch_size or space.precision != backend.precision:
        raise LutError(f"the space is for batch {space.batch_size} {space.precision.value}, the backend for "
                       f"batch {backend.batch_size} {backend.precision.value}")
    if device is None:
        from nvit.profiler.device import backend_fingerprint

        device = backend_fingerprint(backend)
    header = swin_sweep_header(space, backend, device.identity(), options)
    jpath = journal_path(out)
    if resume and is_swin_table(out) and not jpath.exists():
        table = SwinLatencyTable.load(out)
        if table.meta.protocol.get("journal_header_fingerprint") != header_fingerprint(header):
            raise LutError(f"{out} already exists and was profiled with other settings; choose another --out "
                           "or use --no-resume to overwrite it")
        return SweepResult(out, table, measured=0, resumed=len(table), seconds=0.0, already_complete=True)
    if out.exists() and not is_swin_table(out):
        raise LutError(f"{out} exists and is not a Swin latency table; choose another --out")
    start = time.perf_counter()
    journal = Journal.open(jpath, header, fresh=not resume)
    try:
        with ConditionsMonitor(gpu_index=getattr(backend, "cuda_index", None)) as monitor:
            measured, resumed = _run(space, backend, journal, options, progress)
        if measured:
            journal.append({"type": "conditions", **monitor.conditions().to_dict(), "measured_at": utc_now()})
        table = build_swin_table(space, backend, device, journal, options, header)
        table.save(out)
        journal.close(remove=True)
    finally:
        journal.close()
    return SweepResult(out, table, measured=measured, resumed=resumed, seconds=time.perf_counter() - start)


def _run(space: SwinSearchSpace, backend: Backend, journal: Journal, options: SweepOptions,
         progress: Callable[[SweepProgress], None] | None) -> tuple[int, int]:
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
    return state["measured"], resumed


def build_swin_table(space: SwinSearchSpace, backend: Backend, device: Any, journal: Journal,
                     options: SweepOptions, header: Mapping[str, Any]) -> Any:
    """The Swin table (per-stage tables, calibration, self-check) from a complete journal."""
    from nvit import __version__
    from nvit.lut.calibration import fit_calibration
    from nvit.lut.swin_table import SwinLatencyPredictor, SwinLatencyTable
    from nvit.lut.table import LatencyTable, LutMeta, rows_from_records
    from nvit.profiler.selfcheck import check_report

    parts = journal.of_type("part")
    by_key: dict[str, list[dict[str, Any]]] = {}
    for r in parts:
        by_key.setdefault(StagePart.from_dict(r["config"]).key, []).append(r)
    per_stage: list[list[dict[str, Any]]] = [[] for _ in space.stages]
    for passes in by_key.values():
        r = min(passes, key=run_median)
        config = dict(r["config"])
        stage = config.pop("stage")
        per_stage[stage].append({**config, **r["stats"], "sentinel_drift": r["sentinel_drift"],
                                 "sweep_index": r["index"], "profile_seconds": sum(x["seconds"] for x in passes),
                                 "measured_at": r["measured_at"]})
    sentinel = [{"after": r["after"], "latency_ms": r["latency_ms"], "drift": r["drift"],
                 "measured_at": r["measured_at"]} for r in journal.of_type("sentinel")]
    model_runs, check_runs = journal.of_type("model"), journal.of_type("check")
    meta = LutMeta(
        backend=backend.name, device_kind=backend.device, precision=space.precision, batch_size=space.batch_size,
        num_tokens=space.base.num_tokens(0), base_arch=space.base.to_dict(), device_identity=device.identity(),
        device=device.to_dict(), space=space.to_dict(), versions={**device.versions, **backend.versions()},
        settings=backend.settings(),
        protocol={"order": "random", "seed": options.seed, "passes": options.passes,
                  "sentinel_every": options.sentinel_every, "sentinel": space.sentinel().key,
                  "space_fingerprint": space.fingerprint(), "journal_header_fingerprint": header_fingerprint(header),
                  "calibration_models": options.calibration_models, "calibration_seed": options.calibration_seed,
                  "check_models": options.check_models, "check_seed": options.check_seed},
        sentinel=sentinel,
        conditions=sweep_conditions(journal.of_type("conditions"), journal.of_type("sentinel"), parts).to_dict(),
        profile_seconds_total=float(sum(r["seconds"] for r in parts + model_runs + check_runs)),
        nvit_version=__version__,
    )
    stages = tuple(
        LatencyTable(rows_from_records(rows), meta.replace(
            num_tokens=space.base.num_tokens(i), space={"stage": i, **grid.to_dict()},
            calibration=None, conditions=None, sentinel=[])).validate()
        for i, (rows, grid) in enumerate(zip(per_stage, space.stages, strict=True)))
    table = SwinLatencyTable(stages, meta)
    models = fastest_runs(model_runs)
    if models:
        raw = SwinLatencyPredictor(table, calibrated=False)
        archs = [SwinSpec.from_dict(r["arch"]) for r in models]
        floors = raw.floors_for(archs)
        compositions = [raw.composition(a, floors) for a in archs]
        calibration = fit_calibration([r["name"] for r in models], [run_median(r) for r in models],
                                      [c.raw_ms for c in compositions], fit_scale=options.fit_scale,
                                      compositions=compositions, floors=floors)
        table = table.with_meta(calibration=calibration.with_archs([r["arch"] for r in models]))
    if check_runs:
        checks = fastest_runs(check_runs)
        report = check_report(SwinLatencyPredictor(table), [SwinSpec.from_dict(r["arch"]) for r in checks],
                              {r["name"]: run_median(r) for r in checks}, seed=options.check_seed,
                              passes=options.passes, measured_at=max(r["measured_at"] for r in checks))
        models_as_journaled = tuple(dataclasses.replace(m, arch=r["arch"])
                                    for m, r in zip(report.models, checks, strict=True))
        table = table.with_meta(self_check=report.replace(models=models_as_journaled,
                                                          seconds=float(sum(r["seconds"] for r in check_runs))))
    return table
