"""Fashion-MNIST from local IDX files: find them, read them, check them, turn them into tensors.

Nothing here downloads anything unless you call :func:`download_fashion_mnist` yourself.
"""
from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
import torch

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

#: Environment variable naming a folder that holds the four IDX files.
ENV_VAR = "DIFFREP_FASHION_MNIST"
#: Where the Debian/Ubuntu package ``dataset-fashion-mnist`` installs the files.
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
#: torchvision root searched last; torchvision keeps the files in ``<root>/FashionMNIST/raw``.
DEFAULT_TORCHVISION_ROOT = Path.home() / ".cache" / "torchvision"

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_REQUIRED = tuple(name for pair in _FILES.values() for name in pair)

# IDX type codes (third magic byte) -> numpy dtype; multi-byte types are big-endian.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    if path.suffix == ".gz":
        try:
            with gzip.open(path, "rb") as fh:
                return fh.read()
        except (EOFError, OSError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
            raise ValueError(f"{path}: expected a complete gzip stream, got a damaged/truncated one ({exc})") from exc
    return path.read_bytes()


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (plain or ``.gz``) into a writable, native-endian numpy array.

    The header is checked: magic bytes ``0 0 <type> <ndim>``, then ``ndim`` big-endian int32 sizes;
    the data must hold exactly ``prod(sizes)`` items. Anything else raises ValueError naming the
    file, what was expected and what was found.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise ValueError(f"{path}: expected a 4-byte IDX magic number, got a file of {len(raw)} byte(s)")
    zero0, zero1, code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"{path}: expected IDX magic 00 00 <type in {[hex(c) for c in _IDX_DTYPES]}> <ndim >= 1>, "
            f"got {raw[:4].hex(' ')}"
        )
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise ValueError(f"{path}: expected a {header_len}-byte header for {ndim} dims, got {len(raw)} byte(s)")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    found = len(raw) - header_len
    if found != expected:
        raise ValueError(
            f"{path}: expected {expected} data bytes for shape {shape} of {dtype.name}, got {found}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=True)


def _resolve_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _missing(folder: Path) -> list[str]:
    return [name for name in _REQUIRED if _resolve_file(folder, name) is None]


def _not_found_message(searched: list[str]) -> str:
    places = "\n".join(f"  - {s}" for s in searched)
    return (
        "Fashion-MNIST IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        f"t10k-labels-idx1-ubyte, plain or .gz) not found. Searched:\n{places}\n"
        "To get the data: `apt-get install dataset-fashion-mnist` (installs to /usr/share/datasets/fashion-mnist), "
        f"or set {ENV_VAR}=<folder with the 4 files>, or with internet access call "
        "diffrep.data.download_fashion_mnist(root) and pass that root."
    )


def _check_explicit(folder: Path, what: str) -> Path:
    for candidate in (folder, folder / "FashionMNIST" / "raw"):
        if candidate.is_dir() and not _missing(candidate):
            return candidate
    detail = f"missing {_missing(folder)}" if folder.is_dir() else "not a directory"
    raise FileNotFoundError(_not_found_message([f"{folder} ({what}; {detail})"]))


