"""A Swin prunes like a ViT, its widths only for now: one EMB group per stage, groups priced by finite
differences of a whole-model predictor (the FLOPs stand-in), variants sliced exactly and saved as Swins."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from prune_fakes import config, digits_batches

from nvit.lut.base import SwinFlopsPredictor, flops_predictor
from nvit.models import load_variant
from nvit.models.swin import SwinTransformer, build_swin
from nvit.models.swin_slicing import slice_swin
from nvit.pruning.config import Target
from nvit.pruning.groups import GroupKind, GroupLayout
from nvit.pruning.loop import prune
from nvit.pruning.regularizer import gate_latency_deltas_ms
from nvit.pruning.state import PruneState
from nvit.swin import SwinSpec, swin_preset

SPEC = swin_preset("swin_test")


def test_the_layout_has_one_embedding_gate_per_stage_in_the_models_order() -> None:
    layout = GroupLayout(SPEC, group_size=8)
    model = build_swin(SPEC, seed=0)
    model.enable_gates()
    assert [g.numel() for g in layout.check_model(model)] == list(layout.gate_sizes)
    assert [layout.gates[j].name for j in layout.emb_gates] == ["stage 0 emb", "stage 1 emb"]
    full = layout.spec_at(np.array(layout.gate_sizes))
    assert full == SPEC  # the scale stays implicit until QK channels go (the next test)


def test_the_mask_and_the_sliced_swin_agree_before_any_qk_channel_goes() -> None:
    from nvit.models.checkpoint import slice_any

    layout = GroupLayout(SPEC, group_size=8)
    state = PruneState(layout)
    state.remove(layout.units_of(layout.gate_index[(GroupKind.MLP, 1)])[:8])
    model = build_swin(SPEC, seed=0)
    state.apply(model)
    assert slice_any(model).spec == state.spec() and state.spec().qk_scale is None  # the scale stays implicit
    state.remove(layout.units_of(layout.gate_index[(GroupKind.QK, 0)])[:8])
    state.apply(model)
    assert slice_any(model).spec == state.spec() and state.spec().qk_scale == 16**-0.5  # now it is fixed


def test_a_swin_block_may_lose_one_sub_layer_but_never_both() -> None:
    layout = GroupLayout(SPEC, group_size=8, removable={GroupKind.ATTN_LAYER, GroupKind.MLP_LAYER})
    smallest = layout.minimal_spec()  # every block keeps one sub-layer; the first keeps its attention
    blocks = [b for s in smallest.stages for b in s.blocks]
    assert len(blocks) == SPEC.depth and all(b.has_attn or b.has_mlp for b in blocks)
    assert blocks[0].has_attn and sum(b.has_attn for b in blocks) == 1
    state = PruneState(layout)
    attn0, mlp0 = (layout.gate_index[(k, 0)] for k in (GroupKind.ATTN_LAYER, GroupKind.MLP_LAYER))
    assert state.removable_groups()[[attn0, mlp0]].tolist() == [1, 1]
    state.remove(layout.units_of(attn0))
    assert state.removable_groups()[mlp0] == 0  # the block's last sub-layer stays
    assert not state.can_remove(layout.units_of(mlp0))
    spec = state.spec()
    assert not spec.stages[0].blocks[0].has_attn and spec.stages[0].blocks[0].mlp_dim == 128


def test_a_groups_price_is_the_whole_models_saving() -> None:
    layout = GroupLayout(SPEC, group_size=8)
    predictor = SwinFlopsPredictor(SPEC, reference_ms=1.0)
    widths = PruneState(layout).widths
    deltas = gate_latency_deltas_ms(layout, predictor, widths)
    stage1 = layout.emb_gates[1]
    narrower = widths.copy()
    narrower[stage1] -= 8
    smaller = layout.spec_at(narrower)
    assert isinstance(smaller, SwinSpec) and smaller.stages[1].embed_dim == 56
    assert deltas[stage1] == pytest.approx(1.0 - smaller.flops() / SPEC.flops())
    layer_gates = [j for j, g in enumerate(layout.gates) if g.kind in (GroupKind.ATTN_LAYER, GroupKind.MLP_LAYER)]
    assert np.isnan(deltas[layer_gates]).all() and np.isfinite(np.delete(deltas, layer_gates)).all()


def test_a_swin_table_prices_and_pruning_removes_sub_layers(tmp_path) -> None:
    from swin_fakes import swin_table

    from nvit.lut import load_predictor

    predictor = load_predictor(swin_table(tmp_path / "t.swinlut", calibration_models=3, check_models=0))
    assert predictor.removal_unavailable is None
    layout = GroupLayout(SPEC, group_size=8, removable={GroupKind.ATTN_LAYER, GroupKind.MLP_LAYER})
    widths = PruneState(layout).widths
    deltas = gate_latency_deltas_ms(layout, predictor, widths)
    mlp3 = layout.gate_index[(GroupKind.MLP_LAYER, 3)]
    without = widths.copy()
    without[mlp3] = 0
    assert deltas[mlp3] == pytest.approx(predictor.predict_ms(SPEC) - predictor.predict_ms(layout.spec_at(without)))
    assert deltas[mlp3] > 0
    model = build_swin(SPEC, seed=0)
    dense_ms = predictor.predict_ms(SPEC)
    # below what widths alone reach on this table (0.66 of dense): sub-layers must go (the default allows both)
    cfg = config(Target.ratio(0.62), min_embed_dim=8, remove=None)
    result = prune(model, config=cfg, predictor=predictor, data=digits_batches(cfg.batch_size),
                   out_dir=tmp_path / "run")
    [variant] = result.variants
    blocks = [b for s in variant.arch.stages for b in s.blocks]
    assert len(blocks) == SPEC.depth and all(b.has_attn or b.has_mlp for b in blocks)
    assert variant.arch.removed_sublayers["attn"] + variant.arch.removed_sublayers["mlp"] >= 1
    assert variant.predicted_latency_ms <= 0.62 * dense_ms * 1.0001
    saved = load_variant(variant.path)
    assert saved.spec == variant.arch
    images = torch.randn(3, 1, 8, 8)
    model.eval()
    with torch.no_grad():  # the gated model (removed branches gated off) and the sliced variant agree
        assert torch.allclose(model(images), saved(images), atol=1e-5)


def test_a_swin_prunes_to_its_targets_and_saves_sliced_swins(tmp_path) -> None:
    model = build_swin(SPEC, seed=0)
    predictor = flops_predictor(SPEC, 4.0)
    cfg = config(Target.ratio(0.7), Target.ratio(0.5), min_embed_dim=8)
    result = prune(model, config=cfg, predictor=predictor, data=digits_batches(cfg.batch_size), out_dir=tmp_path,
                   provenance={"base": "swin_test seed 0"})
    assert [v.label for v in result.variants] == ["ratio_0.7", "ratio_0.5"]
    for v in result.variants:
        assert v.predicted_latency_ms <= v.target_ms + 1e-12
        assert v.predicted_latency_ms == pytest.approx(predictor.predict_ms(v.arch))
        saved = load_variant(v.path)
        assert isinstance(saved, SwinTransformer) and saved.spec == v.arch
        with torch.no_grad():
            assert torch.isfinite(saved(torch.randn(2, 1, 8, 8))).all()
    smallest = result.variants[-1].arch
    assert smallest.num_params() < SPEC.num_params() and smallest.stages[0].blocks != SPEC.stages[0].blocks
    log = pd.read_parquet(result.log_path)
    assert {"s0_embed_dim", "s1_embed_dim"} <= set(log.columns)
    assert log["s1_embed_dim"].iloc[-1] == smallest.stages[1].embed_dim
    # the gated model and the variant sliced from it compute the same
    images = torch.randn(3, 1, 8, 8)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(images), slice_swin(model)(images), atol=1e-5)
    again = prune(build_swin(SPEC, seed=0), config=cfg, predictor=predictor, data=digits_batches(cfg.batch_size),
                  out_dir=tmp_path, resume=True)  # a finished run resumes to the same variants
    assert [v.arch for v in again.variants] == [v.arch for v in result.variants]
