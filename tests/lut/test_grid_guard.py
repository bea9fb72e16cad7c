"""The extrapolation guard: a spec inside the measured grid, at its edge, one step outside (warned) and far
outside (refused), per axis, through the predictor API and ``nvit predict``."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import lut_fakes as fk
import pytest
from cli_run import run_cli

from nvit.arch import ArchSpec, BlockSpec
from nvit.errors import LutError
from nvit.lut.coverage import GridStatus, MeasuredGrid
from nvit.lut.predictor import LatencyPredictor
from nvit.presets import preset
from nvit.profiler.sweep import SweepOptions, run_sweep

# vit_test is e=64, 4 heads, q=v=16, m=256; this grid stops one MLP step (64) below the base's 256.
GRID = dict(embed_dims=(32, 64), heads=(2, 4), qk_dims=(8, 16), v_dims=(8, 16), mlp_dims=(64, 128, 192))


@pytest.fixture(scope="module")
def lut_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("guard") / "guard.parquet"
    with fk.FakeBackend() as backend:
        run_sweep(fk.tiny_space(**GRID), backend, path, device=fk.fake_device(),
                  options=SweepOptions(calibration_models=0))
    return path


@pytest.fixture(scope="module")
def predictor(lut_path) -> LatencyPredictor:
    from nvit.lut import load_predictor

    return load_predictor(lut_path)


def spec(e: int = 64, heads: int = 4, q: int = 16, v: int = 16, m: int = 128, **last: int) -> ArchSpec:
    """vit_test at the given widths; ``last`` overrides the last block's widths (a non-uniform spec)."""
    base = preset("vit_test")
    block = BlockSpec(heads=heads, qk_dim=q, v_dim=v, mlp_dim=m)
    blocks = [block] * (base.depth - 1) + [replace(block, **last)]
    return replace(base, embed_dim=e, blocks=tuple(blocks), name="probe")


def test_grid_holds_the_measured_values_and_the_base(predictor) -> None:
    grid = predictor.grid
    assert grid.to_dict() == {"embed_dim": [32, 64], "heads": [2, 4], "qk_dim": [8, 16], "v_dim": [8, 16],
                              "mlp_dim": [64, 128, 192]}
    assert grid.smallest("mlp_dim") == 64 and grid.largest("mlp_dim") == 192
    assert grid.axis("mlp_dim").base_max == 256 and grid.axis("embed_dim").base_max == 64
    with pytest.raises(KeyError):
        grid.values("depth")


def test_inside_and_at_the_edge_are_silent(predictor, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        inside = predictor.grid_report(spec(e=48, heads=3, q=8, v=16, m=100))
        edge = predictor.grid_report(spec(e=32, heads=2, q=8, v=8, m=64, mlp_dim=192))
        predictor.predict_ms(spec(m=192))
    assert inside.status is GridStatus.INSIDE and edge.status is GridStatus.INSIDE
    assert all(x.steps_below == 0 and x.steps_above == 0 for x in edge.extents)
    assert not caplog.records


def test_one_step_outside_is_predicted_with_a_warning_per_axis(lut_path, caplog) -> None:
    from nvit.lut import load_predictor

    p = load_predictor(lut_path)  # a fresh predictor: warnings are given once per axis and direction
    above = spec(mlp_dim=256)  # one MLP block a whole step (64) above the largest measured 192 (= the base's)
    below = spec(m=32, heads=1)  # half an MLP step below 64, one head step below 2
    r_above, r_below = p.grid_report(above), p.grid_report(below)
    assert r_above.status is GridStatus.OUTSIDE
    assert r_above.axis("mlp_dim").steps_above == pytest.approx(1.0)
    assert r_above.axis("mlp_dim").spec_min == 128 and r_above.axis("mlp_dim").spec_max == 256
    assert [x.axis for x in r_above.outside()] == ["mlp_dim"]
    assert r_below.axis("mlp_dim").steps_below == pytest.approx(0.5)
    assert r_below.axis("heads").steps_below == pytest.approx(0.5)  # (2 - 1) / (4 - 2)
    with caplog.at_level(logging.WARNING, logger="nvit.lut.predictor"):
        for _ in range(3):
            assert p.predict_ms(above) > p.predict_ms(spec())
        p.predict_ms(below)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3  # mlp above, mlp below, heads below: each once
    assert any("mlp_dim 256 is 1 grid step(s) above the largest measured 192" in m for m in messages)
    assert any("heads 1 is 0.5 grid step(s) below the smallest measured 2" in m for m in messages)


def test_more_than_one_step_or_above_the_base_is_refused(predictor) -> None:
    # 1.5 MLP steps above the grid (but not above the base's 256? 288 is: both reasons are named)
    with pytest.raises(LutError, match=r"mlp_dim 288 is 1.5 grid step\(s\) above the largest measured 192"):
        predictor.predict_ms(spec(mlp_dim=288))
    # inside one grid step of e (step 32) but above the base model's 64
    with pytest.raises(LutError, match="embed_dim 72 is above the base model's 64"):
        predictor.predict_ms(spec(e=72))
    with pytest.raises(LutError, match="heads 5 is above the base model's 4"):
        predictor.delta_ms(spec(heads=5))
    # absurd: an embedding width of 10^12
    with pytest.raises(LutError, match="far outside the latency table's measured grid"):
        predictor.block_latencies_ms(spec(e=10**12))
    report = predictor.grid_report(spec(e=10**12))  # the report itself never raises
    assert report.status is GridStatus.FAR
    assert report.axis("embed_dim").steps_above == pytest.approx((10**12 - 64) / 32)


def test_grid_from_values_for_pruning_minimums() -> None:
    base = preset("deit_tiny")
    grid = MeasuredGrid.from_values({"mlp_dim": [96, 768, 288], "heads": [1, 2, 3]}, base)
    assert grid.values("mlp_dim") == (96, 288, 768) and grid.smallest("heads") == 1
    assert grid.axis("mlp_dim").base_max == 768
    with pytest.raises(LutError, match="unknown grid axis"):
        MeasuredGrid.from_values({"depth": [1]})


def test_predict_cli_shows_the_grid_and_refuses_far_outside(lut_path, tmp_path, capsys) -> None:
    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps(spec(m=32).to_dict()))
    code, out, err = run_cli(["predict", "--lut", str(lut_path), "--arch", str(arch), "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["grid"]["status"] == "outside"
    assert doc["grid"]["axes"]["mlp_dim"]["steps_below"] == pytest.approx(0.5)
    assert doc["grid"]["axes"]["embed_dim"]["status"] == "inside"
    code, out, err = run_cli(["predict", "--lut", str(lut_path), "--arch", str(arch)], capsys)
    assert code == 0, err
    assert "outside the measured grid" in out and "mlp_dim 32 is 0.5 grid step" in out
    arch.write_text(json.dumps(spec(e=10**12).to_dict()))
    code, out, err = run_cli(["predict", "--lut", str(lut_path), "--arch", str(arch)], capsys)
    assert code != 0
    assert "far outside the latency table's measured grid" in err
    assert "Traceback" not in out + err
