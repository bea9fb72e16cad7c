"""Targets met at measured latency: a measurer that disagrees with the table by a known factor makes pruning
go on until the variant measures within its target; resume keeps the loop's state; off is today's loop."""

from __future__ import annotations

import lut_fakes as fk
import pandas as pd
import pytest
import torch
from prune_fakes import DENSE_MS, SPEC, config, digits_batches

from nvit.arch import load_arch_file
from nvit.errors import NvitError
from nvit.lut.base import FlopsPredictor
from nvit.models import build_model, load_variant
from nvit.pruning.config import Target
from nvit.pruning.loop import prune
from nvit.pruning.measured import MeasuredTargets, TargetMeasurement

SLOWER = 1.15  # the device runs every pruned model 15% slower than the table predicts
NOISE = 0.01


class Interrupt(Exception):
    pass


class SlowDevice:
    """Measures ``SLOWER`` × the predictor's latency (its drift-corrected figure; drift ratio 1.1 applied)."""

    def __init__(self, predictor) -> None:
        self.predictor = predictor
        self.calls: list[float] = []

    def __call__(self, spec, model) -> TargetMeasurement:
        assert isinstance(model, torch.nn.Module) and model.spec == spec  # the sliced variant itself
        ms = SLOWER * self.predictor.predict_ms(spec)
        self.calls.append(ms)
        return TargetMeasurement(measured_ms=1.1 * ms, corrected_ms=ms, uncertainty_rel=NOISE, drift_ratio=1.1,
                                 seconds=0.01)


def run(out, cfg, measure: bool, **kwargs):
    predictor = FlopsPredictor(SPEC, reference_ms=DENSE_MS)
    device = SlowDevice(predictor) if measure else None
    result = prune(build_model(SPEC, seed=0), config=cfg, predictor=predictor, data=digits_batches(cfg.batch_size),
                   out_dir=out, provenance={"lut": {"kind": "flops"}}, measurer=device, **kwargs)
    return predictor, device, result


def test_the_decision_follows_the_measurement() -> None:
    figures = iter([1.2, 0.99])  # measured / target at the first and the second try

    def measurer(spec, model):
        ms = next(figures) * 1.0
        return TargetMeasurement(ms, ms, NOISE, 1.0, 0.5)

    m = MeasuredTargets(measurer, broadcast=list, is_main=True)
    first = m.measure("t", 1.0, 0.9, 0.2, 5, SPEC, None)  # predicted 0.9, measured 1.2: missed
    assert not first.save and m.correction == pytest.approx(1.2 / 0.9)
    assert m.goal_ms(1.0, 0.2) == pytest.approx(0.9 / 1.2)
    second = m.measure("t", 1.0, 0.74, 0.2, 8, SPEC, None)
    assert second.save and second.met and second.record["try"] == 2
    assert m.summary()["measurements"] == 2 and m.summary()["seconds"] == pytest.approx(1.0)
    floor = MeasuredTargets(lambda s, x: TargetMeasurement(2.0, 2.0, NOISE, 1.0, 0.1), broadcast=list, is_main=True)
    at_floor = floor.measure("t", 1.0, 0.2, 0.2, 3, SPEC, None)  # cannot prune further: saved, said missed
    assert at_floor.save and not at_floor.met and at_floor.record["stopped_by"].startswith("the table's smallest")
    restored = MeasuredTargets(None, broadcast=list, is_main=True)
    restored.load_state_dict(m.state_dict())
    assert restored.correction == m.correction and restored.records == m.records


def test_pruning_continues_until_the_variant_measures_within_its_target(tmp_path) -> None:
    cfg = config(Target.ratio(0.7), Target.ratio(0.5))
    predictor, device, result = run(tmp_path / "on", cfg, measure=True)
    assert [v.label for v in result.variants] == ["ratio_0.7", "ratio_0.5"]
    for v, ratio in zip(result.variants, (0.7, 0.5), strict=True):
        target = ratio * DENSE_MS
        _, prov = load_arch_file(f"{v.path}/arch.json")
        m = prov["measured_latency"]
        assert m["met"] and v.target_met_measured and m["corrected_ms"] <= target * (1 + NOISE)
        assert m["corrected_ms"] == pytest.approx(SLOWER * predictor.predict_ms(load_variant(v.path).spec))
        assert m["measured_ms"] == pytest.approx(1.1 * m["corrected_ms"]) and m["drift_ratio"] == 1.1
        assert v.predicted_latency_ms <= target * (1 + NOISE) / SLOWER  # the table's goal was lowered
    summary = result.measured_targets
    assert summary["correction"] == pytest.approx(SLOWER, rel=1e-6) and summary["measurements"] == len(device.calls)
    assert len(device.calls) >= 3  # ratio_0.7 missed once at its predicted crossing, then met
    log = pd.read_parquet(result.log_path)
    first = result.variants[0]
    assert log.loc[first.step, "predicted_latency_ms"] < 0.7 * DENSE_MS / SLOWER * (1 + NOISE)

    _, none, off = run(tmp_path / "off", cfg, measure=False)  # today's loop: the predicted crossing saves
    assert none is None and off.measured_targets is None
    assert all(v.measured_ms is None and v.predicted_latency_ms <= v.target_ms for v in off.variants)
    assert off.variants[0].step < first.step
    _, prov = load_arch_file(f"{off.variants[0].path}/arch.json")
    assert "measured_latency" not in prov


