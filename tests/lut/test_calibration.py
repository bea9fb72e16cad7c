"""The calibration from parts to whole models: it follows the model's composition (depth, removed sub-layers),
it never predicts ≤ 0 for any architecture of the table's space, a stored calibration that would is refused,
and an impossible target is refused up front."""

from __future__ import annotations

import itertools
import time
from dataclasses import replace

import lut_fakes as fk
import numpy as np
import pytest
import torch
from cli_run import run_cli

from nvit.arch import ArchSpec, BlockSpec, save_arch
from nvit.lut.calibration import PART_FLOOR_FRACTION, fit_calibration
from nvit.lut.predictor import LatencyPredictor
from nvit.lut.table import LatencyTable
from nvit.models import build_model
from nvit.presets import preset
from nvit.profiler.sampling import calibration_archs
from nvit.profiler.selfcheck import check_archs

BASE = preset("vit_test")


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> LatencyTable:
    """A fake table that measured one-half blocks, uncalibrated (each test calibrates it its own way)."""
    from nvit.profiler.sweep import SweepOptions, run_sweep

    path = tmp_path_factory.mktemp("cal") / "t.parquet"
    with fk.FakeBackend() as backend:
        return run_sweep(fk.tiny_space(half_blocks_per_embed=2), backend, path, device=fk.fake_device(),
                         options=SweepOptions(calibration_models=0)).table


def space_extremes(p: LatencyPredictor) -> list[ArchSpec]:
    """Every architecture at the edges of the table's space: smallest and largest embedding width; blocks all
    smallest, all largest, attention-only or MLP-only at either end; one block up to the base's depth."""
    g = p.grid
    small = BlockSpec(g.smallest("heads"), g.smallest("qk_dim"), g.smallest("v_dim"), g.smallest("mlp_dim"))
    large = BlockSpec(g.largest("heads"), g.largest("qk_dim"), g.largest("v_dim"), g.largest("mlp_dim"))
    shapes = [small, large, small.without_mlp(), large.without_mlp(), small.without_attn(), large.without_attn()]
    out = []
    for e, shape, depth in itertools.product((g.smallest("embed_dim"), g.largest("embed_dim")), shapes,
                                             range(1, BASE.depth + 1)):
        blocks = (shape,) * depth if shape.has_attn else (small,) + (shape,) * (depth - 1)  # keep one attention
        out.append(replace(BASE, embed_dim=e, blocks=blocks))
    return out


def with_calibration(table: LatencyTable, **fields) -> LatencyTable:
    record = {"method": "offset", "scale": 1.0, "offset_ms": 0.0, "per_block_ms": 0.0, "models": [],
              "residual_pct_max_abs": 0.0, **fields}
    return table.with_meta(calibration=record)


def test_a_large_negative_offset_is_refused_and_the_parts_predict(table) -> None:
    raw = LatencyPredictor(table, calibrated=False)
    bad = LatencyPredictor(with_calibration(table, offset_ms=-0.5))  # larger than the smallest models
    assert bad.calibration_refused and "offset -0.5000 ms" in bad.calibration_refused and not bad.calibrated
    for spec in space_extremes(bad):
        assert bad.predict_ms(spec) == pytest.approx(raw.predict_ms(spec), rel=1e-12) and bad.predict_ms(spec) > 0
    per_block = LatencyPredictor(with_calibration(table, per_block_ms=-0.05))
    assert per_block.calibration_refused and "per-block" in per_block.calibration_refused


def test_a_fit_that_asks_for_too_much_is_bounded_and_every_prediction_stays_positive(table) -> None:
    """Whole models measured far below their parts (a noisy moment): the fit is held at the floor, says so,
    and no architecture of the space goes near zero."""
    raw = LatencyPredictor(table, calibrated=False)
    archs = calibration_archs(BASE, 6, seed=3, removed=True)
    floors = raw.floors_for(archs)
    comps = [raw.composition(a, floors) for a in archs]
    measured = [0.3 * c.raw_ms - 0.004 * c.blocks for c in comps]  # 70% below the parts, more for deep models
    record = fit_calibration([a.name for a in archs], measured, [c.raw_ms for c in comps], compositions=comps,
                             floors=floors)
    assert record.bounded and record.verdict == "implausible"
    assert any("less than 50% of its own time" in r for r in record.reasons)
    p = LatencyPredictor(table.with_meta(calibration=record))
    assert p.calibration_refused is None and p.calibrated
    for spec in space_extremes(p):
        # every part keeps at least half its scaled raw price
        assert p.predict_ms(spec) >= PART_FLOOR_FRACTION * p.scale * raw.predict_ms(spec) * (1 - 1e-9) > 0


