"""The LUT predictor: exact on grid points, exact for multilinear latencies, accurate for smooth ones,
fast ΔLat equal to finite differences, and calibration fitted on whole models."""

from __future__ import annotations

import time
from dataclasses import replace

import lut_fakes as fk
import numpy as np
import pytest

from nvit.arch import BlockSpec, WidthSteps
from nvit.errors import LutError
from nvit.lut.base import Predictor
from nvit.lut.predictor import GridInterpolator, LatencyPredictor, fit_calibration
from nvit.lut.table import LatencyTable, LutMeta, rows_from_records
from nvit.presets import preset
from nvit.profiler.selfcheck import calibrate
from nvit.profiler.space import SearchSpace, calibration_archs, random_arch
from nvit.profiler.sweep import SweepOptions, run_sweep
from nvit.vocab import PartConfig, PartKind


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> LatencyTable:
    path = tmp_path_factory.mktemp("pred") / "tiny.parquet"
    with fk.FakeBackend() as backend:
        return run_sweep(fk.tiny_space(), backend, path, device=fk.fake_device(),
                         options=SweepOptions(calibration_models=3)).table


def synthetic_table(space: SearchSpace, latency_of) -> LatencyTable:
    """A table whose rows are ``latency_of(config)``, without any sweep."""
    records = []
    for i, c in enumerate(space.configs()):
        records.append({**c.to_dict(), **fk.stats(latency_of(c)).as_dict(), "sentinel_drift": 0.0,
                        "sweep_index": i, "profile_seconds": 0.0, "measured_at": "2026-01-01T00:00:00+00:00"})
    meta = LutMeta(backend="synthetic", device_kind="cpu", precision="fp32", batch_size=1,
                   num_tokens=space.num_tokens, base_arch=space.base.to_dict(), device_identity={"kind": "cpu"})
    return LatencyTable(rows_from_records(records), meta)


def random_specs(base, n: int, seed: int, **kwargs):
    rng = np.random.default_rng(seed)
    return [random_arch(base, rng, **kwargs) for _ in range(n)]


def test_grid_interpolator_exact_on_points_linear_beyond_constant_on_single_axes() -> None:
    xs, ys = np.array([1.0, 2.0, 4.0]), np.array([10.0, 20.0])
    values = np.array([[1.0, 2.0], [3.0, 5.0], [4.0, 9.0]])
    f = GridInterpolator([xs, ys], values)
    for i, x in enumerate(xs):
        for j, y in enumerate(ys):
            assert f(x, y) == values[i, j]
    assert f(1.5, 10.0) == pytest.approx(2.0)
    assert f(1.5, 15.0) == pytest.approx((1 + 2 + 3 + 5) / 4)
    assert f(8.0, 10.0) == pytest.approx(6.0)  # linear beyond the last cell: 3 + (4-3)/(4-2)*(8-2)
    assert f(0.0, 10.0) == pytest.approx(-1.0)
    g = GridInterpolator([np.array([5.0]), ys], np.array([[1.0, 3.0]]))
    assert g(100.0, 15.0) == pytest.approx(2.0) and g(-3.0, 10.0) == pytest.approx(1.0)
    vec = f(np.array([1.0, 4.0]), np.array([20.0, 10.0]))
    np.testing.assert_array_equal(vec, [2.0, 4.0])
    with pytest.raises(LutError, match="do not match"):
        GridInterpolator([xs, ys], values.T)


def test_exact_on_every_measured_point(table) -> None:
    p = LatencyPredictor(table)
    for r in table.of_kind(PartKind.ATTN).itertuples():
        assert p.attn_ms(r.embed_dim, r.heads, r.qk_dim, r.v_dim) == pytest.approx(r.latency_ms_median, rel=1e-12)
    for r in table.of_kind(PartKind.MLP).itertuples():
        assert p.mlp_ms(r.embed_dim, r.mlp_dim) == pytest.approx(r.latency_ms_median, rel=1e-12)
    for r in table.of_kind(PartKind.FIXED).itertuples():
        assert p.fixed_ms(r.embed_dim) == pytest.approx(p.scale * r.latency_ms_median, rel=1e-12)
    for r in table.of_kind(PartKind.BLOCK).itertuples():
        block = BlockSpec(r.heads, r.qk_dim, r.v_dim, r.mlp_dim)
        assert p.block_latency_ms(r.embed_dim, block) == pytest.approx(p.scale * r.latency_ms_median, rel=1e-12)


