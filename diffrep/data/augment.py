"""Joint, seeded augmentation of 2D brain slices (image + mask + label) with MONAI dict transforms."""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..errors import as_tensor as _as_tensor

_KEYS = ("image", "mask", "label")

Augment = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def brain_augmentation(seed: int = 0, prob: float = 0.5) -> Any:
    """A seeded MONAI ``Compose`` of small 2D augmentations for keys image/mask/label.

    Geometry (applied jointly; bilinear for the image, nearest for mask and label):
    RandAffined (rotate +-0.1 rad, scale +-5%, translate +-3 px) and a small Rand2DElasticd.
    Intensity (image only): RandBiasFieldd, RandAdjustContrastd (gamma 0.8..1.2),
    RandGaussianNoised (std 0.02). Each transform fires with probability ``prob``.
    Same seed, same sequence of augmentations. Use with :func:`augment_batch`.
    """
    from monai.transforms import (Compose, Rand2DElasticd, RandAdjustContrastd, RandAffined,
                                  RandBiasFieldd, RandGaussianNoised)

    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob: expected a probability in [0, 1], got {prob}")
    modes = ("bilinear", "nearest", "nearest")
    transform = Compose([
        RandAffined(keys=_KEYS, prob=prob, rotate_range=0.1, scale_range=0.05, translate_range=3,
                    mode=modes, padding_mode="zeros"),
        Rand2DElasticd(keys=_KEYS, prob=prob * 0.5, spacing=(16, 16), magnitude_range=(0.5, 1.5),
                       mode=modes, padding_mode="zeros"),
        RandBiasFieldd(keys="image", prob=prob, coeff_range=(0.0, 0.1)),
        RandAdjustContrastd(keys="image", prob=prob, gamma=(0.8, 1.2)),
        RandGaussianNoised(keys="image", prob=prob, std=0.02),
    ])
    transform.set_random_state(seed=seed)
    return transform


def augment_batch(transform: Any, images: Any, masks: Any, labels: Any,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Apply ``transform`` sample by sample; returns (images float32 (N,1,S,S), masks bool (N,1,S,S),
    labels int64 (N,S,S)).

    Images are clamped to [0, 1] and zeroed outside the (transformed) mask; labels stay in their
    input range because they are resampled with nearest interpolation and zero padding.
    """
    img, msk, lab = _as_tensor(images, "images"), _as_tensor(masks, "masks"), _as_tensor(labels, "labels")
    if img.ndim != 4 or img.shape[1] != 1:
        raise ValueError(f"images: expected shape (N, 1, S, S), got {tuple(img.shape)}")
    if tuple(msk.shape) != tuple(img.shape) or tuple(lab.shape) != (img.shape[0], *img.shape[2:]):
        raise ValueError(f"expected masks {tuple(img.shape)} and labels {(img.shape[0], *img.shape[2:])}, "
                         f"got {tuple(msk.shape)} and {tuple(lab.shape)}")
    out_i, out_m, out_l = [], [], []
    for i in range(img.shape[0]):
        sample = {"image": img[i].float(), "mask": msk[i].float(), "label": lab[i][None].float()}
        res = transform(sample)
        m = torch.as_tensor(res["mask"]).as_subclass(torch.Tensor) > 0.5
        l_ = torch.as_tensor(res["label"]).as_subclass(torch.Tensor).round().long()[0]
        x = torch.as_tensor(res["image"]).as_subclass(torch.Tensor).float().clamp(0.0, 1.0) * m
        out_i.append(x)
        out_m.append(m)
        out_l.append(l_ * m[0])
    return torch.stack(out_i), torch.stack(out_m), torch.stack(out_l)


def brain_augment(prob: float = 0.5) -> Augment:
    """An ``augment(images, masks, seed) -> (images, masks float)`` callable: :func:`brain_augmentation`
    seeded with ``seed`` applied by :func:`augment_batch` to a batch without labels. The adapter used by
    DDPM training on brain slices and by the DAE scorer."""

    def augment(images: torch.Tensor, masks: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.zeros(images.shape[0], *images.shape[2:], dtype=torch.long)
        out, out_masks, _ = augment_batch(brain_augmentation(seed % 2**31, prob), images, masks.bool(), labels)
        return out, out_masks.float()

    return augment
