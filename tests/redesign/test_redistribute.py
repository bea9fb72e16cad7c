"""The learned redistribution rule: shares, smoothing, rounding, rebuilding and meeting a latency target."""

from __future__ import annotations

import math

import lut_fakes as fk
import numpy as np
import pytest

from nvit.arch import ArchSpec, BlockSpec, WidthSteps, round_to_step
from nvit.errors import LutError, SpecError, TargetError
from nvit.presets import preset
from nvit.redesign.learned import (
    DEFAULT_ROUNDING,
    KINDS,
    Reference,
    Shape,
    Shares,
    WidthKind,
    build_arch,
    embed_candidates,
    fit_shares,
    relative_positions,
    scale_to_latency,
    smooth,
    variant_shares,
)
from nvit.redesign.published import published_shares

BASE = preset("vit_test")  # e=64, 4 blocks of 4 heads x 16 (q, v), MLP 256
REF = Reference.of(BASE)
H, Q, V, M = WidthKind.HEADS, WidthKind.QK, WidthKind.V, WidthKind.MLP


def shape(e: int, *blocks: tuple[int, int, int, int], name: str = "v") -> Shape:
    return Shape(e, tuple(blocks), name)


def test_shares_are_widths_over_dense_at_the_variants_own_embedding() -> None:
    v = shape(64, (4, 16, 16, 256), (2, 8, 16, 128), (1, 8, 8, 64), (4, 16, 8, 32))
    s = variant_shares(v, REF)
    assert s.positions == pytest.approx((0, 1 / 3, 2 / 3, 1))
    assert s.values[H] == pytest.approx((1, 0.5, 0.25, 1))
    assert s.values[Q] == pytest.approx((1, 0.5, 0.5, 1))
    assert s.values[V] == pytest.approx((1, 1, 0.5, 0.5))
    assert s.values[M] == pytest.approx((1, 0.5, 0.25, 0.125))
    assert s.embed_share == 1.0
    # at half the embedding, the dense reference has 2 heads and MLP 128; per-head dims do not scale
    half = variant_shares(shape(32, (2, 16, 16, 128), (1, 8, 8, 256), (2, 16, 16, 128), (2, 16, 16, 128)), REF)
    assert half.values[H] == pytest.approx((1, 0.5, 1, 1)) and half.values[M] == pytest.approx((1, 2, 1, 1))
    assert half.values[Q] == pytest.approx((1, 0.5, 1, 1)) and half.embed_share == 0.5


def test_a_removed_sub_layer_is_a_share_of_zero() -> None:
    # heads = 0 (attention removed) and mlp_dim = 0 (MLP removed) are shares of 0, averaged like any other
    a = variant_shares(shape(64, (0, 0, 0, 256), (4, 16, 16, 0), (4, 16, 16, 256), (4, 16, 16, 256)), REF)
    b = variant_shares(shape(64, (4, 16, 16, 256), (4, 16, 16, 128), (4, 16, 16, 256), (4, 16, 16, 256)), REF)
    rule = fit_shares([a, b], depth=4, bandwidth=0)
    assert rule.values[H] == pytest.approx((0.5, 1, 1, 1)) and rule.values[M] == pytest.approx((1, 0.25, 1, 1))
    spec = build_arch(rule, REF, 64, BASE)
    assert spec.blocks[0].heads == 2 and spec.blocks[1].mlp_dim == 64
    zero = fit_shares([a], depth=4, bandwidth=0)
    spec = build_arch(zero, REF, 64, BASE)  # a rounded width never drops below one step
    assert (spec.blocks[0].heads, spec.blocks[0].qk_dim, spec.blocks[0].v_dim) == (2, 8, 8)
    assert spec.blocks[1].mlp_dim == 8
    with pytest.raises(SpecError, match="integers >= 0"):
        shape(64, (-1, 16, 16, 256))


def test_fit_with_zero_bandwidth_is_the_per_block_mean() -> None:
    rng = np.random.default_rng(0)
    family = [variant_shares(shape(64, *[tuple(int(x) for x in rng.integers(1, 5, 1).tolist() +
                                                (rng.integers(1, 3, 3) * (8, 8, 64)).tolist()) for _ in range(4)],
                                   name=f"v{i}"), REF) for i in range(3)]
    rule = fit_shares(family, depth=4, bandwidth=0)
    for k in KINDS:
        expected = np.mean([s.values[k] for s in family], axis=0)
        assert rule.values[k] == pytest.approx(tuple(expected), rel=1e-12)


def test_gaussian_smoothing_by_hand() -> None:
    x, y = np.array([0.0, 1.0]), np.array([1.0, 0.0])
    w = math.exp(-0.5 * (1 / 0.5) ** 2)  # the far point's weight at bandwidth 0.5
    assert smooth(x, y, np.array([0.0, 0.5, 1.0]), 0.5) == pytest.approx([1 / (1 + w), 0.5, w / (1 + w)])
    # constant shares stay constant at any bandwidth and any depth
    const = Shares("c", (0, 0.5, 1), {k: (0.75, 0.75, 0.75) for k in KINDS})
    for depth in (1, 3, 7):
        assert fit_shares([const], depth, bandwidth=0.3).values[M] == pytest.approx((0.75,) * depth)
    with pytest.raises(SpecError, match="bandwidth"):
        smooth(x, y, x, -1.0)


def test_variants_of_other_depths_pool_by_relative_position() -> None:
    assert relative_positions(1).tolist() == [0.5]
    assert relative_positions(5).tolist() == [0, 0.25, 0.5, 0.75, 1]
    a = Shares("a", (0.0, 1.0), {k: (1.0, 0.0) for k in KINDS})
    b = Shares("b", (0.0, 0.5, 1.0), {k: (1.0, 0.5, 0.0) for k in KINDS})
    rule = fit_shares([a, b], depth=3, bandwidth=0)
    assert rule.values[H] == pytest.approx((1.0, 0.5, 0.0))  # the middle block's nearest points: b's only