def test_interaction_and_calibration_are_recovered(table) -> None:
    p = LatencyPredictor(table)
    assert p.interaction.method == "affine" and p.interaction.blocks == 4
    assert p.interaction.slope == pytest.approx(fk.RATIO)  # the fake's blocks are RATIO x their halves
    assert p.interaction.overhead_ms == pytest.approx(0.0, abs=1e-12)
    assert p.interaction.overhead_ms_per_embed == pytest.approx(0.0, abs=1e-12)
    assert p.scale == pytest.approx(fk.SCALE) and p.offset_ms() == pytest.approx(fk.OFFSET_MS)
    raw = LatencyPredictor(table, calibrated=False)
    assert raw.scale == 1.0 and raw.offset_ms() == 0.0 and not raw.calibrated


def test_block_interaction_follows_block_size() -> None:
    """Blocks cost slope x halves plus an overhead linear in e: recovered exactly; too few or same-sized
    blocks fall back to the mean ratio; the floor keeps a tiny block positive."""
    from nvit.lut.interaction import BlockInteraction

    rng = np.random.default_rng(0)
    e = rng.choice([64.0, 128.0, 192.0], 12)
    halves = rng.uniform(0.05, 1.0, 12)
    measured = 1.04 * halves - 0.003 - 5e-5 * e
    fit = BlockInteraction.fit(e, halves, measured)
    assert fit.method == "affine" and fit.slope == pytest.approx(1.04)
    assert fit.overhead_ms == pytest.approx(-0.003) and fit.overhead_ms_per_embed == pytest.approx(-5e-5)
    assert fit.residual_pct_mean_abs == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_allclose(fit(e, halves), measured)
    # a narrow block's overhead is a larger share: one ratio would miss it
    ratio = BlockInteraction.fit(e[:3], halves[:3], measured[:3])
    assert ratio.method == "ratio" and ratio.slope == pytest.approx(np.mean(measured[:3] / halves[:3]))
    same = BlockInteraction.fit(e, np.full(12, 0.5), np.full(12, 0.45))
    assert same.method == "ratio" and same.slope == pytest.approx(0.9)
    assert BlockInteraction.fit(e[:0], halves[:0], measured[:0]).slope == 1.0
    assert fit(192.0, 1e-4) == pytest.approx(0.5e-4)  # floored at half the halves


def test_multilinear_latency_is_reproduced_anywhere_even_beyond_the_grid(table) -> None:
    """The fake's halves are multilinear in the widths, so interpolation is exact, inside and outside (the
    parts; whole specs far beyond the grid are refused by the guard, tests/lut/test_grid_guard.py)."""
    p = LatencyPredictor(table)
    base = preset("vit_test")
    for spec in random_specs(base, 10, seed=0):
        assert p.predict_ms(spec) == pytest.approx(fk.model_ms(spec), rel=1e-9)
        expected = [fk.SCALE * fk.block_ms(spec.embed_dim, b.heads, b.qk_dim, b.v_dim, b.mlp_dim) for b in spec.blocks]
        assert p.block_latencies_ms(spec) == pytest.approx(expected, rel=1e-9)
    for spec in random_specs(base, 5, seed=1, low=0.1, high=2.0, align=4):
        widths = [np.array([getattr(b, f) for b in spec.blocks]) for f in ("heads", "qk_dim", "v_dim", "mlp_dim")]
        blocks = p.blocks_ms(spec.embed_dim, *widths)
        total = float(blocks.sum()) + p.fixed_latency_ms(spec.embed_dim) + p.offset_ms()
        assert total == pytest.approx(fk.model_ms(spec), rel=1e-9)


def _smooth_attn(c) -> float:
    """Latency with efficiency rising with size (not multilinear): work / (1 + 2000 / work) + overhead."""
    work = c.embed_dim * c.heads * (2 * c.qk_dim + c.v_dim) + 17 * c.heads * (c.qk_dim + c.v_dim) * 4
    return 0.01 + 1e-6 * work ** 1.1 / (1 + 3e3 / work)


def _smooth_mlp(c) -> float:
    work = c.embed_dim * c.mlp_dim
    return 0.005 + 1e-6 * work ** 1.1 / (1 + 3e3 / work)


def _smooth(c) -> float:
    if c.kind is PartKind.ATTN:
        return _smooth_attn(c)
    if c.kind is PartKind.MLP:
        return _smooth_mlp(c)
    if c.kind is PartKind.FIXED:
        return 0.02 + 1e-4 * c.embed_dim
    if c.kind is PartKind.ATTN_BLOCK:
        return _smooth_attn(replace(c, kind=PartKind.ATTN))
    if c.kind is PartKind.MLP_BLOCK:
        return _smooth_mlp(replace(c, kind=PartKind.MLP))
    attn = replace(c, kind=PartKind.ATTN, mlp_dim=0)
    mlp = replace(c, kind=PartKind.MLP, heads=0, qk_dim=0, v_dim=0)
    return 0.9 * (_smooth_attn(attn) + _smooth_mlp(mlp))


