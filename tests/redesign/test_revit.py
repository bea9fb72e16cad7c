"""NViT's published redistribution rule: exact per-block widths, the depth stretch, presets and the CLI."""

from __future__ import annotations

import json

import pytest
from cli_run import run_cli

from nvit.arch import load_arch_file
from nvit.errors import SpecError
from nvit.models import build_model
from nvit.presets import pattern_index, preset, revit_spec, revit_widths


def _column(spec, attr):
    return [getattr(b, attr) for b in spec.blocks]


def test_rule_at_e176_is_revit_tiny() -> None:
    # r = round(0.88) = 1, s = round(1.1) = 1
    spec = preset("revit_tiny")
    assert spec.embed_dim == 176 and spec.depth == 12 and not spec.distilled
    assert _column(spec, "heads") == [10, 2, 2, 4, 4, 4, 4, 4, 4, 2, 2, 10]
    assert _column(spec, "qk_dim") == [16, 8, 8, 16, 16, 16, 16, 16, 16, 8, 8, 16]
    assert _column(spec, "v_dim") == [64] * 12
    assert _column(spec, "mlp_dim") == [528] * 3 + [1056] * 6 + [528] * 3


def test_rule_at_e384_is_revit_small() -> None:
    # r = round(1.92) = 2, s = round(2.4) = 2
    spec = preset("revit_small")
    assert spec.embed_dim == 384
    assert _column(spec, "heads") == [10, 4, 4, 8, 8, 8, 8, 8, 8, 4, 4, 10]
    assert _column(spec, "qk_dim") == [32, 16, 16, 32, 32, 32, 32, 32, 32, 16, 16, 32]
    assert _column(spec, "v_dim") == [64] * 12
    assert _column(spec, "mlp_dim") == [1152] * 3 + [2304] * 6 + [1152] * 3


def test_python_rounding_of_the_factors() -> None:
    # E = 300: 0.005·E = 1.5 -> 2 (banker's: 2 is even); 0.05·E/8 = 1.875 -> 2
    assert revit_widths(300)[3] == (8, 32, 64, 1800)
    # E = 500: 0.005·E = 2.5 -> 2 (banker's), 0.05·E/8 = 3.125 -> 3
    assert revit_widths(500)[3] == (8, 48, 64, 3000)


def test_params_and_macs_against_the_paper() -> None:
    # The paper's ReViT-T: distillation token, 198 tokens, about 5.3 M params and 1.1 GMACs.
    tiny = preset("revit_tiny_distilled")
    assert tiny.num_tokens == 198
    assert tiny.num_params() == 5_339_136
    assert tiny.macs() == 1_135_290_112
    plain = preset("revit_tiny")
    assert plain.num_tokens == 197 and plain.num_params() == 5_161_784 and plain.macs() == 1_128_708_992
    assert sum(p.numel() for p in build_model(tiny, seed=0).parameters()) == tiny.num_params()


@pytest.mark.parametrize(("depth", "expected"), [
    (12, list(range(12))),
    (6, [0, 2, 4, 7, 9, 11]),
    (4, [0, 4, 7, 11]),
    (3, [0, 6, 11]),
    (2, [0, 11]),
    (1, [5]),
    (24, [i // 2 for i in range(24)]),
])
def test_depth_stretch_maps_relative_position_onto_the_pattern(depth, expected) -> None:
    assert [pattern_index(j, depth) for j in range(depth)] == expected


@pytest.mark.parametrize("depth", range(1, 30))
def test_stretched_rule_is_symmetric_and_keeps_the_edges(depth) -> None:
    widths = revit_widths(176, depth)
    assert widths == widths[::-1]
    if depth > 1:
        assert widths[0] == widths[-1] == (10, 16, 64, 528)


def test_rule_refuses_an_embedding_that_zeroes_a_width() -> None:
    with pytest.raises(SpecError, match="above 100"):
        revit_spec(100)
    assert revit_spec(101).blocks[1].heads == 2


def test_cli_revit_prints_and_writes(tmp_path, capsys) -> None:
    code, out, _ = run_cli(["arch", "revit", "--embed", "256", "--depth", "6", "--json"], capsys)
    assert code == 0
    doc = json.loads(out)
    assert [b["heads"] for b in doc["arch"]["blocks"]] == [10, 2, 4, 4, 2, 10]  # r = round(1.28) = 1
    code, out, _ = run_cli(["arch", "revit", "--embed", "176", "--distilled", "--out", str(tmp_path / "a.json")],
                           capsys)
    assert code == 0 and "5.34 M params, 1.14 GMACs" in out
    spec, prov = load_arch_file(tmp_path / "a.json")
    assert spec.blocks == preset("revit_tiny_distilled").blocks and prov["rule"] == "published (NViT)"
    code, _, err = run_cli(["arch", "revit", "--embed", "64"], capsys)
    assert code == 1 and err.count("\n") == 1 and "above 100" in err


def test_cli_show_revit_tiny(capsys) -> None:
    code, out, _ = run_cli(["arch", "show", "revit_tiny"], capsys)
    assert code == 0 and "5.16 M params, 1.13 GMACs" in out and "1056" in out
