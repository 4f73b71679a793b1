"""Post-processing of anomaly maps: brain masks, mask erosion, median filtering, image scores.

All functions work on a whole batch at once: maps are (N, *spatial) arrays (2D slices (N, H, W) or
volumes (N, D, H, W)), masks are boolean arrays of the same shape (a channel axis of size 1 is
accepted and dropped). Filters never mix different images of the batch: their footprint has size 1
along the batch axis.

The recipe follows the brain-MRI UAD literature: residuals near the brain border are the field's
main source of false positives, so the brain mask is eroded and the map zeroed outside it
(Behrendt et al. 2023, pDDPM; Kascenas et al. 2022, DAE), and a median filter suppresses isolated
bright pixels (pDDPM: 3D median k=5; DAE: 5x5).
"""
from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage as ndi

from ..errors import as_numpy, check_positive_int


def check_masks(masks: Any, images_shape: tuple[int, ...]) -> np.ndarray | None:
    """Validate masks for images of shape (N, C, *spatial); return bool (N, *spatial) or None.

    Accepted mask shapes: (N, 1, *spatial) or (N, *spatial). Any other shape raises a ValueError
    that names both the mask shape and the image shape.
    """
    if masks is None:
        return None
    arr = as_numpy(masks, "masks")
    n, spatial = images_shape[0], tuple(images_shape[2:])
    if arr.shape == (n, 1, *spatial):
        arr = arr[:, 0]
    if arr.shape != (n, *spatial):
        raise ValueError(f"masks: expected shape {(n, 1, *spatial)} or {(n, *spatial)} to match images of shape "
                         f"{tuple(images_shape)}, got mask shape {arr.shape}")
    if arr.dtype != np.bool_:
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            raise ValueError("masks: expected finite values, got NaN/Inf")
        arr = arr > 0.5
    return arr


def _batch_structure(spatial_dims: int) -> np.ndarray:
    """Cross-shaped (connectivity 1) structuring element with a size-1 batch axis."""
    return ndi.generate_binary_structure(spatial_dims, 1)[None]


def erode_masks(masks: np.ndarray, iterations: int) -> np.ndarray:
    """Binary erosion of each mask by ``iterations`` pixels (cross structuring element, scipy).

    Pixels on the image border count as outside (``border_value=0``). ``iterations=0`` returns
    the masks unchanged.
    """
    check_positive_int(iterations, "erode", minimum=0)
    if iterations == 0:
        return masks
    return ndi.binary_erosion(masks, structure=_batch_structure(masks.ndim - 1), iterations=iterations,
                              border_value=0)


def median_filter_maps(maps: np.ndarray, size: int) -> np.ndarray:
    """Median filter of each map with a (size x size[ x size]) window; ``size`` 0 or 1 = no filter."""
    check_positive_int(size, "median", minimum=0)
    if size <= 1:
        return maps
    return ndi.median_filter(maps, size=(1,) + (size,) * (maps.ndim - 1), mode="constant", cval=0.0)


def postprocess_maps(maps: Any, masks: np.ndarray | None = None, erode: int = 0,
                     median: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """Erode the masks, zero the maps outside them, median-filter, and zero outside again.

    Masking before the filter keeps border residuals from leaking inwards; masking after it keeps
    the background exactly 0. Returns ``(maps float32 (N, *spatial), eroded masks or None)``.
    """
    arr = np.asarray(as_numpy(maps, "maps"), dtype=np.float32)
    if masks is not None and masks.shape != arr.shape:
        raise ValueError(f"masks: expected shape {arr.shape} (the maps' shape), got {masks.shape}")
    eroded = erode_masks(masks, erode) if masks is not None else None
    if eroded is not None:
        arr = arr * eroded
    arr = median_filter_maps(arr, median)
    if eroded is not None:
        arr = arr * eroded
    return arr.astype(np.float32, copy=False), eroded


def image_scores(maps: np.ndarray, masks: np.ndarray | None = None, top_fraction: float = 0.01) -> np.ndarray:
    """Image-level anomaly score: the mean of the highest ``top_fraction`` of map values in the mask.

    ``top_fraction=1.0`` gives the mean over the mask (THOR and UPD use the map's mean); small
    fractions (default 1%) respond to small lesions that a mean would dilute. At least one pixel is
    always used. Without masks every pixel counts; an image whose mask is empty scores 0.
    """
    if not (isinstance(top_fraction, (int, float)) and 0.0 < float(top_fraction) <= 1.0):
        raise ValueError(f"top_fraction: expected a number in (0, 1], got {top_fraction!r}")
    flat = maps.reshape(maps.shape[0], -1).astype(np.float64)
    valid = np.ones_like(flat, dtype=bool) if masks is None else masks.reshape(maps.shape[0], -1)
    scores = np.zeros(maps.shape[0], dtype=np.float64)
    for i in range(maps.shape[0]):
        values = flat[i][valid[i]]
        if values.size == 0:
            continue
        k = max(1, int(np.ceil(top_fraction * values.size)))
        scores[i] = np.partition(values, values.size - k)[values.size - k:].mean()
    return scores
