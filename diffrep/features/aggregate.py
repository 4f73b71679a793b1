"""Aggregation of feature maps: pooled image vectors and upsampled pixel descriptors."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from .._types import FeatureKey
from ..errors import check_positive_int


def _ordered(features: Mapping[FeatureKey, torch.Tensor], keys: Sequence[FeatureKey] | None) -> list[torch.Tensor]:
    if not features:
        raise ValueError("features: expected at least one feature map, got an empty mapping")
    keys = list(features) if keys is None else list(keys)
    missing = [k for k in keys if k not in features]
    if missing:
        raise ValueError(f"keys: {missing} not in features; available keys are {list(features)}")
    return [features[k] for k in keys]


def check_pool_grid(grid: int, bound: int | None = None, where: str = "") -> int:
    """``grid`` as a positive int no larger than ``bound`` (the smallest side of the maps it pools).

    A grid larger than the map would only repeat values (adaptive pooling upsamples), multiplying
    the feature size for nothing; ``where`` says which map sets the bound in the error.
    """
    grid = check_positive_int(grid, "pool grid")
    if bound is not None and grid > bound:
        raise ValueError(f"pool grid: expected at most {bound}, the smallest side of the feature maps pooled"
                         f"{' (' + where + ')' if where else ''}, got {grid}")
    return grid


def pool_map(feature_map: torch.Tensor, grid: int = 1) -> torch.Tensor:
    """Average-pool one (N, C, *spatial) map to ``grid`` cells per axis and flatten: (N, C * grid**dims).

    ``grid=1`` is global average pooling; larger grids keep a coarse layout (channel-major order,
    adaptive pooling, so the map size need not divide by ``grid``).
    """
    spatial = tuple(feature_map.shape[2:])
    grid = check_pool_grid(grid, min(spatial) if spatial else None, where=f"map of spatial size {spatial}")
    x = feature_map.float()
    if grid == 1:
        return x.flatten(2).mean(dim=2)
    return pool_to(x, (grid,) * (x.ndim - 2)).flatten(1)


def pool_to(feature_map: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Adaptive average pooling of an (N, C, *spatial) map (1-3 spatial dims) to (N, C, *size)."""
    pooling = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}.get(feature_map.ndim - 2)
    if pooling is None:
        raise ValueError(f"feature map: expected (N, C, *spatial) with 1-3 spatial dims, got {tuple(feature_map.shape)}")
    return pooling(feature_map, tuple(size))


def pool(features: Mapping[FeatureKey, torch.Tensor], keys: Sequence[FeatureKey] | None = None,
         grid: int = 1) -> torch.Tensor:
    """Average pooling of each map (:func:`pool_map`), concatenated in key order.

    ``grid=1`` (global average, (N, sum of channels)) is the DDAE linear-probe protocol (Xiang et
    al. 2023); ``grid=2`` keeps a 2x2 layout, which helps small images where position is informative.
    """
    maps = _ordered(features, keys)
    return torch.cat([pool_map(m, grid) for m in maps], dim=1)


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
