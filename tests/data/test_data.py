"""Data sets: digits split, transforms against hand-computed values, ImageFolder errors, sharded loaders."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from nvit.data import (
    DataError,
    ShardedSampler,
    SyntheticConfig,
    build_dataset,
    build_loader,
    start_epoch,
)
from nvit.data.base import split_indices
from nvit.data.digits import DigitsDataset, digits_dataset
from nvit.data.transforms import (
    EvalTransform,
    Interpolation,
    TrainTransform,
    TransformConfig,
    center_crop_box,
    random_resized_crop_box,
    shift,
    shorter_side_size,
)
from nvit.presets import preset

VIT_TEST = preset("vit_test")


# ---- digits ---------------------------------------------------------------------------------------
def test_digits_split_is_deterministic_disjoint_and_stratified() -> None:
    train, val = DigitsDataset("train"), DigitsDataset("val")
    again = DigitsDataset("train")
    assert len(train) + len(val) == 1797
    assert len(val) == 359  # round(0.2 * n) per class
    assert set(train.indices.tolist()).isdisjoint(val.indices.tolist())
    assert np.array_equal(train.indices, again.indices)
    assert torch.equal(train.images, again.images)
    counts = torch.bincount(val.labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # every class has ~20% of its ~180 images in val
    other = split_indices(np.arange(100) % 10, val_fraction=0.2, seed=1)
    assert len(other.val) == 20 and not np.array_equal(other.val, split_indices(np.arange(100) % 10,
                                                                                 val_fraction=0.2, seed=2).val)


def test_digits_images_are_normalised_with_train_statistics() -> None:
    train, val = DigitsDataset("train"), DigitsDataset("val")
    image, label = train[0]
    assert image.shape == (1, 8, 8) and image.dtype == torch.float32 and isinstance(label, int)
    assert train.images.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert train.images.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    assert val.mean == train.mean and val.std == train.std
    # A blank pixel (0 of 16) maps to -mean/std: check the raw value of a known image corner.
    assert train.images[0, 0, 0, 0].item() == pytest.approx(-train.mean / train.std, rel=1e-6)


def test_shift_moves_pixels_and_fills() -> None:
    image = torch.arange(9.0).view(1, 3, 3)
    out = shift(image, 1, -1, fill=-5.0)
    expected = torch.tensor([[[-5.0, -5.0, -5.0], [1.0, 2.0, -5.0], [4.0, 5.0, -5.0]]])
    assert torch.equal(out, expected)
    assert torch.equal(shift(image, 0, 0, fill=0.0), image)


def test_digits_shift_augmentation_is_seeded_and_off_by_default() -> None:
    assert build_dataset("digits", "train", VIT_TEST, augment=True).shift_px == 0
    assert build_dataset("digits", "val", VIT_TEST, augment=True).shift_px == 0
    assert digits_dataset("val", VIT_TEST, augment="shift").shift_px == 0  # never on val
    aug = digits_dataset("train", VIT_TEST, augment="shift")
    assert aug.shift_px == 1
    torch.manual_seed(3)
    first = torch.stack([aug[i][0] for i in range(8)])
    torch.manual_seed(3)
    second = torch.stack([aug[i][0] for i in range(8)])
    assert torch.equal(first, second)
    assert not torch.equal(first, aug.images[:8])


def test_digits_rejects_an_arch_it_does_not_fit() -> None:
    with pytest.raises(DataError, match="1-channel images, the architecture expects in_chans=3"):
        build_dataset("digits", "train", preset("deit_tiny"))
    with pytest.raises(DataError, match="8x8 images, the architecture expects img_size=16"):
        build_dataset("digits", "train", preset("vit_test", img_size=16))
    with pytest.raises(DataError, match="10 classes, the architecture's head has only 5"):
        build_dataset("digits", "train", preset("vit_test", num_classes=5))


def test_synthetic_is_seeded_and_shaped() -> None:
    spec = preset("deit_tiny", img_size=32, patch_size=16, num_classes=7)
    a = build_dataset("synthetic", "train", spec, synthetic=SyntheticConfig(train_size=10, seed=4))
    b = build_dataset("synthetic", "train", spec, synthetic=SyntheticConfig(train_size=10, seed=4))
    c = build_dataset("synthetic", "val", spec, synthetic=SyntheticConfig(train_size=10, seed=4))
    assert len(a) == 10 and a[3][0].shape == (3, 32, 32) and 0 <= a[3][1] < 7
    assert torch.equal(a[3][0], b[3][0]) and a[3][1] == b[3][1]
    assert not torch.equal(a[3][0], c[3][0])
    # Learnable: a sample is its class prototype plus unit noise.
    image, label = a[5]
    assert (image - a.prototype(label)).std().item() == pytest.approx(1.0, abs=0.1)


def test_unknown_name_and_bad_split() -> None:
    with pytest.raises(DataError, match="neither a known name"):
        build_dataset("no/such/folder", "train", VIT_TEST)
    with pytest.raises(DataError, match="unknown split 'tset'"):
        build_dataset("digits", "tset", VIT_TEST)


# ---- transforms -----------------------------------------------------------------------------------
def _tiny_rgb() -> tuple[Image.Image, np.ndarray]:
    """A 6 (wide) x 4 (high) RGB image whose pixel (y, x, c) is 10y + 40x + c."""
    y, x, c = np.meshgrid(np.arange(4), np.arange(6), np.arange(3), indexing="ij")
    pixels = (10 * y + 40 * x + c).astype(np.uint8)
    return Image.fromarray(pixels, "RGB"), pixels


def test_eval_geometry() -> None:
    assert TransformConfig(img_size=224).resize_px == 256
    assert shorter_side_size(500, 375, 256) == (341, 256)
    assert shorter_side_size(300, 400, 256) == (256, 341)
    assert center_crop_box(341, 256, 224) == (58, 16, 282, 240)


def test_eval_transform_matches_hand_computed_crop_and_normalisation() -> None:
    image, pixels = _tiny_rgb()
    # resize_px = floor(2 / 0.5) = 4 = the shorter side, so no resampling; centre 2x2 of the 6x4 image
    # starts at x = (6-2)/2 = 2, y = (4-2)/2 = 1.
    config = TransformConfig(img_size=2, crop_pct=0.5, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    out = EvalTransform(config)(image)
    assert out.shape == (3, 2, 2)
    for c, (m, s) in enumerate(zip(config.mean, config.std, strict=True)):
        for yy in range(2):
            for xx in range(2):
                value = (10 * (1 + yy) + 40 * (2 + xx) + c) / 255.0
                assert out[c, yy, xx].item() == pytest.approx((value - m) / s, rel=1e-5)
    assert np.array_equal(pixels[1:3, 2:4, 0], np.array([[90, 130], [100, 140]]))


def test_eval_transform_resizes_then_crops_to_arch_size() -> None:
    image = Image.new("RGB", (50, 30), (255, 0, 128))
    config = TransformConfig(img_size=16)
    out = EvalTransform(config)(image)
    assert out.shape == (3, 16, 16)
    expected = [(1.0 - 0.485) / 0.229, (0.0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225]
    for c in range(3):
        assert torch.allclose(out[c], torch.full((16, 16), expected[c]), atol=1e-4)
    grey = EvalTransform(TransformConfig(img_size=16, in_chans=1))(image)
    assert grey.shape == (1, 16, 16)


def test_random_resized_crop_boxes_respect_scale_and_ratio() -> None:
    torch.manual_seed(0)
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    fractions = []
    for _ in range(300):
        left, top, right, bottom = random_resized_crop_box(200, 100, scale=scale, ratio=ratio)
        w, h = right - left, bottom - top
        assert left >= 0 and right <= 200 and top >= 0 and bottom <= 100
        fractions.append(w * h / 20000)
        assert ratio[0] * 0.9 <= w / h <= ratio[1] * 1.1  # rounding to whole pixels
    assert min(fractions) >= 0.07 and max(fractions) <= 1.0
    assert 0.3 < float(np.mean(fractions)) < 0.6  # uniform area in [0.08, 1] clipped by the 2:1 canvas
    # Impossible ratio: falls back to the largest centred box with the ratio clamped.
    assert random_resized_crop_box(100, 10, scale=(1.0, 1.0), ratio=(1.0, 1.0)) == (45, 0, 55, 10)


def test_train_transform_shapes_flip_and_constant_image() -> None:
    torch.manual_seed(1)
    flat = Image.new("RGB", (40, 30), (51, 102, 204))
    out = TrainTransform(TransformConfig(img_size=12))(flat)
    assert out.shape == (3, 12, 12)
    for c, value in enumerate((51, 102, 204)):
        expected = (value / 255 - (0.485, 0.456, 0.406)[c]) / (0.229, 0.224, 0.225)[c]
        assert torch.allclose(out[c], torch.full((12, 12), expected), atol=1e-3)
    image, _ = _tiny_rgb()
    no_crop = dict(img_size=4, scale=(1.0, 1.0), ratio=(1.5, 1.5), interpolation=Interpolation.NEAREST,
                   mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    plain = TrainTransform(TransformConfig(hflip_prob=0.0, **no_crop))(image)
    flipped = TrainTransform(TransformConfig(hflip_prob=1.0, **no_crop))(image)
    assert torch.equal(flipped, plain.flip(-1))
    assert not torch.equal(flipped, plain)
    jittered = TrainTransform(TransformConfig(img_size=8, jitter=0.4))(flat)
    assert jittered.shape == (3, 8, 8) and torch.isfinite(jittered).all()


# ---- image folders --------------------------------------------------------------------------------
def _make_folder(root, layout: dict[str, dict[str, int]], size=(20, 14)) -> None:
    rng = np.random.default_rng(0)
    for split, classes in layout.items():
        for name, count in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_imagefolder_reads_imagenet_layout(tmp_path) -> None:
    _make_folder(tmp_path, {"train": {"cat": 3, "dog": 2}, "val": {"dog": 2}})
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    spec = preset("deit_tiny", img_size=16, patch_size=8, num_classes=2)
    train = build_dataset(tmp_path, "train", spec)
    val = build_dataset(tmp_path, "val", spec)
    assert train.classes == ["cat", "dog"] and len(train) == 5
    assert [label for _, label in train.samples] == [0, 0, 0, 1, 1]
    assert [label for _, label in val.samples] == [1, 1]  # indices follow the train class list
    image, label = val[0]
    assert image.shape == (3, 16, 16) and label == 1
    torch.manual_seed(0)
    assert train[0][0].shape == (3, 16, 16)


def test_imagefolder_errors(tmp_path) -> None:
    spec = preset("deit_tiny", img_size=16, patch_size=8, num_classes=2)
    with pytest.raises(DataError, match="no 'train' folder"):
        build_dataset(tmp_path, "train", spec)
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        build_dataset(tmp_path, "train", spec)
    (tmp_path / "train" / "a").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        build_dataset(tmp_path, "train", spec)
    file_path = tmp_path / "file.txt"
    file_path.write_text("x")
    with pytest.raises(DataError, match="is not a folder"):
        build_dataset(file_path, "train", spec)


def test_imagefolder_class_mismatches(tmp_path) -> None:
    _make_folder(tmp_path, {"train": {"a": 1, "b": 1, "c": 1}, "val": {"z": 1}})
    with pytest.raises(DataError, match="3 classes, the architecture's head has only 2"):
        build_dataset(tmp_path, "train", preset("deit_tiny", img_size=16, patch_size=8, num_classes=2))
    spec = preset("deit_tiny", img_size=16, patch_size=8, num_classes=3)
    with pytest.raises(DataError, match="class folder 'z' is not among the 3 training classes"):
        build_dataset(tmp_path, "val", spec)
    with pytest.raises(DataError, match="in_chans=2"):
        build_dataset(tmp_path, "train", preset("deit_tiny", img_size=16, patch_size=8, in_chans=2))


# ---- loaders --------------------------------------------------------------------------------------
def test_sampler_shards_are_disjoint_and_cover_the_data() -> None:
    ranks = [ShardedSampler(11, shuffle=True, seed=5, rank=r, world_size=2) for r in range(2)]
    shards = [list(s) for s in ranks]
    assert len(shards[0]) == len(shards[1]) == 5  # the odd item out is dropped in train mode
    assert set(shards[0]).isdisjoint(shards[1])
    ranks[0].set_epoch(1)
    assert list(ranks[0]) != shards[0]
    evals = [list(ShardedSampler(11, shuffle=False, rank=r, world_size=2)) for r in range(2)]
    assert sorted(evals[0] + evals[1]) == list(range(11))


def test_loader_epochs_are_reproducible() -> None:
    data = build_dataset("digits", "train", VIT_TEST, augment=True)
    loader = build_loader(data, batch_size=32, train=True, seed=7)
    start_epoch(loader, 2, seed=7)
    first = next(iter(loader))
    start_epoch(loader, 3, seed=7)
    next(iter(loader))
    start_epoch(loader, 2, seed=7)
    again = next(iter(loader))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert len(loader) == math.ceil(len(data) / 32)
    with pytest.raises(DataError, match="batch size must be positive"):
        build_loader(data, batch_size=0, train=True)
