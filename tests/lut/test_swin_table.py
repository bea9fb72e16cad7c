"""Swin latency tables: the per-stage space, profiling (resumable), the folder on disk, and the predictor
checked against the fake device's truth (:mod:`swin_fakes`) on Swins it never measured."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from lut_fakes import FakeBackend, Killed, fake_device, tiny_table
from swin_fakes import swin_ms, swin_space, swin_table

from nvit.errors import LutError, SpecError
from nvit.lut import load_predictor, load_table
from nvit.lut.swin_table import SwinLatencyPredictor, SwinLatencyTable
from nvit.presets import preset
from nvit.profiler.sweep import SweepOptions
from nvit.profiler.swin_space import SwinSearchSpace, random_swin, swin_check_archs, uniform_swin
from nvit.profiler.swin_sweep import run_swin_sweep
from nvit.swin import swin_preset


def test_a_swin_space_has_one_grid_per_stage_at_its_widths_and_round_trips() -> None:
    space = swin_space()
    base = swin_preset("swin_test")
    assert len(space.stages) == 2
    for grid, stage in zip(space.stages, base.stages, strict=True):
        assert grid.embed_dims[-1] == stage.embed_dim and grid.embed_dims[0] == 8
        assert grid.heads[-1] == stage.blocks[0].heads and grid.mlp_dims[-1] == stage.blocks[0].mlp_dim
    parts = space.configs()
    assert len({p.key for p in parts}) == len(parts)  # stage-qualified keys are unique
    assert {p.stage for p in parts} == {0, 1} and sum(space.counts().values()) == len(parts)
    assert SwinSearchSpace.from_dict(json.loads(json.dumps(space.to_dict()))) == space
    narrow = dataclasses.replace(space.stages[1], embed_dims=(8, 16))
    with pytest.raises(SpecError, match="base's embedding width 64"):
        dataclasses.replace(space, stages=(space.stages[0], narrow))


def test_a_swin_table_predicts_swins_it_never_measured(tmp_path) -> None:
    path = swin_table(tmp_path / "t.swinlut")
    assert sorted(p.name for p in path.iterdir()) == ["stage0.parquet", "stage1.parquet", "swin_table.json"]
    table = load_table(path)
    assert isinstance(table, SwinLatencyTable) and [t.meta.num_tokens for t in table.stages] == [64, 16]
    predictor = load_predictor(path)
    assert isinstance(predictor, SwinLatencyPredictor) and predictor.calibrated
    rng = np.random.default_rng(7)
    space = swin_space()
    shapes = [random_swin(space, rng, low=0.2) for _ in range(12)] + [uniform_swin(space, 0.5), space.base]
    errors = np.array([predictor.predict_ms(s) / swin_ms(s) - 1 for s in shapes])
    # the skeleton's merging terms are priced as separate changes: the only error left on the fake device
    assert np.max(np.abs(errors)) < 0.03, errors
    assert table.meta.self_check.n == 4 and table.meta.self_check.mape_pct < 3.0
    assert predictor.predict_ms(uniform_swin(space, 0.5)) < predictor.predict_ms(space.base)
    uncalibrated = SwinLatencyPredictor(table, calibrated=False)
    assert abs(uncalibrated.predict_ms(space.base) / predictor.predict_ms(space.base) - 1) > 0.01


def test_a_swin_sweep_resumes_after_a_kill_to_the_same_table(tmp_path) -> None:
    space = swin_space()
    options = SweepOptions(calibration_models=3, check_models=2)
    with FakeBackend(kill_after=150) as backend, pytest.raises(Killed):
        run_swin_sweep(space, backend, tmp_path / "a.swinlut", device=fake_device(), options=options)
    assert not (tmp_path / "a.swinlut").exists()  # nothing that looks complete
    with FakeBackend() as backend:
        resumed = run_swin_sweep(space, backend, tmp_path / "a.swinlut", device=fake_device(), options=options)
        assert resumed.resumed >= 140 and len(backend.calls) < len(space.configs())
    with FakeBackend() as backend:
        whole = run_swin_sweep(space, backend, tmp_path / "b.swinlut", device=fake_device(), options=options)
    for a, b in zip(resumed.table.stages, whole.table.stages, strict=True):
        assert a.rows["latency_ms_median"].tolist() == b.rows["latency_ms_median"].tolist()
    with FakeBackend() as backend:
        again = run_swin_sweep(space, backend, tmp_path / "a.swinlut", device=fake_device(), options=options)
    assert again.already_complete and not backend.calls


def test_a_swin_table_refuses_edits_vits_and_other_geometries(tmp_path) -> None:
    path = swin_table(tmp_path / "t.swinlut", calibration_models=2, check_models=0)
    predictor = load_predictor(path)
    with pytest.raises(LutError, match="not a Swin"):
        predictor.predict_ms(preset("vit_test"))
    with pytest.raises(LutError, match="img_size=8"):
        predictor.predict_ms(dataclasses.replace(swin_preset("swin_test"), img_size=16))
    wide = swin_check_archs(swin_space(), 1)[0]
    stages = (wide.stages[0], dataclasses.replace(wide.stages[1], embed_dim=4096))
    with pytest.raises(LutError, match=r"stage 1 .* far outside"):
        predictor.predict_ms(dataclasses.replace(wide, stages=stages))
    with pytest.raises(LutError, match="is not a Swin latency table"):
        SwinLatencyTable.load(tiny_table(tmp_path / "vit.parquet"))
    stage = path / "stage1.parquet"
    stage.write_bytes(stage.read_bytes() + b"\0")
    with pytest.raises(LutError, match=r"does not match swin_table\.json"):
        load_table(path)


def test_onnx_runtime_profiles_a_tiny_swin_space(tmp_path) -> None:
    """The real path: every Swin part (window attention with its bias, MLP, blocks, one-half blocks, the skeleton
    with no blocks) and whole Swins exported to ONNX and timed by ONNX Runtime on the CPU."""
    from nvit.profiler.base import get_backend
    from nvit.profiler.harness import HarnessConfig
    from nvit.profiler.swin_space import SwinStageGrid
    from nvit.vocab import DeviceKind, Precision

    base = swin_preset("swin_test")
    grids = tuple(SwinStageGrid(embed_dims=(16, s.embed_dim), heads=(s.blocks[0].heads,), qk_dims=(16,),
                                v_dims=(16,), mlp_dims=(32, s.blocks[0].mlp_dim), blocks_per_embed=1,
                                half_blocks_per_embed=1, narrow_blocks=False) for s in base.stages)
    space = SwinSearchSpace(base=base, stages=grids, name="tiny-swin")
    fast = HarnessConfig(warmup_s=0.0, rewarm_s=0.0, min_samples=3, max_samples=5, time_cap_s=0.05, repeats=1)
    with get_backend("onnxruntime")(device=DeviceKind.CPU, precision=Precision.FP32, batch_size=1, harness=fast,
                                    intra_op_threads=1) as backend:
        result = run_swin_sweep(space, backend, tmp_path / "t.swinlut", device=fake_device(),
                                options=SweepOptions(calibration_models=2, check_models=2, sentinel_every=10))
    table = result.table
    assert [t.meta.num_tokens for t in table.stages] == [64, 16] and len(table) == len(space.configs())
    assert all((t.rows["latency_ms_median"] > 0).all() for t in table.stages)
    assert table.meta.backend == "onnxruntime" and table.meta.self_check.n == 2
    predictor = load_predictor(tmp_path / "t.swinlut")
    for spec in (base, uniform_swin(space, 0.5)):  # timings are this machine's: only their sanity is tested here
        assert 0 < predictor.predict_ms(spec) < 10 * table.meta.calibration.models[0].measured_ms
