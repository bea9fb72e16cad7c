"""One job, run by ``nvit agent`` in a child process: ``python -m nvit.service.worker JOBDIR``.

The child parses and builds what the job brings (an uploaded ONNX model, a table), so a crash or a hostile
file costs the child, not the agent. It runs the job through the library calls the CLI uses:
:func:`~nvit.profiler.sweep.run_sweep` (with its journal, so a profile resumes where the last agent
stopped) for ``profile`` jobs, and :func:`~nvit.validation.compare.measure_with_table` /
:func:`~nvit.validation.compare.measure_passes` with the timing harness for ``measure`` jobs: a remote
measurement is the same measurement as a local one.

Protocol: ``JOBDIR/job.json`` holds the job and the local paths of its inputs. The child writes one JSON
object per line on its standard output (everything else it or a library prints goes to standard error):
``progress`` events, each answered by the agent with a line on standard input once it has uploaded what the
event reports (the journal lines, so nothing measured is lost with the agent), then ``result`` or
``error``. The child dies with the agent (``PR_SET_PDEATHSIG``, and a check of its parent at every event),
so a killed agent never leaves a measurement running on a device it no longer holds.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from nvit.errors import NvitError

PARENT_ENV = "NVIT_WORKER_PARENT"
JOB_FILE = "job.json"
TABLE_FILE = "lut.parquet"
_PR_SET_PDEATHSIG = 1


class Channel:
    """The line protocol to the agent."""

    def __init__(self, out: TextIO, parent: int | None) -> None:
        self.out, self.parent = out, parent

    def send(self, message: dict[str, Any], *, wait: bool = False) -> None:
        if self.parent is not None and os.getppid() != self.parent:
            os._exit(1)  # the agent is gone: its device lock with it
        self.out.write(json.dumps(message, default=str) + "\n")
        self.out.flush()
        if wait and not sys.stdin.readline():
            os._exit(1)

    def progress(self, **fields: Any) -> None:
        self.send({"event": "progress", "progress": fields}, wait=True)


def _die_with_parent(parent: int | None) -> None:
    if parent is None:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the check at every event remains
        pass
    if os.getppid() != parent:
        os._exit(1)


def run_profile(job: dict[str, Any], jobdir: Path, channel: Channel) -> dict[str, Any]:
    from nvit.profiler.base import get_backend
    from nvit.profiler.device import backend_fingerprint
    from nvit.profiler.space import SearchSpace
    from nvit.profiler.sweep import SweepOptions, run_sweep
    from nvit.vocab import DeviceKind

    spec = job["spec"]
    space = SearchSpace.from_dict(spec["space"])
    kind = DeviceKind(spec["device"])
    options = SweepOptions(**spec["options"])
    backend = get_backend(spec["backend"])(device=kind, precision=space.precision, batch_size=space.batch_size,
                                          **spec["backend_options"])

    def on_progress(p: Any) -> None:
        channel.progress(phase=p.phase.value, done=p.done, total=p.total, name=p.name, latency_ms=p.latency_ms,
                         resumed=p.resumed)

    with backend:
        device = backend_fingerprint(backend)  # as nvit profile: clocks read under load
        result = run_sweep(space, backend, jobdir / TABLE_FILE, options=options, resume=True, progress=on_progress,
                           device=device)
    return {"table": TABLE_FILE, "rows": len(result.table), "measured": result.measured, "resumed": result.resumed,
            "seconds": result.seconds}


def run_measure(job: dict[str, Any], channel: Channel) -> dict[str, Any]:
    from nvit.arch import ArchSpec
    from nvit.profiler.base import Workload, get_backend
    from nvit.profiler.device import backend_fingerprint
    from nvit.profiler.workloads import model_workload
    from nvit.validation.compare import backend_for_table, measure_passes, measure_with_table
    from nvit.vocab import DeviceKind

    spec, files = job["spec"], job["files"]
    workloads = []
    archs: dict[str, ArchSpec] = {}
    for m in spec["models"]:
        if "arch" in m:
            archs[m["name"]] = ArchSpec.from_dict(m["arch"])
        if "onnx" in m:
            workloads.append(Workload(m["name"], None, tuple(m["input_shape"]), onnx_path=files[m["onnx"]]))
        else:
            workloads.append(model_workload(archs[m["name"]], spec["batch_size"], name=m["name"]))
    channel.progress(phase="measure", done=0, total=len(workloads), name=f"{len(workloads)} models")
    predicted: dict[str, float] = {}
    started = time.time()
    if spec["lut"] is not None:
        from nvit.lut.predictor import LatencyPredictor
        from nvit.lut.table import LatencyTable

        table = LatencyTable.load(files["lut"])
        stats, context = measure_with_table(table.meta, workloads, same_device=spec["same_device"],
                                            passes=spec["passes"])
        predictor = LatencyPredictor(table)
        predicted = {name: predictor.predict_ms(arch) for name, arch in archs.items()}
        backend = backend_for_table(table.meta)
    else:
        backend = get_backend(spec["backend"])(device=DeviceKind(spec["device"]), precision=spec["precision"],
                                              batch_size=spec["batch_size"], **spec["backend_options"])
        from nvit.profiler.conditions import ConditionsMonitor

        with backend, ConditionsMonitor(gpu_index=getattr(backend, "cuda_index", None)) as monitor:
            stats = measure_passes(backend, workloads, spec["passes"])
            hit = sum(s.runs_hit for s in stats) / max(1, sum(s.n_repeats for s in stats))
            context = {"backend": backend.settings(), "versions": backend.versions(),
                       "conditions": monitor.conditions(runs_hit=hit).to_dict()}
    finished = time.time()
    channel.progress(phase="measure", done=len(workloads), total=len(workloads), name="done")
    device = backend_fingerprint(backend, warm_up_s=0.0)
    models = [{"name": w.name, "stats": s.as_dict(), "predicted_ms": predicted.get(w.name)}
              for w, s in zip(workloads, stats, strict=True)]
    return {"models": models, "context": context, "device": device.to_dict(), "measure_started_at": started,
            "measure_finished_at": finished}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m nvit.service.worker JOBDIR", file=sys.stderr)
        return 2
    protocol = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # anything printed by libraries (even from C) goes to standard error
    sys.stdout = sys.stderr
    parent = int(os.environ[PARENT_ENV]) if os.environ.get(PARENT_ENV) else None
    _die_with_parent(parent)
    channel = Channel(protocol, parent)
    jobdir = Path(argv[0])
    job = json.loads((jobdir / JOB_FILE).read_text())
    try:
        result = run_profile(job, jobdir, channel) if job["kind"] == "profile" else run_measure(job, channel)
    except NvitError as exc:
        channel.send({"event": "error", "message": str(exc)})
        return 3
    channel.send({"event": "result", "result": result})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
