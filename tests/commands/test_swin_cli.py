"""A small Swin through the commands that already know it, on digits: ``nvit train``, ``nvit prune`` (widths,
priced by FLOPs), ``nvit finetune`` of the pruned variant from the dense teacher, and ``nvit export`` (verified in
ONNX Runtime); and the commands that do not handle it yet refuse it in one line."""

from __future__ import annotations

import json

import torch
from cli_run import run_cli

from nvit.models import load_variant
from nvit.models.swin import SwinTransformer
from nvit.swin import SwinSpec, swin_preset


def test_a_small_swin_trains_prunes_finetunes_and_exports_verified(tmp_path, capsys) -> None:
    base, pruned, tuned, exported = (tmp_path / n for n in ("base", "pruned", "tuned", "export"))
    code, _, err = run_cli(["train", "--arch", "swin_test", "--data", "digits", "--epochs", "1", "--batch-size", "64",
                            "--out", str(base)], capsys)
    assert code == 0, err
    doc = json.loads((base / "arch.json").read_text())
    assert doc["arch"]["kind"] == "swin" and doc["summary"]["params"] == swin_preset("swin_test").num_params()
    model = load_variant(base)
    assert isinstance(model, SwinTransformer) and model.spec == swin_preset("swin_test")
    assert doc["provenance"]["top1"] > 0.1  # one epoch on digits: better than chance

    code, out, err = run_cli(["prune", "--variant", str(base), "--lut", "flops", "--target-ratio", "0.6",
                              "--remove", "none", "--pace", "0.05", "--interval", "5", "--data", "digits",
                              "--out", str(pruned)], capsys)
    assert code == 0, err
    small = load_variant(pruned / "ratio_0.6")
    assert isinstance(small.spec, SwinSpec) and small.spec.num_params() < model.spec.num_params()
    assert small.spec.flops() <= 0.6 * model.spec.flops() + 1e-9 and "ratio_0.6" in out

    code, _, err = run_cli(["finetune", "--variant", str(pruned / "ratio_0.6"), "--teacher", str(base), "--data",
                            "digits", "--epochs", "1", "--batch-size", "64", "--out", str(tuned)], capsys)
    assert code == 0, err
    student = load_variant(tuned)
    assert student.spec == small.spec
    with torch.no_grad():  # the weights moved: fine-tuning trained the pruned Swin
        assert not torch.equal(student.head.weight, small.head.weight)

    code, _, err = run_cli(["export", str(tuned), "--out", str(exported)], capsys)
    assert code == 0, err
    report = json.loads((exported / "export.json").read_text())
    assert report["verify"]["passed"] and report["verify"]["provider"] == "CPUExecutionProvider"
    assert [c["batch_size"] for c in report["verify"]["checks"]] == [1, 3]  # the batch is dynamic