def test_smooth_separable_latency_is_interpolated_within_two_percent() -> None:
    space = SearchSpace(base=preset("deit_small"), embed_dims=(64, 128, 192, 256, 320, 384), heads=(1, 2, 3, 4, 5, 6),
                        qk_dims=(8, 16, 32, 64), v_dims=(8, 16, 32, 64), mlp_dims=(128, 320, 576, 832, 1088, 1536),
                        blocks_per_embed=1)
    p = LatencyPredictor(synthetic_table(space, _smooth))
    errors = []
    for spec in random_specs(space.base, 20, seed=3):
        for b in spec.blocks:
            c = PartConfig(PartKind.BLOCK, spec.embed_dim, b.heads, b.qk_dim, b.v_dim, b.mlp_dim)
            errors.append(p.block_latency_ms(spec.embed_dim, b) / _smooth(c) - 1)
    assert np.max(np.abs(errors)) < 0.02
    # Beyond the grid: positive, and growing with every width.
    small, big = BlockSpec(1, 4, 4, 32), BlockSpec(8, 96, 96, 2048)
    assert 0 <= p.block_latency_ms(32, small) < p.block_latency_ms(64, BlockSpec(1, 8, 8, 128))
    assert p.block_latency_ms(512, big) > p.block_latency_ms(384, BlockSpec(6, 64, 64, 1536))


