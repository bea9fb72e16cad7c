"""`nvit demo --quick` end to end on CPU: every artifact, the report's figures, and a resuming rerun."""

from __future__ import annotations

import json

import pytest

from nvit.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    try:
        main(["demo", "--quick", "--out", str(out)])
    except SystemExit as exc:
        assert exc.code == 0
    return out


def test_demo_writes_every_artifact(demo_dir) -> None:
    for name in ("lut.parquet", "base/arch.json", "base/model.safetensors", "base/export/model.onnx",
                 "variants/ratio_0.7/arch.json", "variants/ratio_0.5/export/model.onnx",
                 "prune/prune_log.parquet", "report/compare.json", "report/compare.csv"):
        assert (demo_dir / name).is_file(), name
    for png in ("compare.png", "widths.png", "pareto.png"):
        assert (demo_dir / "report" / png).read_bytes()[:4] == b"\x89PNG"


def test_demo_report_figures(demo_dir) -> None:
    doc = json.loads((demo_dir / "report" / "demo_report.json").read_text())
    rows = {r["variant"]: r for r in doc["rows"]}
    assert set(rows) == {"base", "ratio_0.7", "ratio_0.5"}
    base = rows["base"]
    assert base["top1"] > 0.3  # ten classes: chance is 0.1, even the quick budget learns
    for name, ratio in (("ratio_0.7", 0.7), ("ratio_0.5", 0.5)):
        r = rows[name]
        assert r["predicted_ms"] <= ratio * base["predicted_ms"] * 1.001  # the target was met (predicted)
        assert r["params"] < base["params"]
        assert r["onnx_max_abs_error"] < 1e-4
        assert r["speedup_measured"] > 1.0  # pruned variants really are faster
    assert rows["ratio_0.5"]["measured_ms"] < rows["ratio_0.7"]["measured_ms"]
    for r in rows.values():  # the quick table is coarse and timed briefly; the full demo is in BENCHMARKS.md
        assert abs(r["error_pct"]) < 30 or r["noise"]  # a large error is either absent or flagged
    trust = doc["trust"]  # the one-line verdict, and the rows it rests on
    assert doc["schema_version"] == 2 and trust["verdict"] in ("quiet", "noisy", "unusable")
    assert trust["line"].startswith(f"measurements {trust['verdict']}: ")
    assert trust["noisy_rows"] == [r["variant"] for r in doc["rows"] if r["noise"]]
    compare = json.loads((demo_dir / "report" / "compare.json").read_text())
    assert compare["trust"] == trust and [r["noisy"] for r in compare["results"]] == [bool(r["noise"]) for r in
                                                                                    doc["rows"]]


def test_rerun_resumes_without_redoing_work(demo_dir, capsys) -> None:
    stamps = {p: (demo_dir / p).stat().st_mtime_ns for p in ("lut.parquet", "base/model.safetensors",
                                                             "variants/ratio_0.5/model.safetensors")}
    try:
        main(["demo", "--quick", "--out", str(demo_dir)])
    except SystemExit as exc:
        assert exc.code == 0
    assert "reused" in capsys.readouterr().out
    for p, stamp in stamps.items():
        assert (demo_dir / p).stat().st_mtime_ns == stamp, f"{p} was rewritten"
