"""A table's calibration and self-check are typed in its metadata, and stored as the same JSON as before."""

from __future__ import annotations

import pytest

from nvit.errors import LutError
from nvit.lut.calibration import fit_calibration, status_line
from nvit.lut.records import Calibration, CalibrationModel, CheckedModel, SelfCheck

#: What the first calibrated tables stored: no per-block term, no forms, no verdict.
OLDEST = {"method": "scale_offset", "scale": 1.1, "offset_ms": 0.05, "fitted_at": "2026-11-01T00:00:00+00:00",
          "models": [{"name": "a", "measured_ms": 1.0, "predicted_raw_ms": 0.9}], "residual_pct_max_abs": 0.4}


def test_a_fitted_calibration_round_trips_its_json_exactly() -> None:
    fit = fit_calibration(["a", "b", "c"], [2.1, 4.2, 8.4], [2.0, 4.0, 8.0]).with_archs([{"x": 1}, {"x": 2}, {"x": 3}])
    doc = fit.to_dict()
    assert list(doc) == ["method", "scale", "offset_ms", "per_block_ms", "models", "residual_pct_max_abs",
                         "loo_pct_mean_abs", "forms", "floors", "bounded", "fitted_at", "verdict", "reasons"]
    assert doc["models"][1] == {"name": "b", "measured_ms": 4.2, "predicted_raw_ms": 4.0, "blocks": 0.0,
                                "arch": {"x": 2}}
    again = Calibration.from_dict(doc)
    assert again == fit and again.to_dict() == doc
    learned = again.replace(learned={"version": 2}, models=(again.models[0], CalibrationModel("n", 1.0, 1.0,
                                                                                               learned=True)))
    assert learned.to_dict()["learned"] == {"version": 2} and learned.to_dict()["models"][1]["learned"] is True


def test_the_oldest_record_reads_with_defaults_and_is_judged_when_read() -> None:
    cal = Calibration.from_dict(OLDEST)
    assert cal.per_block_ms == 0.0 and cal.verdict is None and cal.models[0].blocks == 0.0
    verdict, line = status_line(cal)
    assert verdict == "plausible" and "scale 1.1000, offset +0.0500 ms" in line


@pytest.mark.parametrize(("data", "message"), [
    ({**OLDEST, "slope": 2.0}, "unknown calibration key"),
    ({"method": "offset"}, "incomplete calibration"),
    ({**OLDEST, "models": [{"name": "a"}]}, "incomplete calibration model"),
    ("scale 2", "must be a JSON object"),
])
def test_a_bad_record_is_one_clear_error(data: object, message: str) -> None:
    with pytest.raises(LutError, match=message):
        Calibration.from_dict(data)


def test_a_self_check_round_trips_and_gives_its_figures() -> None:
    check = SelfCheck(seed=5, passes=2, measured_at="t", n=2, mape_pct=3.0, median_abs_pct=3.0, max_abs_pct=4.0,
                      bias_pct=-1.0, within_5pct=1.0, within_10pct=1.0, kendall_tau=None,
                      models=(CheckedModel("m", 1.0, 1.04, 4.0, {"x": 1}), CheckedModel("n", 1.0, 0.98, -2.0)),
                      seconds=1.5)
    doc = check.to_dict()
    assert "pruned_shapes" not in doc and doc["seconds"] == 1.5 and doc["models"][1] == {
        "name": "n", "measured_ms": 1.0, "predicted_ms": 0.98, "error_pct": -2.0}
    assert SelfCheck.from_dict(doc) == check
    assert check.figures() == {"n": 2, "mape_pct": 3.0, "median_abs_pct": 3.0, "max_abs_pct": 4.0, "bias_pct": -1.0,
                               "within_5pct": 1.0, "within_10pct": 1.0, "kendall_tau": None}
    with pytest.raises(LutError, match="unknown self-check key"):
        SelfCheck.from_dict({**doc, "mape": 1})
