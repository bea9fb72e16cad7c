"""ImageNet-layout folders: ``ROOT/{train,val,test}/<class name>/<image file>``; classes are sorted folder names.

The class list always comes from ``ROOT/train`` when it exists, so train and val agree on label indices
even when the val folder lacks some classes. Images are decoded lazily by PIL in ``__getitem__``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from nvit.arch import ArchSpec
from nvit.data.base import DataError, Split, check_image_shape
from nvit.data.transforms import (
    Augment,
    EvalTransform,
    ShiftTransform,
    TrainTransform,
    TransformConfig,
    resolve_augment,
    shift_px_for,
)

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".webp", ".tif", ".tiff"})


def find_classes(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}")
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise DataError(f"{folder} has no class sub-folders (expected {folder}/<class>/<image>)")
    return classes


def scan_images(folder: Path, classes: list[str]) -> list[tuple[Path, int]]:
    """Every image file under ``folder/<class>/`` (recursively), labelled by the class's index."""
    known = {name: i for i, name in enumerate(classes)}
    samples: list[tuple[Path, int]] = []
    for name in sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith(".")):
        if name not in known:
            raise DataError(f"{folder}: class folder {name!r} is not among the {len(classes)} training classes")
        for root, _, files in sorted(os.walk(folder / name)):
            samples.extend(
                (Path(root) / f, known[name]) for f in sorted(files) if Path(f).suffix.lower() in IMAGE_EXTENSIONS
            )
    if not samples:
        raise DataError(f"{folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return samples


class ImageFolderDataset(Dataset):
    """``(normalised [C, S, S] tensor, label)`` pairs read from one split of an ImageNet-layout folder."""

    def __init__(self, root: str | os.PathLike[str], split: Split | str, transform) -> None:
        self.root = Path(root)
        self.split = Split.parse(split)
        folder = self.root / self.split.value
        if not folder.is_dir():
            raise DataError(
                f"{self.root} has no '{self.split.value}' folder (expected ImageNet layout ROOT/train, ROOT/val, "
                "and ROOT/test for a test split)"
            )
        class_source = self.root / Split.TRAIN.value
        self.classes = find_classes(class_source if class_source.is_dir() else folder)
        self.samples = scan_images(folder, self.classes)
        self.transform = transform
        log.info("%s/%s: %d images in %d classes", self.root, self.split.value, len(self.samples), len(self.classes))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image, UnidentifiedImageError

        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                image.load()
                return self.transform(image), label
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"cannot read image {path}: {exc}") from None


def imagefolder_dataset(
    root: str | os.PathLike[str], split: Split | str, arch: ArchSpec, *, augment: Augment | str | bool = True,
    jitter: float = 0.0,
) -> ImageFolderDataset:
    """A split of an ImageNet-layout folder for ``arch``, with the train-time ``augment`` preset on the train
    split (``auto``: by ``arch.img_size``, see :mod:`nvit.data.transforms`). Small images (``shift`` or
    ``none`` presets) are resized to the arch's size for evaluation; larger ones get DeiT's resize + centre
    crop."""
    split = Split.parse(split)
    if arch.in_chans not in (1, 3):
        raise DataError(f"image folders give 1- or 3-channel images, the architecture expects in_chans={arch.in_chans}")
    chosen = resolve_augment(augment, arch.img_size)
    small = resolve_augment(Augment.AUTO, arch.img_size) is not Augment.IMAGENET
    config = TransformConfig(img_size=arch.img_size, in_chans=arch.in_chans, jitter=jitter)
    train = split is Split.TRAIN
    shift_train = train and chosen is Augment.SHIFT
    if train and chosen is Augment.IMAGENET:
        transform = TrainTransform(config)
    elif small or shift_train:
        transform = ShiftTransform(config, shift_px_for(arch.img_size) if shift_train else 0)
    else:
        transform = EvalTransform(config)
    dataset = ImageFolderDataset(root, split, transform)
    check_image_shape(str(root), arch, channels=arch.in_chans, size_px=None, num_classes=dataset.num_classes)
    if dataset.num_classes < arch.num_classes:
        log.warning("%s has %d classes, fewer than the head's %d", root, dataset.num_classes, arch.num_classes)
    return dataset
