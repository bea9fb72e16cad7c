"""Benchmark: nvit's measurements on a quiet machine and on one with a busy neighbour.

A *condition* is one code version (``--code``, the folder whose ``nvit`` package runs: an older checkout for
"before") under one load (``none``; ``spin``: one process spinning one core for the whole part, started
before the part and stopped after it; ``spinall``: one such process per core, so nvit's own thread must
wait for a CPU). Per condition, three parts, each cached in ``--work`` as a JSON file
(a rerun skips the parts that are done):

- ``profile``: ``nvit profile --space deit_tiny --threads 1`` (the table, under the load);
- ``check``: 24 held-out pruned-shape models (``benchmarks/lut_pruned_shapes.py``, seed 1000, 2 passes)
  measured under the same load right after, then their MAPE / bias against that table;
- ``demo``: ``nvit demo`` under the load: every row's prediction error, and whether the row is flagged.

While each part runs, the share of the machine's CPU time used by processes other than the part's own
(from ``/proc/stat`` and the part's rusage: independent of the code being measured) is recorded, so "quiet"
is a measured statement. Run it under the measurement lock:

    flock /work/measure.lock python benchmarks/busy_machine.py run --code . --label after --load none
    flock /work/measure.lock python benchmarks/busy_machine.py run --code ../old --label before --load spin
    python benchmarks/busy_machine.py report --work bench-work/busy --out results/busy_machine.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

LOADS = ("none", "spin", "spinall")
PARTS = ("profile", "check", "demo")
SPIN = "while True:\n    pass\n"
_JIFFY_S = 1.0 / os.sysconf("SC_CLK_TCK")


def _cpu_busy_s() -> tuple[float, float]:
    """Busy and steal CPU seconds of the whole machine so far (all cores)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) * _JIFFY_S, steal * _JIFFY_S


def _children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_part(cmd: list[str], *, code: Path, load: str, log: Path) -> dict[str, Any]:
    """Run ``cmd`` (with ``code`` first on PYTHONPATH) under ``load``; its wall time and the CPU others used."""
    env = {**os.environ, "PYTHONPATH": str(code.resolve()), "PYTHONUNBUFFERED": "1"}
    count = {"none": 0, "spin": 1, "spinall": os.cpu_count() or 1}[load]
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(count)]
    try:
        time.sleep(0.5 if spinners else 0.0)
        busy0, steal0 = _cpu_busy_s()
        own0, t0 = _children_cpu_s(), time.monotonic()
        with open(log, "w") as out:
            rc = subprocess.run(cmd, env=env, cwd=code, stdout=out, stderr=subprocess.STDOUT).returncode
        wall = time.monotonic() - t0
        busy1, steal1 = _cpu_busy_s()
        own = _children_cpu_s() - own0
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    cores = os.cpu_count() or 1
    other = max(0.0, busy1 - busy0 - own)
    return {"cmd": cmd, "rc": rc, "wall_s": wall, "own_cpu_s": own, "other_cpu_s": other,
            "other_cores": other / wall, "other_share": other / (wall * cores),
            "steal_share": (steal1 - steal0) / (wall * cores), "cores": cores}