def test_the_calibration_follows_depth_and_removed_sublayers_on_held_out_models(table) -> None:
    """Whole models that pay each part's own overhead once, not once per part: a per-block term and the offset
    recover it, judged on held-out models of other depths and removed sub-layers; one offset cannot."""
    raw = LatencyPredictor(table, calibrated=False)
    per_part_ms = 0.003

    def whole_ms(spec: ArchSpec) -> float:  # each block's own graph overhead is not paid inside the model
        return 1.02 * raw.predict_ms(spec) - per_part_ms * (spec.depth + 1) + 0.001

    archs = calibration_archs(BASE, 6, seed=3, removed=True)
    assert len({a.depth for a in archs}) > 1
    floors = raw.floors_for(archs)
    comps = [raw.composition(a, floors) for a in archs]
    record = fit_calibration([a.name for a in archs], [whole_ms(a) for a in archs], [c.raw_ms for c in comps],
                             compositions=comps, floors=floors)
    assert record.method == "scale_offset_per_block" and record.verdict == "plausible"
    assert record.per_block_ms == pytest.approx(-1.02 * 0 - per_part_ms, rel=1e-6)
    offset_only = fit_calibration([a.name for a in archs], [whole_ms(a) for a in archs], [c.raw_ms for c in comps],
                                  floors=floors)
    p = LatencyPredictor(table.with_meta(calibration=record))
    q = LatencyPredictor(table.with_meta(calibration=offset_only))
    held_out = check_archs(BASE, 8, seed=11, removed=True)
    assert len({a.depth for a in held_out}) > 1 and any(sum(a.removed_sublayers.values()) for a in held_out)
    errors = [abs(p.predict_ms(a) / whole_ms(a) - 1) for a in held_out]
    errors_offset = [abs(q.predict_ms(a) / whole_ms(a) - 1) for a in held_out]
    # exact wherever every part is at least the smallest the fit saw; a model with a part below that takes a
    # proportionally smaller correction for it (what keeps extrapolated widths positive): still within 0.5%
    assert np.median(errors) < 1e-9 and max(errors) < 0.005 and max(errors_offset) > 0.01


def test_lut_show_prints_the_calibration_verdict(table, tmp_path, capsys) -> None:
    good = tmp_path / "good.parquet"
    with_calibration(table, offset_ms=-0.001, verdict="plausible", reasons=[]).save(good)
    code, out, _ = run_cli(["lut", "show", str(good)], capsys)
    assert code == 0 and "calibration plausible" in out
    bad = tmp_path / "bad.parquet"
    with_calibration(table, offset_ms=-0.5).save(bad)
    code, out, _ = run_cli(["lut", "show", str(bad)], capsys)
    assert code == 0 and "calibration refused" in " ".join(out.split()) and "re-profile" in out


def test_an_impossible_target_is_refused_up_front_with_the_smallest_reachable_latency(table, tmp_path,
                                                                                       capsys) -> None:
    lut = tmp_path / "noisy.parquet"
    with_calibration(table, offset_ms=-0.5).save(lut)  # a noisy table's offset: would predict below zero
    torch.save(build_model(BASE, seed=0).state_dict(), tmp_path / "base.pth")
    arch = save_arch(BASE, tmp_path / "base.json")
    out = tmp_path / "pr_1us"
    started = time.perf_counter()
    code, _, err = run_cli(["prune", "--checkpoint", str(tmp_path / "base.pth"), "--arch", str(arch), "--lut",
                            str(lut), "--data", "digits", "--target-latency", "1us", "--no-eval", "--out", str(out)],
                           capsys)
    assert time.perf_counter() - started < 10
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "smallest reachable predicted latency" in err
    smallest = float(err.split("smallest reachable predicted latency ")[1].split()[0])
    assert smallest > 0.001
    assert not out.exists() or not any(out.iterdir())


def test_an_uncalibrated_fit_record_round_trips_its_forms() -> None:
    record = fit_calibration(["a", "b", "c"], [2.1, 4.2, 8.4], [2.0, 4.0, 8.0])
    assert record.method == "scale_offset" and set(record.forms) == {"offset", "scale_offset"}
    assert record.verdict == "plausible" and np.isclose(record.loo_pct_mean_abs, 0.0)
