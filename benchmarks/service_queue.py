"""Benchmark: how many queued jobs per second the service hands out with its default SQLite database.

A real server (``nvit serve``, one uvicorn process, SQLite in WAL mode with full fsync) gets ``--jobs``
``measure`` jobs submitted over HTTP; then ``K`` scripted agents (threads, one HTTP connection each) lease
as fast as they can until the queue is empty. Reported for each K: submissions per second, leases per second
(lease only), and full cycles per second (lease + complete), each over a fresh queue. The queue itself
without HTTP (:class:`~nvit.service.queue.JobQueue` on the same kind of SQLite file) is measured too, to
show what the HTTP layer costs.

    flock /work/measure.lock python benchmarks/service_queue.py --jobs 500 --out results/service_queue.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from service_measure import start, wait_url

from nvit.fileio import atomic_write_text
from nvit.service.procs import stop_process
from nvit.service.queue import JobKind, JobQueue, NewJob
from nvit.service.store import Store, sqlite_url

FINGERPRINT = {"kind": "cpu", "cpu": {"model_name": "Bench CPU", "logical_cores": 1, "available_cores": 1,
                                      "threads_used": None, "platform": "bench", "machine": "x86_64",
                                      "python_version": "3"}, "gpu": None, "versions": {}}


def submit_all(http: httpx.Client, n: int, tag: str) -> float:
    start_s = time.perf_counter()
    for i in range(n):
        body = {"kind": "measure", "models": [{"name": f"{tag}-{i}", "arch": "vit_test"}], "passes": 1}
        response = http.post("/v1/jobs", json=body)
        response.raise_for_status()
    return n / (time.perf_counter() - start_s)


def drain(url: str, agents: list[str], complete: bool) -> tuple[int, float]:
    counts = [0] * len(agents)

    def run(i: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            while True:
                response = http.post(f"/v1/agents/{agents[i]}/lease", params={"wait_s": 0})
                if response.status_code == 204:
                    return
                response.raise_for_status()
                counts[i] += 1
                if complete:
                    job_id = response.json()["job"]["id"]
                    done = http.post(f"/v1/jobs/{job_id}/complete", json={"agent_id": agents[i],
                                                                          "result": {"models": []}})
                    done.raise_for_status()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(agents))]
    start_s = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts), time.perf_counter() - start_s


def store_only(folder: Path, n: int) -> dict[str, float]:
    folder.mkdir(parents=True, exist_ok=True)
    store = Store.open(sqlite_url(folder))
    queue = JobQueue(store, lease_s=600)
    agent = {"id": "a", "device_kind": "cpu", "device_name": "Bench CPU", "backends": ["onnxruntime"]}
    start_s = time.perf_counter()
    for i in range(n):
        queue.submit(NewJob(JobKind.MEASURE, {"i": i}, device_kind="cpu", backend="onnxruntime"), now=time.time())
    submit_rate = n / (time.perf_counter() - start_s)
    start_s = time.perf_counter()
    leased = 0
    while queue.lease(agent, now=time.time()) is not None:
        leased += 1
    lease_rate = leased / (time.perf_counter() - start_s)
    store.close()
    return {"submits_per_s": submit_rate, "leases_per_s": lease_rate}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--agents", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="nvit-bench-queue-"))
    env = {**os.environ, "NVIT_LOCK_DIR": str(work / "locks")}
    server = start(["serve", "--state", str(work / "state"), "--port", "0", "--lease-s", "600"],
                   work / "server.log", env)
    runs: list[dict[str, Any]] = []
    try:
        url = wait_url(work / "state", server)
        load_start = os.getloadavg()
        with httpx.Client(base_url=url, timeout=60) as http:
            agent_ids = [http.post("/v1/agents", json={"name": f"bench-{i}", "hostname": "bench",
                                                       "fingerprint": FINGERPRINT,
                                                       "backends": ["onnxruntime"]}).json()["id"]
                         for i in range(max(args.agents))]
            for k in args.agents:
                for complete in (False, True):
                    submit_rate = submit_all(http, args.jobs, f"k{k}-{int(complete)}")
                    leased, seconds = drain(url, agent_ids[:k], complete)
                    runs.append({"agents": k, "complete": complete, "jobs": leased, "seconds": seconds,
                                 "handed_out_per_s": leased / seconds, "submits_per_s": submit_rate})
                    print(f"{k} agent(s), {'lease+complete' if complete else 'lease only':14s}: "
                          f"{leased / seconds:7.1f} jobs/s ({leased} in {seconds:.2f} s); "
                          f"submit {submit_rate:.1f}/s", flush=True)
        direct = store_only(work / "direct", args.jobs)
        print(f"queue without HTTP: submit {direct['submits_per_s']:.0f}/s, lease {direct['leases_per_s']:.0f}/s")
        doc = {"kind": "nvit.benchmark.service_queue", "created_unix_s": time.time(),
               "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
               "machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                           "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
               "database": "sqlite (WAL, synchronous=FULL)", "runs": runs, "queue_without_http": direct}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(doc, indent=2) + "\n")
    finally:
        stop_process(server, timeout_s=20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
