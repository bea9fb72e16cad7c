"""Benchmark: a remote ``measure`` job against the same measurement made locally.

A service (``nvit serve``, SQLite) and one agent run on this machine, as ``nvit serve --local-agent`` would.
Each round measures the same model twice, in alternating order: locally, with the library calls the agent's
worker makes (onnxruntime on the CPU, the default harness, ``measure_passes`` with 2 passes: what ``nvit
compare`` does), and remotely, as a ``measure`` job submitted over HTTP and followed to its end. Reported per
model: the median latency of each side over the rounds and their ratio, the run-to-run spread of each side
(the harness's own noise on this machine: max/min of the per-round medians - 1), and the wall time of a local
measurement against the time from submitting a job to reading its result (the service's overhead: the
agent's child process, its imports, the ONNX export it repeats, HTTP and polling).

Run under the machine's measurement lock, at normal priority:
    flock /work/measure.lock python benchmarks/service_measure.py --rounds 5 --out results/service_measure.json
Smoke run:
    python benchmarks/service_measure.py --rounds 1 --models vit_test --out /tmp/service_measure.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from nvit.errors import NvitError
from nvit.fileio import atomic_write_text
from nvit.presets import preset
from nvit.profiler.base import get_backend
from nvit.profiler.device import fingerprint
from nvit.profiler.workloads import model_workload
from nvit.service.procs import stop_process
from nvit.service.server import wait_for_server_url
from nvit.validation.compare import measure_passes
from nvit.vocab import DeviceKind, Precision

PASSES = 2  # as nvit compare
POLL_S = 0.05


def start(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "nvit", *args], env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_url(state: Path, proc: subprocess.Popen[bytes]) -> str:
    try:
        return wait_for_server_url(state, proc, timeout_s=120, probe_timeout_s=2)
    except NvitError as exc:
        raise SystemExit(str(exc)) from None


def measure_local(name: str, threads: int) -> tuple[dict[str, Any], float]:
    start_s = time.perf_counter()
    backend = get_backend("onnxruntime")(device=DeviceKind.CPU, precision=Precision.FP32, batch_size=1,
                                         intra_op_threads=threads)
    with backend:
        (stats,) = measure_passes(backend, [model_workload(preset(name), 1, name=name)], PASSES)
    return stats.as_dict(), time.perf_counter() - start_s


def measure_remote(http: httpx.Client, name: str, threads: int) -> tuple[dict[str, Any], float, dict[str, Any]]:
    body = {"kind": "measure", "models": [{"name": name, "arch": name}], "passes": PASSES,
            "backend_options": {"intra_op_threads": threads}}
    start_s = time.perf_counter()
    job = http.post("/v1/jobs", json=body).json()
    while job["state"] not in ("succeeded", "failed", "cancelled"):
        time.sleep(POLL_S)
        job = http.get(f"/v1/jobs/{job['id']}").json()
    wall = time.perf_counter() - start_s
    if job["state"] != "succeeded":
        raise SystemExit(f"job {job['id']} {job['state']}: {job['error']}")
    result = job["result"]
    phases = {"worker_s": result["worker_finished_at"] - result["worker_started_at"],
              "measure_s": result["measure_finished_at"] - result["measure_started_at"]}
    return result["models"][0]["stats"], wall, phases


def spread(values: list[float]) -> float:
    return max(values) / min(values) - 1.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["deit_tiny", "vit_test"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="nvit-bench-service-"))
    env = {**os.environ, "NVIT_LOCK_DIR": str(work / "locks"), "NVIT_CACHE_DIR": str(work / "cache")}
    os.environ.update({k: env[k] for k in ("NVIT_LOCK_DIR", "NVIT_CACHE_DIR")})
    server = start(["serve", "--state", str(work / "state"), "--port", "0"], work / "server.log", env)
    agent = None
    try:
        url = wait_url(work / "state", server)
        agent = start(["agent", "--server", url, "--work-dir", str(work / "agent"), "--poll-s", "5"],
                      work / "agent.log", env)
        load_start = os.getloadavg()
        rows: dict[str, dict[str, list[Any]]] = {}
        with httpx.Client(base_url=url, timeout=600) as http:
            measure_remote(http, "vit_test", args.threads)  # warm the agent's first lease and downloads
            for r in range(args.rounds):
                for name in args.models:
                    row = rows.setdefault(name, {"local_ms": [], "remote_ms": [], "local_wall_s": [],
                                                 "remote_wall_s": [], "remote_worker_s": [], "remote_measure_s": []})
                    order = ("local", "remote") if r % 2 == 0 else ("remote", "local")
                    for side in order:
                        if side == "local":
                            stats, wall = measure_local(name, args.threads)
                        else:
                            stats, wall, phases = measure_remote(http, name, args.threads)
                            row["remote_worker_s"].append(phases["worker_s"])
                            row["remote_measure_s"].append(phases["measure_s"])
                        row[f"{side}_ms"].append(stats["latency_ms_median"])
                        row[f"{side}_wall_s"].append(wall)
                        print(f"round {r} {name:10s} {side:6s} {stats['latency_ms_median']:8.3f} ms  "
                              f"wall {wall:6.2f} s", flush=True)
        summary = {}
        for name, row in rows.items():
            local, remote = statistics.median(row["local_ms"]), statistics.median(row["remote_ms"])
            summary[name] = {
                "local_ms_median": local, "remote_ms_median": remote, "remote_over_local": remote / local,
                "local_run_to_run_spread": spread(row["local_ms"]) if len(row["local_ms"]) > 1 else None,
                "remote_run_to_run_spread": spread(row["remote_ms"]) if len(row["remote_ms"]) > 1 else None,
                "local_wall_s_median": statistics.median(row["local_wall_s"]),
                "remote_wall_s_median": statistics.median(row["remote_wall_s"]),
                "overhead_s_median": statistics.median(row["remote_wall_s"]) - statistics.median(row["local_wall_s"]),
                "remote_worker_s_median": statistics.median(row["remote_worker_s"]),
                "rounds": row,
            }
        doc = {
            "kind": "nvit.benchmark.service_measure", "created_unix_s": time.time(),
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "machine": {"cpu": fingerprint(DeviceKind.CPU).cpu.model_name, "cores": os.cpu_count(),
                        "python": platform.python_version(), "loadavg_start": load_start,
                        "loadavg_end": os.getloadavg()},
            "settings": {"backend": "onnxruntime", "threads": args.threads, "passes": PASSES,
                         "harness": "default CPU harness", "rounds": args.rounds},
            "models": summary,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(doc, indent=2) + "\n")
        for name, s in summary.items():
            print(f"{name}: local {s['local_ms_median']:.3f} ms, remote {s['remote_ms_median']:.3f} ms "
                  f"(x{s['remote_over_local']:.3f}); spread local {s['local_run_to_run_spread']}, remote "
                  f"{s['remote_run_to_run_spread']}; wall local {s['local_wall_s_median']:.2f} s, remote "
                  f"{s['remote_wall_s_median']:.2f} s")
    finally:
        for proc in (agent, server):
            if proc is not None:
                stop_process(proc, timeout_s=20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
