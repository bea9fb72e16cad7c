"""The table learns from the whole models measured against it (nvit.lut.learn, ``nvit lut learn``): a device
whose whole models pay a per-block cost that the table's own calibration models (all of one depth) could
not reveal; measured models of other depths teach it, judged on models left out of the fit."""

from __future__ import annotations

import json
from dataclasses import replace

import lut_fakes as fk
import pytest
from cli_run import run_cli

from nvit.arch import ArchSpec, BlockSpec
from nvit.errors import LutError
from nvit.lut.learn import MeasuredModel, learn
from nvit.lut.predictor import LatencyPredictor
from nvit.lut.table import LatencyTable
from nvit.presets import preset
from nvit.validation.measured_models import measurements_from

PER_BLOCK_MS = 0.006  # what each block of a whole model costs beyond its parts on this device


class PerBlockModels(fk.FakeBackend):
    def latency_of(self, workload) -> float:
        config = getattr(workload.module, "nvit_config", None)
        if config is not None:
            return fk.config_ms(config)
        spec = workload.module.spec
        return fk.model_ms(spec) + PER_BLOCK_MS * spec.depth


def truth(spec: ArchSpec) -> float:
    return fk.model_ms(spec) + PER_BLOCK_MS * spec.depth


BASE = preset("vit_test", qk_scale=0.25)
GRID = [BlockSpec(4, 16, 16, 256), BlockSpec(2, 8, 8, 64), BlockSpec(4, 8, 16, 128), BlockSpec(2, 16, 8, 256)]


def model(depth: int, e: int, shift: int) -> ArchSpec:
    return replace(BASE, embed_dim=e, blocks=tuple(GRID[(i + shift) % 4] for i in range(depth)),
                   name=f"d{depth}-e{e}-{shift}")


MEASURED = [model(d, e, s) for d, e, s in ((1, 64, 0), (2, 32, 1), (2, 64, 2), (3, 32, 3), (3, 64, 0), (1, 32, 2))]


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    from nvit.profiler.device import cpu_info
    from nvit.profiler.sweep import SweepOptions, run_sweep

    folder = tmp_path_factory.mktemp("learn")
    here = fk.fake_device(cpu=cpu_info().model_name)  # the table's device is this machine
    with PerBlockModels() as backend:  # a width-only table: its calibration models all have the base's depth
        return run_sweep(fk.tiny_space(), backend, folder / "t.parquet", device=here,
                         options=SweepOptions(calibration_models=3)).path


def test_learning_from_measured_models_of_other_depths_fixes_what_the_calibration_missed(table, tmp_path) -> None:
    parent = LatencyTable.load(table)
    assert {ArchSpec.from_dict(m.arch).depth for m in parent.meta.calibration.models} == {4}
    before = LatencyPredictor(parent)
    errors = [before.predict_ms(a) / truth(a) - 1 for a in MEASURED]
    assert max(abs(e) for e in errors) > 0.05  # the per-block cost hid in the offset: shallow models miss
    learned = learn(parent, [MeasuredModel(a.name, a, truth(a), "compare", "test") for a in MEASURED],
                    parent_sha256="ab" * 32)
    record = learned.meta.calibration
    info = record.learned
    assert record.method.endswith("per_block") and record.per_block_ms == pytest.approx(PER_BLOCK_MS, rel=1e-3)
    assert info["version"] == 2 and info["models"] == 6 and info["own_models"] == 3
    assert info["sources"] == {"compare": 6}
    held = info["held_out"]  # judged on models left out of the fit, one at a time
    assert held["n"] == 6 and held["mape_pct_before"] > 5 and held["mape_pct_after"] < 0.1
    assert held["mape_pct_before"] == pytest.approx(100 * sum(abs(e) for e in errors) / 6, rel=1e-6)
    after = LatencyPredictor(learned)
    unseen = model(2, 48, 3)  # a width and depth no model had
    assert after.predict_ms(unseen) == pytest.approx(truth(unseen), rel=1e-3)
    assert abs(before.predict_ms(unseen) / truth(unseen) - 1) > 0.05
    # a new version: the parent is untouched, and learning again keeps what was learned
    assert LatencyTable.load(table).meta.calibration == parent.meta.calibration
    again = learn(learned, [MeasuredModel("u", unseen, truth(unseen), "prune", "test")])
    assert again.meta.calibration.learned["version"] == 3 and again.meta.calibration.learned["models"] == 7
    assert sum(m.learned for m in again.meta.calibration.models) == 7
    with pytest.raises(LutError, match="no measured models"):
        learn(parent, [])


