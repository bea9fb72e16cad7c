"""Drift since profiling: the table's own rows re-timed beside the models tell how far the machine moved, per
work size, and the comparison reports the drift-corrected error and says so."""

from __future__ import annotations

import math

import lut_fakes as fk
import pytest

from nvit.lut.predictor import LatencyPredictor
from nvit.models import build_model
from nvit.presets import preset
from nvit.profiler.sampling import uniform_arch
from nvit.validation.compare import Variant, compare_with_table
from nvit.validation.drift import DriftCorrection, Reference, reference_rows


def test_the_ratio_follows_work_size_between_references() -> None:
    drift = DriftCorrection((Reference("wide", 0.1, 0.1), Reference("narrow", 0.01, 0.013)))
    assert drift.ratio(0.01) == pytest.approx(1.3) and drift.ratio(0.1) == pytest.approx(1.0)
    assert drift.ratio(math.sqrt(0.01 * 0.1)) == pytest.approx(math.sqrt(1.3))  # halfway in log size
    assert drift.ratio(0.001) == pytest.approx(1.3) and drift.ratio(1.0) == pytest.approx(1.0)  # nearest beyond
    assert drift.largest_pct == pytest.approx(30.0)
    assert DriftCorrection.from_dict(drift.to_dict()) == drift
    assert DriftCorrection(()).ratio(0.5) == 1.0


class NarrowSlowdown(fk.FakeBackend):
    """The machine since profiling: everything 10% slower, and work under 0.03 ms another 30% (overhead-bound
    work suffers more)."""

    def latency_of(self, workload):
        config = getattr(workload.module, "nvit_config", None)
        if config is not None:
            ms = fk.config_ms(config)
            return ms * (1.1 + (0.3 if ms < 0.03 else 0.0))
        spec = workload.module.spec
        e = spec.embed_dim
        total = fk.fixed_ms(e) * (1.1 + (0.3 if fk.fixed_ms(e) < 0.03 else 0.0))
        for b in spec.blocks:
            ms = fk.block_ms(e, b.heads, b.qk_dim, b.v_dim, b.mlp_dim)
            total += ms * (1.1 + (0.3 if ms < 0.03 else 0.0))
        return fk.SCALE * total + fk.OFFSET_MS


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    from nvit.profiler.sweep import SweepOptions, run_sweep

    with fk.FakeBackend() as backend:
        return run_sweep(fk.tiny_space(), backend, tmp_path_factory.mktemp("drift") / "t.parquet",
                         device=fk.fake_device(), options=SweepOptions(calibration_models=3)).table


def test_compare_re_times_the_tables_rows_and_corrects_each_row_for_drift(table, monkeypatch) -> None:
    spec = preset("vit_test")
    small = uniform_arch(spec, 0.5, name="small")
    base = Variant("base", spec, build_model(spec, seed=0).eval())
    variant = Variant("small", small, build_model(small, seed=0).eval())
    rows = reference_rows(table)
    assert len(rows) == 3 and rows[0]["latency_ms_median"] < rows[1]["latency_ms_median"] < rows[2]["latency_ms_median"]

    fk.register_fake(monkeypatch)
    quiet = compare_with_table(table, base, [variant], same_device=False)
    assert quiet.context["drift"]["largest_pct"] == pytest.approx(0.0, abs=1e-9)
    assert all(r.drift_ratio == pytest.approx(1.0) for r in quiet.results)
    assert "drifted" not in quiet.trust().line()

    fk.register_fake(monkeypatch, cls=NarrowSlowdown)
    report = compare_with_table(table, base, [variant], same_device=False)
    refs = report.context["drift"]["references"]
    assert {round(r["ratio"], 6) for r in refs} <= {1.1, 1.4} and max(r["ratio"] for r in refs) == pytest.approx(1.4)
    predictor = LatencyPredictor(table)
    for r in report.results:
        assert r.error_pct < -5  # the raw comparison blames the table for the machine's drift
        assert 1.1 - 1e-9 <= r.drift_ratio <= 1.4 + 1e-9
        assert abs(r.error_pct_drift_corrected) < abs(r.error_pct)
        assert r.error_pct_drift_corrected == pytest.approx(
            100 * (predictor.predict_ms(base.spec if r.name == "base" else small) * r.drift_ratio - r.measured_ms)
            / r.measured_ms)
    trust = report.trust()
    assert trust.verdict.value in ("noisy", "unusable") and "drifted up to +40%" in trust.line()
    assert report.as_dict()["results"][0]["error_pct_drift_corrected"] is not None
