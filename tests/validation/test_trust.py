"""The verdicts reach the user: tables store and show the conditions they were profiled in, ``prune`` warns
about a noisy table or one whose self-check missed, compare rows that stayed noisy are marked in the table
and the JSON, measured orders that contradict the prediction are called out, and ``--strict`` fails."""

from __future__ import annotations

import json

import lut_fakes as fk
import pytest
import torch
from cli_run import run_cli

from nvit.lut import load_table
from nvit.lut.accuracy import trust_warnings
from nvit.lut.records import SelfCheck
from nvit.models import build_model
from nvit.presets import preset
from nvit.profiler.conditions import Verdict
from nvit.validation.compare import VariantResult
from nvit.validation.trust import UntrustedMeasurement, judge_report, order_conflicts

NOISY = {"verdict": "noisy", "reasons": ["other processes used 48% of the CPU"], "other_cpu": 0.48}


@pytest.fixture(autouse=True)
def fake_registered(monkeypatch):
    fk.register_fake(monkeypatch)


@pytest.fixture(scope="module")
def table_path(tmp_path_factory):
    return fk.tiny_table(tmp_path_factory.mktemp("trust") / "lut.parquet")


def test_a_profiled_table_records_its_conditions_and_lut_show_prints_them(table_path, tmp_path, capsys) -> None:
    cond = load_table(table_path).meta.conditions
    assert cond["verdict"] in {v.value for v in Verdict}
    # the sweep's own figures: the fake backend's sentinel never drifts and its repeats agree to 1%
    assert cond["sentinel_drift"] == 0.0 and cond["repeat_spread"] == pytest.approx(0.01)
    assert cond["runs_hit"] == 0.0 and cond["wall_s"] > 0
    code, out, err = run_cli(["lut", "show", str(table_path)], capsys)
    assert code == 0, err
    assert f"conditions while profiling: {cond['verdict']}" in " ".join(out.split())
    noisy = tmp_path / "noisy.parquet"
    load_table(table_path).with_meta(conditions=NOISY).save(noisy)
    code, out, _ = run_cli(["lut", "show", str(noisy)], capsys)
    assert code == 0 and "conditions while profiling: noisy: other processes used 48% of the CPU" in " ".join(
        out.split())


def test_trust_warnings_name_a_noisy_table_and_a_missed_self_check(table_path) -> None:
    meta = load_table(table_path).meta.replace(conditions={"verdict": "quiet", "reasons": []})
    assert trust_warnings(meta) == []
    some = meta.self_check or SelfCheck(seed=0, passes=1, measured_at="", n=1, mape_pct=0.0, median_abs_pct=0.0,
                                        max_abs_pct=0.0, bias_pct=0.0, within_5pct=1.0, within_10pct=1.0,
                                        kendall_tau=None)
    missed = some.replace(n=6, mape_pct=14.7, within_10pct=0.5)
    warnings = trust_warnings(meta.replace(conditions=NOISY, self_check=missed))
    assert len(warnings) == 2
    assert "profiled on a noisy machine (other processes used 48% of the CPU)" in warnings[0]
    assert warnings[1] == "the table's self-check missed: MAPE 14.7% on 6 held-out models, 50% within ±10%"


def test_prune_says_at_start_that_its_table_is_noisy(table_path, tmp_path, capsys) -> None:
    noisy = tmp_path / "noisy.parquet"
    load_table(table_path).with_meta(conditions=NOISY).save(noisy)
    torch.save(build_model(preset("vit_test"), seed=0).state_dict(), tmp_path / "base.pth")
    code, _, err = run_cli(["prune", "--checkpoint", str(tmp_path / "base.pth"), "--arch", "vit_test", "--lut",
                            str(noisy), "--data", "digits", "--interval", "4", "--pace", "0.15", "--batch-size",
                            "512", "--min-embed-dim", "32", "--target-ratio", "0.7", "--no-eval", "--out",
                            str(tmp_path / "run")], capsys)
    assert code == 0, err
    text = " ".join(err.split())
    assert "warning: the table was profiled on a noisy machine (other processes used 48% of the CPU)" in text
    assert text.index("warning: the table") < text.index("plan:")  # said at start, before any work


def _row(name: str, predicted_ms: float, measured_ms: float, *, uncertainty_pct: float = 1.0,
         noise: tuple[str, ...] = (), arch: dict | None = None) -> VariantResult:
    return VariantResult(name=name, path=None, params=1, macs=1, embed_dim=64, heads=(1,), mlp_dims=(8,),
                         predicted_ms=predicted_ms, measured_ms=measured_ms, measured_ms_p10=measured_ms,
                         measured_ms_p90=measured_ms, error_pct=0.0, speedup_measured=1.0, speedup_predicted=1.0,
                         target_ms=None, target_met_predicted=None, target_met_measured=None, top1=None,
                         noise=noise, uncertainty_pct=uncertainty_pct, arch=arch)

def test_a_measured_order_that_contradicts_the_prediction_beyond_the_noise_is_called_out() -> None:
    big, small = _row("big", 2.0, 2.0), _row("small", 1.0, 2.6)
    assert order_conflicts([big, small]) == [
        "small measured slower than big (2.6 vs 2 ms) though predicted 50% faster"]
    assert order_conflicts([big, _row("small", 1.0, 2.03)]) == []  # within the 2 x 1% noise: not a conflict
    assert order_conflicts([big, _row("small", 1.0, 2.6, uncertainty_pct=40.0)]) == []  # too noisy to tell


