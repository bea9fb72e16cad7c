#!/usr/bin/env bash
# Everything GPU that runs on a machine with a CUDA build of torch (no TensorRT, no onnxruntime-gpu, no network,
# nothing installed): about 5 minutes on one H100/H200, at most 8.
#
#   OUT=/some/folder bash scripts/gpu_check.sh      (OUT defaults to ./gpu-check-<date>)
#
# Steps: the GPU tests (pytest -m gpu: CUDA-event timer against the wall clock on GEMMs, graph replay against
# eager, the torch backend on DeiT-Small parts in fp32/fp16/bf16, torch.compile, the fingerprint; TensorRT
# tests skip), a small `nvit profile --gpu --backend torch` table, `nvit compare` of 10 random models against
# it (MAPE within 5%), and the one-line refusals when TensorRT / onnxruntime-gpu are missing. Writes
# $OUT/gpu_check.log and $OUT/summary.json (every step's status, seconds and figures). Exit status: 0 when every
# step passed, 1 when one failed, 2 when there is no CUDA device (nothing else is tried).
set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu-check-$(date +%Y%m%d-%H%M%S)}
MODELS=${GPU_CHECK_MODELS:-10}     # random models compared with the table
MAX_MAPE_PCT=5
mkdir -p "$OUT" || { echo "cannot create OUT=$OUT" >&2; exit 1; }
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" NVIT_CACHE_DIR="$WORK/cache" MPLBACKEND=Agg PYTHONUNBUFFERED=1
export COLUMNS=${COLUMNS:-160}  # wide tables in the log
export OUT WORK MODELS MAX_MAPE_PCT
cd "$ROOT" || exit 1
exec > >(tee "$OUT/gpu_check.log") 2>&1
STEPS="$WORK/steps.jsonl"
: > "$STEPS"
START=$SECONDS

banner() { printf '\n===== %s (%s, +%ss) =====\n' "$1" "$(date +%T)" "$((SECONDS - START))"; }

# step NAME TIMEOUT_S COMMAND...: run under a time limit (commands may be exported functions), record
# status and seconds
step() {
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  banner "$name"
  timeout --kill-after=10 "$limit" bash -c '"$@"' step "$@"
  rc=$?
  printf '{"step": "%s", "rc": %d, "seconds": %d}\n' "$name" "$rc" "$((SECONDS - t0))" >> "$STEPS"
  [ "$rc" -eq 0 ] && echo "PASS $name" || echo "FAIL $name (exit $rc)"
  return 0
}

