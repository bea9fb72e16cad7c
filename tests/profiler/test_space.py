"""Search spaces (grids, presets, JSON files, sampling) and the workloads the profiler times."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nvit.arch import BlockSpec, block_params
from nvit.errors import SpecError
from nvit.models.vit import Block
from nvit.presets import preset
from nvit.profiler.space import (
    SearchSpace,
    aligned_span,
    calibration_archs,
    doubling_span,
    load_space,
    preset_space,
    random_arch,
    resolve_space,
    save_space,
    space_preset_names,
)
from nvit.profiler.workloads import build_part_module, model_workload, part_workload
from nvit.vocab import PartConfig, PartKind, Precision


def test_vit_test_preset_counts_and_grids() -> None:
    space = preset_space("vit_test")
    assert space.num_tokens == 17
    assert space.embed_dims == (16, 32, 48, 64)
    assert space.heads == (1, 2, 3, 4) and space.qk_dims == (8, 16) and space.v_dims == (8, 16)
    assert space.mlp_dims == (8, 56, 104, 160, 208, 256)  # down to the pruning group size
    # narrow blocks per e: 4 heads x 2 MLP widths full blocks (the smallest corner already sampled: +7),
    # 4 attention-only (+3) and the 3 smallest MLP-only (+2) at q8/v8
    assert space.counts() == {"attn": 64, "mlp": 24, "block": 8 + 28, "fixed": 4, "attn_block": 8 + 12,
                              "mlp_block": 8 + 8}
    assert len(space.configs()) == 116 + 48
    assert len({c.key for c in space.configs()}) == 164  # keys are unique
    halves = space.one_half_block_configs()  # per e: the smallest and the largest of each half's grid
    assert [c.key for c in halves[:4]] == ["attn_block/e16/h1/q8/v8", "attn_block/e16/h4/q16/v16",
                                           "mlp_block/e16/m8", "mlp_block/e16/m256"]
    narrow = [c.key for c in space.narrow_block_configs() if c.embed_dim == 64]
    assert "block/e64/h4/q8/v8/m8" in narrow and "attn_block/e64/h4/q8/v8" in narrow  # the shapes §1 found off
    assert "mlp_block/e64/m56" in narrow and "mlp_block/e64/m104" in narrow
    assert all("/q8/v8" in k for k in narrow if not k.startswith("mlp_block"))
    assert len(narrow) == 12


def test_older_spaces_measure_no_narrow_blocks() -> None:
    data = preset_space("vit_test").to_dict()
    assert data["schema_version"] == 4 and data["narrow_blocks"] is True
    old = {k: v for k, v in data.items() if k != "narrow_blocks"} | {"schema_version": 3}
    space = SearchSpace.from_dict(old)
    assert not space.narrow_blocks and space.narrow_block_configs() == [] and len(space.configs()) == 116
    with pytest.raises(SpecError, match="narrow_blocks"):
        SearchSpace.from_dict({**data, "narrow_blocks": "yes"})


@pytest.mark.parametrize("name", ["deit_tiny", "deit_small", "deit_base"])
def test_deit_presets_cover_the_dense_model_on_aligned_grids(name: str) -> None:
    space = preset_space(name)
    dense = preset(name)
    block = dense.blocks[0]
    assert space.embed_dims[-1] == dense.embed_dim and space.heads[-1] == block.heads
    assert space.qk_dims[-1] == block.qk_dim and space.mlp_dims[-1] == block.mlp_dim
    assert all(e % 32 == 0 for e in space.embed_dims)
    assert all(q % 8 == 0 for q in space.qk_dims + space.v_dims)
    assert all(m % 8 == 0 for m in space.mlp_dims)
    assert space.heads[0] == 1 and space.qk_dims[0] == 8 and space.mlp_dims[0] == 8  # down to the group size
    gaps = np.diff(space.mlp_dims)
    assert gaps[0] < gaps[-1] / 4  # measured densely at the narrow end, where pruned blocks end
    # The profiling budget on 2 CPU cores (about 1.5 s per configuration): well under an hour.
    assert len(space.configs()) <= 800
    assert space.sentinel() == space.largest_block(dense.embed_dim)


def test_distilled_presets_have_one_more_token() -> None:
    assert preset_space("deit_small_distilled").num_tokens == preset_space("deit_small").num_tokens + 1
    assert "deit_base_distilled" in space_preset_names()


def test_spans() -> None:
    assert aligned_span(64, 384, 6, 64) == (64, 128, 192, 256, 320, 384)
    assert aligned_span(10, 100, 1, 8) == (100,)
    assert doubling_span(8, 64) == (8, 16, 32, 64)
    assert doubling_span(8, 48) == (8, 16, 32, 48)
    assert doubling_span(8, 8) == (8,)


def test_part_config_validates_widths_per_kind() -> None:
    c = PartConfig(PartKind.ATTN, 64, heads=4, qk_dim=16, v_dim=8)
    assert c.key == "attn/e64/h4/q16/v8"
    assert PartConfig("mlp", 64, mlp_dim=128).key == "mlp/e64/m128"
    assert PartConfig(PartKind.FIXED, 32).key == "fixed/e32"
    with pytest.raises(SpecError, match="mlp_dim must be 0"):
        PartConfig(PartKind.ATTN, 64, heads=4, qk_dim=16, v_dim=8, mlp_dim=3)
    with pytest.raises(SpecError, match="heads must be a positive integer"):
        PartConfig(PartKind.BLOCK, 64, heads=0, qk_dim=16, v_dim=8, mlp_dim=3)
    with pytest.raises(SpecError, match="embed_dim"):
        PartConfig(PartKind.FIXED, -1)
    with pytest.raises(ValueError):
        PartConfig("conv", 64)
    assert PartConfig(**c.to_dict()) == c


def test_block_sample_is_seeded_distinct_and_holds_the_largest_and_smallest_blocks() -> None:
    space = preset_space("deit_small")
    blocks = space.block_configs()
    assert len(blocks) == 4 * len(space.embed_dims) == len(set(blocks))
    for e in space.embed_dims:
        assert space.largest_block(e) in blocks and space.smallest_block(e) in blocks
        assert space.smallest_block(e).to_dict() == {"kind": "block", "embed_dim": e, "heads": 1, "qk_dim": 8,
                                                      "v_dim": 8, "mlp_dim": 8}
    assert blocks == space.block_configs()
    other = SearchSpace(**{**space.__dict__, "sample_seed": 7}).block_configs()
    assert other != blocks
    small = SearchSpace(base=preset("vit_test"), embed_dims=(64,), heads=(1,), qk_dims=(8,), v_dims=(8,),
                        mlp_dims=(32, 64), blocks_per_embed=5)
    assert len(small.block_configs()) == 2  # never more than the grid holds
    one = SearchSpace(base=preset("vit_test"), embed_dims=(64,), heads=(1, 2), qk_dims=(8,), v_dims=(8,),
                      mlp_dims=(32, 64), blocks_per_embed=1)
    assert one.block_configs() == [one.largest_block(64)]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"heads": (2, 1)}, "strictly increasing"),
        ({"qk_dims": (8, 8)}, "strictly increasing"),
        ({"mlp_dims": ()}, "non-empty"),
        ({"embed_dims": (0, 64)}, "positive integers"),
        ({"v_dims": "8,16"}, "non-empty list"),
        ({"blocks_per_embed": -1}, "non-negative"),
        ({"batch_size": 0}, "batch_size"),
        ({"precision": "int8"}, "unknown precision"),
    ],
)
def test_bad_spaces_are_spec_errors(change: dict, message: str) -> None:
    kwargs = dict(base=preset("vit_test"), embed_dims=(32, 64), heads=(1, 2), qk_dims=(8, 16), v_dims=(8, 16),
                  mlp_dims=(64, 128))
    with pytest.raises(SpecError, match=message):
        SearchSpace(**{**kwargs, **change})


def test_json_round_trip_and_fingerprint(tmp_path) -> None:
    space = preset_space("deit_tiny", batch_size=4)
    path = save_space(space, tmp_path / "space.json")
    back = load_space(path)
    assert back == space and back.fingerprint() == space.fingerprint()
    assert preset_space("deit_tiny").fingerprint() != space.fingerprint()  # batch is part of the identity


def test_hand_written_json_with_preset_base(tmp_path) -> None:
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"base": "vit_test", "embed_dims": [32, 64], "heads": [1, 4], "qk_dims": [16],
                                "v_dims": [16], "mlp_dims": [128, 256], "precision": "fp16"}))
    space = resolve_space(str(path), batch_size=8)
    assert space.base == preset("vit_test") and space.batch_size == 8 and space.precision is Precision.FP16
    # + 2 narrow full blocks (h1 and h4 at q16/v16 with the other MLP width than their corners)
    assert space.counts() == {"attn": 4, "mlp": 4, "block": 6 + 2, "fixed": 2, "attn_block": 4, "mlp_block": 4}


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"base": "vit_test", "embed_dims": [64], "heads": [1], "qk_dims": [8], "v_dims": [8], "mlp_dims": [8],
          "colour": "red"}, "unknown search space key"),
        ({"base": "vit_test", "embed_dims": [64], "heads": [1], "qk_dims": [8], "v_dims": [8]}, "missing key"),
        ({"base": "vit_huge", "embed_dims": [64], "heads": [1], "qk_dims": [8], "v_dims": [8], "mlp_dims": [8]},
         "unknown base architecture"),
        ({"base": "vit_test", "embed_dims": 64, "heads": [1], "qk_dims": [8], "v_dims": [8], "mlp_dims": [8]},
         "must be a list"),
        ({"schema_version": 9, "base": "vit_test", "embed_dims": [64], "heads": [1], "qk_dims": [8],
          "v_dims": [8], "mlp_dims": [8]}, "schema_version"),
        ([1, 2], "JSON object"),
    ],
)
def test_bad_space_files(tmp_path, doc, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(SpecError, match=message):
        load_space(path)


def test_space_file_errors(tmp_path) -> None:
    with pytest.raises(SpecError, match="not found"):
        load_space(tmp_path / "nope.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(SpecError, match="not valid JSON"):
        load_space(tmp_path / "broken.json")
    with pytest.raises(SpecError, match="neither a space preset"):
        resolve_space("deit_gigantic")
    with pytest.raises(SpecError, match="unknown search space preset"):
        preset_space("deit_gigantic")


def test_random_archs_stay_in_range_and_are_seeded() -> None:
    base = preset("deit_small")
    archs = [random_arch(base, np.random.default_rng(3)) for _ in range(2)]
    assert archs[0] == archs[1]
    arch = random_arch(base, np.random.default_rng(5))
    assert not arch.is_uniform and arch.depth == base.depth and arch.num_tokens == base.num_tokens
    assert 0.3 * 384 <= arch.embed_dim <= 384 and arch.embed_dim % 8 == 0
    for b in arch.blocks:
        assert 2 <= b.heads <= 6
        assert all(0.3 * 64 <= w <= 64 and w % 8 == 0 for w in (b.qk_dim, b.v_dim))
        assert 0.3 * 1536 <= b.mlp_dim <= 1536 and b.mlp_dim % 8 == 0
    with pytest.raises(SpecError, match="0 < low <= high"):
        random_arch(base, np.random.default_rng(0), low=0.9, high=0.5)


def test_calibration_archs_span_the_range() -> None:
    base = preset("deit_small")
    archs = calibration_archs(base, 4, seed=1)
    assert [a.name for a in archs] == ["cal-dense", "cal-uniform", "cal-pruned0", "cal-random0"]
    assert archs[0].blocks == base.blocks and archs[0].embed_dim == base.embed_dim
    assert archs[1].flops() < 0.3 * base.flops()
    assert min(b.mlp_dim for b in archs[2].blocks) <= 32  # a pruned shape: some blocks narrow
    assert calibration_archs(base, 1) == archs[:1] and calibration_archs(base, 0) == []


def test_attention_and_mlp_parts_compose_to_the_models_block() -> None:
    """The two halves are the model's own modules: with the block's weights they compute the block."""
    base = preset("vit_test")
    torch.manual_seed(0)
    block = Block(embed_dim=32, spec=BlockSpec(2, 8, 16, 48), scale=8**-0.5, eps=base.layer_norm_eps).eval()
    attn = build_part_module(PartConfig(PartKind.ATTN, 32, heads=2, qk_dim=8, v_dim=16), base)
    mlp = build_part_module(PartConfig(PartKind.MLP, 32, mlp_dim=48), base)
    attn.load_state_dict({k: v for k, v in block.state_dict().items() if k.startswith(("norm1", "attn"))})
    mlp.load_state_dict({k: v for k, v in block.state_dict().items() if k.startswith(("norm2", "mlp"))})
    x = torch.randn(2, base.num_tokens, 32)
    with torch.no_grad():
        torch.testing.assert_close(mlp(attn(x)), block(x), rtol=1e-6, atol=1e-6)


def test_fixed_parts_are_the_model_without_blocks() -> None:
    base = preset("deit_small_distilled")
    module = build_part_module(PartConfig(PartKind.FIXED, 128), base)
    assert len(module.blocks) == 0 and module.nvit_config.embed_dim == 128
    spec = module.spec
    params = sum(p.numel() for p in module.parameters())
    assert params == spec.num_params() - sum(block_params(128, b) for b in spec.blocks)
    w = part_workload(PartConfig(PartKind.FIXED, 128), preset("vit_test"), batch_size=3)
    assert w.input_shape == (3, 1, 8, 8) and w.name == "fixed/e128"
    with torch.no_grad():
        assert w.module(torch.randn(w.input_shape)).shape == (3, 10)


def test_workload_shapes_and_determinism() -> None:
    base = preset("vit_test")
    c = PartConfig(PartKind.BLOCK, 48, heads=3, qk_dim=8, v_dim=16, mlp_dim=96)
    w1, w2 = part_workload(c, base, 2), part_workload(c, base, 2)
    assert w1.input_shape == (2, 17, 48) and not w1.module.training
    for (n, p1), p2 in zip(w1.module.state_dict().items(), w2.module.state_dict().values(), strict=True):
        assert torch.equal(p1, p2), n
    m = model_workload(base, 4)
    assert m.input_shape == (4, 1, 8, 8) and m.module.spec == base