def run(args: argparse.Namespace) -> int:
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    code = args.code.resolve()
    tag = f"{args.label}-{args.load}"
    lut = work / f"{tag}.parquet"
    py = sys.executable
    shapes = str(code / "benchmarks" / "lut_pruned_shapes.py")
    measured = work / f"{tag}-pruned-s1000.json"
    cmds = {
        "profile": [py, "-m", "nvit", "profile", "--space", "deit_tiny", "--threads", "1", "--out", str(lut)],
        "check": [py, shapes, "measure", "--lut", str(lut), "--set", "pruned", "--models", "24", "--seed", "1000",
                  "--passes", "2", "--work", str(work), "--out", str(measured), "--budget-s", "3000"],
        "demo": [py, "-m", "nvit", "demo", "--out", str(work / f"demo-{tag}")],
    }
    for part in args.parts:
        done = work / f"{tag}-{part}.json"
        if done.exists():
            print(f"{done.name}: done before")
            continue
        if part == "demo" and (work / f"demo-{tag}").exists():
            subprocess.run(["rm", "-rf", str(work / f"demo-{tag}")], check=True)
        print(f"{tag} {part}: {' '.join(cmds[part][1:])}", flush=True)
        record = run_part(cmds[part], code=code, load=args.load, log=work / f"{tag}-{part}.log")
        record.update(label=args.label, load=args.load, part=part, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        if part == "check" and record["rc"] == 0:
            ev = work / f"{tag}-check-eval.json"
            subprocess.run([py, shapes, "evaluate", "--lut", str(lut), "--label", tag, "--measured", str(measured),
                            "--out", str(ev)], env={**os.environ, "PYTHONPATH": str(code)}, cwd=code, check=True)
            record["evaluate"] = json.loads(ev.read_text())
        if part == "profile" and record["rc"] == 0:
            record["table"] = _table_meta(lut, code)
        if part == "demo" and record["rc"] == 0:
            record["compare"] = json.loads((work / f"demo-{tag}" / "report" / "compare.json").read_text())
        print(f"  rc {record['rc']}, {record['wall_s']:.0f} s, other processes {record['other_cores']:.2f} cores, "
              f"steal {100 * record['steal_share']:.1f}%", flush=True)
        if record["rc"] != 0:
            print(f"  failed: see {work / f'{tag}-{part}.log'}", file=sys.stderr)
            return 1
        done.write_text(json.dumps(record, indent=1) + "\n")
    return 0


def _table_meta(lut: Path, code: Path) -> dict[str, Any]:
    """What the table says of itself: its self-check and (with code that records them) its conditions."""
    probe = ("import json, sys; from nvit.lut import load_table; m = load_table(sys.argv[1]).meta; "
             "print(json.dumps({'self_check': m.self_check, 'conditions': getattr(m, 'conditions', None)}, "
             "default=str))")
    out = subprocess.run([sys.executable, "-c", probe, str(lut)], env={**os.environ, "PYTHONPATH": str(code)},
                         cwd=code, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def summarize(work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path in sorted(work.glob("*-*-*.json")):
        stem = path.stem.rsplit("-", 1)
        if len(stem) != 2 or stem[1] not in PARTS:
            continue
        rec = json.loads(path.read_text())
        entry = {k: rec[k] for k in ("wall_s", "other_cores", "steal_share", "finished_at")}
        if rec["part"] == "profile":
            table = rec.get("table") or {}
            check = table.get("self_check") or {}
            keys = ("n", "mape_pct", "max_abs_pct", "within_10pct", "bias_pct")
            entry["self_check"] = {k: check.get(k) for k in keys}
            entry["table_conditions"] = table.get("conditions")
        if rec["part"] == "check":
            entry["evaluate"] = {k: {"dense_ms": v["dense_ms"], **v["results"]}
                                 for k, v in rec["evaluate"]["sets"].items()}
        if rec["part"] == "demo":
            rows = rec["compare"]["results"]
            entry["rows"] = [{k: r.get(k) for k in ("name", "predicted_ms", "measured_ms", "error_pct", "noisy",
                                                    "noise")} for r in rows]
            entry["trust"] = rec["compare"].get("trust")  # None with code that has no verdict
        out.setdefault(f"{rec['label']}-{rec['load']}", {})[rec["part"]] = entry
    return out


def report(args: argparse.Namespace) -> int:
    doc = {"schema_version": 1, "kind": "nvit.bench.busy_machine", "conditions": summarize(args.work)}
    text = json.dumps(doc, indent=1) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="Run the parts of one condition (cached; a rerun resumes).")
    r.add_argument("--code", type=Path, default=Path("."), help="The checkout whose nvit to run.")
    r.add_argument("--label", required=True, help="before | after (any name).")
    r.add_argument("--load", choices=LOADS, default="none")
    r.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    r.add_argument("--work", type=Path, default=Path("bench-work/busy"))
    s = sub.add_parser("report", help="Collect every finished part into one JSON document.")
    s.add_argument("--work", type=Path, default=Path("bench-work/busy"))
    s.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    return run(args) if args.cmd == "run" else report(args)


if __name__ == "__main__":
    raise SystemExit(main())
