"""`nvit compare` end to end with a fake backend whose latency is known: predicted must equal measured."""

from __future__ import annotations

import json

import lut_fakes as fk
import pytest
from cli_run import run_cli

from nvit.arch import ArchSpec, BlockSpec
from nvit.models import build_model, save_variant
from nvit.presets import preset
from nvit.profiler.sweep import SweepOptions, run_sweep


@pytest.fixture(autouse=True)
def fake_registered(monkeypatch):
    """The fake backend under its name for these tests only (the registry is global)."""
    fk.register_fake(monkeypatch)


@pytest.fixture(scope="module")
def lut(tmp_path_factory):
    path = tmp_path_factory.mktemp("cmp") / "tiny.parquet"
    with fk.FakeBackend() as backend:
        run_sweep(fk.tiny_space(), backend, path, device=fk.fake_device(), options=SweepOptions(calibration_models=3))
    return path



def test_compare_reports_exact_figures_with_a_known_device(lut, tmp_path, capsys) -> None:
    pruned = ArchSpec(embed_dim=48, blocks=(BlockSpec(2, 8, 16, 64), BlockSpec(3, 16, 8, 200),
                                            BlockSpec(4, 12, 12, 100), BlockSpec(2, 8, 8, 64)),
                      img_size=8, patch_size=2, in_chans=1, num_classes=10, qk_scale=0.25)
    folder = save_variant(build_model(pruned, seed=0), tmp_path / "v1",
                          provenance={"target": {"latency_ms": 1.0}, "top1": 0.75})
    code, stdout, err = run_cli(["compare", str(folder), "--lut", str(lut), "--out", str(tmp_path / "report"),
                     "--allow-other-device"], capsys)
    assert code == 0, err
    doc = json.loads((tmp_path / "report" / "compare.json").read_text())
    base, variant = doc["results"]
    assert base["name"] == "vit_test" and variant["name"] == "v1"
    assert variant["measured_ms"] == pytest.approx(fk.model_ms(pruned))
    assert variant["predicted_ms"] == pytest.approx(fk.model_ms(pruned), rel=1e-6)
    assert abs(variant["error_pct"]) < 1e-3
    assert variant["speedup_measured"] == pytest.approx(fk.model_ms(preset("vit_test")) / fk.model_ms(pruned))
    assert variant["target_met_measured"] is True and variant["top1"] == 0.75
    assert (tmp_path / "report" / "compare.png").stat().st_size > 10_000
    assert "v1" in stdout and "met" in stdout


def test_compare_refuses_another_device(lut, tmp_path, capsys) -> None:
    code, _, err = run_cli(["compare", "vit_test", "--lut", str(lut), "--out", str(tmp_path / "r")], capsys)
    assert code == 1
    assert "measured with device Test CPU 9000" in err
    assert not (tmp_path / "r").exists()


def test_compare_with_a_missing_or_corrupt_table(tmp_path, capsys) -> None:
    code, _, err = run_cli(["compare", "vit_test", "--lut", str(tmp_path / "none.parquet")], capsys)
    assert code == 1 and "none.parquet" in err
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 garbage")
    code, _, err = run_cli(["compare", "vit_test", "--lut", str(bad)], capsys)
    assert code == 1 and "Traceback" not in err
