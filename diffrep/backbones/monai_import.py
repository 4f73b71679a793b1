"""Bring other users' MONAI ``DiffusionModelUNet`` models into diffrep as Backbones.

Either wrap a live module (``from_monai_unet``), or import a state-dict file saved with
``torch.save(unet.state_dict(), path)`` together with its architecture (``import_monai_state_dict``).
The state dict is read with ``weights_only=True``: no arbitrary unpickling.
"""
from __future__ import annotations

import dataclasses
import inspect
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

    ``architecture`` has the keys of BackboneConfig: ``unet`` (DiffusionModelUNet arguments; omitted
    ones take MONAI's defaults, see ``monai_unet_args``), optionally ``schedule``, ``normalisation``
    and ``provenance`` (e.g. ``image_size``: the training size). Unknown keys are errors; mismatching
    weights are named.
    """
    path = Path(state_dict_path)
    if not path.is_file():
        raise CheckpointError(f"state dict: {path} does not exist")
    architecture = dict(architecture)
    architecture["unet"] = monai_unet_args(architecture.get("unet", {}), where="architecture.unet")
    config = from_dict(BackboneConfig, architecture, where="architecture")
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


def monai_unet_args(unet_args: Any, where: str = "unet") -> dict[str, Any]:
    """UNetConfig arguments reproducing ``DiffusionModelUNet(**unet_args)``: omitted arguments take MONAI's defaults.

    The defaults are read from MONAI's signature (not diffrep's UNetConfig defaults, which differ).
    Refuses, naming the keys: arguments DiffusionModelUNet does not have, missing required ones, and
    arguments diffrep does not record (``norm_eps``, conditioning, ...) set to anything but MONAI's default.
    """
    if not isinstance(unet_args, Mapping):
        raise TypeError(f"{where}: expected a mapping of DiffusionModelUNet arguments, got {type(unet_args).__name__}")
    params = {name: p for name, p in inspect.signature(DiffusionModelUNet.__init__).parameters.items() if name != "self"}
    unknown = sorted(set(unet_args) - set(params))
    if unknown:
        raise ValueError(f"{where}: unknown DiffusionModelUNet argument(s) {unknown}; valid ones are {sorted(params)}")
    missing = [name for name, p in params.items() if p.default is inspect.Parameter.empty and name not in unet_args]
    if missing:
        raise ValueError(f"{where}: missing required DiffusionModelUNet argument(s) {missing}")
    recorded = [f.name for f in dataclasses.fields(UNetConfig)]
    unsupported = {k: v for k, v in unet_args.items() if k not in recorded and v != params[k].default}
    if unsupported:
        raise ValueError(f"{where}: diffrep builds DiffusionModelUNets with MONAI's defaults for "
                         f"{sorted(set(params) - set(recorded))}, got {unsupported}; such a model cannot be reproduced")
    return {name: unet_args.get(name, params[name].default) for name in recorded}
