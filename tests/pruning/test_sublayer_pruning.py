"""Whole sub-layers and blocks priced by the table as measured and removed by pruning (absent in the model:
tests/models/test_removed_sublayers.py)."""

from __future__ import annotations

import json

import lut_fakes as fk
import numpy as np
import pytest
import torch
from cli_run import run_cli
from prune_fakes import digits_batches
from test_saliency import backward, perturbed

from nvit.arch import ArchSpec, BlockSpec, load_arch_file, save_arch
from nvit.errors import LutError
from nvit.lut.predictor import LatencyPredictor
from nvit.lut.table import LatencyTable
from nvit.models import build_model, load_variant, slice_model
from nvit.presets import preset
from nvit.pruning.config import PruneConfig, RankingMethod, Sublayer, Target, parse_remove
from nvit.pruning.groups import GroupKind, GroupLayout, Minimums
from nvit.pruning.limits import pruning_layout
from nvit.pruning.loop import prune
from nvit.pruning.regularizer import gate_latency_deltas_ms
from nvit.pruning.saliency import gate_unit_sums, parameter_unit_sums
from nvit.pruning.state import PruneState

SPEC = preset("vit_test")
BOTH = frozenset({GroupKind.ATTN_LAYER, GroupKind.MLP_LAYER})


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    """A table that measured one-half blocks and one that did not (the fake backend's latency is the oracle)."""
    from nvit.profiler.sweep import SweepOptions, run_sweep

    folder = tmp_path_factory.mktemp("sublayer")
    out = {}
    for name, halves in (("with", 2), ("without", 0)):
        with fk.FakeBackend() as backend:
            out[name] = run_sweep(fk.tiny_space(half_blocks_per_embed=halves), backend, folder / f"{name}.parquet",
                                  device=fk.fake_device(), options=SweepOptions(calibration_models=4)).path
    return out


# ---- table and predictor ---------------------------------------------------------------------------
def test_predictor_prices_removed_sublayers_as_measured(tables) -> None:
    predictor = LatencyPredictor(LatencyTable.load(tables["with"]))
    assert predictor.removal_unavailable is None
    assert set(predictor.one_half) and all(f.slope == pytest.approx(fk.ONE_HALF_RATIO) for f in
                                            predictor.one_half.values())
    spec = ArchSpec(embed_dim=64, blocks=(BlockSpec(4, 16, 16, 0), BlockSpec(0, 0, 0, 128), BlockSpec(2, 8, 8, 256)),
                    img_size=8, patch_size=2, in_chans=1, num_classes=10, qk_scale=0.25)
    assert predictor.grid_report(spec).inside
    assert predictor.predict_ms(spec) == pytest.approx(fk.model_ms(spec), rel=1e-9)
    # the price of removing a sub-layer is the measured drop to the one-half block, not the half's width
    deltas = predictor.sublayer_deltas_ms(64, spec.blocks)
    full = fk.block_ms(64, 2, 8, 8, 256)
    assert deltas.attn_ms[2] == pytest.approx(fk.SCALE * (full - fk.block_ms(64, 0, 0, 0, 256)), rel=1e-9)
    assert deltas.mlp_ms[2] == pytest.approx(fk.SCALE * (full - fk.block_ms(64, 2, 8, 8, 0)), rel=1e-9)
    assert deltas.mlp_ms[1] == pytest.approx(fk.SCALE * fk.block_ms(64, 0, 0, 0, 128), rel=1e-9)  # last: the block
    assert np.isnan(deltas.mlp_ms[0]) and np.isnan(deltas.attn_ms[1])
    # calibration and the self-check include models that lack sub-layers and blocks
    meta = LatencyTable.load(tables["with"]).meta
    assert any(m.name.startswith(("cal-removed", "cal-shallow")) for m in meta.calibration.models)
    assert meta.self_check.removed_shapes["n"] >= 1 and meta.self_check.mape_pct < 1e-6