def test_delta_ms_equals_the_finite_difference_definition(table) -> None:
    p = LatencyPredictor(table)
    base = preset("vit_test")
    at_minimum = base.with_blocks((BlockSpec(1, 8, 8, 8), BlockSpec(4, 16, 16, 256)), embed_dim=8)
    specs = [*random_specs(base, 6, seed=4), at_minimum]
    for step in (WidthSteps(), WidthSteps(embed_dim=16, heads=2, qk_dim=4, v_dim=8, mlp_dim=32)):
        for spec in specs:
            fast, slow = p.delta_ms(spec, step), Predictor.delta_ms(p, spec, step)
            for name in ("heads_ms", "qk_ms", "v_ms", "mlp_ms"):
                np.testing.assert_allclose(getattr(fast, name), getattr(slow, name), rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(fast.emb_ms, slow.emb_ms, rtol=1e-9, atol=1e-12)
    edge = p.delta_ms(specs[-1])
    assert np.isnan(edge.emb_ms) and np.isnan(edge.heads_ms[0]) and np.isnan(edge.mlp_ms[0])
    assert np.all(np.isfinite(edge.heads_ms[1:]))
    assert np.all(edge.heads_ms[1:] > 0)  # removing a head saves time


def test_delta_ms_is_faster_than_finite_differences(table) -> None:
    p = LatencyPredictor(table)
    spec = random_specs(preset("vit_test"), 1, seed=5)[0].with_blocks(
        random_specs(preset("vit_test"), 1, seed=5)[0].blocks * 3)  # 12 blocks
    reps = 30
    t0 = time.perf_counter()
    for _ in range(reps):
        p.delta_ms(spec)
    fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(reps):
        Predictor.delta_ms(p, spec)
    slow = time.perf_counter() - t0
    assert fast < slow


def test_specs_the_table_cannot_speak_for(table) -> None:
    p = LatencyPredictor(table)
    with pytest.raises(LutError, match="token count 17, but 197 is needed"):
        p.predict_ms(preset("deit_small"))
    with pytest.raises(LutError, match="num_classes=10"):
        p.delta_ms(replace(preset("vit_test"), num_classes=5))


def test_calibrate_measures_whole_models_and_recovers_the_line(table) -> None:
    bare = table.with_meta(calibration=None)
    archs = calibration_archs(preset("vit_test"), 3, seed=6)
    with fk.FakeBackend() as backend:
        calibrated = calibrate(bare, backend, archs)
        assert len(backend.calls) == 3  # the three whole models, nothing else
    cal = calibrated.meta.calibration
    assert cal.method == "scale_offset" and len(cal.models) == 3 and cal.models[0].arch
    p = LatencyPredictor(calibrated)
    assert p.scale == pytest.approx(fk.SCALE) and p.offset_ms() == pytest.approx(fk.OFFSET_MS)
    spec = random_specs(preset("vit_test"), 1, seed=7)[0]
    assert p.predict_ms(spec) == pytest.approx(fk.model_ms(spec), rel=1e-9)
    with fk.FakeBackend() as backend:
        offset_only = calibrate(bare, backend, archs, fit_scale=False).meta.calibration
    raw = LatencyPredictor(bare)
    y = np.array([fk.model_ms(a) for a in archs])
    x = np.array([raw.predict_ms(a) for a in archs])
    expected = np.sum((y - x) / y**2) / np.sum(1 / y**2)  # least squares on relative residuals
    assert offset_only.method == "offset" and offset_only.scale == 1.0
    assert offset_only.offset_ms == pytest.approx(expected)
    with fk.FakeBackend(batch_size=2) as backend, pytest.raises(LutError, match="batch size 1, but 2"):
        calibrate(bare, backend, archs)
    with fk.FakeBackend(harness={"repeats": 1}) as backend, pytest.raises(LutError, match=r"settings differ .*harness"):
        calibrate(bare, backend, archs)


def test_fit_calibration_falls_back_to_an_offset_when_a_slope_is_not_identifiable(caplog) -> None:
    one = fit_calibration(["a"], [2.0], [1.5])
    assert one.method == "offset" and one.offset_ms == pytest.approx(0.5)
    narrow = fit_calibration(["a", "b"], [2.0, 2.3], [1.9, 2.0])  # predictions within 25%
    # the offset minimising the relative residuals: sum((y - x) / y²) / sum(1 / y²)
    assert narrow.method == "offset"
    assert narrow.offset_ms == pytest.approx((0.1 / 4 + 0.3 / 2.3**2) / (1 / 4 + 1 / 2.3**2))
    wild = fit_calibration(["a", "b"], [1.0, 10.0], [1.0, 2.0])  # slope 9: not a calibration
    assert wild.method == "offset" and "implausible" in caplog.text
    line = fit_calibration(["a", "b", "c"], [2.1, 4.2, 8.4], [2.0, 4.0, 8.0])
    assert line.scale == pytest.approx(1.05) and line.offset_ms == pytest.approx(0.0, abs=1e-12)
    assert line.residual_pct_max_abs == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(LutError, match="at least one"):
        fit_calibration([], [], [])
    with pytest.raises(LutError, match="finite and positive"):
        fit_calibration(["a"], [-1.0], [1.0])


def test_the_benchmarks_run_end_to_end_with_a_fake_backend(tmp_path, monkeypatch) -> None:
    """The issue's benchmark scripts, on a tiny space and the fake backend: the oracle makes every
    LUT prediction exact, and the FLOPs baseline is not."""
    import json

    from nvit.profiler.space import save_space

    fk.register_fake(monkeypatch)
    import lut_end_to_end
    import lut_interpolation

    space = save_space(fk.tiny_space(embed_dims=(16, 32, 48, 64), mlp_dims=(32, 64, 128, 256)),
                       tmp_path / "space.json")
    common = ["--backend", "fake", "--space", str(space), "--work", str(tmp_path / "work")]
    assert lut_interpolation.main([*common, "--offgrid", "2", "--out", str(tmp_path / "interp.json")]) == 0
    interp = json.loads((tmp_path / "interp.json").read_text())
    assert interp["held_out_grid"]["attn"]["n"] > 0 and interp["held_out_grid"]["attn"]["max_abs_pct"] < 1e-6
    assert interp["off_grid"]["block"]["n"] == 2 and interp["off_grid"]["block"]["max_abs_pct"] < 1e-6
    assert interp["cost"]["deit_small_table_estimate_s"] >= 0
    lut = tmp_path / "work" / "lut-tiny.parquet"
    argv = ["--lut", str(lut), "--backend", "fake", "--models", "5", "--recalibrate", "3", "--model-passes", "2",
            "--out", str(tmp_path / "e2e.json")]
    assert lut_end_to_end.main(argv) == 0
    e2e = json.loads((tmp_path / "e2e.json").read_text())
    lut_result, flops = e2e["results"]["lut_table_calibration"], e2e["results"]["flops_proportional"]
    assert lut_result["n"] == 5 and lut_result["mape_pct"] < 1e-6 and lut_result["kendall_tau"] == pytest.approx(1.0)
    assert e2e["results"]["lut_fresh_calibration"]["mape_pct"] < 1e-6
    assert flops["mape_pct"] > 1.0
    assert all(len(m["pass_ms"]) == 2 for m in e2e["models"])