def test_a_swin_table_profiles_prices_pruning_and_compares(tmp_path, capsys, monkeypatch) -> None:
    """profile --arch swin_test (fake device) → a .swinlut folder; prune --lut TABLE at a latency target meets it
    by the table; compare measures the variant and the dense base against the table's predictions."""
    from lut_fakes import register_fake
    from swin_fakes import swin_ms

    from nvit.lut import load_predictor
    from nvit.models import save_variant
    from nvit.models.swin import build_swin

    register_fake(monkeypatch)
    table = tmp_path / "swin.swinlut"
    code, out, err = run_cli(["profile", "--arch", "swin_test", "--backend", "fake", "--calibrate", "4", "--check",
                              "4", "--out", str(table)], capsys)
    assert code == 0, err
    assert (table / "swin_table.json").is_file() and (table / "stage1.parquet").is_file()
    assert "stage 1 attn" in out and "64/16 tokens per stage" in out
    code, out, err = run_cli(["lut", "show", str(table)], capsys)
    assert code == 0 and "stage 1 (16 tokens)" in out and "64/16 tokens per stage" in out, err
    code, out, err = run_cli(["lut", "validate", str(table)], capsys)
    assert code == 0 and "valid" in out, err
    code, _, err = run_cli(["lut", "merge", str(table), str(table), "--out", str(tmp_path / "m.parquet")], capsys)
    assert code != 0 and "is a Swin latency table" in err and "Traceback" not in err
    predictor = load_predictor(table)
    dense = swin_preset("swin_test")
    assert abs(predictor.predict_ms(dense) / swin_ms(dense) - 1) < 0.02
    assert predictor.meta.self_check.mape_pct < 3.0

    base = save_variant(build_swin(dense, seed=0), tmp_path / "base")
    target_ms = round(0.8 * predictor.predict_ms(dense), 4)  # the fake skeleton holds 2/3 of the dense Swin
    code, out, err = run_cli(["prune", "--variant", str(base), "--lut", str(table), "--target-latency",
                              f"{target_ms}ms", "--pace", "0.05", "--interval", "5", "--data", "digits",
                              "--out", str(tmp_path / "pruned")], capsys)
    assert code == 0, err
    assert "widths only" not in err  # the Swin table prices removed sub-layers: the default may remove them
    [variant] = [p for p in (tmp_path / "pruned").iterdir() if (p / "arch.json").is_file()]
    doc = json.loads((variant / "arch.json").read_text())
    small = load_variant(variant).spec
    assert isinstance(small, SwinSpec) and predictor.predict_ms(small) <= target_ms * 1.001
    assert doc["provenance"]["lut"]["kind"] == "lut" and len(doc["provenance"]["lut"]["sha256"]) == 64

    code, out, err = run_cli(["compare", str(variant), "--lut", str(table), "--base", str(base), "--out",
                              str(tmp_path / "cmp")], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    rows = {r["name"]: r for r in report["results"]}
    assert len(rows) == 2 and variant.name in rows
    for r in rows.values():  # the fake device's truth vs the table: within the self-check's error
        assert abs(r["error_pct"]) < 3.0 and r["measured_ms"] > 0
    assert rows[variant.name]["speedup_measured"] > 1.15  # a target at 0.8 of the dense prediction


def test_a_vit_table_refuses_a_swin_in_one_line(tmp_path, capsys) -> None:
    from lut_fakes import tiny_table

    from nvit.models import save_variant
    from nvit.models.swin import build_swin

    folder = save_variant(build_swin(swin_preset("swin_test"), seed=0), tmp_path / "swin")
    table = str(tiny_table(tmp_path / "t.parquet"))
    for argv, says in ((["prune", "--variant", str(folder), "--lut", table, "--target-ratio", "0.6", "--data",
                         "digits", "--out", str(tmp_path / "pruned")], "a Swin needs a Swin table"),
                       (["compare", str(folder), "--lut", table, "--out", str(tmp_path / "cmp")],
                        "is a Swin and the latency table a ViT table")):
        code, _, err = run_cli(argv, capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code != 0 and says in err.replace("\n", " "), argv
        assert len(lines) <= 3 and "Traceback" not in err, argv  # one error (wrapped by the console)
    assert not (tmp_path / "pruned").exists()


def test_a_written_space_is_edited_and_profiled_coarser(tmp_path, capsys, monkeypatch) -> None:
    """profile --arch swin_test --write-space writes the derived per-stage grids and profiles nothing; a copy with
    fewer MLP widths in stage 0 profiles (fake device) to a table with exactly those rows fewer, and still prices the
    dense Swin; a ViT's space is written and read back the same."""
    from lut_fakes import register_fake
    from swin_fakes import swin_ms

    from nvit.lut import load_predictor, load_table
    from nvit.presets import preset
    from nvit.profiler.space import derived_space, load_space
    from nvit.profiler.swin_space import SwinSearchSpace, derived_swin_space

    register_fake(monkeypatch)
    written = tmp_path / "space.json"
    code, out, err = run_cli(["profile", "--arch", "swin_test", "--write-space", str(written)], capsys)
    assert code == 0, err
    assert "wrote the space" in out and not list(tmp_path.glob("*.swinlut"))
    derived = derived_swin_space(swin_preset("swin_test"))
    assert load_space(written) == derived
    doc = json.loads(written.read_text())
    mlp = doc["stages"][0]["mlp_dims"]
    assert len(mlp) >= 3
    doc["stages"][0]["mlp_dims"] = [mlp[0], mlp[-1]]  # the narrowest and the dense width
    coarse = tmp_path / "coarse.json"
    coarse.write_text(json.dumps(doc))
    space = load_space(coarse)
    assert isinstance(space, SwinSearchSpace) and space.stages[1] == derived.stages[1]
    fewer = derived.counts()["mlp"] - space.counts()["mlp"]
    assert fewer > 0
    table = tmp_path / "coarse.swinlut"
    code, out, err = run_cli(["profile", "--space", str(coarse), "--backend", "fake", "--calibrate", "4", "--check",
                              "2", "--out", str(table)], capsys)
    assert code == 0, err
    assert load_table(table).counts()["mlp"] == space.counts()["mlp"]
    dense = swin_preset("swin_test")
    assert abs(load_predictor(table).predict_ms(dense) / swin_ms(dense) - 1) < 0.03

    vit = tmp_path / "vit.json"
    code, out, err = run_cli(["profile", "--arch", "vit_test", "--write-space", str(vit), "--batch-size", "2"],
                             capsys)
    assert code == 0, err
    assert load_space(vit) == derived_space(preset("vit_test"), batch_size=2)
    code, _, err = run_cli(["profile", "--arch", "swin_test", "--write-space", str(vit), "--remote",
                            "http://127.0.0.1:9"], capsys)
    assert code != 0 and "not both" in err and "Traceback" not in err