@pytest.mark.parametrize(("width", "step", "expected"), [
    (11.9, 8, 8), (12.0, 8, 16), (19.9, 8, 16), (20.0, 8, 24), (0.0, 8, 8), (3.0, 8, 8), (64.0, 8, 64),
    (2.9, 2, 2), (3.0, 2, 4), (5.2, 2, 6), (0.4, 2, 2), (1.4, 1, 1), (1.5, 1, 2), (0.2, 1, 1),
])
def test_rounding_to_the_nearest_step_never_below_one(width, step, expected) -> None:
    assert round_to_step(width, step) == expected


def test_rounding_steps_are_checked() -> None:
    assert DEFAULT_ROUNDING.to_dict() == {"heads": 2, "qk_dim": 8, "v_dim": 8, "mlp_dim": 8, "embed_dim": 8}
    with pytest.raises(SpecError, match="heads step"):
        WidthSteps(heads=0)


def test_a_variant_rebuilt_at_its_embedding_is_itself() -> None:
    v = ArchSpec(embed_dim=48, blocks=(BlockSpec(4, 16, 16, 192), BlockSpec(2, 8, 16, 48), BlockSpec(2, 8, 8, 96),
                                       BlockSpec(4, 16, 8, 200)), img_size=8, patch_size=2, in_chans=1,
                 num_classes=10, name="v", qk_scale=0.25)
    rule = fit_shares([variant_shares(Shape.of(v), REF)], depth=4, bandwidth=0)
    rebuilt = build_arch(rule, REF, 48, BASE, name="r")
    assert rebuilt.blocks == v.blocks and rebuilt.embed_dim == 48 and rebuilt.qk_scale is None
    assert (rebuilt.img_size, rebuilt.num_classes, rebuilt.name) == (8, 10, "r")
    # at twice the embedding, heads and MLP double; per-head dims stay
    doubled = build_arch(rule, REF, 96, BASE)
    assert [b.heads for b in doubled.blocks] == [8, 4, 4, 8] and [b.mlp_dim for b in doubled.blocks] == [384, 96,
                                                                                                        192, 400]
    assert [b.qk_dim for b in doubled.blocks] == [16, 8, 8, 16]


# ---- meeting a latency target with a table ----------------------------------------------------------
@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    from nvit.lut import load_predictor

    return load_predictor(fk.tiny_table(tmp_path_factory.mktemp("lut") / "lut.parquet"))


def _rule(heads: float = 0.75, mlp: float = 0.6) -> Shares:
    return Shares("r", (0.0, 1 / 3, 2 / 3, 1.0), {H: (heads,) * 4, Q: (1.0, 0.5, 0.5, 1.0), V: (1.0,) * 4,
                                                  M: (mlp, 1.0, 1.0, mlp)})


def test_embedding_candidates_stay_on_the_measured_range() -> None:
    assert embed_candidates([32, 64], 8) == [32, 40, 48, 56, 64]
    assert embed_candidates([20, 50], 16) == [20, 32, 48, 50]


def test_largest_embedding_meeting_the_target(predictor) -> None:
    rule = _rule()

    def build(e):
        return build_arch(rule, REF, e, BASE)

    truth = {e: fk.model_ms(build(e)) for e in (32, 40, 48, 56, 64)}  # the fake backend's exact latency
    assert all(truth[a] < truth[b] for a, b in zip((32, 40, 48, 56), (40, 48, 56, 64), strict=True))
    target = (truth[48] + truth[56]) / 2
    design = scale_to_latency(build, predictor, target)
    assert design.embed_dim == 48 and design.predicted_ms == pytest.approx(truth[48], rel=1e-6)
    assert design.predicted_ms <= target and design.spec == build(48)
    assert [e for e, _ in design.tried] == [32, 40, 48, 56, 64]
    assert scale_to_latency(build, predictor, truth[64] * 1.01).embed_dim == 64
    with pytest.raises(TargetError, match=r"unreachable.*at least .* ms \(E=32\)"):
        scale_to_latency(build, predictor, truth[32] * 0.9)
    with pytest.raises(TargetError, match="positive"):
        scale_to_latency(build, predictor, -1.0)


def test_a_design_the_table_cannot_price_is_refused(predictor) -> None:
    wide = _rule(mlp=2.5)  # MLP 320 already at E = 32: above the table's base model (256)

    def build(e):
        return build_arch(wide, REF, e, BASE)

    with pytest.raises(LutError, match="cannot price the design"):
        scale_to_latency(build, predictor, 10.0)


def test_published_rule_as_shares_rebuilds_revit_on_a_deit_base() -> None:
    rule = published_shares(12)
    assert rule.values[H][0] == pytest.approx(10 / 2.75) and rule.values[Q][1] == pytest.approx(8 / 64)
    assert rule.values[M] == pytest.approx((0.75,) * 3 + (1.5,) * 6 + (0.75,) * 3) and rule.values[V] == (1.0,) * 12
    deit = preset("deit_tiny")
    assert build_arch(rule, Reference.of(deit), 176, deit).blocks == preset("revit_tiny").blocks
    # on the 4-block vit_test base (16-channel heads): the stretched pattern [edge, middle, middle, edge]
    small = build_arch(published_shares(4), REF, 64, BASE)
    assert [(b.heads, b.qk_dim, b.v_dim, b.mlp_dim) for b in small.blocks] == [
        (14, 8, 16, 192), (6, 8, 16, 384), (6, 8, 16, 384), (14, 8, 16, 192)]
