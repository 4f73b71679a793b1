"""Aggregation of feature maps: pooled image vectors and upsampled pixel descriptors."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from .._types import FeatureKey


def _ordered(features: Mapping[FeatureKey, torch.Tensor], keys: Sequence[FeatureKey] | None) -> list[torch.Tensor]:
    if not features:
        raise ValueError("features: expected at least one feature map, got an empty mapping")
    keys = list(features) if keys is None else list(keys)
    missing = [k for k in keys if k not in features]
    if missing:
        raise ValueError(f"keys: {missing} not in features; available keys are {list(features)}")
    return [features[k] for k in keys]


def pool(features: Mapping[FeatureKey, torch.Tensor], keys: Sequence[FeatureKey] | None = None) -> torch.Tensor:
    """Global average pooling of each map, concatenated in key order: (N, sum of channels).

    The DDAE linear-probe protocol (Xiang et al. 2023) pools one decoder block this way.
    """
    maps = _ordered(features, keys)
    return torch.cat([m.float().flatten(2).mean(dim=2) for m in maps], dim=1)


def upsample_concat(features: Mapping[FeatureKey, torch.Tensor], size: Sequence[int],
                    keys: Sequence[FeatureKey] | None = None, mode: str | None = None) -> torch.Tensor:
    """Upsample every map to ``size`` and concatenate channels: (N, D, *size) pixel descriptors.

    Bilinear (trilinear in 3D) interpolation as in ddpm-segmentation (Baranchuk et al. 2022).
    """
    maps = _ordered(features, keys)
    size = tuple(int(s) for s in size)
    spatial_dims = maps[0].ndim - 2
    if len(size) != spatial_dims:
        raise ValueError(f"size: expected {spatial_dims} spatial sizes for {spatial_dims}D maps, got {size}")
    mode = mode or ("bilinear" if spatial_dims == 2 else "trilinear")
    out = []
    for m in maps:
        m = m.float()
        out.append(m if tuple(m.shape[2:]) == size else F.interpolate(m, size=size, mode=mode, align_corners=False))
    return torch.cat(out, dim=1)