def test_a_table_without_one_half_blocks_says_why_it_cannot_price_removal(tables, capsys) -> None:
    predictor = LatencyPredictor(LatencyTable.load(tables["without"]))
    assert "no measured one-half blocks" in predictor.removal_unavailable
    spec = ArchSpec(embed_dim=64, blocks=(BlockSpec(4, 16, 16, 0), BlockSpec(2, 8, 8, 256)), img_size=8,
                    patch_size=2, in_chans=1, num_classes=10, qk_scale=0.25)
    with pytest.raises(LutError, match="cannot price removing a whole attention or MLP"):
        predictor.predict_ms(spec)
    assert predictor.predict_ms(spec.with_blocks((BlockSpec(2, 8, 8, 256),) * 2)) > 0  # widths still work
    code, out, _ = run_cli(["lut", "show", str(tables["without"])], capsys)
    assert code == 0 and "sub-layer removal unavailable" in out


def test_predict_shows_removed_sublayers(tables, tmp_path, capsys) -> None:
    spec = ArchSpec(embed_dim=64, blocks=(BlockSpec(4, 16, 16, 0), BlockSpec(0, 0, 0, 128)), img_size=8,
                    patch_size=2, in_chans=1, num_classes=10, qk_scale=0.25)
    arch = save_arch(spec, tmp_path / "a.json")
    code, out, _ = run_cli(["predict", "--lut", str(tables["with"]), "--arch", str(arch)], capsys)
    assert code == 0 and "attn removed" in out and "mlp removed" in out
    code, _, err = run_cli(["predict", "--lut", str(tables["without"]), "--arch", str(arch)], capsys)
    assert code == 1 and "no measured one-half blocks" in err and "Traceback" not in err


# ---- groups and saliency ---------------------------------------------------------------------------
def test_layer_gate_saliency_is_the_sum_of_its_units_and_the_parameter_form() -> None:
    model = perturbed(SPEC, seed=4)
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.proj.bias.zero_()
            blk.mlp.fc2.bias.zero_()
    lay = GroupLayout(SPEC, group_size=8, minimums=Minimums(embed_dim=8), removable=BOTH)
    backward(model, seed=4)
    sums = gate_unit_sums(model, lay).numpy()
    for i in range(SPEC.depth):
        heads = sums[lay.units_of(lay.gates_of(GroupKind.HEAD, i)[0])]
        neurons = sums[lay.units_of(lay.gates_of(GroupKind.MLP, i)[0])]
        attn = sums[lay.units_of(lay.gates_of(GroupKind.ATTN_LAYER, i)[0])]
        mlp = sums[lay.units_of(lay.gates_of(GroupKind.MLP_LAYER, i)[0])]
        assert attn[0] == pytest.approx(heads.sum(), rel=1e-9) and mlp[0] == pytest.approx(neurons.sum(), rel=1e-9)
    np.testing.assert_allclose(sums[lay.unit_kind >= 5], parameter_unit_sums(model, lay).numpy()[lay.unit_kind >= 5],
                               rtol=1e-9)


def test_removing_sublayers_drops_their_widths_and_keeps_one_attention() -> None:
    lay = GroupLayout(SPEC, group_size=8, removable=BOTH)
    state = PruneState(lay)
    attn = lay.gates_of(GroupKind.ATTN_LAYER)
    mlp = lay.gates_of(GroupKind.MLP_LAYER)
    state.remove(lay.units_of(attn[0]))
    assert not state.can_remove(lay.units_of(lay.gates_of(GroupKind.HEAD, 0)[0])[:1])  # its heads went with it
    assert state.spec().blocks[0] == BlockSpec(0, 0, 0, 256)
    state.remove(lay.units_of(mlp[0]))  # block 0 is gone
    assert state.spec().depth == 3 and state.block_specs()[0] is None
    for j in attn[1:3]:
        state.remove(lay.units_of(j))
    assert not state.can_remove(lay.units_of(attn[3]))  # the last attention stays
    assert int(state.removable_groups()[attn].sum()) == 0
    cand = state.candidates(np.ones(lay.num_units))
    assert not set(cand.gate.tolist()) & set(attn.tolist())
    assert [b.has_attn for b in state.spec().blocks] == [False, False, True]
    assert lay.minimal_spec().blocks == (BlockSpec(1, 8, 8, 0),)
    # sub-layers not named removable never go
    width_only = GroupLayout(SPEC, group_size=8)
    assert not PruneState(width_only).can_remove(width_only.units_of(width_only.gates_of(GroupKind.MLP_LAYER)[0]))
    model = build_model(SPEC, seed=0).eval()
    state.apply(model)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(slice_model(model)(x), model(x), atol=1e-6, rtol=1e-5)
    assert slice_model(model).spec == state.spec()


