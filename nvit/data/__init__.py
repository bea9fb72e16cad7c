"""Data sets and loaders: bundled digits, Fashion-MNIST, ImageNet-layout folders, synthetic images.

``build_dataset("digits" | "fashion-mnist[:FOLDER]" | "synthetic" | PATH, split, arch)`` checks that the
images fit ``arch``; splits are train, val and (except digits) test;
``build_loader`` adds a seeded sampler that shards across DDP ranks (see :mod:`nvit.data.sampler`).
Call :func:`start_epoch` at the start of every epoch so that order and augmentation depend only on
``(seed, epoch, rank)``, which is what makes an interrupted run resume identically.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from nvit.arch import ArchSpec
from nvit.data.base import DataError, Split, check_image_shape
from nvit.data.digits import DIGITS_NAME, DigitsDataset, digits_dataset
from nvit.data.fashion_mnist import FASHION_MNIST_NAME, FashionMnistDataset, fashion_mnist_dataset, is_fashion_mnist
from nvit.data.imagefolder import ImageFolderDataset, imagefolder_dataset
from nvit.data.sampler import ShardedSampler, epoch_seed
from nvit.data.synthetic import SYNTHETIC_NAME, SyntheticConfig, SyntheticDataset
from nvit.data.transforms import Augment

log = logging.getLogger(__name__)

KNOWN_DATASETS = (DIGITS_NAME, FASHION_MNIST_NAME, SYNTHETIC_NAME)

__all__ = [
    "KNOWN_DATASETS", "Augment", "DataError", "DigitsDataset", "FashionMnistDataset",
    "ImageFolderDataset", "ShardedSampler", "Split", "SyntheticConfig", "SyntheticDataset", "build_dataset",
    "build_loader", "check_image_shape", "epoch_seed", "in_memory", "start_epoch",
]


def in_memory(name_or_path: str | os.PathLike[str]) -> bool:
    """Whether a data set is held in memory (named sets), so that loader worker processes only cost time."""
    text = str(name_or_path)
    return text in KNOWN_DATASETS or is_fashion_mnist(text)


def build_dataset(
    name_or_path: str | os.PathLike[str],
    split: Split | str,
    arch: ArchSpec,
    *,
    augment: Augment | str | bool = True,
    synthetic: SyntheticConfig | None = None,
) -> Dataset:
    """A data set by name (``digits``, ``fashion-mnist[:FOLDER]``, ``synthetic``) or an ImageNet-layout folder,
    checked against ``arch``.

    ``augment`` is the train-time :class:`~nvit.data.transforms.Augment` preset for the train split (never
    val or test); ``True`` is ``auto``: by image size, none for 8x8 digits, a 2-pixel random shift without
    flip for 28x28 Fashion-MNIST, DeiT's random resized crop + flip for large images. Synthetic data is
    never augmented.
    """
    text = str(name_or_path)
    split = Split.parse(split)
    try:
        Augment.parse(augment)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    if text == DIGITS_NAME:
        return digits_dataset(split, arch, augment=augment)
    if is_fashion_mnist(text):
        return fashion_mnist_dataset(text, split, arch, augment=augment)
    if text == SYNTHETIC_NAME:
        return SyntheticDataset(split, arch, synthetic or SyntheticConfig())
    path = Path(text)
    if not path.exists():
        raise DataError(
            f"data set {text!r} is neither a known name ({', '.join(KNOWN_DATASETS)}) nor an existing folder"
        )
    if not path.is_dir():
        raise DataError(f"data set path {text!r} is not a folder (expected ImageNet layout ROOT/train, ROOT/val)")
    return imagefolder_dataset(path, split, arch, augment=augment)


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def build_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    train: bool,
    seed: int = 0,
    num_workers: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """A loader over this rank's shard (rank and world size from torch.distributed unless given).

    ``train`` shuffles with a permutation drawn from ``(seed, epoch)``; ``batch_size`` is per rank.
    """
    if batch_size <= 0:
        raise DataError(f"batch size must be positive, got {batch_size}")
    size = len(dataset)  # type: ignore[arg-type]
    if size == 0:
        raise DataError("the data set is empty")
    default_rank, default_world = _world()
    rank = default_rank if rank is None else rank
    world_size = default_world if world_size is None else world_size
    if train and size < world_size:
        raise DataError(f"{size} training items cannot be shared by {world_size} processes")
    sampler = ShardedSampler(size, shuffle=train, seed=seed, rank=rank, world_size=world_size)
    generator = torch.Generator().manual_seed(epoch_seed(seed, 0, rank))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=generator,
        persistent_workers=False,
    )


def start_epoch(loader: DataLoader, epoch: int, *, seed: int = 0) -> None:
    """Make the coming epoch's order and augmentation a function of ``(seed, epoch, rank)`` only.

    Sets the sampler's epoch, reseeds the loader's generator (worker seeds are drawn from it) and reseeds
    torch's global generator (augmentation in the main process when ``num_workers`` is 0).
    """
    sampler = loader.sampler
    rank = sampler.rank if isinstance(sampler, ShardedSampler) else 0
    if isinstance(sampler, ShardedSampler):
        sampler.set_epoch(epoch)
    if loader.generator is not None:
        loader.generator.manual_seed(epoch_seed(seed, epoch, rank) + 1)
    torch.manual_seed(epoch_seed(seed, epoch, rank))