summary() {  # summary.json from the step records and the artifacts
  "$PY" - "$1" <<'EOF'
import json, os, sys, xml.etree.ElementTree as ET
from pathlib import Path
out, work = Path(os.environ["OUT"]), Path(os.environ["WORK"])
steps = [json.loads(line) for line in (work / "steps.jsonl").read_text().splitlines() if line.strip()]
doc = {"status": sys.argv[1], "steps": steps, "failed": [s["step"] for s in steps if s["rc"] != 0]}
for name in ("environment.json", "pytest-gpu.xml", "compare-check.json"):
    path = out / name
    if not path.exists():
        continue
    if name.endswith(".json"):
        doc[name[:-5].replace("-", "_")] = json.loads(path.read_text())
    else:
        suite = ET.parse(path).getroot()
        suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
        doc["pytest_gpu"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        doc["pytest_gpu"]["failed_tests"] = [c.get("name") for c in suite.iter("testcase")
                                             if c.find("failure") is not None or c.find("error") is not None]
if doc["status"] == "done":
    doc["status"] = "passed" if not doc["failed"] else "failed"
(out / "summary.json").write_text(json.dumps(doc, indent=2) + "\n")
print(f"summary: {doc['status']}" + (f" (failed: {', '.join(doc['failed'])})" if doc["failed"] else ""))
EOF
}

banner "0 environment"
"$PY" - <<'EOF'
import importlib.util, json, os, sys
from pathlib import Path
missing = [m for m in ("torch", "numpy", "onnx", "onnxruntime", "pandas", "pyarrow", "typer", "rich", "safetensors",
                       "matplotlib", "pytest") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing packages: {', '.join(missing)} (this check installs nothing)")
import torch
import onnxruntime
env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
       "cuda_available": torch.cuda.is_available(), "onnxruntime": onnxruntime.__version__,
       "onnxruntime_providers": onnxruntime.get_available_providers(),
       "optional": {m: importlib.util.find_spec(m) is not None for m in ("tensorrt", "pycuda", "pynvml", "cupy")}}
if env["cuda_available"]:
    env["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
Path(os.environ["OUT"], "environment.json").write_text(json.dumps(env, indent=2) + "\n")
print(json.dumps(env, indent=2))
if not env["cuda_available"]:
    sys.exit(f"no CUDA device: torch {torch.__version__} reports torch.cuda.is_available() == False")
EOF
rc=$?
if [ "$rc" -ne 0 ]; then
  printf '{"step": "environment", "rc": %d, "seconds": %d}\n' "$rc" "$((SECONDS - START))" >> "$STEPS"
  if grep -q '"cuda_available": false' "$OUT/environment.json" 2>/dev/null; then
    summary no_cuda
    echo "stopped: no CUDA device, nothing GPU to check here"
    exit 2
  fi
  summary failed
  exit 1
fi
printf '{"step": "environment", "rc": 0, "seconds": %d}\n' "$((SECONDS - START))" >> "$STEPS"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,uuid,driver_version,clocks.sm,clocks.max.sm,power.limit,temperature.gpu --format=csv

step "1 pytest -m gpu" 240 "$PY" -m pytest -m gpu -p no:cacheprovider -q -rs --junitxml="$OUT/pytest-gpu.xml" tests/

H='{"warmup_s": 0.1, "rewarm_s": 0.05, "time_cap_s": 0.25}'  # a partial harness: the GPU defaults for the rest
step "2 nvit profile --gpu --backend torch (vit_test, fp16)" 150 \
  "$PY" -m nvit profile --gpu --backend torch --space vit_test --precision fp16 --calibrate 4 \
  --backend-option "harness=$H" --out "$OUT/lut-gpu-torch.parquet"
step "2b nvit lut show" 30 "$PY" -m nvit lut show "$OUT/lut-gpu-torch.parquet"

step "3a $MODELS random variants of the table's base" 60 "$PY" - <<'EOF'
import os
from pathlib import Path
import numpy as np
from nvit.arch import ArchSpec
from nvit.lut.table import LatencyTable
from nvit.models import build_model, save_variant
from nvit.profiler.space import random_arch
table = LatencyTable.load(Path(os.environ["OUT"]) / "lut-gpu-torch.parquet")
base, rng = ArchSpec.from_dict(table.meta.base_arch), np.random.default_rng(2024)
for i in range(int(os.environ["MODELS"])):
    spec = random_arch(base, rng, name=f"random{i}")
    save_variant(build_model(spec, seed=i).eval(), Path(os.environ["WORK"]) / "variants" / f"random{i}")
print(f"{os.environ['MODELS']} variants of {base.name} in {os.environ['WORK']}/variants")
EOF
compare() { "$PY" -m nvit compare "$WORK"/variants/random* --lut "$OUT/lut-gpu-torch.parquet" --out "$OUT/compare"; }
export -f compare
export PY
step "3b nvit compare (torch, GPU)" 120 compare
step "3c compare: MAPE within ${MAX_MAPE_PCT}%" 30 "$PY" - <<'EOF'
import json, os, sys
from pathlib import Path
out = Path(os.environ["OUT"])
report = json.loads((out / "compare" / "compare.json").read_text())
errors = [r["error_pct"] for r in report["results"] if r["name"] != report["base"]]
check = {"models": len(errors), "mape_pct": sum(map(abs, errors)) / len(errors),
         "max_abs_error_pct": max(map(abs, errors)), "within_5pct": sum(abs(e) <= 5 for e in errors),
         "limit_pct": float(os.environ["MAX_MAPE_PCT"])}
(out / "compare-check.json").write_text(json.dumps(check, indent=2) + "\n")
print(json.dumps(check))
sys.exit(0 if len(errors) >= int(os.environ["MODELS"]) and check["mape_pct"] <= check["limit_pct"] else 1)
EOF

refusal() {  # refusal NAME EXPECTED_TEXT BACKEND: one error line, exit 1, when the package is missing
  local err="$WORK/refusal-$3.err" rc
  "$PY" -m nvit profile --gpu --backend "$3" --space vit_test --precision fp16 --out "$WORK/refused-$3.parquet" \
    2> "$err" > /dev/null
  rc=$?
  cat "$err"
  [ "$rc" -eq 1 ] && [ "$(grep -c . "$err")" -eq 1 ] && grep -q "$2" "$err" && ! grep -q Traceback "$err"
}
export -f refusal
if "$PY" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("tensorrt") is None)'; then
  echo "TensorRT is installed: its refusal is not checked"
else
  step "4a refusal: no TensorRT" 60 refusal trt "TensorRT is not installed" tensorrt
fi
if "$PY" -c 'import onnxruntime as o, sys; sys.exit("CUDAExecutionProvider" not in o.get_available_providers())'; then
  echo "onnxruntime-gpu is installed: its refusal is not checked"
else
  step "4b refusal: no onnxruntime-gpu" 60 refusal ort "has no CUDAExecutionProvider" onnxruntime
fi

banner "done in $((SECONDS - START)) s"
summary done
ls -la "$OUT"
grep -q '"status": "passed"' "$OUT/summary.json"