def test_nvit_lut_learn_reads_compare_reports_and_writes_a_new_table(table, tmp_path, monkeypatch, capsys) -> None:
    from nvit.models import build_model
    from nvit.validation.compare import Variant, compare_with_table

    fk.register_fake(monkeypatch, cls=PerBlockModels)
    parent = LatencyTable.load(table)
    variants = [Variant(a.name, a, build_model(a, seed=0).eval()) for a in MEASURED]
    base = Variant("base", BASE, build_model(BASE, seed=0).eval())
    compare_with_table(parent, base, variants, passes=1).save(tmp_path / "cmp")
    found = measurements_from(tmp_path / "cmp", parent)
    assert len(found) == 7 and all(m.source == "compare" for m in found)
    assert {m.arch for m in found} == {*MEASURED, BASE}
    assert all(m.measured_ms == pytest.approx(truth(m.arch), rel=1e-6) for m in found)  # drift ratio 1 here

    out = tmp_path / "learned.parquet"
    code, stdout, err = run_cli(["lut", "learn", str(table), str(tmp_path / "cmp"), "--out", str(out)], capsys)
    assert code == 0, err
    assert "calibration version 2" in stdout and "7 models" in stdout
    code, stdout, _ = run_cli(["lut", "show", str(out)], capsys)
    assert code == 0 and "learned from 7 measured models (7 compare)" in " ".join(stdout.split())
    # never in place; nothing to learn; another device's report
    code, _, err = run_cli(["lut", "learn", str(table), str(tmp_path / "cmp"), "--out", str(table)], capsys)
    assert code == 1 and "must be a new file" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["lut", "learn", str(table), "--out", str(tmp_path / "x.parquet")], capsys)
    assert code == 1 and "nothing to learn from" in err and not (tmp_path / "x.parquet").exists()
    doc = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    doc["context"]["lut_identity"]["batch_size"] = 8
    (tmp_path / "other.json").write_text(json.dumps(doc))
    code, _, err = run_cli(["lut", "learn", str(table), str(tmp_path / "other.json"), "--out",
                            str(tmp_path / "y.parquet")], capsys)
    assert code == 1 and "another table's device or settings (batch_size)" in err


def test_a_pruning_run_that_measured_its_targets_is_a_source(table, tmp_path, monkeypatch) -> None:
    from prune_fakes import config, digits_batches

    from nvit.models import build_model
    from nvit.pruning.config import Target
    from nvit.pruning.loop import prune
    from nvit.validation.targets import TableMeasurer

    fk.register_fake(monkeypatch, cls=PerBlockModels)
    parent = LatencyTable.load(table)
    cfg = config(Target.ratio(0.8), min_embed_dim=None)
    prune(build_model(BASE, seed=0), config=cfg, predictor=LatencyPredictor(parent),
          data=digits_batches(cfg.batch_size), out_dir=tmp_path / "run", measurer=TableMeasurer(parent),
          provenance={"lut": {"identity": parent.meta.identity()}})
    found = measurements_from(tmp_path / "run", parent)
    assert found and all(m.source == "prune" for m in found)
    assert all(m.measured_ms == pytest.approx(truth(m.arch), rel=1e-6) for m in found)
    prune(build_model(BASE, seed=0), config=cfg, predictor=LatencyPredictor(parent),
          data=digits_batches(cfg.batch_size), out_dir=tmp_path / "open", provenance={"lut": {}})
    with pytest.raises(LutError, match="did not measure its targets"):
        measurements_from(tmp_path / "open", parent)
