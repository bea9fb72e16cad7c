"""The README's multi-process commands, run as written: ``torchrun --nproc_per_node 2 -m nvit ...`` on CPU (gloo).

Each test launches the real CLI under torchrun (two processes, one thread each) and checks the exit code, the
files written and, where the algorithm says so, that the result equals one process seeing the same global batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from nvit.arch import load_arch_file
from nvit.presets import preset

SPEC = preset("vit_test")
WORLD = 2
PER_RANK_BATCH = 8


def _torchrun(args: list[str], cwd: Path, *, world: int = WORLD) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           "-m", "nvit", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    env.pop("NVIT_DEBUG", None)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _nvit(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "nvit", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A latency table of vit_test from the fake backend of known latency, and an untrained checkpoint."""
    import lut_fakes as fk

    from nvit.models import build_model

    folder = tmp_path_factory.mktemp("torchrun")
    fk.tiny_table(folder / "lut.parquet")
    torch.save(build_model(SPEC, seed=0).state_dict(), folder / "base.pth")
    return folder


def test_torchrun_train_then_finetune(work: Path) -> None:
    train = ["train", "--arch", "vit_test", "--data", "digits", "--epochs", "1", "--lr", "1e-3", "--device", "cpu"]
    run = _torchrun([*train, "--batch-size", str(PER_RANK_BATCH), "--out", "ddp_base"], work)
    assert run.returncode == 0, run.stderr[-3000:]
    prov = json.loads((work / "ddp_base" / "arch.json").read_text())["provenance"]
    assert prov["world_size"] == WORLD and prov["train"]["batch_size"] == PER_RANK_BATCH
    assert (work / "ddp_base" / "model.safetensors").is_file()
    assert len((work / "ddp_base" / "train_log.csv").read_text().splitlines()) == 2  # header + one epoch
    # one process with the same global batch takes the same steps: the epoch's mean loss agrees closely
    one = _nvit([*train, "--batch-size", str(WORLD * PER_RANK_BATCH), "--out", "one_base"], work)
    assert one.returncode == 0, one.stderr[-3000:]
    ddp_log = pd.read_csv(work / "ddp_base" / "train_log.csv")
    one_log = pd.read_csv(work / "one_base" / "train_log.csv")
    assert ddp_log["loss"].iloc[0] == pytest.approx(one_log["loss"].iloc[0], rel=1e-3)

    run = _torchrun(["finetune", "--variant", "ddp_base", "--teacher", "ddp_base", "--data", "digits", "--epochs",
                     "1", "--batch-size", str(PER_RANK_BATCH), "--device", "cpu", "--out", "ddp_ft"], work)
    assert run.returncode == 0, run.stderr[-3000:]
    prov = json.loads((work / "ddp_ft" / "arch.json").read_text())["provenance"]
    assert prov["world_size"] == WORLD and prov["teacher"] == "ddp_base" and "top1_before_finetune" in prov
    assert load_arch_file(work / "ddp_ft" / "arch.json")[0] == SPEC


def test_torchrun_prune_exits_cleanly_and_matches_one_process(work: Path) -> None:
    common = ["prune", "--lut", "lut.parquet", "--checkpoint", "base.pth", "--arch", "vit_test", "--target-ratio",
              "0.7", "--data", "digits", "--interval", "2", "--pace", "0.1", "--min-embed-dim", "32",
              "--device", "cpu"]
    run = _torchrun([*common, "--batch-size", str(PER_RANK_BATCH), "--out", "ddp_prune"], work)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ratio_0.7" in run.stdout and "val top-1" in run.stdout  # rank 0 prints the variants table
    assert run.stdout.count("pruned variants") == 1 and "Traceback" not in run.stderr
    ddp_spec, ddp_prov = load_arch_file(work / "ddp_prune" / "ratio_0.7" / "arch.json")
    assert 0.0 <= ddp_prov["top1"] <= 1.0 and ddp_prov["top1_split"] == "val"

    one = _nvit([*common, "--batch-size", str(WORLD * PER_RANK_BATCH), "--out", "one_prune"], work)
    assert one.returncode == 0, one.stderr[-3000:]
    one_spec, one_prov = load_arch_file(work / "one_prune" / "ratio_0.7" / "arch.json")
    assert ddp_spec == one_spec  # same global batches -> the same pruning decisions
    assert ddp_prov["predicted_latency_ms"] == pytest.approx(one_prov["predicted_latency_ms"])
    assert ddp_prov["top1"] == pytest.approx(one_prov["top1"], abs=0.02)  # same widths, weights equal to ~1e-6
    ddp_log = pd.read_parquet(work / "ddp_prune" / "prune_log.parquet")
    one_log = pd.read_parquet(work / "one_prune" / "prune_log.parquet")
    assert list(ddp_log["pruned_groups"]) == list(one_log["pruned_groups"])


def test_torchrun_failure_is_one_line_per_rank_and_named_to_the_launcher(work: Path) -> None:
    run = _torchrun(["prune", "--lut", "lut.parquet", "--checkpoint", "base.pth", "--arch", "vit_test",
                     "--target-ratio", "0.01", "--data", "digits", "--device", "cpu", "--out", "never"], work)
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert 1 <= len(lines) <= WORLD and all("smallest reachable predicted latency" in line for line in lines)
    assert "[rank0]: Traceback" not in run.stderr and "[rank1]: Traceback" not in run.stderr
    # torchrun's own failure report carries the same message instead of "To enable traceback see ..."
    assert "traceback : nvit error: target ratio_0.01" in run.stderr
    assert not (work / "never").exists()


def _lost_peer_worker(rank: int, port: int, out: str) -> None:
    from nvit.errors import NvitError
    from nvit.training.distributed import all_reduce_scalars, collective_errors, init_distributed

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    ctx = init_distributed("cpu", timeout_s=60)
    all_reduce_scalars([1.0])
    if rank == 1:
        os._exit(3)  # dies without leaving the group, like a crashed worker
    try:
        with collective_errors(ctx):
            all_reduce_scalars([2.0])
        Path(out).write_text("no error")
    except NvitError as exc:
        Path(out).write_text(f"{type(exc).__name__}: {exc}")


def test_a_rank_that_dies_ends_the_others_with_one_line_not_a_hang(tmp_path: Path) -> None:
    import service_env as se
    import torch.multiprocessing as mp

    port = se.free_port()
    out = tmp_path / "rank0.txt"
    ctx = mp.start_processes(_lost_peer_worker, args=(port, str(out)), nprocs=WORLD, join=False, start_method="spawn")
    for p in ctx.processes:
        p.join(timeout=120)
    assert all(not p.is_alive() for p in ctx.processes), "a rank hung after its peer died"
    text = out.read_text()
    assert text.startswith("DistributedError: rank 0 of 2: a collective failed because another rank stopped")
    assert "\n" not in text
