"""``nvit arch redistribute`` on a variant family from ``nvit prune``, and its one-line errors."""

from __future__ import annotations

import json

import lut_fakes as fk
import pytest
import torch
from cli_run import run_cli

from nvit.arch import load_arch_file, save_arch
from nvit.models import build_model
from nvit.presets import preset
from nvit.redesign.family import load_family, resolve_base

SPEC = preset("vit_test")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A latency table of vit_test (fake backend of known latency) and a two-variant ``nvit prune`` run."""
    folder = tmp_path_factory.mktemp("redistribute")
    lut = fk.tiny_table(folder / "lut.parquet")
    torch.save(build_model(SPEC, seed=0).state_dict(), folder / "base.pth")
    from nvit.cli import main

    try:
        main(["prune", "--checkpoint", str(folder / "base.pth"), "--arch", "vit_test", "--lut", str(lut),
              "--data", "digits", "--interval", "2", "--pace", "0.1", "--min-embed-dim", "32", "--batch-size", "16",
              "--target-ratio", "0.85", "--target-ratio", "0.7", "--no-eval", "--out", str(folder / "run")])
    except SystemExit as exc:
        assert exc.code in (0, None)
    return folder


def test_family_of_a_prune_run_and_its_base_from_provenance(family) -> None:
    variants = load_family([family / "run"])
    assert [v.name for v in variants] == ["ratio_0.85", "ratio_0.7"]
    base, how = resolve_base(variants)
    assert base.blocks == SPEC.blocks and "base.arch" in how
    assert [v.name for v in load_family([family / "run" / "ratio_0.7", family / "run" / "ratio_0.85" / "arch.json"])
            ] == ["ratio_0.7", "ratio_0.85"]


def test_redistribute_at_an_embedding_writes_arch_and_plot(family, tmp_path, capsys) -> None:
    out, png = tmp_path / "d" / "arch.json", tmp_path / "shares.png"
    code, stdout, err = run_cli(["arch", "redistribute", str(family / "run"), "--embed", "48", "--bandwidth", "0",
                                 "--out", str(out), "--plot", str(png), "--lut", str(family / "lut.parquet")], capsys)
    assert code == 0, err
    spec, prov = load_arch_file(out)
    assert spec.embed_dim == 48 and spec.depth == 4 and spec.name == "vit_test-redistributed"
    assert all(b.heads % 2 == 0 and b.qk_dim % 8 == 0 and b.v_dim % 8 == 0 and b.mlp_dim % 8 == 0
               for b in spec.blocks)
    assert prov["kind"] == "nvit.redistribute" and prov["embed"] == {"mode": "given", "embed_dim": 48}
    assert [s["name"] for s in prov["sources"]] == ["ratio_0.85", "ratio_0.7"]
    assert prov["sources"][0]["target"]["kind"] == "ratio" and prov["sources"][0]["target"]["value"] == 0.85
    assert prov["rounding"]["heads"] == 2 and prov["bandwidth"] == 0.0 and prov["predicted_latency_ms"] > 0
    # the per-block shares are the two variants' means (bandwidth 0)
    variants = load_family([family / "run"])
    for j in range(4):
        mean_mlp = sum(v.spec.blocks[j].mlp_dim / (256 * v.spec.embed_dim / 64) for v in variants) / 2
        assert prov["shares"]["mlp_dim"][j] == pytest.approx(mean_mlp)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in stdout and "predicted" in stdout


def test_redistribute_to_a_latency_target(family, tmp_path, capsys) -> None:
    from nvit.lut import load_predictor

    predictor = load_predictor(family / "lut.parquet")
    target = 0.8 * predictor.predict_ms(SPEC)
    out = tmp_path / "t.json"
    code, _, err = run_cli(["arch", "redistribute", str(family / "run"), "--lut", str(family / "lut.parquet"),
                                 "--target-latency", f"{target:.6f}ms", "--out", str(out)], capsys)
    assert code == 0, err
    spec, prov = load_arch_file(out)
    assert prov["embed"]["mode"] == "latency_target" and prov["embed"]["embed_dim"] == spec.embed_dim
    assert predictor.predict_ms(spec) == pytest.approx(prov["predicted_latency_ms"]) and \
        prov["predicted_latency_ms"] <= target
    bigger = [ms for e, ms in prov["embed"]["tried"] if e > spec.embed_dim and ms is not None]
    assert all(ms > target for ms in bigger)
    assert prov["embed"]["lut"]["identity"]["backend"] == "fake"


def _one_line_error(code: int, err: str) -> None:
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_bad_inputs_give_one_line_and_no_file(family, tmp_path, capsys) -> None:
    out = tmp_path / "o.json"
    lut = str(family / "lut.parquet")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    cases = [
        ([str(bad), "--embed", "64"], "not valid JSON"),
        ([str(tmp_path / "missing.json"), "--embed", "64"], "not found"),
        ([str(tmp_path), "--embed", "64"], "neither a variant folder"),
        ([str(family / "run"), "--lut", lut, "--target-latency", "0.0001ms"], "unreachable"),
        ([str(family / "run"), "--target-latency", "1ms"], "needs --lut"),
        ([str(family / "run"), "--embed", "64", "--lut", lut, "--target-latency", "1ms"], "exactly one"),
        ([str(family / "run")], "exactly one"),
        ([str(family / "run"), "--embed", "64", "--bandwidth", "-1"], "bandwidth"),
        ([str(family / "run"), "--embed", "64", "--heads-step", "0"], "heads step"),
        ([str(family / "run"), "--embed", "64", "--base", "deit_tiny"], "blocks"),
    ]
    for args, message in cases:
        code, _, err = run_cli(["arch", "redistribute", *args, "--out", str(out)], capsys)
        _one_line_error(code, err)
        assert message in err, (args, err)
        assert not out.exists()


def test_a_variant_without_base_provenance_needs_base(family, tmp_path, capsys) -> None:
    spec, _ = load_arch_file(family / "run" / "ratio_0.7" / "arch.json")
    save_arch(spec, tmp_path / "bare.json", {"note": "hand-made"})
    out = tmp_path / "o.json"
    code, _, err = run_cli(["arch", "redistribute", str(tmp_path / "bare.json"), "--embed", "64", "--out", str(out)],
                           capsys)
    _one_line_error(code, err)
    assert "give --base" in err and not out.exists()
    code, _, err = run_cli(["arch", "redistribute", str(tmp_path / "bare.json"), "--embed", "64", "--base", "vit_test",
                            "--out", str(out)], capsys)
    assert code == 0, err
    assert json.loads(out.read_text())["provenance"]["base"]["found"] == "--base vit_test"


def test_redistribute_to_another_depth(family, tmp_path, capsys) -> None:
    out = tmp_path / "deep.json"
    code, _, err = run_cli(["arch", "redistribute", str(family / "run" / "ratio_0.7"), "--embed", "64", "--depth", "7",
                            "--bandwidth", "0", "--out", str(out)], capsys)
    assert code == 0, err
    spec, prov = load_arch_file(out)
    assert spec.depth == 7 and prov["depth"] == 7 and len(prov["shares"]["heads"]) == 7
    # bandwidth 0 on one 4-block variant: positions j/6 against 0, 1/3, 2/3, 1; odd j lie midway (mean of two)
    variant = load_family([family / "run" / "ratio_0.7"])[0].spec
    share = [b.mlp_dim / (256 * variant.embed_dim / 64) for b in variant.blocks]
    expected = [share[0], (share[0] + share[1]) / 2, share[1], (share[1] + share[2]) / 2, share[2],
                (share[2] + share[3]) / 2, share[3]]
    assert prov["shares"]["mlp_dim"] == pytest.approx(expected)
