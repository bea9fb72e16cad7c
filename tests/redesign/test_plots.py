"""The widths-per-block figures: absolute widths against the base (demo) and shares against dense (redistribute)."""

from __future__ import annotations

from unittest import mock

from nvit.plots import plot_per_block, plot_shares, plot_widths
from nvit.presets import preset
from nvit.redesign.learned import Reference, Shape, fit_shares, variant_shares

PNG = b"\x89PNG\r\n\x1a\n"


def test_both_figures_are_drawn_by_the_shared_per_block_drawing(tmp_path) -> None:
    base = preset("vit_test")
    variant = base.with_blocks(tuple(b.__class__(2, 8, 16, 64) for b in base.blocks), name="v")
    shares = variant_shares(Shape.of(variant), Reference.of(base))
    rule = fit_shares([shares], depth=6)
    with mock.patch("nvit.plots.plot_per_block", wraps=plot_per_block) as drawer:
        plot_widths(base, [("v", variant)], tmp_path / "w.png")
        plot_shares([shares], rule, tmp_path / "s.png")
    assert drawer.call_count == 2
    widths_series = drawer.call_args_list[0].args[1]
    assert widths_series[1][1][0] == [2.0] * 4  # heads of the variant
    share_series = drawer.call_args_list[1].args[1]
    assert share_series[0][1][0] == (0.5,) * 4 and len(share_series[1][1][0]) == 6  # the rule at depth 6
    assert (tmp_path / "w.png").read_bytes()[:8] == PNG and (tmp_path / "s.png").read_bytes()[:8] == PNG


def test_a_dropped_block_keeps_its_place_in_the_widths_plot() -> None:
    from nvit.arch import BlockSpec
    from nvit.plots import _absolute
    from nvit.presets import preset

    variant = preset("vit_test").with_blocks((BlockSpec(4, 16, 16, 64), BlockSpec(0, 0, 0, 32), BlockSpec(2, 8, 8, 0)))
    heads, mlp = _absolute(variant, ("heads", "mlp_dim"), dropped=(1,))
    assert heads == [4.0, 0.0, 0.0, 2.0] and mlp == [64.0, 0.0, 32.0, 0.0]
