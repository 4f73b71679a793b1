"""Fashion-MNIST loader: IDX parsing, search order, errors, tensor conversion (synthetic files)."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from diffrep.data import fashion_mnist as fm

NAMES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}i", *arr.shape)
    return header + arr.astype(">u1").tobytes()


def write(path: Path, data: bytes) -> Path:
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)
    return path


def make_dataset(folder: Path, n: int = 5, gz: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for split, (img_name, lab_name) in NAMES.items():
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        suffix = ".gz" if gz else ""
        write(folder / f"{img_name}{suffix}", idx_bytes(images))
        write(folder / f"{lab_name}{suffix}", idx_bytes(labels))
        out[split] = (images, labels)
    return out


@pytest.fixture
def no_defaults(tmp_path, monkeypatch):
    """Point every default search place at empty tmp folders."""
    monkeypatch.delenv(fm.ENV_VAR, raising=False)
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "system")
    monkeypatch.setattr(fm, "DEFAULT_TORCHVISION_ROOT", tmp_path / "tv")
    return tmp_path


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_round_trip(tmp_path, suffix):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    got = fm.read_idx(write(tmp_path / f"x-idx3-ubyte{suffix}", idx_bytes(arr)))
    assert got.dtype == np.uint8 and got.shape == (2, 3, 4) and got.flags.writeable
    np.testing.assert_array_equal(got, arr)


def test_read_idx_bad_magic(tmp_path):
    arr = np.zeros((2, 2), np.uint8)
    path = write(tmp_path / "bad", b"\x01" + idx_bytes(arr)[1:])
    with pytest.raises(ValueError, match=r"bad: expected IDX magic .* got 01 00 08 02"):
        fm.read_idx(path)
    with pytest.raises(ValueError, match="expected IDX magic"):
        fm.read_idx(write(tmp_path / "badtype", idx_bytes(arr, code=0x07)))


def test_read_idx_truncated_gz_and_short_data(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (50, 28, 28), dtype=np.uint8)
    good = write(tmp_path / "good.gz", idx_bytes(arr))
    cut = tmp_path / "cut.gz"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="cut.gz: expected a complete gzip stream"):
        fm.read_idx(cut)
    notgz = tmp_path / "plain.gz"
    notgz.write_bytes(b"this is not gzip")
    with pytest.raises(ValueError, match="gzip"):
        fm.read_idx(notgz)
    short = write(tmp_path / "short", idx_bytes(arr)[:-5])
    with pytest.raises(ValueError, match=r"expected 39200 data bytes for shape \(50, 28, 28\).*got 39195"):
        fm.read_idx(short)


def test_load_round_trip_plain_and_gz(tmp_path, no_defaults):
    for gz in (True, False):
        folder = tmp_path / f"data_gz{gz}"
        ref = make_dataset(folder, gz=gz)
        for split in ("train", "test"):
            images, labels = fm.load_fashion_mnist(split, path=folder)
            assert images.dtype == np.uint8 and images.shape == (5, 28, 28)
            assert labels.dtype == np.int64
            np.testing.assert_array_equal(images, ref[split][0])
            np.testing.assert_array_equal(labels, ref[split][1])
    with pytest.raises(ValueError, match="split: expected one of"):
        fm.load_fashion_mnist("val", path=folder)


def test_search_order(tmp_path, no_defaults, monkeypatch):
    explicit, env, system, tv = (tmp_path / n for n in ("explicit", "env", "system", "tv"))
    for folder in (explicit, env, system, tv / "FashionMNIST" / "raw"):
        make_dataset(folder)
    monkeypatch.setenv(fm.ENV_VAR, str(env))
    assert fm.find_fashion_mnist(explicit) == explicit
    assert fm.find_fashion_mnist() == env
    monkeypatch.delenv(fm.ENV_VAR)
    assert fm.find_fashion_mnist() == system
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "nothing")
    assert fm.find_fashion_mnist() == tv / "FashionMNIST" / "raw"
    assert fm.find_fashion_mnist(tv) == tv / "FashionMNIST" / "raw"  # a torchvision root as path
    other = tmp_path / "other_tv"
    make_dataset(other / "FashionMNIST" / "raw")
    assert fm.find_fashion_mnist(torchvision_root=other) == other / "FashionMNIST" / "raw"


def test_not_found_lists_places_and_instructions(no_defaults, monkeypatch):
    with pytest.raises(FileNotFoundError) as info:
        fm.find_fashion_mnist()
    msg = str(info.value)
    for needle in ("DIFFREP_FASHION_MNIST", str(no_defaults / "system"), str(no_defaults / "tv"),
                   "apt-get install dataset-fashion-mnist", "download_fashion_mnist"):
        assert needle in msg
    # explicit path or env var that lacks the files: an error, not a silent fallback
    partial = no_defaults / "partial"
    partial.mkdir()
    (partial / "train-images-idx3-ubyte").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="missing .*t10k-images-idx3-ubyte"):
        fm.find_fashion_mnist(partial)
    monkeypatch.setenv(fm.ENV_VAR, str(no_defaults / "absent"))
    with pytest.raises(FileNotFoundError, match=r"\$DIFFREP_FASHION_MNIST"):
        fm.find_fashion_mnist()


def test_bad_labels_and_count_mismatch(tmp_path, no_defaults):
    folder = tmp_path / "d"
    make_dataset(folder, gz=False)
    write(folder / "t10k-labels-idx1-ubyte", idx_bytes(np.array([0, 1, 12, 3, 4], np.uint8)))
    with pytest.raises(ValueError, match=r"expected labels in 0..9, got value\(s\) \[12\]"):
        fm.load_fashion_mnist("test", folder)
    write(folder / "t10k-labels-idx1-ubyte", idx_bytes(np.array([0, 1, 2], np.uint8)))
    with pytest.raises(ValueError, match="got 3 labels for 5 images"):
        fm.load_fashion_mnist("test", folder)


def test_to_tensor_images():
    imgs = np.full((3, 28, 28), 255, np.uint8)
    x = fm.to_tensor_images(imgs)
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.float32 and float(x.max()) == 1.0
    p = fm.to_tensor_images(imgs, pad_to=32)
    assert p.shape == (3, 1, 32, 32)
    assert float(p[..., 2:30, 2:30].min()) == 1.0 and float(p.sum()) == 3 * 28 * 28
    with pytest.raises(TypeError, match="uint8"):
        fm.to_tensor_images(imgs.astype(np.float32))
    with pytest.raises(ValueError, match="pad_to"):
        fm.to_tensor_images(imgs, pad_to=20)


def test_classes():
    assert len(fm.FASHION_MNIST_CLASSES) == 10 and fm.FASHION_MNIST_CLASSES[9] == "Ankle boot"


@pytest.mark.skipif(not fm.SYSTEM_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_test_split(monkeypatch):
    monkeypatch.delenv(fm.ENV_VAR, raising=False)
    images, labels = fm.load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and np.bincount(labels).tolist() == [1000] * 10
