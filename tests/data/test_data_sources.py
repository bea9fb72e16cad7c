"""Fashion-MNIST from IDX files the tests write, augmentation presets by image size, worker errors."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from cli_run import run_cli
from PIL import Image

from nvit.arch import ArchSpec, BlockSpec
from nvit.data import DataError, build_dataset, build_loader
from nvit.data.fashion_mnist import DEBIAN_PACKAGE, DEFAULT_ROOT, load_arrays, read_idx, root_of
from nvit.data.imagefolder import imagefolder_dataset
from nvit.data.transforms import Augment, ShiftTransform, TrainTransform, resolve_augment, shift_px_for
from nvit.presets import preset

FMNIST = ArchSpec(embed_dim=16, blocks=(BlockSpec(1, 8, 8, 16),), img_size=28, patch_size=7, in_chans=1,
                  num_classes=10, name="tiny28")


def write_idx(path, array: np.ndarray, *, gz: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


def make_fashion(root, *, per_class_train: int = 12, per_class_test: int = 3, gz: bool = True) -> None:
    """Images whose every pixel is 20·label + index-in-class (so the split and labels can be checked)."""
    root.mkdir(parents=True, exist_ok=True)
    for part, per_class in (("train", per_class_train), ("t10k", per_class_test)):
        labels = np.tile(np.arange(10), per_class)  # interleaved classes
        images = np.stack([np.full((28, 28), 20 * lab + i // 10) for i, lab in enumerate(labels)])
        suffix = ".gz" if gz else ""
        write_idx(root / f"{part}-images-idx3-ubyte{suffix}", images, gz=gz)
        write_idx(root / f"{part}-labels-idx1-ubyte{suffix}", labels, gz=gz)


def test_fashion_mnist_reads_idx_files_and_splits_train_into_train_and_val(tmp_path) -> None:
    make_fashion(tmp_path / "fm")
    name = f"fashion-mnist:{tmp_path / 'fm'}"
    train = build_dataset(name, "train", FMNIST, augment=False)
    val = build_dataset(name, "val", FMNIST)
    test = build_dataset(name, "test", FMNIST)
    # 1/12 of each class goes to val: round(12 / 12) = 1 image per class
    assert (len(train), len(val), len(test)) == (110, 10, 30)
    assert torch.bincount(val.labels, minlength=10).tolist() == [1] * 10
    assert torch.bincount(test.labels, minlength=10).tolist() == [3] * 10
    # every image is constant 20·label + k, so pixels identify the image; train and val are disjoint
    key = lambda ds: {int(ds.images[i, 0, 0, 0]) for i in range(len(ds))}  # noqa: E731
    assert key(train).isdisjoint(key(val)) and len(key(train) | key(val)) == 120
    assert all(int(train.images[i, 0, 0, 0]) // 20 == int(train.labels[i]) for i in range(len(train)))
    # normalised with the train split's statistics (0..1 scale)
    pixels = train.images.float() / 255
    image, label = train[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32 and isinstance(label, int)
    assert train.mean == pytest.approx(float(pixels.mean()), rel=1e-6)
    assert train.std == pytest.approx(float(pixels.std(unbiased=False)), rel=1e-6)
    assert val.mean == train.mean == test.mean
    expected = (float(train.images[0, 0, 0, 0]) / 255 - train.mean) / train.std
    assert torch.allclose(image, torch.full((1, 28, 28), expected))
    # the same split every time; plain (not gzipped) files read the same
    again = build_dataset(name, "val", FMNIST)
    assert torch.equal(again.images, val.images)
    make_fashion(tmp_path / "plain", gz=False)
    plain = build_dataset(f"fashion-mnist:{tmp_path / 'plain'}", "val", FMNIST)
    assert torch.equal(plain.images, val.images) and torch.equal(plain.labels, val.labels)


def test_fashion_mnist_default_split_sizes_match_the_published_files() -> None:
    if not (DEFAULT_ROOT / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"{DEBIAN_PACKAGE} is not installed")
    raw = load_arrays(DEFAULT_ROOT)
    sizes = {split.value: len(labels) for split, labels in raw.labels.items()}
    assert sizes == {"train": 55000, "val": 5000, "test": 10000}
    assert np.bincount(raw.labels[next(s for s in raw.labels if s.value == "val")]).tolist() == [500] * 10
    assert raw.mean == pytest.approx(0.2860, abs=5e-4) and raw.std == pytest.approx(0.3530, abs=5e-4)


def test_fashion_mnist_missing_or_corrupt_files_are_one_line_errors(tmp_path, monkeypatch) -> None:
    assert root_of("fashion-mnist") == DEFAULT_ROOT and str(root_of(f"fashion-mnist:{tmp_path}")) == str(tmp_path)
    with pytest.raises(DataError, match="give a folder after the colon"):
        root_of("fashion-mnist:")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as info:
        build_dataset(f"fashion-mnist:{empty}", "train", FMNIST)
    message = str(info.value)
    assert "\n" not in message and str(empty) in message and "train-images-idx3-ubyte.gz" in message
    assert DEBIAN_PACKAGE in message
    missing = tmp_path / "usr" / "share" / "datasets" / "fashion-mnist"
    monkeypatch.setattr("nvit.data.fashion_mnist.DEFAULT_ROOT", missing)  # the package is not installed
    with pytest.raises(DataError) as info:
        build_dataset("fashion-mnist", "val", FMNIST)
    assert f"{missing} is not a folder (install the Debian package {DEBIAN_PACKAGE}" in str(info.value)
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as fh:
        fh.write(b"\0\0\x08\x03" + struct.pack(">III", 2, 28, 28) + b"\0" * 100)  # truncated
    with pytest.raises(DataError, match="holds 100 values, its header says"):
        read_idx(bad, 3)
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(bad, 1)
    with pytest.raises(DataError, match="28x28 images, the architecture expects img_size=8"):
        build_dataset("fashion-mnist", "train", preset("vit_test"))


def test_augmentation_presets_follow_image_size() -> None:
    assert resolve_augment("auto", 8) is Augment.NONE  # digits
    assert resolve_augment(True, 28) is Augment.SHIFT and shift_px_for(28) == 2
    assert resolve_augment("auto", 224) is Augment.IMAGENET
    assert resolve_augment(False, 224) is Augment.NONE and resolve_augment("shift", 224) is Augment.SHIFT
    with pytest.raises(ValueError, match="unknown augmentation 'flip'"):
        Augment.parse("flip")
    with pytest.raises(DataError, match="unknown augmentation"):
        build_dataset("digits", "train", preset("vit_test"), augment="flip")
    assert build_dataset("digits", "train", preset("vit_test"), augment="shift").shift_px == 1
    with pytest.raises(DataError, match="imagenet augmentation applies to image folders"):
        build_dataset("digits", "train", preset("vit_test"), augment="imagenet")
    with pytest.raises(DataError, match="no test split"):
        build_dataset("digits", "test", preset("vit_test"))


def test_fashion_mnist_shift_augments_train_only_and_is_seeded(tmp_path) -> None:
    make_fashion(tmp_path)
    name = f"fashion-mnist:{tmp_path}"
    train = build_dataset(name, "train", FMNIST)  # auto: a 2-pixel shift
    assert train.shift_px == 2 and build_dataset(name, "val", FMNIST, augment="shift").shift_px == 0
    # a bright square in the middle of a black image moves by at most 2 pixels and keeps its size
    train.images[0] = 0
    train.images[0, 0, 10:14, 10:14] = 255
    seen = set()
    for seed in range(40):
        torch.manual_seed(seed)
        image, _ = train[0]
        bright = torch.nonzero(image[0] > 0)
        assert len(bright) == 16
        dy, dx = int(bright[:, 0].min()) - 10, int(bright[:, 1].min()) - 10
        assert max(abs(dy), abs(dx)) <= 2
        assert image[0].min().item() == pytest.approx(-train.mean / train.std, rel=1e-6)  # black stays black
        seen.add((dy, dx))
    assert len(seen) > 10
    torch.manual_seed(5)
    first = train[0][0]
    torch.manual_seed(5)
    assert torch.equal(first, train[0][0])


def _folder(root, size: int, *, count: int = 2, corrupt: bool = False) -> None:
    for split in ("train", "val"):
        for name in ("a", "b"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("L", (size, size), 40 * i).save(folder / f"{i}.png")
    if corrupt:
        (root / "train" / "b" / "broken.png").write_bytes(b"\x89PNG not really")


def test_small_image_folders_get_shift_not_imagenet_crops(tmp_path) -> None:
    _folder(tmp_path, 28)
    spec = ArchSpec(embed_dim=16, blocks=(BlockSpec(1, 8, 8, 16),), img_size=28, patch_size=7, in_chans=1,
                    num_classes=2)
    train = imagefolder_dataset(tmp_path, "train", spec)
    assert isinstance(train.transform, ShiftTransform) and train.transform.shift_px == 2
    val = imagefolder_dataset(tmp_path, "val", spec)
    assert isinstance(val.transform, ShiftTransform) and val.transform.shift_px == 0
    # eval keeps the whole 28x28 image (no resize-then-centre-crop margin)
    image = Image.fromarray(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28) % 251, "L")
    out = val.transform(image)
    c = val.transform.config
    expected = (torch.from_numpy(np.asarray(image, dtype=np.float32)) / 255 - c.channel_mean[0]) / c.channel_std[0]
    assert torch.allclose(out[0], expected, atol=1e-6)
    assert isinstance(imagefolder_dataset(tmp_path, "train", spec, augment="imagenet").transform, TrainTransform)
    big = preset("deit_tiny", img_size=96, patch_size=16, num_classes=2, in_chans=1)
    assert isinstance(imagefolder_dataset(tmp_path, "train", big).transform, TrainTransform)


def test_unreadable_image_in_a_worker_is_one_line(tmp_path, capsys) -> None:
    _folder(tmp_path / "data", 28, corrupt=True)
    spec = ArchSpec(embed_dim=16, blocks=(BlockSpec(1, 8, 8, 16),), img_size=28, patch_size=7, in_chans=1,
                    num_classes=2)
    dataset = build_dataset(tmp_path / "data", "train", spec, augment=False)
    loader = build_loader(dataset, batch_size=5, train=False, num_workers=1)
    with pytest.raises(DataError) as info:
        list(loader)
    message = str(info.value)
    assert "\n" not in message and "broken.png" in message and "in data loading worker 0" in message
    from nvit.arch import save_arch

    arch = save_arch(spec, tmp_path / "arch.json")
    code, _, err = run_cli(["train", "--arch", str(arch), "--data", str(tmp_path / "data"), "--epochs", "1",
                            "--workers", "1", "--batch-size", "5", "--out", str(tmp_path / "out")], capsys)
    lines = [line for line in err.splitlines() if line.strip() and "error" in line]
    assert code == 1 and len(lines) == 1 and "cannot read image" in lines[0] and "broken.png" in lines[0]
    assert "Traceback" not in err


def test_augment_help_states_the_thresholds_in_use() -> None:
    from nvit.commands.train import AUGMENT_HELP
    from nvit.data.transforms import SMALL_IMAGE_PX, TINY_IMAGE_PX

    assert f"none up to {TINY_IMAGE_PX} px" in AUGMENT_HELP and f"up to {SMALL_IMAGE_PX} px" in AUGMENT_HELP
    assert f"{shift_px_for(28)} px at 28" in AUGMENT_HELP