def test_layer_gate_deltas_come_from_the_table(tables) -> None:
    predictor = LatencyPredictor(LatencyTable.load(tables["with"]))
    spec = ArchSpec(embed_dim=64, blocks=(BlockSpec(4, 16, 16, 256),) * 2, img_size=8, patch_size=2, in_chans=1,
                    num_classes=10)
    lay = GroupLayout(spec, group_size=8, removable=BOTH)
    state = PruneState(lay)
    state.remove(lay.units_of(lay.gates_of(GroupKind.MLP_LAYER, 1)[0]))
    d = gate_latency_deltas_ms(lay, predictor, state.widths)
    assert d[lay.gates_of(GroupKind.ATTN_LAYER, 1)[0]] == pytest.approx(
        fk.SCALE * fk.block_ms(64, 4, 16, 16, 0), rel=1e-9)  # its last sub-layer: the whole block
    assert d[lay.gates_of(GroupKind.MLP_LAYER, 0)[0]] == pytest.approx(
        fk.SCALE * (fk.block_ms(64, 4, 16, 16, 256) - fk.block_ms(64, 4, 16, 16, 0)), rel=1e-9)
    assert np.isnan(d[lay.gates_of(GroupKind.MLP, 1)[0]])  # a removed sub-layer's width gate


# ---- the pruning loop and the CLI ------------------------------------------------------------------
def below_the_width_only_floor(predictor: LatencyPredictor, base: ArchSpec) -> Target:
    """A target ratio 20% below the lowest latency width-only pruning can reach on ``predictor``'s table."""
    width_only = pruning_layout(base, PruneConfig(targets=(Target.ratio(0.5),), remove=()), predictor)
    return Target.ratio(round(0.8 * predictor.predict_ms(width_only.minimal_spec()) / predictor.predict_ms(base), 3))


def removal_config(target: Target, **changes) -> PruneConfig:
    kwargs = dict(targets=(target,), interval=2, pace=0.08, saliency_window=1, lr=1e-3, batch_size=16,
                  remove=(Sublayer.ATTN, Sublayer.MLP))
    return PruneConfig(**{**kwargs, **changes})


BASE = SPEC.with_blocks(SPEC.blocks, qk_scale=0.25)


@pytest.mark.parametrize("ranking", [RankingMethod.KNAPSACK, RankingMethod.LATENCY, RankingMethod.SALIENCY])
def test_pruning_removes_sublayers_below_the_width_only_floor_and_slices_exactly(tmp_path, tables, ranking) -> None:
    predictor = LatencyPredictor(LatencyTable.load(tables["with"]))
    target = below_the_width_only_floor(predictor, BASE)
    model = build_model(BASE, seed=0)
    result = prune(model, config=removal_config(target, ranking=ranking), predictor=predictor,
                   data=digits_batches(16), out_dir=tmp_path)
    variant = load_variant(result.variants[0].path)
    assert any(variant.spec.removed_sublayers.values()) or variant.spec.depth < BASE.depth
    assert any(b.has_attn for b in variant.spec.blocks)
    assert predictor.predict_ms(variant.spec) <= target.value * predictor.predict_ms(BASE)
    _, prov = load_arch_file(f"{result.variants[0].path}/arch.json")
    assert prov["removable_sublayers"] == ["attn_layer", "mlp_layer"]
    x = digits_batches().dataset.tensors[0][:8]
    with torch.no_grad():
        torch.testing.assert_close(variant(x), model.eval()(x), atol=1e-5, rtol=1e-4)


