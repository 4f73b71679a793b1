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
    """A tiny backbone whose every layer is informative.

    MONAI zero-initialises the output convolution and the last convolution of every residual branch
    (and attention projections), so a fresh U-Net outputs exactly 0 and its resnets are identities:
    tests comparing outputs, or telling one module of a block from another, could not fail. Those
    layers get PyTorch's default initialisation here instead.
    """
    torch.manual_seed(seed)
    backbone = Backbone(BackboneConfig(unet=TINY_CONFIGS[name]))
    informative_init_(backbone.unet)
    return backbone


def informative_init_(module: torch.nn.Module) -> torch.nn.Module:
    """Re-initialise every all-zero conv/linear layer of ``module`` with PyTorch's default init."""
    for layer in module.modules():
        weight = getattr(layer, "weight", None)
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)) and weight is not None \
                and not bool(weight.detach().any()):
            layer.reset_parameters()
    return module


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


def free_port() -> int:
    """A TCP port free right now, for torchrun's rendezvous (fixed ports clash when test runs share a machine)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
