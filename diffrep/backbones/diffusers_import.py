"""Bring diffusers ``UNet2DModel`` checkpoints (e.g. the google/ddpm-* pipelines) into diffrep as Backbones.

A diffusers UNet2DModel has the same block structure as MONAI's DiffusionModelUNet: ``down_blocks``
(resnets, optional attentions, a downsampler on all but the last), ``mid_block`` and ``up_blocks``
(an upsampler on all but the last). ``DiffusersUNet`` exposes it under the names diffrep's node
discovery uses, so the nodes are the usual ``down.{i}``, ``mid`` and ``up.{i}`` with the same
strides, and every extractor, head and scorer works unchanged.

This module reads local directories only (``local_files_only=True``); Hub repository ids are
resolved to a snapshot folder by ``diffrep.backbones.hub`` first. Accepted layouts:

- a pipeline folder: ``model_index.json``, ``unet/`` and ``scheduler/``;
- a model folder: ``config.json`` with ``"_class_name": "UNet2DModel"`` plus its weights, with the
  noise schedule in ``scheduler_config.json`` beside it or in ``../scheduler/``.

The noise schedule is read from the diffusers ``DDPMScheduler`` config and rebuilt with MONAI's
scheduler; loading fails if the two schedules' cumulative alphas differ.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._types import FeatureInfo
from .backbone import Backbone, last_layer_path, unet_node_table
from .checkpoint import CheckpointError, check_weights
from .config import BackboneConfig, Normalisation, ScheduleConfig, UNetConfig

BETA_SCHEDULES = {"linear": "linear_beta", "scaled_linear": "scaled_linear_beta", "sigmoid": "sigmoid_beta",
                  "squaredcos_cap_v2": "cosine"}
DIFFUSERS_SCHEDULER_DEFAULTS = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4,
                                "beta_end": 0.02, "prediction_type": "epsilon"}


class DiffusersUNet(nn.Module):
    """A diffusers ``UNet2DModel`` behind diffrep's U-Net interface: ``forward(x_t, timesteps) -> eps``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def down_blocks(self) -> nn.ModuleList:
        return self.model.down_blocks

    @property
    def middle_block(self) -> nn.Module:
        return self.model.mid_block

    @property
    def up_blocks(self) -> nn.ModuleList:
        return self.model.up_blocks

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.model(x_t, timesteps).sample

    def node_table(self, channels: tuple[int, ...]) -> list[FeatureInfo]:
        """diffrep's nodes on diffusers' blocks: ``down.i`` = the last resnet/attention of ``down_blocks[i]``,
        ``mid`` = ``mid_block``, ``up.i`` = ``up_blocks[i]`` (after its upsampler)."""
        down = [last_layer_path(block, f"model.down_blocks.{i}") for i, block in enumerate(self.model.down_blocks)]
        up = [f"model.up_blocks.{i}" for i in range(len(self.model.up_blocks))]
        return unet_node_table(channels, down, "model.mid_block", up)


