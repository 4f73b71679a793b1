"""Volume <-> 2D slices: one square crop around the brain, slices along an axis, resizing, and the inverse.

The one implementation behind the brain training slices (:mod:`diffrep.data.brain`) and slice-wise
volume scoring (:mod:`diffrep.anomaly.volume`).

Layout: for ``axis=2`` (axial slices of a RAS volume) a slice is ``vol[:, ::-1, z].T``: rows run
anterior -> posterior, columns subject left -> right, so ``imshow`` shows a conventional view. In
general the two remaining axes (a, b) become columns (a) and rows (b, reversed).

Crop: every slice of a volume is cut to the same square around the mask's footprint over all
slices (+``margin`` voxels, zero padding where the square leaves the volume).

Resizing rule, used in both directions: intensities and score maps by antialiased bilinear
interpolation (``torch.nn.functional.interpolate``, ``antialias=True, align_corners=False``); masks
and label maps by a majority vote: the antialiased bilinear resize of their one-hot encoding, then
the argmax (ties go to the lower label). A mask is a label map with the two labels 0 and 1; for it
the vote is "brain where more than half of the covered area is brain". When the size equals the
crop's side nothing is interpolated, so volume -> slices -> volume is exact on the crop box.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SliceGeometry:
    """Where slices came from: the volume's ``shape``, the slicing ``axis``, the square crop ``box``
    (row0, col0, side) in slice coordinates (it may reach outside the volume) and the slices' ``size``."""

    shape: tuple[int, int, int]
    axis: int
    box: tuple[int, int, int]
    size: int


def _to_stack(volume: np.ndarray, axis: int) -> np.ndarray:
    """(n, rows, cols) view of a 3D array: slices along ``axis`` in the documented layout."""
    return np.transpose(np.moveaxis(volume, axis, 0), (0, 2, 1))[:, ::-1, :]


def _from_stack(stack: np.ndarray, axis: int) -> np.ndarray:
    """Inverse of :func:`_to_stack`."""
    return np.moveaxis(np.transpose(stack[:, ::-1, :], (0, 2, 1)), 0, axis)


def _check_axis(axis: int) -> int:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not 0 <= int(axis) <= 2:
        raise ValueError(f"axis: expected 0, 1 or 2, got {axis!r}")
    return int(axis)


def crop_box(mask: np.ndarray, axis: int = 2, margin: int = 4) -> tuple[int, int, int]:
    """Square (row0, col0, side) around the footprint of a 3D ``mask`` over all its slices along ``axis``."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3 or not mask.any():
        raise ValueError(f"mask: expected a non-empty 3D mask, got shape {mask.shape} with {int(mask.sum())} voxel(s) set")
    footprint = _to_stack(mask, _check_axis(axis)).any(axis=0)
    rows, cols = np.nonzero(footprint)
    side = int(max(rows.max() - rows.min(), cols.max() - cols.min())) + 1 + 2 * margin
    r0 = (int(rows.min()) + int(rows.max())) // 2 - side // 2
    c0 = (int(cols.min()) + int(cols.max())) // 2 - side // 2
    return r0, c0, side


def _crop(stack: np.ndarray, box: tuple[int, int, int]) -> np.ndarray:
    """(n, side, side) copy of a slice stack cut to ``box``, zero outside the stack."""
    r0, c0, side = box
    out = np.zeros((stack.shape[0], side, side), stack.dtype)
    rs, cs = max(r0, 0), max(c0, 0)
    re, ce = min(r0 + side, stack.shape[1]), min(c0 + side, stack.shape[2])
    out[:, rs - r0:re - r0, cs - c0:ce - c0] = stack[:, rs:re, cs:ce]
    return out


def _uncrop(crops: np.ndarray, box: tuple[int, int, int], rows: int, cols: int) -> np.ndarray:
    """Inverse of :func:`_crop`: (n, rows, cols) stack, zero outside the box."""
    r0, c0, side = box
    out = np.zeros((crops.shape[0], rows, cols), crops.dtype)
    rs, cs = max(r0, 0), max(c0, 0)
    re, ce = min(r0 + side, rows), min(c0 + side, cols)
    out[:, rs:re, cs:ce] = crops[:, rs - r0:re - r0, cs - c0:ce - c0]
    return out


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W) float images -> (N, size, size) float32 by antialiased bilinear interpolation."""
    images = np.asarray(images, dtype=np.float32)
    if images.shape[1:] == (size, size):
        return images.copy()
    resized = F.interpolate(torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1), size=(size, size),
                            mode="bilinear", antialias=True, align_corners=False)
    return resized[:, 0].numpy()


