"""Pixel descriptors on disk, one image per chunk, and a class-balanced sampler that reads them one by one.

Baranchuk et al. (ICLR 2022, "Label-efficient semantic segmentation with diffusion models") train
their pixel MLPs on the upsampled, concatenated U-Net activations of every labelled pixel. The
reference code holds all of them in RAM as one float32 tensor (about 210 GB for 50 images of
256x256). Here each image's descriptor (D, H, W) is written as float16 to its own atomic chunk of a
:class:`~diffrep.features.store.FeatureStore` as soon as it is computed; training reads the chunks
back one image at a time and keeps only a fixed-size, class-balanced pixel sample in memory.

Pixel sources (anything with ``__len__``, ``num_features``, ``image_shape``, ``read(i)`` and
``read_labels(i)``): :class:`PixelStore` (on disk), :class:`ArrayPixels` (small in-memory cases)
and :class:`PixelSubset` (a view of some images of another source).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from .._provenance import feature_code_digest
from .._types import FeatureKey
from .aggregate import upsample_concat
from .store import FeatureStore, open_chunk
from ..errors import as_tensor as _as_tensor
from ..digests import array_digest, backbone_identity
from ..errors import as_dtype, check_label_range, check_positive_int

DESCRIPTOR = "descriptor"
LABELS = "labels"


@runtime_checkable
class PixelSource(Protocol):
    """What the sampler and the pixel classifier need: per-image descriptors (D, H, W) and labels (H, W)."""

    num_features: int
    image_shape: tuple[int, int]

    def __len__(self) -> int: ...

    def read(self, index: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def read_labels(self, index: int) -> torch.Tensor: ...


# ---------------------------------------------------------------------------------------- validation
def check_pixel_labels(labels: Any, num_classes: int | None, *, image_shape: Sequence[int] | None = None,
                       num_images: int | None = None, ignore_index: int | None = None,
                       name: str = "labels") -> torch.Tensor:
    """Validate a label batch (N, H, W) of integers in 0..num_classes-1 (or ``ignore_index``); int64 out.

    The shapes are checked here (one map per image, of the image size), the values by ``errors.check_label_range``.
    """
    y = check_label_range(labels, None, name=name)
    if y.ndim != 3:
        raise ValueError(f"{name}: expected shape (N, H, W), got {tuple(y.shape)}")
    if y.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one label map (N >= 1), got N = 0")
    if num_images is not None and y.shape[0] != num_images:
        raise ValueError(f"{name}: expected {num_images} label map(s), one per image, got {y.shape[0]}")
    if image_shape is not None and tuple(y.shape[1:]) != tuple(image_shape):
        raise ValueError(f"{name}: expected label maps of the image size {tuple(image_shape)}, "
                         f"got {tuple(y.shape[1:])}")
    return check_label_range(y, num_classes, ignore_index, name=name)


# --------------------------------------------------------------------------------------------- sources
class ArrayPixels:
    """In-memory descriptors (N, D, H, W) and labels (N, H, W) for small cases; nothing is copied."""

    def __init__(self, descriptors: Any, labels: Any) -> None:
        x = _as_tensor(descriptors, "descriptors")
        if x.ndim != 4:
            raise ValueError(f"descriptors: expected shape (N, D, H, W), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("descriptors: expected at least one image (N >= 1), got N = 0")
        if not x.is_floating_point():
            raise TypeError(f"descriptors: expected floating-point values, got dtype {x.dtype}")
        y = _as_tensor(labels, "labels")
        if y.ndim != 3:
            raise ValueError(f"labels: expected shape (N, H, W), got {tuple(y.shape)}")
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"labels: expected {x.shape[0]} label map(s), one per image, got {y.shape[0]}")
        if tuple(y.shape[1:]) != tuple(x.shape[2:]):
            raise ValueError(f"labels: expected label maps of the image size {tuple(x.shape[2:])}, "
                             f"got {tuple(y.shape[1:])}")
        if y.is_floating_point():
            raise TypeError(f"labels: expected an integer label map, got dtype {y.dtype}")
        self.descriptors, self.labels = x, y
        self.num_features = int(x.shape[1])
        self.image_shape = (int(x.shape[2]), int(x.shape[3]))

    def __len__(self) -> int:
        return int(self.descriptors.shape[0])

    def read(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.descriptors[index], self.labels[index].long()

    def read_labels(self, index: int) -> torch.Tensor:
        return self.labels[index].long()


class PixelSubset:
    """A view of some images of another pixel source (e.g. the N labelled slices of a larger store)."""

    def __init__(self, source: PixelSource, indices: Iterable[int]) -> None:
        self.source = source
        self.indices = [int(i) for i in indices]
        bad = [i for i in self.indices if not 0 <= i < len(source)]
        if bad:
            raise ValueError(f"indices: expected values in 0..{len(source) - 1}, got {bad[:10]}")
        self.num_features = source.num_features
        self.image_shape = source.image_shape

    def __len__(self) -> int:
        return len(self.indices)

    def read(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.source.read(self.indices[index])

    def read_labels(self, index: int) -> torch.Tensor:
        return self.source.read_labels(self.indices[index])


class PixelStore:
    """Per-image pixel descriptors (float16 (D, H, W)) and labels (int64 (H, W)), one FeatureStore chunk each.

    Args:
        root: parent directory of stores.
        fingerprint: everything that determines the descriptors (backbone digest, nodes, timesteps,
            noise, seed, data digest...); a different fingerprint gives a different directory.

    Use :meth:`fill` (or :func:`build_pixel_store`) to compute missing images; an interrupted fill
    keeps every finished image and the next fill computes only the missing ones.
    """

    def __init__(self, root: str | os.PathLike, fingerprint: Mapping[str, Any]) -> None:
        fp = dict(fingerprint)
        for key in ("num_images", "image_shape"):
            if key not in fp:
                raise ValueError(f"fingerprint: expected key {key!r} (the store's size), got keys {sorted(fp)}")
        if int(fp["num_images"]) < 1:
            raise ValueError(f"fingerprint: expected num_images >= 1, got N = {fp['num_images']}")
        self.store = FeatureStore(root, fp)
        self.fingerprint = fp
        self.num_images = int(fp["num_images"])
        self.image_shape = tuple(int(s) for s in fp["image_shape"])
        self._num_features: int | None = fp.get("num_features")

    @property
    def path(self):
        return self.store.path

    def __len__(self) -> int:
        return self.num_images

    def missing(self) -> list[int]:
        """Indices of images whose descriptors have not been written yet."""
        return [i for i in range(self.num_images) if not self.store.has(i)]

    def complete(self) -> bool:
        return not self.missing()

    def write(self, index: int, descriptor: torch.Tensor, labels: torch.Tensor) -> None:
        """Atomically write one image's descriptor (D, H, W), stored as float16, and its labels (H, W)."""
        if not 0 <= index < self.num_images:
            raise ValueError(f"index: expected 0..{self.num_images - 1}, got {index}")
        if descriptor.ndim != 3 or tuple(descriptor.shape[1:]) != self.image_shape:
            raise ValueError(f"descriptor: expected shape (D, {self.image_shape[0]}, {self.image_shape[1]}), "
                             f"got {tuple(descriptor.shape)}")
        if tuple(labels.shape) != self.image_shape:
            raise ValueError(f"labels: expected shape {self.image_shape}, got {tuple(labels.shape)}")
        if self._num_features is not None and descriptor.shape[0] != self._num_features:
            raise ValueError(f"descriptor: expected {self._num_features} features, got {descriptor.shape[0]}")
        self._num_features = int(descriptor.shape[0])
        self.store.write(index, {DESCRIPTOR: descriptor.to(torch.float16), LABELS: labels.long()})

    def fill(self, compute: Callable[[list[int]], Iterable[tuple[torch.Tensor, torch.Tensor]]],
             batch_size: int = 8, progress: Callable[[Iterator[Any]], Iterator[Any]] | None = None) -> "PixelStore":
        """Compute the missing images in batches: ``compute(indices)`` yields (descriptor, labels) per index.

        Each image is written as soon as its batch is computed; finished images are never recomputed.
        """
        todo = self.missing()
        groups = [todo[i:i + batch_size] for i in range(0, len(todo), max(1, batch_size))]
        for group in (progress(iter(groups)) if progress else groups):
            results = list(compute(group))
            if len(results) != len(group):
                raise ValueError(f"compute: expected {len(group)} (descriptor, labels) pairs, got {len(results)}")
            for index, (descriptor, labels) in zip(group, results):
                self.write(index, descriptor, labels)
        return self

    def _chunk(self, index: int) -> str:
        if not 0 <= index < self.num_images:
            raise IndexError(f"index: expected 0..{self.num_images - 1}, got {index}")
        if not self.store.has(index):
            raise KeyError(f"pixel store {self.path}: image {index} has not been written; run fill() first")
        return str(self.store._chunk_path(index))

    def read(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One image's (descriptor float16 (D, H, W), labels int64 (H, W))."""
        self._chunk(index)
        chunk = self.store.read(index)
        return chunk[DESCRIPTOR], chunk[LABELS]

    def read_labels(self, index: int) -> torch.Tensor:
        """One image's labels only; the descriptor is not read from disk."""
        with open_chunk(self._chunk(index)) as handle:
            return handle.get_tensor(LABELS)

    @property
    def num_features(self) -> int:
        if self._num_features is None:
            ids = self.store.chunk_ids()
            if not ids:
                raise ValueError(f"pixel store {self.path}: no image written yet, so the descriptor size is unknown")
            with open_chunk(self._chunk(ids[0])) as handle:
                self._num_features = int(handle.get_slice(DESCRIPTOR).get_shape()[0])
        return self._num_features

    def subset(self, indices: Iterable[int]) -> PixelSubset:
        return PixelSubset(self, indices)


def build_pixel_store(root: str | os.PathLike, extractor: Any, images: Any, labels: Any,
                      keys: Sequence[FeatureKey] | None = None, num_classes: int | None = None,
                      batch_size: int = 8, extra: Mapping[str, Any] | None = None,
                      progress: Callable[[Iterator[Any]], Iterator[Any]] | None = None) -> PixelStore:
    """Extract, upsample+concatenate and write pixel descriptors image by image (resumable).

    ``extractor`` is a :class:`~diffrep.features.FeatureExtractor`; descriptors follow Baranchuk et
    al. 2022: each node at each timestep bilinearly upsampled to the image size and concatenated in
    ``keys`` order (default: node-major, then timestep). Only one batch of features is ever in memory.
    """
    x = extractor.backbone.check_images(images)
    y = check_pixel_labels(labels, num_classes, image_shape=tuple(x.shape[2:]), num_images=x.shape[0])
    if x.ndim != 4:
        raise ValueError(f"images: expected 2D images (N, C, H, W), got shape {tuple(x.shape)}")
    keys = list(keys) if keys is not None else [FeatureKey(n, t) for n in extractor.nodes for t in extractor.timesteps]
    size = tuple(int(s) for s in x.shape[2:])
    num_features = sum(extractor.feature_info[k.node].channels for k in keys)
    fingerprint = {
        "kind": "pixel-descriptors", "code": feature_code_digest(), "backbone": backbone_identity(extractor.backbone),
        "nodes": list(extractor.nodes), "timesteps": list(extractor.timesteps),
        "keys": [[k.node, k.timestep] for k in keys], "noise": str(extractor.noise), "seed": extractor.seed,
        "data": array_digest(x, y), "num_images": int(x.shape[0]), "image_shape": list(size),
        "num_features": num_features, "dtype": "float16", "upsample": "bilinear", **dict(extra or {}),
    }
    store = PixelStore(root, fingerprint)

    def compute(indices: list[int]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        features = extractor(x[indices])
        descriptors = upsample_concat(features, size, keys).to(torch.float16)
        del features
        for j, index in enumerate(indices):
            yield descriptors[j], y[index]

    return store.fill(compute, batch_size=batch_size, progress=progress)


# --------------------------------------------------------------------------------------------- sampler
def balanced_quotas(totals: np.ndarray, budget: int) -> np.ndarray:
    """Split ``budget`` pixels evenly over classes; a class with fewer pixels gives its share to the others."""
    totals = np.asarray(totals, dtype=np.int64)
    quotas = np.zeros_like(totals)
    active = [c for c in np.argsort(totals) if totals[c] > 0]
    left = int(budget)
    while active:
        share = left // len(active)
        c = active[0]
        if totals[c] <= share:
            quotas[c] = totals[c]
            left -= int(totals[c])
            active.pop(0)
            continue
        for k, c in enumerate(active):
            quotas[c] = share + (1 if k < left - share * len(active) else 0)
        break
    return quotas


class BalancedPixelSampler:
    """Draws a class-balanced random pixel sample of at most ``max_pixels`` pixels per epoch.

    It first reads every image's labels (not descriptors) to count pixels per class, then for each
    draw picks, per class, ``max_pixels / C`` pixels uniformly among that class's pixels of all
    images (classes with fewer pixels give up their share), and finally reads the images one at a
    time to gather the chosen descriptors into one preallocated (M, D) buffer. Peak memory is that
    buffer plus one image's descriptor, whatever the number of images.

    ``dtype`` (a torch dtype or its name) is that of the sampled descriptors; ``peak_bytes_`` records the
    largest (buffer + one image) footprint seen.
    """

    def __init__(self, source: PixelSource, num_classes: int, max_pixels: int, *, seed: int = 0,
                 ignore_index: int | None = None, dtype: str | torch.dtype = torch.float16) -> None:
        if len(source) == 0:
            raise ValueError("source: expected at least one labelled image (N >= 1), got N = 0")
        check_positive_int(max_pixels, "max_pixels")
        self.source, self.num_classes, self.max_pixels = source, int(num_classes), int(max_pixels)
        self.seed, self.ignore_index, self.dtype = seed, ignore_index, as_dtype(dtype)
        counts = np.zeros((len(source), self.num_classes), dtype=np.int64)
        for i in range(len(source)):
            y = source.read_labels(i)
            if tuple(y.shape) != tuple(source.image_shape):
                raise ValueError(f"labels of image {i}: expected shape {tuple(source.image_shape)}, got {tuple(y.shape)}")
            y = check_pixel_labels(y[None], self.num_classes, ignore_index=ignore_index, name=f"labels of image {i}")
            keep = y[y != ignore_index] if ignore_index is not None else y.flatten()
            counts[i] = torch.bincount(keep, minlength=self.num_classes).numpy()
        if counts.sum() == 0:
            raise ValueError("labels: expected at least one labelled pixel, got none (all ignore_index)")
        self.counts = counts
        self.totals = counts.sum(axis=0)
        self.peak_bytes_ = 0

    def sample(self, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(descriptors (M, D) in ``dtype``, labels (M,) int64); M <= max_pixels, balanced over classes."""
        rng = np.random.default_rng([int(self.seed), int(epoch)])
        quotas = balanced_quotas(self.totals, self.max_pixels)
        offsets = np.concatenate([np.zeros((1, self.num_classes), np.int64), np.cumsum(self.counts, axis=0)])
        # picks[i][c] = ranks (within image i's pixels of class c) of the chosen pixels
        picks: dict[int, dict[int, np.ndarray]] = {}
        for c in range(self.num_classes):
            if quotas[c] == 0:
                continue
            chosen = np.sort(rng.choice(int(self.totals[c]), size=int(quotas[c]), replace=False))
            image = np.searchsorted(offsets[1:, c], chosen, side="right")
            for i in np.unique(image):
                picks.setdefault(int(i), {})[c] = chosen[image == i] - offsets[i, c]
        total = int(quotas.sum())
        x = torch.empty((total, self.source.num_features), dtype=self.dtype)
        y = torch.empty((total,), dtype=torch.int64)
        row = 0
        for i in sorted(picks):
            descriptor, labels = self.source.read(i)
            self.peak_bytes_ = max(self.peak_bytes_, x.nbytes + descriptor.nbytes)
            flat_x = descriptor.reshape(descriptor.shape[0], -1)
            flat_y = labels.reshape(-1)
            where = torch.cat([torch.nonzero(flat_y == c).squeeze(1)[torch.from_numpy(ranks)]
                               for c, ranks in picks[i].items()])
            where = torch.sort(where).values  # raster order: rows do not depend on how images are chunked
            x[row:row + len(where)] = flat_x[:, where].T.to(self.dtype)
            y[row:row + len(where)] = flat_y[where]
            row += len(where)
            del descriptor, flat_x
        return x, y  # in (image, pixel) order; the classifier shuffles its minibatches