def test_resume_with_sublayer_removal_continues_exactly(tmp_path, tables) -> None:
    predictor = LatencyPredictor(LatencyTable.load(tables["with"]))
    cfg = removal_config(below_the_width_only_floor(predictor, BASE), checkpoint_every=2)
    data = lambda: digits_batches(16)  # noqa: E731
    full = prune(build_model(BASE, seed=0), config=cfg, predictor=predictor, data=data(), out_dir=tmp_path / "full")

    class Stop(Exception):
        pass

    def stop(report) -> None:
        if report.step == full.steps // 2 + 1:
            raise Stop

    with pytest.raises(Stop):
        prune(build_model(BASE, seed=0), config=cfg, predictor=predictor, data=data(), out_dir=tmp_path / "cut",
              on_step=stop)
    resumed = prune(build_model(BASE, seed=0), config=cfg, predictor=predictor, data=data(),
                    out_dir=tmp_path / "cut", resume=True)
    assert resumed.variants[0].arch == full.variants[0].arch and resumed.steps == full.steps
    a = load_variant(full.variants[0].path).state_dict()
    b = load_variant(resumed.variants[0].path).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_remove_flag_parses_and_tables_without_rows_refuse_or_fall_back(tables, tmp_path, caplog) -> None:
    assert parse_remove("attn,mlp") == (Sublayer.ATTN, Sublayer.MLP) and parse_remove("none") == ()
    assert parse_remove("mlp") == (Sublayer.MLP,)
    with pytest.raises(Exception, match="--remove takes"):
        parse_remove("none,attn")
    predictor = LatencyPredictor(LatencyTable.load(tables["without"]))
    with pytest.raises(LutError, match="no measured one-half blocks"):
        pruning_layout(SPEC, PruneConfig(targets=(Target.ratio(0.5),), remove=(Sublayer.ATTN,)), predictor)
    lay = pruning_layout(SPEC, PruneConfig(targets=(Target.ratio(0.5),)), predictor)  # the default falls back
    assert lay.removable == frozenset() and "pruning widths only" in caplog.text
    assert PruneConfig.from_dict(PruneConfig(targets=(Target.ratio(0.5),), remove=(Sublayer.MLP,)).to_dict()
                                 ).remove == (Sublayer.MLP,)


