"""The redistribution benchmark end to end in its quick mode (digits, one epoch, a short timing protocol)."""

from __future__ import annotations

import json

import pytest
import revit_fashion as rf

from nvit.arch import BlockSpec
from nvit.presets import preset


def _prune_results(path) -> None:
    base = preset("vit_test")
    rows = []
    for seed in (0, 1):
        for ratio, blocks in ((0.8, [(4, 16, 16, 128), (4, 8, 16, 64), (2, 8, 16, 64), (4, 16, 16, 192)]),
                              (0.5, [(2, 8, 16, 64), (2, 8, 8, 32), (2, 8, 8, 32), (2, 8, 16, 128)])):
            spec = base.with_blocks(tuple(BlockSpec(*b) for b in blocks))
            rows.append({"method": "latency_l3", "seed": seed, "target_ratio": ratio, "arch": spec.to_dict(),
                         "val_after": 0.8 + 0.01 * seed, "test_after": None, "measured_ms": 0.1})
    rows.append({**rows[0], "method": "saliency"})
    doc = {"kind": "nvit.benchmark.prune_fashion", "chosen_lambda": 3.0, "base": {"arch": base.to_dict()},
           "rows": rows}
    path.write_text(json.dumps(doc))


def test_quick_run_trains_scales_measures_and_reports(tmp_path, monkeypatch, capsys) -> None:
    prune, work, out = tmp_path / "prune.json", tmp_path / "work", tmp_path / "revit.json"
    _prune_results(prune)
    common = ["--quick", "--prune-results", str(prune), "--work", str(work), "--out", str(out)]
    rf.main(["all", *common])
    doc = json.loads(out.read_text())
    assert doc["kind"] == "nvit.benchmark.revit_fashion" and doc["split"] == "val"
    assert set(doc["designs"]) == {"uniform", "published", "learned", "pruned"}
    scale = json.loads((work / "scale.json").read_text())
    for name in rf.DESIGNS:
        d = doc["designs"][name]
        assert d["embed_dim"] in (16, 32, 48, 64) and d["embed_dim"] == scale["chosen_embed"][name]
        assert len(d["top1"]) == 2 and 0 <= d["mean"]["mean"] <= 1 and d["measured_ms"] > 0
        cands = {int(k.split("/")[1]): v for k, v in scale["measured_ms"].items() if k.startswith(f"{name}/")}
        gaps = {e: abs(v - scale["target_ms"]) for e, v in cands.items()}
        assert gaps[d["embed_dim"]] == min(gaps.values())
    assert doc["designs"]["uniform"]["vs_uniform"]["mean"] == 0.0
    assert doc["designs"]["pruned"]["top1"] == [0.8, 0.81]
    # the learned rule is the mean of the variants' shares, smoothed; published has the rule's edge heads
    assert doc["shares"]["learned"]["heads"][0] < 1.0 and doc["shares"]["published"]["heads"][0] > 3
    assert "| learned |" in capsys.readouterr().out
    assert (tmp_path / "revit_shares.png").stat().st_size > 10_000  # the family's shares and the learned rule
    # everything is cached: a rerun neither trains nor measures
    monkeypatch.setattr(rf, "train_one", lambda *a, **k: pytest.fail("retrained"))
    monkeypatch.setattr(rf, "measure", lambda *a, **k: pytest.fail("remeasured"))
    rf.main(["all", *common])
