"""Shared pieces of the data sets: the error type, splits, and the image-shape check against an arch."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

import numpy as np

from nvit.arch import ArchSpec
from nvit.data.transforms import Augment, resolve_augment, shift_px_for
from nvit.errors import NvitError

_WORKER_HEADER = re.compile(r"^Caught (\w+) in DataLoader worker process (\d+)\.$")


class DataError(NvitError):
    """A data set is missing, empty, or does not fit the architecture it is meant to feed.

    Raised inside a DataLoader worker, torch re-raises it in the main process as ``DataError(text)`` where
    the text is a whole worker traceback; the constructor keeps only the original one-line message.
    """

    def __init__(self, message: str = "") -> None:
        super().__init__(_worker_message(str(message)))


def _worker_message(message: str) -> str:
    """The original message of an error re-raised from a DataLoader worker (``message`` otherwise)."""
    lines = message.splitlines()
    match = _WORKER_HEADER.match(lines[0]) if lines else None
    if match is None:
        return message
    name, worker = match.groups()
    last = next((line for line in reversed(lines) if line.strip()), "")
    _, sep, original = last.partition(f"{name}: ")
    return f"{original.strip() if sep else last.strip()} (in data loading worker {worker})"


class Split(str, enum.Enum):
    """Which part of a data set to read."""

    TRAIN = "train"
    VAL = "val"
    TEST = "test"

    @classmethod
    def parse(cls, value: str | Split) -> Split:
        if isinstance(value, Split):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise DataError(f"unknown split {value!r}; use one of: {', '.join(s.value for s in cls)}") from None


def check_image_shape(
    name: str, arch: ArchSpec, *, channels: int, size_px: int | None, num_classes: int
) -> None:
    """Fail with one line when images of ``channels`` x ``size_px`` and ``num_classes`` labels don't fit ``arch``.

    ``size_px`` is ``None`` for data sets that resize their images to whatever the arch asks for.
    """
    if channels != arch.in_chans:
        raise DataError(f"{name} has {channels}-channel images, the architecture expects in_chans={arch.in_chans}")
    if size_px is not None and size_px != arch.img_size:
        raise DataError(f"{name} has {size_px}x{size_px} images, the architecture expects img_size={arch.img_size}")
    if num_classes > arch.num_classes:
        raise DataError(f"{name} has {num_classes} classes, the architecture's head has only {arch.num_classes}")


@dataclass(frozen=True)
class SplitIndices:
    """Indices of the train and val parts of one labelled array (disjoint, stratified)."""

    train: np.ndarray
    val: np.ndarray


def split_indices(labels: np.ndarray, *, val_fraction: float, seed: int) -> SplitIndices:
    """Per class, a seeded permutation whose first ``round(n * val_fraction)`` items go to val."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_val = round(len(members) * val_fraction)
        val.append(members[:n_val])
        train.append(members[n_val:])
    return SplitIndices(train=np.sort(np.concatenate(train)), val=np.sort(np.concatenate(val)))


def in_memory_shift_px(name: str, augment: Augment | str | bool, size_px: int, split: Split) -> int:
    """The random shift (pixels) an in-memory data set of ``size_px`` images applies to ``split`` under the
    ``augment`` preset: the preset's shift on the train split, none elsewhere; ``imagenet`` is refused."""
    chosen = resolve_augment(augment, size_px)
    if chosen is Augment.IMAGENET:
        raise DataError(f"the imagenet augmentation applies to image folders; use shift or none for {name}")
    return shift_px_for(size_px) if chosen is Augment.SHIFT and split is Split.TRAIN else 0