def find_fashion_mnist(path: str | os.PathLike | None = None,
                       torchvision_root: str | os.PathLike | None = None) -> Path:
    """Return the folder holding the four Fashion-MNIST IDX files.

    Search order:
      1. ``path`` if given (the folder itself, or a torchvision root holding ``FashionMNIST/raw``);
      2. the folder in environment variable ``DIFFREP_FASHION_MNIST``;
      3. ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``; ``SYSTEM_DIR``);
      4. ``<torchvision_root>/FashionMNIST/raw``, ``torchvision_root`` defaulting to
         ``~/.cache/torchvision`` (``DEFAULT_TORCHVISION_ROOT``).
    An explicit ``path`` or a set environment variable that does not hold the files is an error
    (no silent fallback). Raises FileNotFoundError listing the places searched and how to get the data.
    """
    if path is not None:
        return _check_explicit(Path(path).expanduser(), "path argument")
    env = os.environ.get(ENV_VAR)
    if env:
        return _check_explicit(Path(env).expanduser(), f"${ENV_VAR}")
    tv_root = Path(torchvision_root).expanduser() if torchvision_root is not None else DEFAULT_TORCHVISION_ROOT
    searched = []
    for folder, what in ((SYSTEM_DIR, "system package dir"), (tv_root / "FashionMNIST" / "raw", "torchvision root")):
        if folder.is_dir() and not _missing(folder):
            return folder
        searched.append(f"{folder} ({what}; {'missing ' + str(_missing(folder)) if folder.is_dir() else 'absent'})")
    searched.insert(0, f"${ENV_VAR} (not set)")
    raise FileNotFoundError(_not_found_message(searched))


def load_fashion_mnist(split: Literal["train", "test"] = "train",
                       path: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load one split as ``(images uint8 (N, 28, 28), labels int64 (N,))``.

    ``path`` is passed to :func:`find_fashion_mnist`. Checks shapes, that images and labels agree
    in count, and that labels lie in 0..9.
    """
    if split not in _FILES:
        raise ValueError(f"split: expected one of {sorted(_FILES)}, got {split!r}")
    folder = find_fashion_mnist(path)
    img_name, lab_name = _FILES[split]
    img_path, lab_path = _resolve_file(folder, img_name), _resolve_file(folder, lab_name)
    images, labels = read_idx(img_path), read_idx(lab_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{img_path}: expected uint8 images of shape (N, 28, 28), got {images.dtype} {images.shape}")
    if labels.ndim != 1:
        raise ValueError(f"{lab_path}: expected labels of shape (N,), got {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{folder}: expected as many labels as images, got {len(labels)} labels for {len(images)} images")
    bad = np.unique(labels[(labels < 0) | (labels > 9)])
    if bad.size:
        raise ValueError(f"{lab_path}: expected labels in 0..9, got value(s) {bad[:10].tolist()}")
    return images, labels.astype(np.int64)


def to_tensor_images(images_uint8: np.ndarray | torch.Tensor, pad_to: int | None = None) -> torch.Tensor:
    """Turn uint8 images (N, H, W) or (N, 1, H, W) into a float32 tensor (N, 1, H, W) in [0, 1].

    ``pad_to`` zero-pads each image centred to ``pad_to x pad_to`` (e.g. 28 -> 32 for U-Nets that
    halve the resolution several times); an odd remainder goes to the bottom/right.
    """
    tensor = torch.as_tensor(images_uint8)
    if tensor.dtype != torch.uint8:
        raise TypeError(f"images_uint8: expected dtype uint8, got {tensor.dtype}")
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(1)
    if tensor.ndim != 4 or tensor.shape[1] != 1:
        raise ValueError(f"images_uint8: expected shape (N, H, W) or (N, 1, H, W), got {tuple(tensor.shape)}")
    out = tensor.float() / 255.0
    if pad_to is not None:
        h, w = out.shape[-2:]
        if pad_to < max(h, w):
            raise ValueError(f"pad_to: expected >= image size {max(h, w)}, got {pad_to}")
        top, left = (pad_to - h) // 2, (pad_to - w) // 2
        out = torch.nn.functional.pad(out, (left, pad_to - w - left, top, pad_to - h - top))
    return out


def download_fashion_mnist(root: str | os.PathLike) -> Path:
    """Download Fashion-MNIST with torchvision into ``root`` (needs internet); returns the raw folder.

    Pass the returned folder (or ``root``) to :func:`load_fashion_mnist`.
    """
    from torchvision.datasets import FashionMNIST

    FashionMNIST(str(root), train=True, download=True)
    FashionMNIST(str(root), train=False, download=True)
    return Path(root) / "FashionMNIST" / "raw"
