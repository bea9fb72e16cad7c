"""Training batches as a pure function of the step number, so that an interrupted run resumes exactly.

Epoch ``k`` visits the data set in the order of a permutation seeded by ``(seed, k)``; the last incomplete
batch of an epoch is dropped. ``batches(start_step)`` therefore yields from any step on without replaying
the ones before it. Under data parallelism, step ``s`` takes one global batch of ``batch_size ×
world_size`` items and rank ``r`` gets its ``r``-th slice (``batch_size`` is per process).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from nvit.errors import NvitError

Batch = tuple[torch.Tensor, torch.Tensor]
_SEED_STRIDE = 1_000_003  # mixes the epoch into the seed


class BatchSource(Protocol):
    def batches(self, start_step: int) -> Iterator[Batch]:
        """An endless stream of ``(images, labels)`` batches beginning at training step ``start_step``."""
        ...


class StepBatches:
    """Deterministic, endless batches of a map-style data set (``TensorDataset`` is indexed directly)."""

    def __init__(self, dataset: Dataset, *, batch_size: int, seed: int = 0, num_workers: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        self.dataset, self.batch_size, self.seed, self.num_workers = dataset, batch_size, seed, num_workers
        if world_size < 1 or not 0 <= rank < world_size:
            raise NvitError(f"rank {rank} is not within a world of {world_size}")
        self.rank, self.world_size = rank, world_size
        self.size = len(dataset)  # type: ignore[arg-type]
        if batch_size <= 0:
            raise NvitError(f"batch size must be positive, got {batch_size}")
        global_batch = batch_size * world_size
        if self.size < global_batch:
            raise NvitError(f"the data set has {self.size} samples, fewer than one batch of {global_batch}")
        self.steps_per_epoch = self.size // global_batch
        self._perm_epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def indices(self, step: int) -> torch.Tensor:
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * _SEED_STRIDE + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.size, generator=g), epoch
        start = (pos * self.world_size + self.rank) * self.batch_size
        return self._perm[start : start + self.batch_size]

    def batches(self, start_step: int) -> Iterator[Batch]:
        if isinstance(self.dataset, TensorDataset):
            images, labels = self.dataset.tensors[:2]
            step = start_step
            while True:
                idx = self.indices(step)
                yield images[idx], labels[idx]
                step += 1
        loader = DataLoader(self.dataset, batch_sampler=_StepSampler(self, start_step), num_workers=self.num_workers)
        for images, labels, *_ in loader:
            yield images, labels


class _StepSampler:
    def __init__(self, source: StepBatches, start_step: int) -> None:
        self.source, self.start_step = source, start_step

    def __iter__(self) -> Iterator[Sequence[int]]:
        step = self.start_step
        while True:
            yield self.source.indices(step).tolist()
            step += 1
