"""Data-parallel runs under ``torchrun``: process-group set-up, DDP wrapping, all-reduce helpers.

``init_distributed()`` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``); without it (or with a world of one) it returns a single-process context
and every helper here is a no-op, so the same code runs alone or under torchrun. NCCL is used on GPUs,
gloo on CPU. Only rank 0 logs at INFO level and writes files (:func:`is_main_process`).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from nvit.errors import NvitError

log = logging.getLogger(__name__)

BACKEND_GPU = "nccl"
BACKEND_CPU = "gloo"
DEFAULT_TIMEOUT_S = 1800.0
_ENV_REQUIRED = ("MASTER_ADDR", "MASTER_PORT")
CPU = torch.device("cpu")


class DistributedError(NvitError):
    """The distributed environment is incomplete or inconsistent."""


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank, the world size, its device and the process-group backend."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = CPU
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"environment variable {name}={raw!r} is not an integer") from None


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` (this rank's GPU) or an explicit ``cuda:N``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DistributedError(f"device {device!r} was asked for but CUDA is not available")
        return torch.device(device if ":" in device else f"cuda:{local_rank}")
    if device != "cpu":
        raise DistributedError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    return CPU


def _is_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def init_distributed(device: str = "auto", *, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistContext:
    """Join the process group described by torchrun's environment (or stay single-process)."""
    import torch.distributed as dist

    world_size = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise DistributedError(f"RANK={rank} is not within WORLD_SIZE={world_size}")
    resolved = resolve_device(device, local_rank)
    if world_size == 1:
        return DistContext(device=resolved)
    backend = BACKEND_GPU if resolved.type == "cuda" else BACKEND_CPU
    if _is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, resolved, dist.get_backend())
    missing = [name for name in _ENV_REQUIRED if not os.environ.get(name)]
    if missing:
        raise DistributedError(f"WORLD_SIZE={world_size} but {', '.join(missing)} not set (launch with torchrun)")
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    dist.init_process_group(
        backend=backend, init_method="env://", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    log.info("rank %d/%d joined the %s process group on %s", rank, world_size, backend, resolved)
    return DistContext(rank, world_size, local_rank, resolved, backend)


def shutdown() -> None:
    """Leave the process group (no-op when none was joined)."""
    import torch.distributed as dist

    if _is_initialized():
        dist.destroy_process_group()


#: What gloo and NCCL say when the rank on the other side of a collective has gone away.
_LOST_PEER_MARKERS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                      "NCCL communicator was aborted", "remote process exited")


def raise_if_lost_peer(ctx: DistContext, exc: BaseException) -> None:
    """Raise one :class:`DistributedError` line if ``exc`` is a collective that failed because another rank
    stopped (the rank that failed first prints its own error; torchrun then stops the whole group).
    Anything else returns, for the caller to re-raise unchanged."""
    import torch.distributed as dist

    if not ctx.is_distributed or isinstance(exc, NvitError) or not isinstance(exc, RuntimeError):
        return
    text = str(exc)
    marker = next((m for m in _LOST_PEER_MARKERS if m in text), None)
    if marker or isinstance(exc, dist.DistError):  # DistError is a RuntimeError
        reason = marker or (text.strip().splitlines() or [type(exc).__name__])[0][:200]
        raise DistributedError(f"rank {ctx.rank} of {ctx.world_size}: a collective failed because another rank "
                               f"stopped ({reason}); that rank's error is the cause") from exc


@contextlib.contextmanager
def collective_errors(ctx: DistContext) -> Iterator[None]:
    """Context manager form of :func:`raise_if_lost_peer`."""
    try:
        yield
    except RuntimeError as exc:
        raise_if_lost_peer(ctx, exc)
        raise


def current_context() -> DistContext:
    """Rank and world size of the joined process group (device left as CPU)."""
    import torch.distributed as dist

    if not _is_initialized():
        return DistContext()
    return DistContext(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0), backend=dist.get_backend())


def is_main_process() -> bool:
    return current_context().is_main


def barrier() -> None:
    import torch.distributed as dist

    if _is_initialized():
        if dist.get_backend() == BACKEND_GPU:
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


# ---- models ---------------------------------------------------------------------------------------
def wrap_ddp(model: nn.Module, ctx: DistContext, *, find_unused_parameters: bool = False) -> nn.Module:
    """The model on ``ctx.device``, inside DistributedDataParallel when the world is larger than one.

    DDP broadcasts rank 0's parameters at construction, so every rank starts from the same weights. Create
    gates (``enable_gates``) before wrapping: parameters added later are not synchronised.
    """
    model = model.to(ctx.device)
    if not ctx.is_distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DDP (or torch.compile) wrapper."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


# ---- reductions -----------------------------------------------------------------------------------
def _reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    out = tensor.detach().clone()
    if not _is_initialized() or dist.get_world_size() == 1:
        return out
    if dist.get_backend() == BACKEND_GPU and out.device.type != "cuda":
        moved = out.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        return moved.to(tensor.device)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (a new tensor; the input is untouched). Identity when not distributed."""
    return _reduce_sum(tensor)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise mean over ranks (a new tensor), e.g. for saliency statistics accumulated per rank."""
    return _reduce_sum(tensor) / current_context().world_size


def all_reduce_scalars(values: Sequence[float]) -> list[float]:
    """Sums over ranks of a few Python numbers (in float64, so counts stay exact)."""
    summed = _reduce_sum(torch.tensor(list(values), dtype=torch.float64))
    return [float(v) for v in summed]


# ---- logging --------------------------------------------------------------------------------------
class MainProcessFilter(logging.Filter):
    """Lets every record through on rank 0, and only warnings and errors on other ranks."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0 or record.levelno >= logging.WARNING


def configure_rank_logging(ctx: DistContext) -> None:
    """Attach :class:`MainProcessFilter` to the root logger's handlers (idempotent)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, MainProcessFilter) for f in handler.filters):
            handler.addFilter(MainProcessFilter(ctx.rank))
