"""Shared fixtures: tiny MONAI U-Nets in 2D and 3D that build and run in milliseconds on CPU."""
from __future__ import annotations

import pytest
import torch

from diffrep.backbones import Backbone, BackboneConfig, UNetConfig

# Tiny tensors run fastest single-threaded, and CI has 2 cores shared with nothing else to gain.
torch.set_num_threads(1)

TINY_CONFIGS = {
    "2d-2level": UNetConfig(spatial_dims=2, channels=(8, 16), attention_levels=(False, False),
                            norm_num_groups=8, num_head_channels=8),
    "2d-3level-attn": UNetConfig(spatial_dims=2, channels=(8, 16, 16), attention_levels=(False, False, True),
                                 num_res_blocks=2, norm_num_groups=8, num_head_channels=8),
    "3d-2level": UNetConfig(spatial_dims=3, channels=(8, 16), attention_levels=(False, False),
                            norm_num_groups=8, num_head_channels=8),
}


def make_backbone(name: str = "2d-2level", seed: int = 0) -> Backbone:
    torch.manual_seed(seed)
    return Backbone(BackboneConfig(unet=TINY_CONFIGS[name]))


def make_images(backbone: Backbone, n: int = 3, size: int = 16, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    spatial = (size,) * backbone.spatial_dims if backbone.spatial_dims == 2 else (8, size, size)
    return torch.rand((n, backbone.in_channels, *spatial), generator=generator)


@pytest.fixture(params=sorted(TINY_CONFIGS))
def tiny_backbone(request) -> Backbone:
    return make_backbone(request.param)


@pytest.fixture
def backbone_2d() -> Backbone:
    return make_backbone("2d-3level-attn")
