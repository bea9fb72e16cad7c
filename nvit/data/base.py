"""Shared pieces of the data sets: the error type, splits, and the image-shape check against an arch."""

from __future__ import annotations

import enum

from nvit.arch import ArchSpec
from nvit.errors import NvitError


class DataError(NvitError):
    """A data set is missing, empty, or does not fit the architecture it is meant to feed."""


class Split(str, enum.Enum):
    """Which part of a data set to read."""

    TRAIN = "train"
    VAL = "val"

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
