"""Profile a search space into a latency table: randomised, drift-tracked, resumable.

Protocol:

1. The space's configurations are shuffled with a seed (neighbours in time are not neighbours on the
   grid, so slow drift of the machine does not bend the table along one axis).
   With several passes every configuration is measured once per pass (each pass in a new order) and
   its row keeps the fastest pass: on a shared CPU interference only ever adds time.
2. A sentinel configuration (:meth:`SearchSpace.sentinel`) is timed first, every ``sentinel_every``
   configurations, at every restart and at the end; each row records the sentinel drift seen last.
3. Every measured configuration is appended to a JSON-lines journal beside the output and fsynced, so a
   kill (even SIGKILL) loses at most the configuration in flight; a rerun with the same space, backend,
   settings and device skips what the journal holds, and refuses a journal made under other conditions.
   A run holds an exclusive lock on its journal, so two runs never write the same table.
4. A few whole models are measured (interleaved) and a calibration is fitted
   (:func:`nvit.lut.predictor.fit_calibration`).
5. The Parquet table is written atomically, then the journal is removed.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nvit.arch import ArchSpec
from nvit.errors import LutError
from nvit.lut.meta import utc_now
from nvit.profiler.base import Backend
from nvit.profiler.conditions import ConditionsMonitor, sweep_conditions
from nvit.profiler.journal import JOURNAL_KIND, JOURNAL_SCHEMA_VERSION, Journal, journal_path
from nvit.profiler.sampling import calibration_archs
from nvit.profiler.selfcheck import DEFAULT_CHECK_MODELS, DEFAULT_CHECK_SEED, check_archs
from nvit.profiler.space import SearchSpace
from nvit.profiler.workloads import part_workload
from nvit.vocab import PartConfig

DEFAULT_SENTINEL_EVERY = 25
DEFAULT_CALIBRATION_MODELS = 8  # dense, small uniform, then pruned shapes and random ones


@dataclass(frozen=True)
class SweepOptions:
    seed: int = 0  # order of the configurations
    sentinel_every: int = DEFAULT_SENTINEL_EVERY
    calibration_models: int = DEFAULT_CALIBRATION_MODELS  # 0: leave the table uncalibrated
    calibration_seed: int = 1
    fit_scale: bool = True
    passes: int = 1  # each pass measures every configuration in a new order; a row keeps its fastest pass
    check_models: int = DEFAULT_CHECK_MODELS  # held-out whole models measured after the fit (0: no self-check)
    check_seed: int = DEFAULT_CHECK_SEED

    def __post_init__(self) -> None:
        if self.passes < 1:
            raise LutError(f"passes must be >= 1, got {self.passes}")
        if self.sentinel_every < 1:
            raise LutError(f"sentinel_every must be >= 1, got {self.sentinel_every}")
        if self.calibration_models < 0:
            raise LutError(f"calibration_models must be >= 0, got {self.calibration_models}")
        if self.check_models < 0:
            raise LutError(f"check_models must be >= 0, got {self.check_models}")
        if self.check_models and self.check_seed == self.calibration_seed:
            raise LutError("the self-check needs its own seed (check_seed == calibration_seed)")


class Phase(str, enum.Enum):
    PART = "part"
    SENTINEL = "sentinel"
    CALIBRATION = "calibration"
    CHECK = "check"


@dataclass(frozen=True)
class SweepProgress:
    """One step of a sweep: ``done`` of ``total`` configurations (calibration models included)."""

    phase: Phase
    done: int
    total: int
    name: str
    latency_ms: float
    resumed: int  # configurations found in the journal when the run started


@dataclass(frozen=True)
class SweepResult:
    path: Path
    table: Any  # nvit.lut.table.LatencyTable
    measured: int  # configurations measured by this run (calibration models included)
    resumed: int  # configurations taken from the journal
    seconds: float
    already_complete: bool = False

def run_median(record: Mapping[str, Any]) -> float:
    return float(record["stats"]["latency_ms_median"])


class _Sweep:
    def __init__(self, space: SearchSpace, backend: Backend, journal: Journal, options: SweepOptions,
                 progress: Callable[[SweepProgress], None] | None, total: int, resumed: int) -> None:
        self.space, self.backend, self.journal, self.options = space, backend, journal, options
        self.progress, self.total, self.resumed = progress, total, resumed
        self.done = resumed
        self.measured = 0

    def _report(self, phase: Phase, name: str, latency_ms: float) -> None:
        if self.progress is not None:
            self.progress(SweepProgress(phase, self.done, self.total, name, latency_ms, self.resumed))

    def sentinel(self, parts_done: int) -> float:
        config = self.space.sentinel()
        stats = self.backend.measure(part_workload(config, self.space.base, self.space.batch_size))
        first = self.journal.of_type("sentinel")
        ref = first[0]["latency_ms"] if first else stats.latency_ms_median
        drift = stats.latency_ms_median / ref - 1.0
        self.journal.append({"type": "sentinel", "after": parts_done, "latency_ms": stats.latency_ms_median,
                             "drift": drift, "stats": stats.as_dict(), "measured_at": utc_now()})
        self._report(Phase.SENTINEL, config.key, stats.latency_ms_median)
        return drift

    def part(self, config: PartConfig, index: int, drift: float, pass_index: int) -> None:
        start = time.perf_counter()
        stats = self.backend.measure(part_workload(config, self.space.base, self.space.batch_size))
        seconds = time.perf_counter() - start
        self.journal.append({"type": "part", "config": config.to_dict(), "stats": stats.as_dict(),
                             "seconds": seconds, "index": index, "pass": pass_index, "sentinel_drift": drift,
                             "measured_at": utc_now()})
        self.done += 1
        self.measured += 1
        self._report(Phase.PART, config.key, stats.latency_ms_median)

    def models(self, archs: list[ArchSpec], record_type: str, phase: Phase, round_index: int) -> None:
        """Whole models (calibration or held-out check), one round, journaled as ``record_type``."""
        from nvit.profiler.selfcheck import measure_archs

        by_name = {a.name: a for a in archs}
        done = {(r["name"], r["pass"]): run_median(r) for r in self.journal.of_type(record_type)
                if r["name"] in by_name}

        def on_timing(t: Any) -> None:
            self.journal.append({"type": record_type, "name": t.name, "arch": by_name[t.name].to_dict(),
                                 "stats": t.stats, "seconds": t.seconds, "pass": t.pass_index,
                                 "measured_at": utc_now()})
            self.done += 1
            self.measured += 1
            self._report(phase, t.name, t.latency_ms)

        measure_archs(self.backend, archs, passes=1, first_pass=round_index, seed=self.options.seed, done=done,
                      on_timing=on_timing)


def sweep_header(space: Any, backend: Backend, device_identity: Mapping[str, Any],
                 options: SweepOptions) -> dict[str, Any]:
    return {
        "kind": JOURNAL_KIND, "schema_version": JOURNAL_SCHEMA_VERSION, "space": space.to_dict(),
        "space_fingerprint": space.fingerprint(), "backend": backend.name, "settings": backend.settings(),
        "versions": backend.versions(), "device_identity": dict(device_identity),
        "options": dataclasses.asdict(options), "created_at": utc_now(),
    }


def run_sweep(
    space: SearchSpace,
    backend: Backend,
    out: str | os.PathLike[str],
    *,
    options: SweepOptions | None = None,
    resume: bool = True,
    progress: Callable[[SweepProgress], None] | None = None,
    device: Any = None,
) -> SweepResult:
    """Measure every configuration of ``space`` with ``backend`` (already entered) and write ``out``.

    ``device`` is a :class:`~nvit.profiler.device.DeviceFingerprint` (default: this machine, for the
    backend's device and thread count). With ``resume`` an existing journal is continued and an existing
    complete table with the same identity is returned as is; without it both are replaced.
    """
    from nvit.lut.table import LatencyTable

    return sweep_into(space, backend, out, run_parts=_run, build=build_table, load=LatencyTable.load,
                      options=options or SweepOptions(), resume=resume, progress=progress, device=device)


def sweep_into(space: Any, backend: Backend, out: str | os.PathLike[str], *, run_parts: Callable[..., Any],
               build: Callable[..., Any], load: Callable[[Path], Any], options: SweepOptions, resume: bool,
               progress: Callable[[SweepProgress], None] | None, device: Any) -> SweepResult:
    """The protocol around a sweep, for a ViT's space or a Swin's (:mod:`nvit.profiler.swin_sweep`): check the
    backend against the space, return a complete table of the same identity (``load`` reads it), else open the
    journal, ``run_parts`` under the conditions monitor, ``build`` the table and save it, remove the journal."""
    out = Path(out)
    if space.batch_size != backend.batch_size or space.precision != backend.precision:
        raise LutError(f"the space is for batch {space.batch_size} {space.precision.value}, the backend for "
                       f"batch {backend.batch_size} {backend.precision.value}")
    if device is None:
        from nvit.profiler.device import backend_fingerprint

        device = backend_fingerprint(backend)
    header = sweep_header(space, backend, device.identity(), options)
    jpath = journal_path(out)
    if resume and out.exists() and not jpath.exists():
        table = load(out)
        if table.meta.protocol.get("journal_header_fingerprint") != header_fingerprint(header):
            raise LutError(f"{out} already exists and was profiled with other settings; choose another --out "
                           "or use --no-resume to overwrite it")
        return SweepResult(out, table, measured=0, resumed=len(table), seconds=0.0, already_complete=True)
    start = time.perf_counter()
    journal = Journal.open(jpath, header, fresh=not resume)
    try:
        with ConditionsMonitor(gpu_index=getattr(backend, "cuda_index", None)) as monitor:
            sweep = run_parts(space, backend, journal, options, progress)
        if sweep.measured:  # this session's machine, for the table's verdict
            journal.append({"type": "conditions", **monitor.conditions().to_dict(), "measured_at": utc_now()})
        table = build(space, backend, device, journal, options, header)
        table.save(out)
        journal.close(remove=True)
    finally:
        journal.close()
    return SweepResult(out, table, measured=sweep.measured, resumed=sweep.resumed,
                       seconds=time.perf_counter() - start)


def _run(space: SearchSpace, backend: Backend, journal: Journal, options: SweepOptions,
         progress: Callable[[SweepProgress], None] | None) -> _Sweep:
    """Sentinel, the parts not in the journal and the whole models (calibration and check) in rounds spread
    over the sweep."""
    configs = space.configs()
    removed = space.has_one_half_blocks  # models with removed sub-layers where the table can price them
    archs = calibration_archs(space.base, options.calibration_models, seed=options.calibration_seed,
                              removed=removed)
    checks = check_archs(space.base, options.check_models, seed=options.check_seed, removed=removed)
    done = {(PartConfig(**r["config"]).key, r["pass"]) for r in journal.of_type("part")}
    names = {a.name for a in archs} | {a.name for a in checks}
    resumed = len(done) + sum(r["name"] in names for r in journal.of_type("model") + journal.of_type("check"))
    rounds = model_rounds(options)
    n_parts = options.passes * len(configs)
    whole = [(a, "model", Phase.CALIBRATION) for a in archs] + [(a, "check", Phase.CHECK) for a in checks]
    retimes = (n_parts - 1) // options.sentinel_every if whole and n_parts else 0
    total = n_parts + rounds * len(whole) + retimes
    sweep = _Sweep(space, backend, journal, options, progress, total, resumed)

    def whole_models(round_index: int) -> None:
        sweep.models(archs, "model", Phase.CALIBRATION, round_index)
        sweep.models(checks, "check", Phase.CHECK, round_index)

    def retime(slot: int) -> None:
        """One whole model with the sentinel, round-robin, so each is also timed at moments spread over the
        sweep (``passes`` numbered after the rounds); idempotent on resume."""
        arch, record_type, phase = whole[slot % len(whole)]
        sweep.models([arch], record_type, phase, rounds + slot // len(whole))

    parts_done = len(done)
    todo = [(p, configs[i]) for p in range(options.passes) for i in pass_order(options.seed, p, len(configs))
            if (configs[i].key, p) not in done]
    drift = journal.of_type("sentinel")[-1]["drift"] if journal.of_type("sentinel") else 0.0
    since_sentinel = options.sentinel_every  # (re)starting: time the sentinel first
    whole_models(0)
    current_pass = todo[0][0] if todo else None
    for pass_index, config in todo:
        if pass_index != current_pass:
            whole_models(pass_index)  # round k follows pass k - 1 of the parts
            current_pass = pass_index
        if since_sentinel >= options.sentinel_every:
            drift = sweep.sentinel(parts_done)
            since_sentinel = 0
            if whole and parts_done >= options.sentinel_every:
                retime(parts_done // options.sentinel_every - 1)
        sweep.part(config, parts_done, drift, pass_index)
        parts_done += 1
        since_sentinel += 1
    if todo:
        sweep.sentinel(parts_done)
    for round_index in range(1, rounds):  # those already measured are skipped
        whole_models(round_index)
    return sweep


def model_rounds(options: SweepOptions) -> int:
    """Whole models are measured in ``passes + 1`` rounds: before the parts and after each pass of them; and
    one of them again with every sentinel. A model keeps its fastest measurement: a whole model runs long
    enough that a busy spell of a shared machine inflates it more than the short parts (DeiT-Tiny on the
    2-core CPU: 5-10% from one minute to the next), and measurements spread over the sweep rarely all meet
    one."""
    return options.passes + 1


def pass_order(seed: int, pass_index: int, n: int) -> np.ndarray:
    """The measurement order of one pass (a new shuffle per pass)."""
    return np.random.default_rng(seed if pass_index == 0 else [seed, pass_index]).permutation(n)


def header_fingerprint(header: Mapping[str, Any]) -> str:
    import hashlib

    canonical = json.dumps({k: v for k, v in header.items() if k != "created_at"}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def fastest_part_records(parts: list[dict[str, Any]], key: Callable[[dict[str, Any]], str]) -> list[dict[str, Any]]:
    """Per configuration (``key`` of its journaled config), its fastest pass as a row record (its config,
    statistics, drift, place in the sweep), the time spent summed over its passes."""
    by_key: dict[str, list[dict[str, Any]]] = {}
    for r in parts:
        by_key.setdefault(key(r["config"]), []).append(r)
    records = []
    for passes in by_key.values():
        r = min(passes, key=run_median)
        records.append({**r["config"], **r["stats"], "sentinel_drift": r["sentinel_drift"], "sweep_index": r["index"],
                        "profile_seconds": sum(x["seconds"] for x in passes), "measured_at": r["measured_at"]})
    return records


def sweep_meta(space: Any, backend: Backend, device: Any, journal: Journal, options: SweepOptions,
               header: Mapping[str, Any], *, num_tokens: int) -> Any:
    """The :class:`~nvit.lut.meta.LutMeta` of a table profiled from ``journal`` (a ViT's or a Swin's)."""
    from nvit import __version__
    from nvit.lut.table import LutMeta

    parts = journal.of_type("part")
    whole = journal.of_type("model") + journal.of_type("check")
    return LutMeta(
        backend=backend.name, device_kind=backend.device, precision=space.precision,
        batch_size=space.batch_size, num_tokens=num_tokens, base_arch=space.base.to_dict(),
        device_identity=device.identity(), device=device.to_dict(), space=space.to_dict(),
        versions={**device.versions, **backend.versions()}, settings=backend.settings(),
        protocol={"order": "random", "seed": options.seed, "passes": options.passes,
                  "sentinel_every": options.sentinel_every,
                  "sentinel": space.sentinel().key, "space_fingerprint": space.fingerprint(),
                  "journal_header_fingerprint": header_fingerprint(header),
                  "calibration_models": options.calibration_models, "calibration_seed": options.calibration_seed,
                  "check_models": options.check_models, "check_seed": options.check_seed},
        sentinel=[{"after": r["after"], "latency_ms": r["latency_ms"], "drift": r["drift"],
                   "measured_at": r["measured_at"]} for r in journal.of_type("sentinel")],
        conditions=sweep_conditions(journal.of_type("conditions"), journal.of_type("sentinel"), parts).to_dict(),
        profile_seconds_total=float(sum(r["seconds"] for r in parts + whole)),
        nvit_version=__version__,
    )


def build_table(space: SearchSpace, backend: Backend, device: Any, journal: Journal, options: SweepOptions,
                header: Mapping[str, Any]) -> Any:
    """The table (with calibration) from a complete journal."""
    from nvit.lut.predictor import LatencyPredictor
    from nvit.lut.table import LatencyTable, rows_from_records

    records = fastest_part_records(journal.of_type("part"), lambda c: PartConfig(**c).key)
    meta = sweep_meta(space, backend, device, journal, options, header, num_tokens=space.num_tokens)
    table = LatencyTable(rows_from_records(records), meta).validate()
    return fitted_table(table, journal, options, predictor=LatencyPredictor, arch=ArchSpec.from_dict)


def fitted_table(table: Any, journal: Journal, options: SweepOptions, *, predictor: Callable[..., Any],
                 arch: Callable[[Any], Any]) -> Any:
    """``table`` with its calibration fitted on the journal's whole models (each at its fastest run) and its
    self-check on the held-out ones; ``predictor`` builds the table's predictor (``calibrated=False`` for the
    fit) and ``arch`` reads a journaled architecture (a ViT's or a Swin's)."""
    from nvit.lut.calibration import fit_calibration
    from nvit.profiler.selfcheck import check_report

    models, check_runs = fastest_runs(journal.of_type("model")), journal.of_type("check")
    if models:
        raw = predictor(table, calibrated=False)
        archs = [arch(r["arch"]) for r in models]
        floors = raw.floors_for(archs)
        compositions = [raw.composition(a, floors) for a in archs]
        calibration = fit_calibration([r["name"] for r in models], [run_median(r) for r in models],
                                      [c.raw_ms for c in compositions], fit_scale=options.fit_scale,
                                      compositions=compositions, floors=floors)
        table = table.with_meta(calibration=calibration.with_archs([r["arch"] for r in models]))
    if check_runs:
        checks = fastest_runs(check_runs)
        report = check_report(predictor(table), [arch(r["arch"]) for r in checks],
                              {r["name"]: run_median(r) for r in checks}, seed=options.check_seed,
                              passes=options.passes, measured_at=max(r["measured_at"] for r in checks))
        models_as_journaled = tuple(dataclasses.replace(m, arch=r["arch"])  # JSON types, like the calibration's
                                    for m, r in zip(report.models, checks, strict=True))
        table = table.with_meta(self_check=report.replace(models=models_as_journaled,
                                                          seconds=float(sum(r["seconds"] for r in check_runs))))
    return table


def fastest_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model name, its run with the lowest median (first-seen order)."""
    fastest: dict[str, dict[str, Any]] = {}
    for r in runs:
        if r["name"] not in fastest or run_median(r) < run_median(fastest[r["name"]]):
            fastest[r["name"]] = r
    return list(fastest.values())
