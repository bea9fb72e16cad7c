"""Pruning stays inside the latency table's measured grid: minimums from the grid, models outside it refused."""

from __future__ import annotations

from dataclasses import replace

import lut_fakes as fk
import pytest
import torch
from cli_run import run_cli

from nvit.arch import BlockSpec
from nvit.errors import LutError
from nvit.lut.base import FlopsPredictor
from nvit.lut.predictor import LatencyPredictor
from nvit.models import build_model
from nvit.presets import preset
from nvit.pruning.config import PruneConfig, Target
from nvit.pruning.limits import measured_grid, pruning_layout

SPEC = preset("vit_test")


@pytest.fixture(scope="module")
def table_path(tmp_path_factory):
    """A fake-backend table of vit_test whose grid stops above the group size: heads 2..4, MLP 64..256."""
    return fk.tiny_table(tmp_path_factory.mktemp("grid") / "lut.parquet")


def test_minimums_come_from_the_tables_smallest_measured_widths(table_path) -> None:
    from nvit.lut.table import LatencyTable

    predictor = LatencyPredictor(LatencyTable.load(table_path))
    grid = measured_grid(predictor)
    assert [grid.smallest(a) for a in ("embed_dim", "heads", "qk_dim", "v_dim", "mlp_dim")] == [32, 2, 8, 8, 64]
    assert grid.largest("mlp_dim") == 256 and grid.largest("heads") == 4
    config = PruneConfig(targets=(Target.ratio(0.8),), group_size=8)
    lay = pruning_layout(SPEC, config, predictor)
    assert lay.minimal_spec().embed_dim == 32 and lay.minimal_spec().blocks[0] == BlockSpec(2, 8, 8, 64)
    # a configured minimum above the grid's is kept; below it, the grid's wins
    assert pruning_layout(SPEC, PruneConfig(targets=(Target.ratio(0.8),), min_embed_dim=48, min_heads=3),
                          predictor).minimal_spec().blocks[0].heads == 3
    assert pruning_layout(SPEC, PruneConfig(targets=(Target.ratio(0.8),), min_embed_dim=16),
                          predictor).minimal_spec().embed_dim == 32
    # the smallest reachable latency is a measured point, not an extrapolation floored at 0
    smallest = lay.minimal_spec()
    raw = LatencyPredictor(LatencyTable.load(table_path), calibrated=False)
    assert raw.attn_ms(32, 2, 8, 8) > 0 and raw.mlp_ms(32, 64) > 0
    assert predictor.predict_ms(smallest) > 0.5 * predictor.predict_ms(SPEC)
    # without a table (FLOPs stand-in) only the group size bounds the widths
    flops = pruning_layout(SPEC, replace(config, remove=()), FlopsPredictor(SPEC, reference_ms=1.0))
    assert flops.minimal_spec().blocks[0] == BlockSpec(1, 8, 8, 8) and measured_grid(FlopsPredictor(SPEC, 1.0)) is None
    # the FLOPs stand-in prices removed sub-layers, so by default all but one attention may go
    assert pruning_layout(SPEC, config, FlopsPredictor(SPEC, 1.0)).minimal_spec().blocks == (BlockSpec(1, 8, 8, 0),)


def test_a_model_outside_the_grid_is_refused(table_path) -> None:
    from nvit.lut.table import LatencyTable

    predictor = LatencyPredictor(LatencyTable.load(table_path))
    config = PruneConfig(targets=(Target.ratio(0.8),))
    wide = SPEC.with_blocks((BlockSpec(4, 16, 16, 512), *SPEC.blocks[1:]))
    with pytest.raises(LutError, match="wider than the latency table: block 0 mlp_dim 512 > 256, the largest measured"):
        pruning_layout(wide, config, predictor)
    narrow = SPEC.with_blocks((*SPEC.blocks[:2], BlockSpec(1, 16, 16, 256), *SPEC.blocks[3:]))
    with pytest.raises(LutError, match="narrower than the latency table: block 2 heads 1 < 2"):
        pruning_layout(narrow, config, predictor)


def test_cli_refuses_a_base_wider_than_the_table_in_one_line(table_path, tmp_path, capsys) -> None:
    wide = SPEC.with_blocks(SPEC.blocks, embed_dim=96)  # embed 96 > 64, the largest the table measured
    torch.save(build_model(wide, seed=0).state_dict(), tmp_path / "wide.pth")
    from nvit.arch import save_arch

    arch = save_arch(wide, tmp_path / "wide.json")
    code, _, err = run_cli(["prune", "--checkpoint", str(tmp_path / "wide.pth"), "--arch", str(arch), "--lut",
                            str(table_path), "--target-ratio", "0.8", "--out", str(tmp_path / "out")], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and "latency table" in lines[0] and "embed_dim 96" in lines[0]
    assert not (tmp_path / "out").exists()