def resize_labels(labels: np.ndarray, size: int, num_classes: int) -> np.ndarray:
    """(N, H, W) label maps in 0..num_classes-1 -> (N, size, size) int64 by a majority vote (module docstring)."""
    labels = np.asarray(labels)
    if labels.shape[1:] == (size, size):
        return labels.astype(np.int64)
    onehot = F.one_hot(torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)), num_classes)
    votes = F.interpolate(onehot.permute(0, 3, 1, 2).float(), size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False)
    return votes.argmax(1).numpy().astype(np.int64)


def volume_to_slices(volume: np.ndarray, mask: np.ndarray, axis: int = 2, size: int | None = None, *,
                     labels: np.ndarray | None = None, num_classes: int = 2,
                     margin: int = 4) -> tuple[np.ndarray, np.ndarray, SliceGeometry]:
    """Cut a 3D volume into square slices around ``mask`` along ``axis`` and resize them to ``size``.

    Returns (images float32 (N, 1, size, size), label slices int64 (N, size, size), geometry). The
    label slices are those of ``labels`` (values 0..num_classes-1), or of ``mask`` as 0/1 when
    ``labels`` is None. ``size`` None keeps the crop's side (no interpolation).
    """
    volume, mask = np.asarray(volume), np.asarray(mask, dtype=bool)
    if volume.ndim != 3 or mask.shape != volume.shape:
        raise ValueError(f"volume_to_slices: expected a 3D volume and a mask of its shape, got {volume.shape} and "
                         f"{mask.shape}")
    if labels is None:
        labels, num_classes = mask.astype(np.int64), 2
    elif np.shape(labels) != volume.shape:
        raise ValueError(f"labels: expected the volume's shape {volume.shape}, got {np.shape(labels)}")
    axis = _check_axis(axis)
    box = crop_box(mask, axis, margin)
    size = box[2] if size is None else int(size)
    geometry = SliceGeometry(tuple(int(s) for s in volume.shape), axis, box, size)
    images = resize_images(_crop(_to_stack(volume.astype(np.float32, copy=False), axis), box), size)
    label_slices = resize_labels(_crop(_to_stack(np.asarray(labels), axis), box), size, num_classes)
    return images[:, None], label_slices, geometry


def slices_to_volume(maps: np.ndarray, geometry: SliceGeometry, num_classes: int | None = None) -> np.ndarray:
    """Paste (N, size, size) slice maps (or (N, 1, size, size)) back onto the volume they were cut from.

    Float maps are resized to the crop's side bilinearly (float32 result); with ``num_classes`` the
    maps are label maps, resized by the majority vote (int64 result). Outside the crop box: 0.
    """
    maps = np.asarray(maps)
    if maps.ndim == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    n = geometry.shape[geometry.axis]
    if maps.shape != (n, geometry.size, geometry.size):
        raise ValueError(f"maps: expected shape {(n, geometry.size, geometry.size)} (slices of the geometry), "
                         f"got {maps.shape}")
    side = geometry.box[2]
    crops = resize_images(maps, side) if num_classes is None else resize_labels(maps, side, num_classes)
    rows, cols = _to_stack(np.empty(geometry.shape, bool), geometry.axis).shape[1:]
    return np.ascontiguousarray(_from_stack(_uncrop(crops, geometry.box, rows, cols), geometry.axis))
