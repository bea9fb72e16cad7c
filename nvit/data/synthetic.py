"""Seeded random images for smoke tests: any arch's shape, any size, nothing on disk, learnable labels.

Each class has a random prototype image; a sample is its class prototype plus Gaussian noise. Everything is
drawn from generators seeded by (seed, class) and (seed, split, index), so items are computed on demand
(no memory for large images) and are identical in every process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from nvit.arch import ArchSpec
from nvit.data.base import DataError, Split

SYNTHETIC_NAME = "synthetic"
DEFAULT_TRAIN_SIZE = 512
DEFAULT_VAL_SIZE = 128
DEFAULT_NOISE_STD = 1.0
_SPLIT_SALT = {Split.TRAIN: 1, Split.VAL: 2, Split.TEST: 3}
_SEED_STRIDE = 1_000_003  # a prime that keeps the derived seeds of different streams apart


@dataclass(frozen=True)
class SyntheticConfig:
    train_size: int = DEFAULT_TRAIN_SIZE
    val_size: int = DEFAULT_VAL_SIZE
    noise_std: float = DEFAULT_NOISE_STD
    seed: int = 0

    def __post_init__(self) -> None:
        if self.train_size <= 0 or self.val_size <= 0:
            raise DataError("synthetic data set sizes must be positive")
        if self.noise_std < 0:
            raise DataError(f"synthetic noise_std must be >= 0, got {self.noise_std}")


class SyntheticDataset(Dataset):
    def __init__(self, split: Split | str, arch: ArchSpec, config: SyntheticConfig = SyntheticConfig()) -> None:
        self.split = Split.parse(split)
        self.config = config
        self.shape = (arch.in_chans, arch.img_size, arch.img_size)
        self.num_classes = arch.num_classes
        self._size = config.train_size if self.split is Split.TRAIN else config.val_size  # test: val's size

    def __len__(self) -> int:
        return self._size

    def _generator(self, stream: int, index: int) -> torch.Generator:
        seed = (self.config.seed * _SEED_STRIDE + stream) * _SEED_STRIDE + index
        return torch.Generator().manual_seed(seed)

    def prototype(self, label: int) -> torch.Tensor:
        return torch.randn(self.shape, generator=self._generator(0, label))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self._size:
            raise IndexError(index)
        gen = self._generator(_SPLIT_SALT[self.split], index)
        label = int(torch.randint(self.num_classes, (1,), generator=gen))
        noise = torch.randn(self.shape, generator=gen) * self.config.noise_std
        return self.prototype(label) + noise, label
