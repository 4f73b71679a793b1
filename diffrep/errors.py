"""Input validation at the library's edge: errors that name what was expected and what arrived."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch


def as_tensor(x: Any, name: str) -> torch.Tensor:
    """A numpy array or tensor as a tensor (no copy where possible); anything else is a TypeError."""
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, torch.Tensor):
        return x
    raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(x).__name__}")


def as_numpy(x: Any, name: str) -> np.ndarray:
    """A numpy array or tensor as a numpy array (detached, on the CPU, no copy where possible);
    anything else is a TypeError naming ``name``. The counterpart of :func:`as_tensor`; bfloat16
    tensors, which numpy cannot hold, become float32."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    if isinstance(x, np.ndarray):
        return x
    raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(x).__name__}")


FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def as_dtype(value: Any, name: str = "dtype", allowed: Sequence[str] = FLOAT_DTYPES) -> torch.dtype:
    """The one dtype convention of diffrep's public functions: ``value`` is a ``torch.dtype`` or its name
    (``"float16"``, also ``"torch.float16"``) and comes back as the torch dtype. Anything else, or a dtype
    whose name is not in ``allowed`` (default: the floating-point dtypes), is a ValueError naming ``name``."""
    text = str(value).removeprefix("torch.") if isinstance(value, (str, torch.dtype)) else None
    if text not in allowed:
        raise ValueError(f"{name}: expected a torch dtype or its name, one of {list(allowed)}, got {value!r}")
    return getattr(torch, text)


def dtype_name(value: Any) -> str:
    """The name of a dtype given either way (``torch.float16`` or ``"float16"`` -> ``"float16"``)."""
    return str(as_dtype(value)).removeprefix("torch.")


def check_positive_int(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` as an int if it is an integer (Python or numpy, not bool) >= ``minimum``; otherwise a
    ValueError naming ``name``, the bound and the value. The one integer check of the library's arguments."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def check_label_range(labels: Any, num_classes: int | None, ignore_index: int | None = None,
                      name: str = "labels") -> torch.Tensor:
    """Integer label maps (a tensor or array of any shape) as an int64 tensor whose every value lies in
    0..num_classes-1 or equals ``ignore_index``; a float map is a TypeError, an out-of-range value a
    ValueError listing the values. The value check shared by ``data.brain.check_labels`` and
    ``features.pixel_store.check_pixel_labels`` (which also check shapes); ``heads.label_maps.
    check_label_classes`` goes further and infers the number of classes from the labels found.
    ``num_classes=None`` checks the dtype only."""
    y = as_tensor(labels, name)
    if y.is_floating_point() or y.is_complex():
        raise TypeError(f"{name}: expected an integer label map, got dtype {y.dtype}; convert the labels to an integer dtype")
    y = y.long()
    if num_classes is not None:
        bad = (y < 0) | (y >= num_classes)
        if ignore_index is not None:
            bad &= y != ignore_index
        if bool(bad.any()):
            values = torch.unique(y[bad])[:10].tolist()
            allowed = f"0..{num_classes - 1}" + (f" or ignore_index {ignore_index}" if ignore_index is not None else "")
            raise ValueError(f"{name}: expected values in {allowed}, got out-of-range value(s) {values}")
    return y


def as_float_images(images: Any, *, in_channels: int, spatial_dims: int, name: str = "images") -> torch.Tensor:
    """Check and convert an image batch to a float32 tensor of shape (N, C, *spatial).

    Refuses integer (e.g. uint8) input: diffrep never guesses a 0..255 scaling; convert with the
    backbone's documented normalisation (``Backbone.normalise``) first.
    """
    if isinstance(images, np.ndarray):  # read-only arrays (memory maps) are copied: torch wants writable memory
        array = np.ascontiguousarray(images)
        tensor = torch.from_numpy(array if array.flags.writeable else array.copy())
    elif isinstance(images, torch.Tensor):
        tensor = images
    else:
        raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(images).__name__}")
    if not (tensor.is_floating_point()):
        raise TypeError(
            f"{name}: expected floating-point images in the backbone's data range, got dtype {tensor.dtype}. "
            "Integer images (e.g. uint8 0..255) are refused; scale them with Backbone.normalise(images) first."
        )
    expected_rank = spatial_dims + 2
    if tensor.ndim != expected_rank:
        raise ValueError(
            f"{name}: expected a tensor of rank {expected_rank} (N, C{', D' if spatial_dims == 3 else ''}, H, W), "
            f"got shape {tuple(tensor.shape)}"
        )
    if tensor.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty batch, got shape {tuple(tensor.shape)}")
    if tensor.shape[1] != in_channels:
        raise ValueError(f"{name}: expected {in_channels} channel(s) in dim 1, got {tensor.shape[1]} (shape {tuple(tensor.shape)})")
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{name}: expected finite values, got {bad} NaN/Inf element(s)")
    return tensor.float()


# Images may stray outside the data range by this share of its width on either side (sensor noise,
# interpolation overshoot, augmentation) before they are refused as being on another scale.
DATA_RANGE_TOLERANCE = 0.5


def check_data_range(images: torch.Tensor, low: float, high: float, name: str = "images",
                     description: str = "") -> torch.Tensor:
    """Refuse float images far outside the data range ``[low, high]`` a backbone was trained on.

    Values up to ``DATA_RANGE_TOLERANCE`` x (high - low) beyond either end pass (noisy in-range
    data); anything further (0..255 floats for a [0, 1] model, [-1, 1] data for a [0, 1] model) is
    a ValueError naming the range expected and what arrived. The one check used by the library
    (``Backbone.check_images``) and therefore by every command.
    """
    if images.numel() == 0:
        return images
    margin = DATA_RANGE_TOLERANCE * (high - low)
    lo, hi = float(images.min()), float(images.max())
    if lo < low - margin or hi > high + margin:
        what = f" ({description})" if description else ""
        raise ValueError(
            f"{name}: values span [{lo:.4g}, {hi:.4g}], far outside the backbone's data range [{low:g}, {high:g}]{what}; "
            f"accepted are values in [{low - margin:g}, {high + margin:g}]. Scale the images into the data range "
            "first: Backbone.normalise(images) maps uint8 0..255 to it, float images must already be in it"
        )
    return images