def test_resume_inside_the_measured_loop_keeps_its_correction(tmp_path) -> None:
    cfg = config(Target.ratio(0.7), Target.ratio(0.5), checkpoint_every=3)
    _, _, full = run(tmp_path / "full", cfg, measure=True)
    after_first_miss = min(r["step"] for r in full.measured_targets["records"] if not r["met"])
    cut = after_first_miss + 3 - (after_first_miss % 3) + 1  # past the checkpoint after the first miss
    assert cut < full.variants[-1].step  # the run is cut inside the measured loop, before its last variant

    def stop(report) -> None:
        if report.step == cut:
            raise Interrupt

    with pytest.raises(Interrupt):
        run(tmp_path / "cut", cfg, measure=True, on_step=stop)
    _, _, resumed = run(tmp_path / "cut", cfg, measure=True, resume=True)
    assert [v.arch for v in resumed.variants] == [v.arch for v in full.variants]
    assert resumed.measured_targets["records"] == full.measured_targets["records"]
    assert resumed.measured_targets["correction"] == full.measured_targets["correction"]


class SlowModels(fk.FakeBackend):
    """The table's device now: its parts time as profiled, whole models 15% slower than the table says."""

    def latency_of(self, workload):
        ms = super().latency_of(workload)
        return ms if getattr(workload.module, "nvit_config", None) is not None else SLOWER * ms


def test_the_table_measurer_times_with_the_tables_backend_and_the_loop_meets_the_target(tmp_path,
                                                                                        monkeypatch) -> None:
    from nvit.lut.predictor import LatencyPredictor
    from nvit.profiler.device import cpu_info
    from nvit.profiler.sweep import SweepOptions, run_sweep
    from nvit.validation.targets import MeasureTargets, TableMeasurer, choose_measurer

    here = fk.fake_device(cpu=cpu_info().model_name)  # the table's device is this machine
    with fk.FakeBackend() as backend:
        table = run_sweep(fk.tiny_space(), backend, tmp_path / "t.parquet", device=here,
                          options=SweepOptions(calibration_models=3)).table
    none, why = choose_measurer(MeasureTargets.AUTO, table)  # "fake" is not a registered backend yet
    assert none is None and why.startswith("targets are predicted only")
    fk.register_fake(monkeypatch, cls=SlowModels)
    measurer, line = choose_measurer(MeasureTargets.AUTO, table)
    assert isinstance(measurer, TableMeasurer) and "measured latency" in line
    assert choose_measurer(MeasureTargets.OFF, table)[0] is None
    elsewhere = table.with_meta(device=fk.fake_device().to_dict(), device_identity=fk.fake_device().identity())
    with pytest.raises(NvitError, match="--measure-targets on: the table's device cannot be measured here"):
        choose_measurer(MeasureTargets.ON, elsewhere)
    predictor = LatencyPredictor(table)
    m = measurer(SPEC, build_model(SPEC, seed=0))
    assert m.drift_ratio == pytest.approx(1.0) and m.corrected_ms == pytest.approx(SLOWER * fk.model_ms(SPEC))
    cfg = config(Target.ratio(0.8), min_embed_dim=None)  # the widths reach 0.64 of dense on this table
    result = prune(build_model(SPEC, seed=0), config=cfg, predictor=predictor, data=digits_batches(cfg.batch_size),
                   out_dir=tmp_path / "run", measurer=measurer)
    (v,) = result.variants
    target = 0.8 * predictor.predict_ms(SPEC)
    assert v.target_met_measured and v.measured_ms <= target * 1.03
    assert v.measured_ms == pytest.approx(SLOWER * fk.model_ms(v.arch), rel=1e-6)
    assert fk.model_ms(v.arch) < v.predicted_latency_ms * 1.0001 < target  # the table alone would have stopped earlier


class NeverCalled:
    """A measurer no rank but 0 may call."""

    def __call__(self, spec, model):
        raise AssertionError("only rank 0 measures")


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    import os

    from nvit.training.batches import StepBatches
    from nvit.training.distributed import init_distributed, shutdown

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    try:
        predictor = FlopsPredictor(SPEC, reference_ms=DENSE_MS)
        cfg = config(Target.ratio(0.6), batch_size=8)
        data = StepBatches(digits_batches().dataset, batch_size=8, seed=0, rank=rank, world_size=2)
        measurer = SlowDevice(predictor) if rank == 0 else NeverCalled()
        result = prune(build_model(SPEC, seed=0), config=cfg, predictor=predictor, data=data,
                       out_dir=f"{out_dir}/run", distributed=ctx, measurer=measurer)
        torch.save({"arch": result.variants[0].arch.to_dict(), "steps": result.steps,
                    "records": result.measured_targets["records"]}, f"{out_dir}/rank{rank}.pt")
    finally:
        shutdown()


def test_under_torchrun_rank_0_measures_and_every_rank_follows(tmp_path) -> None:
    import service_env as se
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(se.free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0] == ranks[1]  # the same variant, steps and measurements on both ranks
    assert any(not r["met"] for r in ranks[0]["records"]) and ranks[0]["records"][-1]["met"]
    # one process seeing each step's global batch (2 x 8) measures and decides the same
    _, _, single = run(tmp_path / "single", config(Target.ratio(0.6), batch_size=16), measure=True)
    assert single.variants[0].arch.to_dict() == ranks[0]["arch"] and single.steps == ranks[0]["steps"]
