"""A seeded, epoch-aware sampler that shards a data set across DDP ranks.

Train order is a permutation drawn from ``(seed, epoch)`` alone, so every rank agrees on it and a resumed
run replays it. Each rank takes every ``world_size``-th item; in train mode the tail that does not divide
evenly is dropped so that all ranks run the same number of steps (DDP would hang otherwise). In eval mode
nothing is dropped or repeated: ranks may hold one item more or less, and counts are summed afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

_EPOCH_STRIDE = 1_000_003


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of one (run, epoch, rank) stream: distinct for every pair, the same in every run."""
    return (seed * _EPOCH_STRIDE + epoch) * _EPOCH_STRIDE + rank


class ShardedSampler(Sampler[int]):
    def __init__(self, size: int, *, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not within a world of {world_size}")
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.shuffle:
            return self.size // self.world_size
        return len(range(self.rank, self.size, self.world_size))

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
            order = torch.randperm(self.size, generator=gen).tolist()
            usable = len(self) * self.world_size
            return iter(order[self.rank:usable:self.world_size])
        return iter(range(self.rank, self.size, self.world_size))
