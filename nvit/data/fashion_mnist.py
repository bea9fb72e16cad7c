"""Fashion-MNIST from its four IDX files: 28x28 grayscale images of 10 clothing classes.

``--data fashion-mnist`` reads :data:`DEFAULT_ROOT` (Debian package :data:`DEBIAN_PACKAGE`);
``--data fashion-mnist:/folder`` reads any folder holding the four ``*-idx*-ubyte(.gz)`` files. The 60,000
training images are split once, stratified with a fixed seed, into 55,000 train and 5,000 val (1/12 of
each class); the 10,000 ``t10k`` images are the test split. Pixels (0..255) are scaled to 0..1 and
normalised with the mean and standard deviation of the train split.
"""

from __future__ import annotations

import functools
import gzip
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from nvit.arch import ArchSpec
from nvit.data.base import DataError, Split, check_image_shape, in_memory_shift_px, split_indices
from nvit.data.transforms import Augment, random_shift

log = logging.getLogger(__name__)

FASHION_MNIST_NAME = "fashion-mnist"
DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
SIZE_PX = 28
CHANNELS = 1
NUM_CLASSES = 10
VAL_FRACTION = 1 / 12  # 5,000 of the 60,000 training images, 500 per class
SPLIT_SEED = 0
MAX_PIXEL = 255.0
FILES = {  # part -> (images, labels), without the optional .gz
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_INSTALL_HINT = (f"install the Debian package {DEBIAN_PACKAGE}, or pass --data {FASHION_MNIST_NAME}:/folder "
                 "holding the four *-idx*-ubyte.gz files")
_IDX_UBYTE = 0x08
_IDX_HEADER_BYTES = 4


def is_fashion_mnist(name: str) -> bool:
    return name == FASHION_MNIST_NAME or name.startswith(FASHION_MNIST_NAME + ":")


def root_of(name: str) -> Path:
    """The folder named by ``fashion-mnist`` (the default) or ``fashion-mnist:/folder``."""
    _, sep, folder = name.partition(":")
    if sep and not folder:
        raise DataError(f"{name!r}: give a folder after the colon, e.g. fashion-mnist:/data/fashion-mnist")
    return Path(folder) if sep else DEFAULT_ROOT


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise DataError(f"Fashion-MNIST not found: {root} has no {stem}.gz ({_INSTALL_HINT})")


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An unsigned-byte IDX array (optionally gzipped) with ``ndim`` dimensions; anything else is an error."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    header = _IDX_HEADER_BYTES + 4 * ndim
    if len(data) < header or data[:2] != b"\0\0" or data[2] != _IDX_UBYTE or data[3] != ndim:
        raise DataError(f"{path} is not an IDX file of unsigned bytes with {ndim} dimension(s)")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise DataError(f"{path} holds {len(data) - header} values, its header says {shape} ({expected - header})")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


@dataclass(frozen=True)
class FashionMnistArrays:
    """The images [n, 28, 28] (uint8) and labels of each split, and the train split's pixel statistics
    (0..1 scale); read once per folder."""

    images: dict[Split, np.ndarray]
    labels: dict[Split, np.ndarray]
    mean: float
    std: float


@functools.lru_cache(maxsize=2)
def load_arrays(root: Path) -> FashionMnistArrays:
    if not root.is_dir():
        raise DataError(f"Fashion-MNIST not found: {root} is not a folder ({_INSTALL_HINT})")
    parts = {}
    for part, (images_stem, labels_stem) in FILES.items():
        images = read_idx(_find(root, images_stem), 3)
        labels = read_idx(_find(root, labels_stem), 1)
        if len(images) != len(labels) or images.shape[1:] != (SIZE_PX, SIZE_PX):
            raise DataError(f"{root}: {part} has {len(images)} images of {images.shape[1:]} and {len(labels)} "
                            f"labels; expected as many 28x28 images as labels")
        if labels.size and int(labels.max()) >= NUM_CLASSES:
            raise DataError(f"{root}: {part} labels go up to {int(labels.max())}, expected 0..{NUM_CLASSES - 1}")
        parts[part] = (images, labels.astype(np.int64))
    (train_images, train_labels), (test_images, test_labels) = parts["train"], parts["test"]
    split = split_indices(train_labels, val_fraction=VAL_FRACTION, seed=SPLIT_SEED)
    images = {Split.TRAIN: train_images[split.train], Split.VAL: train_images[split.val],
              Split.TEST: test_images.copy()}
    labels = {Split.TRAIN: train_labels[split.train], Split.VAL: train_labels[split.val], Split.TEST: test_labels}
    pixels = images[Split.TRAIN]
    mean, std = float(pixels.mean()) / MAX_PIXEL, float(pixels.std()) / MAX_PIXEL
    return FashionMnistArrays(images, labels, mean, std)


class FashionMnistDataset(Dataset):
    """One split as ``([1, 28, 28] float32 tensor, int label)`` pairs; ``shift_px`` > 0 augments (train)."""

    def __init__(self, split: Split | str, *, root: Path = DEFAULT_ROOT, shift_px: int = 0) -> None:
        self.split = Split.parse(split)
        raw = load_arrays(Path(root))
        self.mean, self.std = raw.mean, raw.std
        images, labels = raw.images[self.split], raw.labels[self.split]
        if len(labels) == 0:
            raise DataError(f"Fashion-MNIST in {root} has no {self.split.value} images")
        self.images = torch.from_numpy(images).unsqueeze(1)  # uint8 [n, 1, 28, 28], shared, read-only
        self.labels = torch.from_numpy(labels)
        self.shift_px = int(shift_px)
        self.num_classes = NUM_CLASSES
        self._background = -self.mean / self.std  # a black pixel after normalisation
        log.info("fashion-mnist %s: %d images (mean %.4f, std %.4f)", self.split.value, len(self), self.mean, self.std)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = (self.images[index].float() / MAX_PIXEL - self.mean) / self.std
        if self.shift_px > 0:
            image = random_shift(image, self.shift_px, fill=self._background)
        return image, int(self.labels[index])


def fashion_mnist_dataset(
    name: str | os.PathLike[str], split: Split | str, arch: ArchSpec, *, augment: Augment | str | bool = True
) -> FashionMnistDataset:
    """The split of ``fashion-mnist[:folder]`` for ``arch``; ``auto`` augmentation is ``shift`` (2 px, train)."""
    check_image_shape(FASHION_MNIST_NAME, arch, channels=CHANNELS, size_px=SIZE_PX, num_classes=NUM_CLASSES)
    split = Split.parse(split)
    shift_px = in_memory_shift_px(FASHION_MNIST_NAME, augment, SIZE_PX, split)
    return FashionMnistDataset(split, root=root_of(str(name)), shift_px=shift_px)
