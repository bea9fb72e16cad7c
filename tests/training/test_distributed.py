"""DDP on CPU with gloo: two processes agree with each other and with one process doing the same work."""

from __future__ import annotations

import logging
import os

import pytest
import service_env as se
import torch
import torch.multiprocessing as mp
from torch.utils.data import Subset

from nvit.data import build_dataset, build_loader
from nvit.models import build_model
from nvit.presets import preset
from nvit.training.distill import ClassificationLoss
from nvit.training.distributed import (
    DistributedError,
    MainProcessFilter,
    all_reduce_mean,
    all_reduce_scalars,
    init_distributed,
    shutdown,
    unwrap,
    wrap_ddp,
)
from nvit.training.fit import TrainConfig, evaluate, train_epoch

VIT_TEST = preset("vit_test")
WORLD = 2
GLOBAL_BATCH = 32
STEPS = 4
SEED = 11
CONFIG = TrainConfig(epochs=1, batch_size=GLOBAL_BATCH // WORLD, lr=2e-3, seed=SEED)


def _sgd(model: torch.nn.Module) -> torch.optim.SGD:
    """SGD, not AdamW: Adam normalises the float noise of gradients that are zero in exact arithmetic (the K
    bias under softmax), so replicas that sum gradients in another order drift apart by ~lr on those."""
    return torch.optim.SGD(unwrap(model).parameters(), lr=0.5)


def _train_data():
    return Subset(build_dataset("digits", "train", VIT_TEST, augment=False), range(STEPS * GLOBAL_BATCH))


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    try:
        assert ctx.backend == "gloo" and ctx.world_size == WORLD and ctx.rank == rank
        model = wrap_ddp(build_model(VIT_TEST, seed=100 + rank), ctx)  # DDP must broadcast rank 0's weights
        loader = build_loader(_train_data(), batch_size=GLOBAL_BATCH // WORLD, train=True, seed=SEED)
        stats = train_epoch(model, loader, _sgd(model), ClassificationLoss(), epoch=0, config=CONFIG)
        val = build_loader(build_dataset("digits", "val", VIT_TEST), batch_size=64, train=False)
        top1 = evaluate(model, val)
        saliency = all_reduce_mean(torch.tensor([rank + 1.0, 2.0 * rank, 5.0]))
        counts = all_reduce_scalars([len(val.sampler), 1])
        torch.save({"state": unwrap(model).state_dict(), "top1": top1, "loss": stats.loss,
                    "train_top1": stats.train_top1, "steps": len(stats.losses), "saliency": saliency,
                    "counts": counts}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        shutdown()


def test_two_gloo_ranks_match_one_process(tmp_path) -> None:
    mp.spawn(_worker, args=(se.free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key  # replicas stay identical
    assert ranks[0]["steps"] == ranks[1]["steps"] == STEPS
    assert torch.equal(ranks[0]["saliency"], torch.tensor([1.5, 1.0, 5.0]))
    assert ranks[0]["counts"] == [359.0, 2.0]  # val shards cover the whole split, nothing repeated
    for key in ("top1", "loss", "train_top1"):
        assert ranks[0][key] == ranks[1][key], key

    # One process, same starting weights (rank 0's), batches of GLOBAL_BATCH: rank r's step-i shard is
    # perm[r::2][16i:16i+16], so the two shards together are exactly perm[32i:32i+32].
    torch.set_num_threads(1)
    model = build_model(VIT_TEST, seed=100)
    loader = build_loader(_train_data(), batch_size=GLOBAL_BATCH, train=True, seed=SEED)
    stats = train_epoch(model, loader, _sgd(model), ClassificationLoss(), epoch=0, config=CONFIG)
    for key, value in model.state_dict().items():
        assert torch.allclose(value, ranks[0]["state"][key], atol=1e-5, rtol=1e-4), key
    assert stats.loss == pytest.approx(ranks[0]["loss"], rel=1e-5)
    assert stats.train_top1 == pytest.approx(ranks[0]["train_top1"])

    # The all-reduced metric equals the single-process metric of the very same weights.
    model.load_state_dict(ranks[0]["state"])
    val = build_loader(build_dataset("digits", "val", VIT_TEST), batch_size=64, train=False)
    assert evaluate(model, val) == ranks[0]["top1"]


def test_single_process_context_and_identity_reductions(monkeypatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = init_distributed("cpu")
    assert ctx.world_size == 1 and ctx.is_main and not ctx.is_distributed and ctx.backend is None
    x = torch.tensor([1.0, 2.0])
    assert torch.equal(all_reduce_mean(x), x) and all_reduce_mean(x) is not x
    assert all_reduce_scalars([3, 4.5]) == [3.0, 4.5]
    model = build_model(VIT_TEST, seed=0)
    assert wrap_ddp(model, ctx) is model and unwrap(model) is model


def test_incomplete_environment_is_one_clear_error(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(DistributedError, match="MASTER_ADDR, MASTER_PORT not set"):
        init_distributed("cpu")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(DistributedError, match="RANK=5 is not within WORLD_SIZE=2"):
        init_distributed("cpu")
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(DistributedError, match="not an integer"):
        init_distributed("cpu")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(DistributedError, match="unknown device"):
        init_distributed("tpu")


def test_only_rank_zero_logs_below_warning() -> None:
    info = logging.LogRecord("nvit", logging.INFO, __file__, 1, "msg", None, None)
    warning = logging.LogRecord("nvit", logging.WARNING, __file__, 1, "msg", None, None)
    assert MainProcessFilter(0).filter(info) and MainProcessFilter(0).filter(warning)
    assert not MainProcessFilter(1).filter(info) and MainProcessFilter(1).filter(warning)
