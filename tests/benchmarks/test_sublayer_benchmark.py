"""The sub-layer benchmark end to end in its quick mode: width-only methods stop at their floor, the
sub-layer and depth methods go below it, and the report compares them at equal measured latency."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import lut_fakes as fk
import prune_sublayers as ps

from nvit.arch import ArchSpec
from nvit.models import build_model, save_variant
from nvit.presets import preset


def test_quick_run_measures_and_reports(tmp_path, monkeypatch) -> None:
    from nvit.profiler.sweep import SweepOptions, run_sweep

    fk.register_fake(monkeypatch)
    base = tmp_path / "base"
    spec = preset("vit_test", qk_scale=0.25)
    save_variant(build_model(spec, seed=0).eval(), base)
    with fk.FakeBackend() as backend:
        lut = run_sweep(fk.tiny_space(half_blocks_per_embed=2), backend, tmp_path / "lut.parquet",
                        options=SweepOptions(calibration_models=3)).path  # this machine: measure compares here
    # floors of this table: widths alone 0.64 of dense, one whole block 0.35
    s = replace(ps.QUICK, seeds=(0,), targets=(0.85, 0.7, 0.4), total_steps=12, interval=2)
    args = argparse.Namespace(base=base, lut=lut, work=tmp_path / "work", out=tmp_path / "out.json", jobs=1,
                              lock=tmp_path / "measure.lock")
    ps.run_stage(args, s)
    ps.pf.measure_stage(args, s)
    ps.report_stage(args, s)
    doc = json.loads(args.out.read_text())
    reached = doc["targets_reached"]
    assert reached["saliency"] == [0.85, 0.7] and reached["knapsack"] == [0.85, 0.7]  # 0.4 is below the width floor
    assert doc["unreachable"]["saliency/s0"] == [0.4]
    assert 0.4 in reached["saliency_rm"] and 0.4 in reached["knapsack_rm"] and 0.4 in reached["depth"]
    depth_rows = [r for r in doc["rows"] if r["method"] == "depth"]
    assert all(r["blocks_dropped"] >= 1 and r["prune_steps"] == 0 for r in depth_rows)
    for r in doc["rows"]:
        assert r["measured_ms"] == fk.model_ms(ArchSpec.from_dict(r["arch"]))  # the fake's exact latency
        assert r["prune_steps"] + r["finetune_steps"] == s.total_steps
    assert set(doc["comparison"]["after"]["all_vs_saliency"]["methods"]) == {m for m in ps.METHODS
                                                                             if not m.endswith("_mt")}
    # measured targets in the loop: every variant timed where it crossed its target, and met (the fake device
    # agrees with its table); the report pairs each with its open-loop run and says what the loop cost
    loop = doc["measured_loops"]["knapsack_rm_mt/s0"]
    assert loop["measurements"] >= len(reached["knapsack_rm_mt"]) and loop["seconds"] >= 0
    assert all(v["target_met_measured"] for v in loop["variants"])
    assert doc["targets_met"]["knapsack_rm_mt"]["met_within_3pct"] == doc["targets_met"]["knapsack_rm_mt"]["variants"]
    assert doc["comparison"]["after"]["measured_vs_open_loop/knapsack_rm_mt"]["reference"] == "knapsack_rm"
    assert doc["comparison"]["after"]["removal_vs_width_only/saliency_rm"]["reference"] == "saliency"
    text = ps.markdown(doc)
    assert "targets met at measured latency" in text and "| knapsack_rm | 0.85 | e" in text
    assert "saliency" not in doc["comparison"]["after"]["below_width_floor_vs_saliency_rm"]["methods"]
    assert "lowest measured latency" in ps.markdown(doc)
