"""The published-Swin benchmark's pieces on the fake device: its coarse spaces keep what the table needs, the
halved models meet their targets, and the report joins the table, the halvings and a measuring session."""

from __future__ import annotations

import json
from types import SimpleNamespace

import swin_published as sp
from swin_fakes import swin_ms, swin_table

from nvit.lut import load_table, predictor_for
from nvit.profiler.swin_space import derived_swin_space
from nvit.swin import swin_preset


def test_thinned_keeps_the_ends_and_every_other_width() -> None:
    assert sp.thinned((8, 16, 24, 32, 40)) == (8, 24, 40)
    assert sp.thinned((8, 16, 24, 32)) == (8, 24, 32)
    assert sp.thinned((96,)) == (96,)


def test_coarse_spaces_keep_each_stage_dense_width_and_are_smaller() -> None:
    for name in sp.FAMILIES:
        base = swin_preset(name)
        coarse, derived = sp.coarse_space(name), derived_swin_space(base)
        assert len(coarse.configs()) < 0.5 * len(derived.configs())
        for grid, full, stage in zip(coarse.stages, derived.stages, base.stages, strict=True):
            assert stage.embed_dim == grid.embed_dims[-1] and grid.embed_dims[0] == full.embed_dims[0]
            assert grid.mlp_dims[-1] == full.mlp_dims[-1] and grid.heads[-1] == full.heads[-1]


def test_report_joins_table_halvings_and_measurements(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(sp, "FAMILIES", {"swin_test": ("swin_test",)})
    monkeypatch.setattr(sp, "TARGET_FRACTION", 0.8)  # the fake device's skeleton holds 2/3 of the dense Swin
    work = tmp_path / "work"
    work.mkdir()
    swin_table(work / "swin_test.swinlut")
    predictor = predictor_for(load_table(work / "swin_test.swinlut"))
    specs = sp.halved("swin_test", predictor)
    dense_ms = predictor.predict_ms(specs["dense"])
    assert predictor.predict_ms(specs["latency_half"]) <= sp.TARGET_FRACTION * dense_ms
    assert specs["flops_half"].macs() <= sp.TARGET_FRACTION * specs["dense"].macs()
    truth = {s.name: {"measured_ms": swin_ms(s), "predicted_ms": predictor.predict_ms(s), "p10_ms": swin_ms(s),
                      "p90_ms": swin_ms(s)} for s in specs.values()}
    (work / "measured.json").write_text(json.dumps({"swin_test": {"seconds": 1.0, "context": {}, "models": truth}}))
    out = tmp_path / "r.json"
    sp.report_stage(SimpleNamespace(work=work, out=out))
    doc = json.loads(out.read_text())
    row = doc["models"]["swin_test"]
    assert doc["tables"]["swin_test"]["self_check"]["mape_pct"] < 3.0
    assert abs(sum(row["stage_shares_dense"]) - 1) < 0.5  # the skeleton takes the rest
    assert row["latency_half"]["predicted_fraction"] <= sp.TARGET_FRACTION
    assert row["latency_half"]["params_M"] < row["dense"]["params_M"]
    assert abs(row["latency_half"]["measured_fraction"] - swin_ms(specs["latency_half"]) / swin_ms(specs["dense"])) \
        < 1e-9
    assert abs(row["dense"]["error_pct"]) < 3.0


def test_a_new_measuring_session_keeps_the_earlier_one(tmp_path) -> None:
    import os

    from sessions import keep_earlier_session

    path = tmp_path / "measured.json"
    assert keep_earlier_session(path) is None
    path.write_text('{"session": 1}')
    os.utime(path, (0, 0))  # 1970-01-01T00:00:00Z
    kept = keep_earlier_session(path)
    assert kept == tmp_path / "measured_19700101T000000Z.json" and not path.exists()
    assert json.loads(kept.read_text()) == {"session": 1}
    path.write_text('{"session": 2}')
    os.utime(path, (0, 0))  # the same second: a second name, nothing overwritten
    assert keep_earlier_session(path) == tmp_path / "measured_19700101T000000Z-1.json"
    assert json.loads(kept.read_text()) == {"session": 1}