def test_cli_remove_flag(tables, tmp_path, capsys) -> None:
    torch.save(build_model(BASE, seed=0).state_dict(), tmp_path / "base.pth")
    arch = save_arch(BASE, tmp_path / "base.json")
    common = ["prune", "--checkpoint", str(tmp_path / "base.pth"), "--arch", str(arch), "--data", "digits",
              "--interval", "2", "--pace", "0.1", "--batch-size", "16", "--no-eval"]
    code, _, err = run_cli([*common, "--lut", str(tables["without"]), "--remove", "attn", "--target-ratio", "0.5",
                            "--out", str(tmp_path / "a")], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "no measured one-half blocks" in err
    code, _, err = run_cli([*common, "--lut", str(tables["with"]), "--remove", "heads", "--target-ratio", "0.5",
                            "--out", str(tmp_path / "b")], capsys)
    assert code == 1 and "unknown sub-layer to remove 'heads'" in err
    target = below_the_width_only_floor(LatencyPredictor(LatencyTable.load(tables["with"])), BASE)
    code, _, err = run_cli([*common, "--lut", str(tables["with"]), "--remove", "none", "--target-ratio",
                            str(target.value), "--out", str(tmp_path / "c")], capsys)
    assert code == 1 and "smallest reachable" in err  # widths alone cannot get there ...
    code, out, err = run_cli([*common, "--lut", str(tables["with"]), "--target-ratio", str(target.value),
                              "--out", str(tmp_path / "d")], capsys)
    assert code == 0, err  # ... the default removes whole sub-layers, with the knapsack
    assert "ranking knapsack; pruning widths and whole attn and mlp sub-layers" in " ".join(err.split())
    assert json.loads((tmp_path / "d" / "prune_run.json").read_text())["config"]["ranking"] == "knapsack"
    code, _, err = run_cli([*common, "--lut", str(tables["with"]), "--remove", "none", "--target-ratio", "0.9",
                            "--out", str(tmp_path / "e")], capsys)
    assert code == 0 and "ranking saliency; pruning widths only" in " ".join(err.split())
    code, out, _ = run_cli(["arch", "show", str(tmp_path / "d" / target.label / "arch.json")], capsys)
    assert code == 0 and "removed" in out


def test_removed_sublayers_round_trip_train_prune_finetune_export_compare(tables, tmp_path, capsys,
                                                                         monkeypatch) -> None:
    """A model with removed sub-layers trains, prunes further, fine-tunes, exports (verified) and compares."""
    fk.register_fake(monkeypatch)
    start = BASE.with_blocks((BlockSpec(4, 16, 16, 256), BlockSpec(4, 16, 16, 0), BlockSpec(0, 0, 0, 256),
                              BlockSpec(4, 16, 16, 256)))
    arch = save_arch(start, tmp_path / "start.json")
    base = tmp_path / "base"
    code, _, err = run_cli(["train", "--arch", str(arch), "--data", "digits", "--epochs", "1", "--batch-size", "32",
                              "--lr", "1e-3", "--out", str(base), "--device", "cpu"], capsys)
    assert code == 0, err
    predictor = LatencyPredictor(LatencyTable.load(tables["with"]))
    target = below_the_width_only_floor(predictor, start)
    code, _, err = run_cli(["prune", "--variant", str(base), "--lut", str(tables["with"]), "--data", "digits",
                              "--interval", "2", "--pace", "0.1", "--batch-size", "16", "--no-eval",
                              "--target-ratio", str(target.value), "--out", str(tmp_path / "run")], capsys)
    assert code == 0, err
    pruned = tmp_path / "run" / target.label
    kept = load_variant(pruned).spec.blocks  # the start lacks 2 of its 8 sub-layers; pruning only removes more
    assert sum(b.has_attn + b.has_mlp for b in kept) <= 6 and any(not (b.has_attn and b.has_mlp) for b in kept)
    tuned = tmp_path / "tuned"
    code, _, err = run_cli(["finetune", "--variant", str(pruned), "--teacher", str(base), "--data", "digits",
                              "--epochs", "1", "--batch-size", "32", "--out", str(tuned), "--device", "cpu"], capsys)
    assert code == 0, err
    assert load_variant(tuned).spec == load_variant(pruned).spec
    code, _, err = run_cli(["export", str(tuned)], capsys)
    assert code == 0, err
    assert json.loads((tuned / "export" / "export.json").read_text())["verify"]["passed"]
    code, _, err = run_cli(["compare", str(tuned), "--lut", str(tables["with"]), "--base", str(base),
                              "--out", str(tmp_path / "report"), "--allow-other-device"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "report" / "compare.json").read_text())
    row = next(m for m in report["results"] if m["name"] == "tuned")
    assert row["measured_ms"] == pytest.approx(fk.model_ms(load_variant(tuned).spec), rel=1e-9)
    assert row["predicted_ms"] == pytest.approx(row["measured_ms"], rel=1e-6)


class OneShapeSlowBackend(fk.FakeBackend):
    """The fake device, except that an attention-only block of 4 heads × Q/K 8 / V 8 at e 64 takes 25% more
    than its half says, in a row and inside a model alike (what §2b measured on the CPU for that shape)."""

    SLOW = 1.25

    @staticmethod
    def slow(e: int, b: BlockSpec) -> bool:
        return (e, b.heads, b.qk_dim, b.v_dim, b.mlp_dim) == (64, 4, 8, 8, 0)

    def latency_of(self, workload) -> float:
        config = getattr(workload.module, "nvit_config", None)
        if config is not None:
            extra = self.SLOW - 1 if (config.kind.value == "attn_block" and self.slow(
                config.embed_dim, BlockSpec(config.heads, config.qk_dim, config.v_dim, 0))) else 0.0
            return fk.config_ms(config) * (1 + extra)
        spec = workload.module.spec
        extra = sum(fk.block_ms(spec.embed_dim, b.heads, b.qk_dim, b.v_dim, b.mlp_dim) * (self.SLOW - 1)
                    for b in spec.blocks if self.slow(spec.embed_dim, b))
        return fk.model_ms(spec) + fk.SCALE * extra


def test_narrow_blocks_price_the_shapes_pruning_reaches_from_their_own_rows(tmp_path) -> None:
    from nvit.profiler.sweep import SweepOptions, run_sweep

    predictors = {}
    for narrow in (False, True):
        with OneShapeSlowBackend() as backend:
            path = run_sweep(fk.tiny_space(half_blocks_per_embed=2, narrow_blocks=narrow), backend,
                             tmp_path / f"narrow_{narrow}.parquet", device=fk.fake_device(),
                             options=SweepOptions(calibration_models=4)).path
        predictors[narrow] = LatencyPredictor(LatencyTable.load(path))
    slow = BlockSpec(4, 8, 8, 0)
    spec = ArchSpec(embed_dim=64, blocks=(slow, slow, BlockSpec(2, 8, 8, 64)), img_size=8, patch_size=2,
                    in_chans=1, num_classes=10, qk_scale=0.25)
    truth = fk.model_ms(spec) + fk.SCALE * 2 * (OneShapeSlowBackend.SLOW - 1) * fk.block_ms(64, 4, 8, 8, 0)
    # without narrow rows the one-half fit (through its two corners) prices the slow shape like any other
    assert predictors[False].predict_ms(spec) / truth - 1 < -0.08
    # with them, that block is its own row, and the other blocks are the model's as before
    with_rows = predictors[True]
    assert len(with_rows.measured_blocks) > len(predictors[False].measured_blocks)
    assert with_rows.predict_ms(spec) == pytest.approx(truth, rel=0.01)
    raw = with_rows.raw_block_latencies_ms(spec)
    assert raw[0] == pytest.approx(OneShapeSlowBackend.SLOW * fk.block_ms(64, 4, 8, 8, 0), rel=1e-9)
    assert raw[2] == pytest.approx(fk.block_ms(64, 2, 8, 8, 64), rel=1e-9)
    # the price of removing the MLP of a 4 × q8/v8 block now includes the slow shape it leads to
    deltas = with_rows.sublayer_deltas_ms(64, (BlockSpec(4, 8, 8, 64),))
    expected = fk.block_ms(64, 4, 8, 8, 64) - OneShapeSlowBackend.SLOW * fk.block_ms(64, 4, 8, 8, 0)
    assert deltas.mlp_ms[0] == pytest.approx(with_rows.scale * expected, rel=0.02)
    # `lut show` says how many blocks are priced by their rows and where the model alone is furthest off
    from nvit.commands.lut import measured_blocks_line

    line = measured_blocks_line(LatencyPredictor(LatencyTable.load(tmp_path / "narrow_True.parquet"),
                                                 calibrated=False))
    assert f"{len(with_rows.measured_blocks)} measured blocks" in line and "(e64/h4/q8/v8)" in line
    gap = dict(with_rows.measured_blocks.model_gaps_pct(with_rows))["e64/h4/q8/v8"]
    assert gap > 10
