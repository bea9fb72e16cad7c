"""scikit-learn's bundled 8x8 handwritten digits (1,797 real images, shipped with the package, no download).

The split is stratified and fixed by a seed, so every process and every run sees the same train/val images.
Pixels (0..16) are scaled to 0..1 and normalised with the mean and standard deviation of the train split.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch
from torch.utils.data import Dataset

from nvit.arch import ArchSpec
from nvit.data.base import DataError, Split, check_image_shape, in_memory_shift_px, split_indices
from nvit.data.transforms import Augment, random_shift

log = logging.getLogger(__name__)

DIGITS_NAME = "digits"
DIGITS_SIZE_PX = 8
DIGITS_CHANNELS = 1
DIGITS_NUM_CLASSES = 10
DIGITS_MAX_PIXEL = 16.0  # the data set's pixel range is 0..16
DEFAULT_VAL_FRACTION = 0.2
DEFAULT_SPLIT_SEED = 0


@functools.lru_cache(maxsize=1)
def _load_raw() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 images scaled to 0..1 and their labels (parsed once per process, then read-only)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float64) / DIGITS_MAX_PIXEL
    labels = np.asarray(bunch.target, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


class DigitsDataset(Dataset):
    """One split of the digits as ``([1, 8, 8] float32 tensor, int label)`` pairs.

    ``shift_px`` > 0 enables a simple train augmentation: a random translation by up to that many pixels
    (zero padded), drawn from torch's global generator so that seeding torch makes it reproducible.
    """

    def __init__(
        self,
        split: Split | str,
        *,
        val_fraction: float = DEFAULT_VAL_FRACTION,
        seed: int = DEFAULT_SPLIT_SEED,
        shift_px: int = 0,
    ) -> None:
        self.split = Split.parse(split)
        if self.split is Split.TEST:
            raise DataError("digits has no test split (train and val only)")
        images, labels = _load_raw()
        parts = split_indices(labels, val_fraction=val_fraction, seed=seed)
        train_pixels = images[parts.train]
        self.mean, self.std = float(train_pixels.mean()), float(train_pixels.std())
        chosen = parts.train if self.split is Split.TRAIN else parts.val
        self.indices = chosen
        normalised = (images[chosen] - self.mean) / self.std
        self.images = torch.from_numpy(normalised.astype(np.float32)).unsqueeze(1)  # [n, 1, 8, 8]
        self.labels = torch.from_numpy(labels[chosen])
        self.shift_px = int(shift_px)
        self.num_classes = DIGITS_NUM_CLASSES
        self._background = float((0.0 - self.mean) / self.std)  # a blank pixel after normalisation
        log.info("digits %s: %d images (mean %.4f, std %.4f)", self.split.value, len(self), self.mean, self.std)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.shift_px > 0:
            image = random_shift(image, self.shift_px, fill=self._background)
        return image, int(self.labels[index])


def digits_dataset(split: Split | str, arch: ArchSpec, *, augment: Augment | str | bool = False) -> DigitsDataset:
    """The digits split for ``arch``, after checking that 1-channel 8x8 images and 10 classes fit it.

    ``augment`` (an :class:`~nvit.data.transforms.Augment` preset; ``True`` is ``auto``) applies to the train
    split only. ``auto`` means none at 8x8: on 8x8 images with 2x2 patches a one-pixel shift is a large change
    that slows learning a lot. ``shift`` translates by up to one pixel; ``imagenet`` does not apply to these
    in-memory images.
    """
    check_image_shape(
        DIGITS_NAME, arch, channels=DIGITS_CHANNELS, size_px=DIGITS_SIZE_PX, num_classes=DIGITS_NUM_CLASSES
    )
    split = Split.parse(split)
    return DigitsDataset(split, shift_px=in_memory_shift_px(DIGITS_NAME, augment, DIGITS_SIZE_PX, split))
