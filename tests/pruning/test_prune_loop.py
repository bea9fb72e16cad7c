"""The pruning loop: targets met and saved, minimums kept, unreachable targets refused, exact resume."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from cli_run import run_cli as cli
from prune_fakes import DENSE_MS, MIN_EMBED, SPEC, config, digits_batches

from nvit.arch import ArchSpec, load_arch_file
from nvit.errors import TargetError
from nvit.lut.base import FlopsPredictor
from nvit.models import build_model, load_variant
from nvit.pruning.config import ConfigError, PruneConfig, RankingMethod, Target, TargetKind
from nvit.pruning.loop import prune
from nvit.pruning.runstate import ResumeError, read_run_summary
from nvit.training.batches import StepBatches


def run(out, cfg: PruneConfig, **kwargs):
    model = build_model(SPEC, seed=0)
    predictor = FlopsPredictor(SPEC, reference_ms=DENSE_MS)
    result = prune(model, config=cfg, predictor=predictor, data=digits_batches(cfg.batch_size), out_dir=out,
                   provenance={"base": "vit_test seed 0", "lut": {"kind": "flops"}}, **kwargs)
    return model, predictor, result


def test_loop_meets_every_target_and_saves_matching_variants(tmp_path) -> None:
    cfg = config(Target.ratio(0.7), Target.latency("2ms"))
    model, predictor, result = run(tmp_path, cfg)
    assert [v.label for v in result.variants] == ["ratio_0.7", "latency_2ms"]
    log = pd.read_parquet(result.log_path)
    assert list(log["step"]) == list(range(result.steps))
    for v, target_ms in zip(result.variants, (0.7 * DENSE_MS, 2.0), strict=True):
        loaded = load_variant(v.path)
        _, prov = load_arch_file(f"{v.path}/arch.json")
        predicted = predictor.predict_ms(loaded.spec)
        assert predicted == pytest.approx(prov["predicted_latency_ms"], rel=1e-12)
        assert predicted <= target_ms == pytest.approx(prov["target"]["latency_ms"])
        assert prov["base"] == "vit_test seed 0" and prov["lut"] == {"kind": "flops"}
        assert prov["prune_config"] == cfg.to_dict()
        # the variant lands at its target: one step earlier the model was still above it
        assert log.loc[v.step - 1, "predicted_latency_ms"] > target_ms
        assert log.loc[v.step, "saved"].split(",").count(v.label) == 1
    # minimums held at every step, widths only shrink, latency only falls
    assert (log["embed_dim"] >= MIN_EMBED).all()
    for i in range(SPEC.depth):
        channels = log[[f"b{i}_qk_dim", f"b{i}_v_dim", f"b{i}_mlp_dim"]]
        assert (log[f"b{i}_heads"] >= 1).all() and (channels >= 8).all(axis=None)
    assert (np.diff(log["predicted_latency_ms"]) <= 0).all()
    assert np.isfinite(log[["loss", "accuracy"]]).all(axis=None)
    assert (log["pruned_now"] > 0).sum() == (log["step"] % cfg.interval == cfg.interval - 1).sum()
    # the run ends right after the last crossing: the gated model is the last variant
    x = digits_batches().dataset.tensors[0][:16]
    with torch.no_grad():
        torch.testing.assert_close(load_variant(result.variants[-1].path)(x), model.eval()(x), atol=1e-5, rtol=1e-4)
    summary = read_run_summary(tmp_path)
    assert [v["label"] for v in summary["variants"]] == ["ratio_0.7", "latency_2ms"]


class NoData:
    def batches(self, start_step: int):
        raise AssertionError("no batch may be drawn for a rejected target")


def test_unreachable_target_is_rejected_before_any_work(tmp_path) -> None:
    predictor = FlopsPredictor(SPEC, reference_ms=DENSE_MS)
    model = build_model(SPEC, seed=0)
    out = tmp_path / "never"
    with pytest.raises(TargetError, match=r"latency_0.05ms \(0.05 ms\) is below the smallest reachable .* 0\.\d+ ms"):
        prune(model, config=config(Target.ratio(0.5), Target.latency(0.05)), predictor=predictor, data=NoData(),
              out_dir=out)
    with pytest.raises(TargetError, match="not below the model's predicted latency 4 ms"):
        prune(model, config=config(Target.latency("5ms")), predictor=predictor, data=NoData(), out_dir=out)
    assert not out.exists()


class Interrupt(Exception):
    pass


def test_resume_after_an_interrupt_continues_exactly(tmp_path) -> None:
    cfg = config(Target.ratio(0.5), checkpoint_every=4)
    _, _, full = run(tmp_path / "full", cfg)
    cut_at = max(s for s in range(full.steps - 1) if s % 4 != 3)  # between two checkpoints
    assert cut_at >= 8

    def stop_at(step: int):
        def hook(report) -> None:
            if report.step == step:
                raise Interrupt
        return hook

    out = tmp_path / "cut"
    with pytest.raises(Interrupt):
        run(out, cfg, on_step=stop_at(cut_at))
    assert not (out / "ratio_0.5").exists()
    with pytest.raises(ResumeError, match="already holds a pruning run; pass --resume"):
        run(out, cfg)
    with pytest.raises(ResumeError, match=r"config differs \(lr: 0.001 in the checkpoint vs 0.002 now\)"):
        run(out, config(Target.ratio(0.5), checkpoint_every=4, lr=2e-3), resume=True)
    _, _, resumed = run(out, cfg, resume=True)

    assert resumed.steps == full.steps
    assert resumed.variants[0].arch == full.variants[0].arch
    timing = ["prune_wall_ms"]  # wall time differs between runs; everything else must not
    a, b = (pd.read_parquet(r.log_path).drop(columns=timing) for r in (full, resumed))
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-5)
    x = digits_batches().dataset.tensors[0][:8]
    with torch.no_grad():
        torch.testing.assert_close(load_variant(resumed.variants[0].path)(x), load_variant(full.variants[0].path)(x))
    _, _, again = run(out, cfg, resume=True)  # a finished run resumes to its result without training
    assert again.steps == full.steps
    with pytest.raises(ResumeError, match="nothing to resume"):
        run(tmp_path / "empty", cfg, resume=True)


def test_pace_sets_the_latency_removed_per_step_whatever_the_ranking(tmp_path) -> None:
    pace = 0.08
    common = dict(interval=2, pace=pace, saliency_window=None)
    logs = {}
    for ranking in RankingMethod:
        _, _, result = run(tmp_path / ranking.value, config(Target.ratio(0.6), ranking=ranking, **common))
        log = pd.read_parquet(result.log_path)
        steps = log[log["pruned_now"] > 0]
        before = np.r_[DENSE_MS, steps["predicted_latency_ms"].to_numpy()[:-1]]
        drop = before - steps["predicted_latency_ms"].to_numpy()
        # every step but the one that lands on the target removes at least the pace, and not much more
        assert (drop[:-1] >= pace * DENSE_MS - 1e-9).all() and (drop[:-1] < 3 * pace * DENSE_MS).all()
        assert len(steps) == int(np.ceil((1 - 0.6) / pace - 1e-9)) or len(steps) == round((1 - 0.6) / pace)
        logs[ranking] = log
    lat, plain = logs[RankingMethod.LATENCY], logs[RankingMethod.SALIENCY]
    # η is fixed at the first pruning step and logged at every one; saliency alone has none
    assert lat["eta"].dropna().nunique() == 1 and lat["eta"].dropna().iloc[0] > 0
    assert (plain["eta"].dropna() == 0).all() and logs[RankingMethod.KNAPSACK]["eta"].isna().all()
    # pricing latency reaches the same target by removing fewer groups
    assert lat["pruned_groups"].iloc[-1] < plain["pruned_groups"].iloc[-1]
    assert {"removed_emb", "removed_head", "removed_qk", "removed_v", "removed_mlp"} <= set(lat.columns)


def test_config_is_strict_and_round_trips() -> None:
    cfg = config(Target.latency("800us"), Target.ratio(0.5))
    assert cfg.targets[0] == Target(TargetKind.LATENCY_MS, 0.8)
    assert PruneConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError, match=r"unknown pruning config key.*: prune_every"):
        PruneConfig.from_dict({**cfg.to_dict(), "prune_every": 3})
    with pytest.raises(ConfigError, match="cannot read latency target '5 sec'"):
        Target.latency("5 sec")
    assert Target.latency("0.005s").value == pytest.approx(5.0) and Target.latency("3").value == 3.0
    with pytest.raises(ConfigError, match="target ratio must be below 1"):
        Target.ratio(1.2)
    with pytest.raises(ConfigError, match="saliency_window 5 exceeds interval 3"):
        config(Target.ratio(0.5), saliency_window=5)
    with pytest.raises(ConfigError, match="interval must be an integer"):
        config(Target.ratio(0.5), interval=2.5)
    with pytest.raises(ConfigError, match="unknown saliency_norm 'per-tensor'"):
        PruneConfig.from_dict({**cfg.to_dict(), "saliency_norm": "per-tensor"})
    with pytest.raises(ConfigError, match="unknown ranking 'halp'; choose from latency, saliency, flops, knapsack"):
        PruneConfig.from_dict({**cfg.to_dict(), "ranking": "halp"})
    with pytest.raises(ConfigError, match="pace must be a fraction"):
        config(Target.ratio(0.5), pace=1.5)
    with pytest.raises(ConfigError, match="unsupported pruning config version 1"):
        PruneConfig.from_dict({**cfg.to_dict(), "version": 1})
    with pytest.raises(ConfigError, match="at least one target"):
        PruneConfig(targets=())


# ---- the command line ------------------------------------------------------------------------------
def test_cli_prunes_to_latency_and_ratio_targets(prune_cli_inputs, tmp_path, capsys) -> None:
    from nvit.lut import load_predictor

    lut, base = prune_cli_inputs / "lut.parquet", prune_cli_inputs / "base.pth"
    predictor = load_predictor(lut)
    dense_ms = predictor.predict_ms(SPEC)
    target_ms = round(0.7 * dense_ms, 4)  # the table's grid stops at 0.61 of dense (heads 2, MLP 64)
    out = tmp_path / "run"
    common = ["prune", "--checkpoint", str(base), "--arch", "vit_test", "--lut", str(lut), "--data", "digits",
              "--interval", "2", "--pace", "0.1", "--min-embed-dim", "32", "--batch-size", "16"]
    code, stdout, err = cli([*common, "--target-latency", f"{target_ms}ms", "--target-ratio", "0.8",
                             "--out", str(out)], capsys)
    assert code == 0, err
    assert "ratio_0.8" in stdout and f"latency_{target_ms:g}ms" in stdout and "top-1" in stdout
    # a table without one-half blocks prunes widths only, where the default ranking is saliency alone
    assert "ranking saliency; pruning widths only" in " ".join(err.split())
    assert json.loads((out / "prune_run.json").read_text())["config"]["ranking"] == "saliency"
    for label, limit in (("ratio_0.8", 0.8 * dense_ms), (f"latency_{target_ms:g}ms", target_ms)):
        spec, prov = load_arch_file(out / label / "arch.json")
        assert predictor.predict_ms(spec) == pytest.approx(prov["predicted_latency_ms"])
        # never below the smallest widths the table measured
        assert all(b.heads >= 2 and b.mlp_dim >= 64 and b.qk_dim >= 8 for b in spec.blocks) and spec.embed_dim >= 32
        assert prov["predicted_latency_ms"] <= limit
        assert prov["lut"]["identity"]["backend"] == "fake" and prov["lut"]["identity"]["batch_size"] == 1
        assert prov["base"]["source"] == "checkpoint" and len(prov["base"]["sha256"]) == 64
        assert 0.0 <= prov["top1"] <= 1.0 and prov["top1_split"] == "val"

    code, _, err = cli([*common, "--target-latency", "0.001ms", "--out", str(tmp_path / "x")], capsys)
    assert code == 1 and "smallest reachable predicted latency" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
    code, _, err = cli([*common, "--target-ratio", "0.5", "--lut-batch-size", "8", "--out", str(tmp_path / "y")],
                       capsys)
    assert code == 1 and "batch" in err.lower() and len(err.strip().splitlines()) == 1
    code, _, err = cli([*common, "--target-ratio", "0.5", "--no-latency", "--latency-weight", "2", "--out",
                        str(tmp_path / "z")], capsys)
    assert code == 1 and "contradict" in err
    code, _, err = cli([*common, "--target-ratio", "0.5", "--ranking", "halp", "--out", str(tmp_path / "z")], capsys)
    assert code == 1 and "unknown --ranking 'halp'; use latency | saliency | flops | knapsack" in err
    code, _, err = cli([*common[:6], "flops", *common[7:], "--target-latency", "1ms", "--out", str(tmp_path / "w")],
                       capsys)
    assert code == 1 and "no time unit" in err
    code, _, err = cli([*common, "--target-ratio", "0.8", "--target-latency", f"{target_ms}ms", "--out", str(out)],
                       capsys)
    assert code == 1 and "--resume" in err


# ---- data parallel ---------------------------------------------------------------------------------
WORLD = 2


def _ddp_setup(table: str | None) -> tuple[object, PruneConfig]:
    """The predictor and config of the data-parallel test: FLOPs and widths only, or (``table``) the fake
    table with one-half blocks and a target that only removing whole sub-layers reaches."""
    if table is None:
        return FlopsPredictor(SPEC, reference_ms=DENSE_MS), config(Target.ratio(0.6), batch_size=8)
    from test_sublayer_pruning import BASE, below_the_width_only_floor

    from nvit.lut import load_predictor
    from nvit.pruning.config import Sublayer

    predictor = load_predictor(table)
    target = below_the_width_only_floor(predictor, BASE)
    return predictor, config(target, batch_size=8, remove=(Sublayer.ATTN, Sublayer.MLP), min_embed_dim=None)


def _ddp_worker(rank: int, port: int, out_dir: str, table: str | None) -> None:
    import os

    from nvit.training.distributed import init_distributed, shutdown

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    try:
        predictor, cfg = _ddp_setup(table)
        source = digits_batches()
        data = StepBatches(source.dataset, batch_size=8, seed=0, rank=rank, world_size=WORLD)
        spec = SPEC if table is None else SPEC.with_blocks(SPEC.blocks, qk_scale=0.25)
        model = build_model(spec, seed=0 if rank == 0 else 1)  # DDP broadcasts rank 0's weights
        result = prune(model, config=cfg, predictor=predictor, data=data, out_dir=f"{out_dir}/run", distributed=ctx)
        torch.save({"state": model.state_dict(), "arch": result.variants[0].arch.to_dict(), "steps": result.steps},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        shutdown()


@pytest.mark.parametrize("sublayers", [False, True], ids=["widths", "sublayers"])
def test_two_gloo_ranks_prune_like_one_process_with_the_global_batch(tmp_path, sublayers) -> None:
    from dataclasses import replace

    import service_env as se
    import torch.multiprocessing as mp

    table = str(fk_table(tmp_path)) if sublayers else None
    port = se.free_port()
    mp.spawn(_ddp_worker, args=(port, str(tmp_path), table), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key  # same weights and the same gates everywhere
    assert ranks[0]["arch"] == ranks[1]["arch"] and ranks[0]["steps"] == ranks[1]["steps"]
    # one process seeing each step's global batch (2 x 8) takes the same pruning decisions
    predictor, cfg = _ddp_setup(table)
    spec = SPEC if table is None else SPEC.with_blocks(SPEC.blocks, qk_scale=0.25)
    single = prune(build_model(spec, seed=0), config=replace(cfg, batch_size=16), predictor=predictor,
                   data=digits_batches(16), out_dir=tmp_path / "single")
    if sublayers:
        assert any(ArchSpec.from_dict(ranks[0]["arch"]).removed_sublayers.values())
    assert single.steps == ranks[0]["steps"] and single.variants[0].arch.to_dict() == ranks[0]["arch"]
    ddp_log, one_log = pd.read_parquet(tmp_path / "run" / "prune_log.parquet"), pd.read_parquet(single.log_path)
    np.testing.assert_allclose(ddp_log["loss"], one_log["loss"], rtol=1e-4)  # loss reduced over ranks
    np.testing.assert_array_equal(ddp_log["pruned_groups"], one_log["pruned_groups"])
    assert (tmp_path / "run" / single.variants[0].label / "arch.json").is_file()


def fk_table(folder):
    """The fake backend's table of a tiny space with one-half blocks (sub-layer removal priced)."""
    import lut_fakes as fk

    from nvit.profiler.sweep import SweepOptions, run_sweep

    with fk.FakeBackend() as backend:
        return run_sweep(fk.tiny_space(half_blocks_per_embed=2), backend, folder / "halves.parquet",
                         device=fk.fake_device(), options=SweepOptions(calibration_models=3)).path


def test_cli_defaults_are_the_library_defaults() -> None:
    import inspect

    from nvit.commands.prune import prune as command
    from nvit.pruning import config as c

    options = {name: p.default for name, p in inspect.signature(command).parameters.items()}
    defaults = {name: option.default for name, option in options.items()}
    # the ranking follows what may go: the library's default with sub-layer removal, another widths only
    assert defaults["ranking"] is None and defaults["pace"] == c.DEFAULT_PACE
    assert f"Default: {c.DEFAULT_RANKING.value} where whole sub-layers" in " ".join(options["ranking"].help.split())
    assert f"{c.WIDTH_ONLY_RANKING.value} when pruning widths only" in " ".join(options["ranking"].help.split())
    assert defaults["interval"] == c.DEFAULT_INTERVAL and defaults["saliency_ema"] == c.DEFAULT_EMA
    assert f"(default {c.DEFAULT_LATENCY_WEIGHT}," in options["latency_weight"].help
    assert defaults["remove"] is None
    assert "Default: " + ",".join(r.value for r in c.DEFAULT_REMOVE) in options["remove"].help
