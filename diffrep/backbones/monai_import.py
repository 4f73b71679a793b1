"""Bring other users' MONAI ``DiffusionModelUNet`` models into diffrep as Backbones.

Either wrap a live module (``from_monai_unet``), or import a state-dict file saved with
``torch.save(unet.state_dict(), path)`` together with its architecture (``import_monai_state_dict``).
The state dict is read with ``weights_only=True``: no arbitrary unpickling.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from ..config import from_dict
from .backbone import Backbone
from .checkpoint import CheckpointError, load_state_checked
from .config import BackboneConfig, Normalisation, ScheduleConfig, UNetConfig


def infer_unet_config(unet: DiffusionModelUNet) -> UNetConfig:
    """Read the architecture of a MONAI DiffusionModelUNet back from the module."""
    if not isinstance(unet, DiffusionModelUNet):
        raise TypeError(f"unet: expected monai.networks.nets.DiffusionModelUNet, got {type(unet).__name__}")
    if unet.with_conditioning or unet.num_class_embeds is not None:
        raise ValueError("unet: conditioned DiffusionModelUNets (cross-attention or class embeddings) are not supported")
    conv = next(m for m in unet.conv_in.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d)))
    norm = next(m for m in unet.out.modules() if isinstance(m, nn.GroupNorm))
    downsampler = unet.down_blocks[0].downsampler
    resblock_updown = downsampler is not None and not hasattr(downsampler, "op")
    return UNetConfig(
        spatial_dims=3 if isinstance(conv, nn.Conv3d) else 2,
        in_channels=unet.in_channels, out_channels=unet.out_channels,
        channels=tuple(unet.block_out_channels), attention_levels=tuple(unet.attention_levels),
        num_res_blocks=tuple(unet.num_res_blocks), norm_num_groups=norm.num_groups,
        num_head_channels=tuple(unet.num_head_channels), resblock_updown=resblock_updown,
    )


def from_monai_unet(unet: DiffusionModelUNet, schedule: ScheduleConfig | None = None,
                    normalisation: Normalisation | None = None, provenance: dict[str, Any] | None = None) -> Backbone:
    """Wrap a live MONAI U-Net (weights kept) with its schedule and data normalisation."""
    config = BackboneConfig(unet=infer_unet_config(unet), schedule=schedule or ScheduleConfig(),
                            normalisation=normalisation or Normalisation(),
                            provenance=provenance or {"source": "monai DiffusionModelUNet (imported)"})
    backbone = Backbone(config)
    load_state_checked(backbone.unet, unet.state_dict(), source=type(unet).__name__)
    return backbone


def import_monai_state_dict(state_dict_path: str | os.PathLike, architecture: Mapping[str, Any]) -> Backbone:
    """Load a ``torch.save``-d MONAI state dict given the architecture mapping.

    ``architecture`` has the keys of BackboneConfig: ``unet`` (DiffusionModelUNet arguments),
    optionally ``schedule`` and ``normalisation``. Unknown keys are errors; mismatching weights are named.
    """
    path = Path(state_dict_path)
    if not path.is_file():
        raise CheckpointError(f"state dict: {path} does not exist")
    config = from_dict(BackboneConfig, dict(architecture), where="architecture")
    config.provenance = {**config.provenance, "source": f"monai state dict {path.name}"}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or pickled-object files
        raise CheckpointError(f"state dict: {path} is not a weights-only torch file ({err})") from err
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"state dict: {path} expected a mapping of tensors, got {type(state).__name__}")
    backbone = Backbone(config)
    load_state_checked(backbone.unet, dict(state), source=str(path))
    return backbone