class _Report:
    def __init__(self, results, conditions):
        self.results, self.context = results, {"conditions": conditions}


def test_the_verdict_is_the_worst_of_the_machine_the_rows_and_the_orders() -> None:
    quiet = {"verdict": "quiet", "reasons": []}
    rows = [_row("base", 2.0, 2.0), _row("v", 1.0, 1.02)]
    assert judge_report(_Report(rows, quiet)).verdict is Verdict.QUIET
    flagged = [rows[0], _row("v", 1.0, 1.02, noise=("its passes never agreed (9% apart)",))]
    trust = judge_report(_Report(flagged, quiet))
    assert trust.verdict is Verdict.NOISY and trust.noisy_rows == ("v",)
    assert trust.line().startswith("measurements noisy: 1 row(s) noisy (v); machine quiet")
    trust.enforce(strict=False)
    with pytest.raises(UntrustedMeasurement, match=r"^--strict: measurements noisy"):
        trust.enforce(strict=True)
    conflict = [rows[0], _row("v", 1.0, 2.6)]
    assert judge_report(_Report(conflict, quiet)).verdict is Verdict.NOISY
    assert judge_report(_Report(conflict, NOISY)).verdict is Verdict.UNUSABLE


def test_one_architecture_measured_apart_in_one_session_makes_it_noisy() -> None:
    """Two seeds that landed on the same widths measured 27% apart (as §7's Swins did on a quiet-looking
    machine): noisy, the pair named; within 5% (or their uncertainty) they agree; other architectures never
    pair, and the name is not part of the architecture."""
    quiet = {"verdict": "quiet", "reasons": []}
    small = preset("vit_test").to_dict()
    other = {**small, "embed_dim": 32}
    base = _row("base", 2.0, 2.0, arch={**small, "embed_dim": 48, "name": "base"})
    apart = [base, _row("a/s0", 1.0, 0.484, arch={**small, "name": "a"}),
             _row("a/s1", 1.0, 0.614, arch={**small, "name": "b"})]
    trust = judge_report(_Report(apart, quiet))
    assert trust.verdict is Verdict.NOISY
    assert trust.twins == ("a/s0 and a/s1, one architecture, measured 0.484 and 0.614 ms (27% apart)",)
    assert "27% apart" in trust.line() and trust.to_dict()["twins"] == list(trust.twins)
    close = [base, apart[1], _row("a/s1", 1.0, 0.50, arch=small)]
    assert judge_report(_Report(close, quiet)).verdict is Verdict.QUIET
    uncertain = [base, apart[1], _row("a/s1", 1.0, 0.614, arch=small, uncertainty_pct=30.0)]
    assert judge_report(_Report(uncertain, quiet)).twins == ()
    different = [base, apart[1], _row("c", 1.0, 0.614, arch=other)]
    assert judge_report(_Report(different, quiet)).verdict is Verdict.QUIET


class _Unsettled(fk.FakeBackend):
    """Every pass of the model named ``flaky`` is 10% slower than the one before: its passes never agree."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.passes = 0

    def measure_many(self, workloads):
        from dataclasses import replace

        stats = super().measure_many(workloads)
        if any(w.name == "flaky" for w in workloads):
            self.passes += 1
        def slower(s):
            f = 1.1 ** self.passes
            fields = ("latency_ms_median", "latency_ms_mean", "latency_ms_p10", "latency_ms_p90", "latency_ms_p99",
                      "latency_ms_std")
            return replace(s, **{k: getattr(s, k) * f for k in fields})

        return [slower(s) if w.name == "flaky" else s for w, s in zip(workloads, stats, strict=True)]


def test_compare_marks_a_row_that_stayed_noisy_and_strict_fails_after_saving(table_path, tmp_path, capsys,
                                                                             monkeypatch) -> None:
    from nvit.models import save_variant

    fk.register_fake(monkeypatch, cls=_Unsettled)
    folder = save_variant(build_model(preset("vit_test"), seed=0), tmp_path / "flaky", provenance={})
    out = tmp_path / "report"
    argv = ["compare", str(folder), "--lut", str(table_path), "--out", str(out), "--allow-other-device"]
    code, stdout, err = run_cli(argv, capsys)
    assert code == 0, err
    doc = json.loads((out / "compare.json").read_text())
    assert doc["schema_version"] == 3
    rows = {r["name"]: r for r in doc["results"]}
    assert rows["flaky"]["noisy"] is True and rows["vit_test"]["noisy"] is False
    assert rows["flaky"]["noise"] == ["its timings never agreed within 3%"]
    assert doc["trust"]["verdict"] in ("noisy", "unusable") and doc["trust"]["noisy_rows"] == ["flaky"]
    text = " ".join(stdout.split())
    assert "measurements noisy" in text or "measurements unusable" in text
    code, _, err = run_cli([*argv, "--strict"], capsys)
    assert code == 1 and err.strip().count("\n") == 0 and "--strict" in err
    assert (out / "compare.json").is_file()  # the figures are kept

