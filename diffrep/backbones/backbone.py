"""Backbone: a MONAI ``DiffusionModelUNet`` with its DDPM schedule, normalisation and named feature nodes.

Node names are stable across configs: ``down.{i}`` (output of resolution level i before its
downsampler), ``mid`` (the bottleneck) and ``up.{i}`` (output of decoder block i, after its upsampler),
in forward order. MONAI's ``down_blocks[i]`` returns a tuple, so the hook sits on the last resnet
(or attention) of the block; ``middle_block`` and ``up_blocks[i]`` return tensors.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from .._types import FeatureInfo
from ..diffusion import DDPMSchedule
from ..errors import as_float_images, check_data_range
from .config import BackboneConfig


class ImageSizeWarning(UserWarning):
    """Images of another spatial size than the one the backbone was trained on."""


class Backbone:
    """A denoising U-Net plus everything needed to use it as a feature extractor or denoiser.

    Public calls take images in the data range given by ``config.normalisation`` (default [0, 1]);
    ``to_model_range`` maps them to the U-Net's [-1, 1].
    """

    def __init__(self, config: BackboneConfig, unet: nn.Module | None = None) -> None:
        config.validate()
        self.config = config
        u = config.unet
        self.unet = unet if unet is not None else build_unet(config)
        self.unet.eval()
        # the noise process: float64 alpha-bar and every formula that uses it (diffrep.diffusion)
        self.schedule = DDPMSchedule.from_config(config.schedule)
        table = getattr(self.unet, "node_table", None)  # an adapter (e.g. diffusers) brings its own table
        self._feature_info = table(u.channels) if table is not None else monai_node_table(self.unet, u.channels)
        self._modules = {info.name: self.unet.get_submodule(info.module) for info in self._feature_info}
        check_node_shapes(self.unet, self._feature_info, self._modules, u)

    # ----------------------------------------------------------------- schedule
    @property
    def num_timesteps(self) -> int:
        return self.config.schedule.num_train_timesteps

    @property
    def spatial_dims(self) -> int:
        return self.config.unet.spatial_dims

    @property
    def in_channels(self) -> int:
        return self.config.unet.in_channels

    def check_timesteps(self, timesteps: Any) -> list[int]:
        """Validate timesteps (0..T-1, 0 = least noise) and return them as a list of ints."""
        if isinstance(timesteps, (int, np.integer)):
            timesteps = [timesteps]
        values = list(timesteps)
        if not values:
            raise ValueError("timesteps: expected at least one timestep, got an empty list")
        out = []
        for t in values:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= int(t) < self.num_timesteps:
                raise ValueError(f"timesteps: expected integers in 0..{self.num_timesteps - 1} (0 = least noise), got {t!r}")
            out.append(int(t))
        return out

    def noise_level(self, timestep: int) -> float:
        """sqrt(1 - alpha_bar_t): the standard deviation of the noise in x_t; comparable across schedules."""
        return self.schedule.noise_level(int(timestep))

    # ------------------------------------------------------------ normalisation
    def to_model_range(self, images: torch.Tensor) -> torch.Tensor:
        """Map data-range images ([low, high] from the checkpoint) to the U-Net's [-1, 1]."""
        norm = self.config.normalisation
        return (images - norm.low) * (2.0 / (norm.high - norm.low)) - 1.0

    def to_data_range(self, model_images: torch.Tensor) -> torch.Tensor:
        """Inverse of ``to_model_range``."""
        norm = self.config.normalisation
        return (model_images + 1.0) * ((norm.high - norm.low) / 2.0) + norm.low

    def normalise(self, images: Any) -> torch.Tensor:
        """Convert uint8 images (0..255) to the data range this backbone documents, as float32.

        Float input is returned unchanged (as a tensor): it is assumed to be in the data range.
        """
        tensor = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
        if tensor.dtype == torch.uint8:
            norm = self.config.normalisation
            return tensor.float() / 255.0 * (norm.high - norm.low) + norm.low
        if not tensor.is_floating_point():
            raise TypeError(f"normalise: expected uint8 or floating-point images, got dtype {tensor.dtype}")
        return tensor.float()

    def check_images(self, images: Any, name: str = "images") -> torch.Tensor:
        """Validate an image batch for this U-Net and return it as float32 (N, C, *spatial).

        Refuses wrong rank/channels, non-finite values, sizes the U-Net cannot take, and values far
        outside the data range (see ``diffrep.errors.check_data_range``); a spatial size other than
        the one the U-Net was trained on only warns (see ``check_image_size``).
        """
        tensor = as_float_images(images, in_channels=self.in_channels, spatial_dims=self.spatial_dims, name=name)
        norm = self.config.normalisation
        check_data_range(tensor, norm.low, norm.high, name=name, description=norm.description)
        multiple = self.config.unet.size_multiple
        spatial = tuple(tensor.shape[2:])
        if any(s % multiple for s in spatial):
            raise ValueError(
                f"{name}: every spatial size must be divisible by {multiple} (2^(levels-1) for "
                f"{self.config.unet.levels} levels), got spatial size {spatial}; pad or resize the images"
            )
        self.check_image_size(spatial, refuse=False, name=name)
        return tensor

    @property
    def trained_image_size(self) -> tuple[int, ...] | None:
        """The spatial size of the training images, if the checkpoint records it (see BackboneConfig)."""
        return self.config.trained_image_size()

    def check_image_size(self, spatial: tuple[int, ...], *, refuse: bool, name: str = "images") -> None:
        """Compare a spatial size with the training size: warn (library) or raise ValueError (``refuse``, the CLI).

        A U-Net runs on any size divisible by ``size_multiple``, but its features drift away from
        the ones it learned on another scale, so the library warns and the CLI refuses unless told
        otherwise. Nothing is checked when the checkpoint does not record its training size.
        """
        trained = self.trained_image_size
        if trained is None or tuple(spatial) == trained:
            return
        message = (f"{name}: spatial size {tuple(spatial)} differs from the size this backbone was trained on "
                   f"{trained}; its features at another scale are not what it learned")
        if refuse:
            raise ValueError(message + "; resize the images, or pass --allow-other-size to extract anyway")
        warnings.warn(message, ImageSizeWarning, stacklevel=3)

    # ------------------------------------------------------------------ nodes
    def feature_info(self) -> list[FeatureInfo]:
        """The feature nodes in forward order, each with channels, stride and stage."""
        return list(self._feature_info)

    @property
    def node_names(self) -> list[str]:
        return [info.name for info in self._feature_info]

    def feature_map_size(self, node: str, spatial: tuple[int, ...]) -> tuple[int, ...]:
        """The spatial size of node ``node``'s map for images of spatial size ``spatial``."""
        stride = next(i.stride for i in self._feature_info if i.name == self.check_nodes([node])[0])
        return tuple(int(s) // stride for s in spatial)

    def max_pool_grid(self, nodes: Any, spatial: tuple[int, ...]) -> tuple[int, str]:
        """The largest pooling grid the maps of ``nodes`` allow for images of size ``spatial``, and why.

        Returns ``(bound, reason)``: the smallest side over the requested nodes' maps, and a phrase
        naming that node and its map size, for error messages.
        """
        sizes = {node: self.feature_map_size(node, spatial) for node in self.check_nodes(nodes)}
        node = min(sizes, key=lambda n: min(sizes[n]))
        return min(sizes[node]), f"node {node!r} gives {'x'.join(map(str, sizes[node]))} maps for " \
                                 f"{'x'.join(map(str, spatial))} images"

    def node_module(self, name: str) -> nn.Module:
        """The module whose forward output is node ``name``."""
        self.check_nodes([name])
        return self._modules[name]

    def check_nodes(self, nodes: Any) -> list[str]:
        """Validate node names; unknown names raise and list the valid ones."""
        if isinstance(nodes, str):
            nodes = [nodes]
        nodes = list(nodes)
        if not nodes:
            raise ValueError(f"nodes: expected at least one node name from {self.node_names}")
        unknown = [n for n in nodes if n not in self._modules]
        if unknown:
            raise ValueError(f"nodes: unknown node name(s) {unknown}; valid names are {self.node_names}")
        return nodes

    # --------------------------------------------------------------- forward
    def __call__(self, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The U-Net's noise prediction eps_theta(x_t, t), inputs in model range."""
        return self.unet(x_t, timesteps)

    def to(self, device: str | torch.device) -> "Backbone":
        self.unet.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.unet.parameters())

    def save(self, directory: Any) -> None:
        """Write ``config.json`` and ``model.safetensors`` to ``directory`` (see diffrep.backbones.checkpoint)."""
        from .checkpoint import save_backbone

        save_backbone(self, directory)


def build_unet(config: BackboneConfig) -> DiffusionModelUNet:
    """Instantiate MONAI's DiffusionModelUNet from a validated config."""
    u = config.unet
    return DiffusionModelUNet(
        spatial_dims=u.spatial_dims,
        in_channels=u.in_channels,
        out_channels=u.out_channels,
        channels=tuple(u.channels),
        attention_levels=tuple(u.attention_levels),
        num_res_blocks=u.num_res_blocks,
        norm_num_groups=u.norm_num_groups,
        num_head_channels=u.num_head_channels,
        resblock_updown=u.resblock_updown,
    )


def unet_node_table(channels: tuple[int, ...], down: list[str], mid: str, up: list[str]) -> list[FeatureInfo]:
    """The nodes of a U-Net with one down block per level, a middle block and one up block per level:
    ``down.i`` (channels[i], stride 2^i), ``mid`` and ``up.i`` (after its upsampler), with their module paths."""
    levels = len(channels)
    infos = [FeatureInfo(f"down.{i}", channels[i], 2**i, "down", i, down[i]) for i in range(levels)]
    infos.append(FeatureInfo("mid", channels[-1], 2 ** (levels - 1), "mid", levels, mid))
    for i, c in enumerate(reversed(channels)):
        infos.append(FeatureInfo(f"up.{i}", c, 2 ** max(levels - 2 - i, 0), "up", levels + 1 + i, up[i]))
    return infos


def last_layer_path(block: nn.Module, prefix: str) -> str:
    """A down block's output before its downsampler: its last attention if it has any, else its last resnet
    (the block itself returns a tuple, so the hook sits on that layer)."""
    attentions = getattr(block, "attentions", None)
    if attentions is not None and len(attentions):
        return f"{prefix}.attentions.{len(attentions) - 1}"
    return f"{prefix}.resnets.{len(block.resnets) - 1}"


def monai_node_table(unet: DiffusionModelUNet, channels: tuple[int, ...]) -> list[FeatureInfo]:
    """The node table of MONAI's DiffusionModelUNet."""
    down = [last_layer_path(block, f"down_blocks.{i}") for i, block in enumerate(unet.down_blocks)]
    return unet_node_table(channels, down, "middle_block", [f"up_blocks.{i}" for i in range(len(unet.up_blocks))])


@torch.no_grad()
def check_node_shapes(unet: nn.Module, infos: list[FeatureInfo], modules: dict[str, nn.Module], u: Any) -> None:
    """Dry run: one forward of a (1, C, 2m, ..., 2m) input, with m the smallest size the U-Net takes, must give
    every node the shape its FeatureInfo promises (as timm checks its feature_info); a wrong table raises."""
    param = next(unet.parameters(), None)
    device, dtype = (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)
    spatial = (2 * u.size_multiple,) * u.spatial_dims  # 2 x 2 at the bottom: GroupNorm needs > 1 value
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str) -> Any:
        def hook(_module: nn.Module, _inputs: Any, out: Any) -> None:  # returns None: the output is untouched
            shapes.setdefault(name, tuple((out[0] if isinstance(out, tuple) else out).shape))
        return hook

    handles = [m.register_forward_hook(record(name)) for name, m in modules.items()]
    try:
        unet(torch.zeros((1, u.in_channels, *spatial), device=device, dtype=dtype),
             torch.zeros((1,), device=device, dtype=torch.long))
    finally:
        for handle in handles:
            handle.remove()
    wrong = [f"{i.name} ({i.module}): got {shapes.get(i.name)}, expected {i.shape(1, spatial)}"
             for i in infos if shapes.get(i.name) != i.shape(1, spatial)]
    if wrong:
        raise ValueError(f"node table of {type(unet).__name__} does not match the network: {'; '.join(wrong)}")