def is_diffusers_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` looks like a diffusers pipeline or UNet2DModel folder."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        return True
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return "_class_name" in json.loads(config.read_text())
    except (json.JSONDecodeError, TypeError):
        return False


def load_diffusers_unet(path: str | os.PathLike, normalisation: Normalisation | None = None) -> Backbone:
    """Load a diffusers UNet2DModel (pipeline or model folder, see the module docstring) as a Backbone.

    ``normalisation`` gives the data range of the images you will pass (default [0, 1]); diffusers
    DDPM models take [-1, 1] internally, which is diffrep's model range.
    """
    try:
        from diffusers import UNet2DModel
    except ImportError as err:  # pragma: no cover - diffusers is a declared extra
        raise ImportError("loading diffusers checkpoints needs `pip install diffrep[diffusers]`") from err
    path = Path(path)
    unet_dir, scheduler_file = _locate(path)
    class_name = json.loads((unet_dir / "config.json").read_text()).get("_class_name")
    if class_name != "UNet2DModel":
        raise CheckpointError(f"diffusers: expected a UNet2DModel in {unet_dir}, got {class_name!r} "
                              "(conditioned or latent U-Nets are not supported)")
    try:
        model = UNet2DModel.from_pretrained(str(unet_dir), local_files_only=True)
    except (OSError, ValueError, RuntimeError) as err:  # truncated/corrupt weights, missing files
        weights = sorted(p.name for p in unet_dir.glob("diffusion_pytorch_model*"))
        raise CheckpointError(f"diffusers: could not read the UNet weights {weights or '(none found)'} in "
                              f"{unet_dir} ({err})") from err
    check_weights(model.state_dict(), source=f"diffusers UNet in {unet_dir}")
    unet_config = _unet_config(model.config, unet_dir)
    schedule, schedule_source = _schedule(scheduler_file)
    config = BackboneConfig(unet=unet_config, schedule=schedule, normalisation=normalisation or Normalisation(),
                            provenance={"source": {"format": "diffusers", "class": class_name, "path": str(path),
                                                   "diffusers_version": model.config.get("_diffusers_version")},
                                        "schedule_source": schedule_source,
                                        **({"image_size": model.config["sample_size"]}
                                           if model.config.get("sample_size") else {})})
    backbone = Backbone(config, unet=DiffusersUNet(model))
    _check_schedule(backbone, scheduler_file)
    return backbone


def _locate(path: Path) -> tuple[Path, Path | None]:
    """The UNet folder and the scheduler config file (or None) of a pipeline or model folder."""
    if not path.is_dir():
        raise CheckpointError(f"diffusers: expected a folder, got {path}")
    if (path / "model_index.json").is_file():
        unet_dir = path / "unet"
        if not (unet_dir / "config.json").is_file():
            raise CheckpointError(f"diffusers: pipeline folder {path} has no unet/config.json")
        candidates = [path / "scheduler" / "scheduler_config.json"]
    elif (path / "config.json").is_file():
        unet_dir = path
        candidates = [path / "scheduler_config.json", path.parent / "scheduler" / "scheduler_config.json"]
    else:
        raise CheckpointError(f"diffusers: expected model_index.json or config.json in {path}")
    return unet_dir, next((c for c in candidates if c.is_file()), None)


def _unet_config(cfg: Any, unet_dir: Path) -> UNetConfig:
    """diffrep's record of a UNet2DModel architecture; unsupported variants are named in the error."""
    unsupported = []
    if cfg.get("class_embed_type") is not None or cfg.get("num_class_embeds") is not None:
        unsupported.append("class conditioning")
    if cfg.get("time_embedding_type", "positional") != "positional":
        unsupported.append(f"time_embedding_type={cfg.get('time_embedding_type')!r} (score-SDE time, not DDPM steps)")
    if cfg.get("mid_block_type", "UNetMidBlock2D") is None:
        unsupported.append("no mid block")
    if unsupported:
        raise CheckpointError(f"diffusers: {unet_dir} uses {', '.join(unsupported)}; diffrep reads unconditional "
                              "DDPM UNet2DModels")
    channels = tuple(cfg["block_out_channels"])
    head_dim = cfg.get("attention_head_dim") or channels[-1]
    return UNetConfig(spatial_dims=2, in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
                      channels=channels,
                      attention_levels=tuple("Attn" in kind for kind in cfg["down_block_types"]),
                      num_res_blocks=cfg["layers_per_block"], norm_num_groups=cfg["norm_num_groups"],
                      num_head_channels=head_dim, resblock_updown=cfg.get("downsample_type", "conv") == "resnet")


def _schedule(scheduler_file: Path | None) -> tuple[ScheduleConfig, str]:
    """The DDPM schedule from a diffusers scheduler config, or diffusers' defaults (with a warning)."""
    if scheduler_file is None:
        warnings.warn("diffusers: no scheduler_config.json found; assuming diffusers' DDPMScheduler defaults "
                      "(linear betas 1e-4..0.02, 1000 steps, epsilon prediction)", stacklevel=3)
        cfg, source = dict(DIFFUSERS_SCHEDULER_DEFAULTS), "assumed: diffusers DDPMScheduler defaults"
    else:
        cfg, source = {**DIFFUSERS_SCHEDULER_DEFAULTS, **json.loads(scheduler_file.read_text())}, str(scheduler_file)
    if cfg.get("trained_betas") is not None:
        raise CheckpointError(f"diffusers: {scheduler_file} uses trained_betas, which diffrep does not read")
    if cfg["beta_schedule"] not in BETA_SCHEDULES:
        raise CheckpointError(f"diffusers: beta_schedule {cfg['beta_schedule']!r} in {scheduler_file}; "
                              f"expected one of {sorted(BETA_SCHEDULES)}")
    schedule = ScheduleConfig(num_train_timesteps=int(cfg["num_train_timesteps"]),
                              schedule=BETA_SCHEDULES[cfg["beta_schedule"]], beta_start=float(cfg["beta_start"]),
                              beta_end=float(cfg["beta_end"]), prediction_type=cfg["prediction_type"])
    try:
        schedule.validate()
    except ValueError as err:
        raise CheckpointError(f"diffusers: {scheduler_file}: {err}") from err
    return schedule, source


def _check_schedule(backbone: Backbone, scheduler_file: Path | None) -> None:
    """Refuse a checkpoint whose diffusers schedule MONAI's scheduler does not reproduce."""
    from diffusers import DDPMScheduler

    theirs = (DDPMScheduler.from_pretrained(str(scheduler_file.parent)) if scheduler_file is not None
              else DDPMScheduler(**DIFFUSERS_SCHEDULER_DEFAULTS))
    ours = backbone.schedule.alphas_cumprod.float()
    gap = (theirs.alphas_cumprod.float() - ours).abs().max().item()
    if gap > 1e-5:
        raise CheckpointError(f"diffusers: the schedule in {scheduler_file} is not reproduced by MONAI's "
                              f"{backbone.config.schedule.schedule!r} (max |alpha_bar difference| {gap:.2e})")
