"""Training checkpoints: model + optimizer + scheduler + run state in one versioned file, written atomically,
and a lock that keeps two runs from writing the same folder."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nvit.errors import NvitError
from nvit.training.distributed import barrier, is_main_process, unwrap

CHECKPOINT_SCHEMA_VERSION = 1
CHECKPOINT_KIND = "nvit.train_checkpoint"


class TrainError(NvitError):
    """A training setting is invalid or a checkpoint cannot be resumed."""


@dataclass(frozen=True)
class TrainState:
    """Where a run stands: epochs completed, per-epoch history, and what it was started with."""

    epochs_done: int
    history: tuple[dict[str, float], ...]
    config: dict[str, Any]
    extra: dict[str, Any]


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainState,
) -> None:
    """Write model, optimizer, scheduler and ``state`` atomically (rank 0 only; others just wait)."""
    from nvit.fileio import atomic_path

    if is_main_process():
        doc = {
            "schema_version": CHECKPOINT_SCHEMA_VERSION, "kind": CHECKPOINT_KIND,
            "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "epochs_done": state.epochs_done,
            "history": list(state.history), "config": state.config, "extra": state.extra,
        }
        with atomic_path(path) as tmp:
            torch.save(doc, tmp)
    barrier()


def load_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> TrainState:
    """Restore what :func:`save_checkpoint` wrote into the given objects; returns the saved state."""
    path = Path(path)
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TrainError(f"training checkpoint not found: {path}") from None
    except Exception as exc:
        raise TrainError(f"cannot read training checkpoint {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(doc, dict) or doc.get("kind") != CHECKPOINT_KIND:
        raise TrainError(f"{path} is not an nvit training checkpoint")
    if doc.get("schema_version") != CHECKPOINT_SCHEMA_VERSION:
        raise TrainError(f"{path}: unsupported checkpoint schema_version {doc.get('schema_version')!r}")
    try:
        unwrap(model).load_state_dict(doc["model"])
        optimizer.load_state_dict(doc["optimizer"])
    except (RuntimeError, ValueError) as exc:
        raise TrainError(f"{path} does not fit this model: {str(exc).splitlines()[0]}") from None
    scheduler.load_state_dict(doc["scheduler"])
    return TrainState(int(doc["epochs_done"]), tuple(doc["history"]), dict(doc["config"]), dict(doc["extra"]))


@contextlib.contextmanager
def run_lock(checkpoint_path: str | os.PathLike[str] | None) -> Iterator[None]:
    """Hold an exclusive lock beside the checkpoint (rank 0), so two runs never share one folder."""
    if checkpoint_path is None or not is_main_process():
        yield
        return
    import fcntl

    lock_path = Path(checkpoint_path).with_suffix(".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TrainError(f"another run is writing {checkpoint_path}; wait for it or use another folder") from None
        yield
