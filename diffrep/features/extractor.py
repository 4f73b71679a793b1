"""FeatureExtractor: noise images to chosen timesteps, run the U-Net once, read named nodes.

The protocol follows Baranchuk et al. (ICLR 2022, "Label-efficient semantic segmentation with
diffusion models") and Xiang et al. (ICCV 2023, "Denoising diffusion autoencoders are unified
self-supervised learners"): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, features = activations
of U-Net blocks at eps_theta(x_t, t).
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch

from .._types import FeatureInfo, FeatureKey
from ..backbones.backbone import Backbone
from ..compute import ComputeOptions
from ..errors import as_dtype, check_positive_int
from .hooks import StopForward, capture_nodes
from .noise_policy import NoisePolicy


class FeatureDict(dict):
    """``{FeatureKey(node, timestep): tensor (N, C, *spatial)}`` plus the metadata that produced it."""

    def __init__(self, *args: Any, noise_levels: dict[int, float], feature_info: dict[str, FeatureInfo],
                 noise: str, seed: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.noise_levels = noise_levels
        self.feature_info = feature_info
        self.noise = noise
        self.seed = seed

    def metadata(self) -> dict[str, Any]:
        """JSON-ready description: keys, shapes, noise levels, noise policy and seed."""
        return {
            "keys": [{"node": k.node, "timestep": k.timestep, "noise_level": self.noise_levels[k.timestep],
                      "shape": list(v.shape)} for k, v in self.items()],
            "noise": self.noise,
            "seed": self.seed,
        }


class FeatureExtractor:
    """Extract features of named nodes at several timesteps from a backbone.

    Args:
        backbone: the U-Net and its schedule.
        nodes: node names (see ``backbone.feature_info()``).
        timesteps: integers in 0..T-1 (0 = least noise).
        noise: ``"shared"``, ``"ensemble(k)"`` or ``"none"`` (see NoisePolicy).
        seed: seed of the noise draws. Same seed, images, ``batch_size`` (images per chunk),
            ``batch_timesteps`` and ``timesteps``: same features, bit for bit on CPU; ``early_exit``
            and ``nodes`` do not change them. Another ``batch_size``, ``batch_timesteps`` or timestep
            list changes float32 rounding only (features agree within atol = rtol = 1e-5).
        batch_size: images per chunk, the one unit of batching in diffrep. A chunk's forward holds
            ``batch_size`` x ``len(timesteps)`` rows when ``batch_timesteps``, else ``batch_size``
            rows per timestep.
        batch_timesteps: put all timesteps of an image chunk into one forward.
        early_exit: stop the forward after the last requested node.
        dtype: dtype of the returned features, a torch dtype or its name (float16 halves memory and disk).
        compute: autocast precision and channels-last layout of the forward (``diffrep.compute``; default:
            float32, standard layout). ``channels_last`` converts the backbone's U-Net weights in place.

    Calling it on (N, C, *spatial) images in the backbone's data range returns a FeatureDict.
    """

    def __init__(self, backbone: Backbone, nodes: Iterable[str], timesteps: Iterable[int] | int,
                 noise: str | NoisePolicy = "shared", seed: int = 0, batch_size: int = 64,
                 batch_timesteps: bool = True, early_exit: bool = True, dtype: str | torch.dtype = torch.float32,
                 compute: ComputeOptions | None = None) -> None:
        self.backbone = backbone
        self.nodes = backbone.check_nodes(nodes)
        if len(set(self.nodes)) != len(self.nodes):
            raise ValueError(f"nodes: expected distinct names, got {self.nodes}")
        self.timesteps = backbone.check_timesteps(timesteps)
        self.noise = NoisePolicy.parse(noise)
        check_positive_int(batch_size, "batch_size")
        self.seed = int(seed)
        self.batch_size = batch_size
        self.batch_timesteps = batch_timesteps
        self.early_exit = early_exit
        self.dtype = as_dtype(dtype)
        self.compute = compute or ComputeOptions()
        self.compute.check_device(backbone.device)
        self.compute.prepare_module(backbone.unet, backbone.spatial_dims)
        info = {i.name: i for i in backbone.feature_info()}
        self.feature_info = {n: info[n] for n in self.nodes}
        self._last_node = max(self.nodes, key=lambda n: info[n].index)

    def __call__(self, images: Any) -> FeatureDict:
        """Features of all images, keyed by FeatureKey(node, timestep), on the CPU."""
        images = self.backbone.check_images(images)
        parts: dict[FeatureKey, list[torch.Tensor]] = {}
        for index in self.chunks(images.shape[0]):
            for key, value in self._extract_chunk(images[index]).items():
                parts.setdefault(key, []).append(value)
        return self._wrap({key: values[0] if len(values) == 1 else torch.cat(values) for key, values in parts.items()})

    def iter_batches(self, images: Any) -> Iterator[tuple[slice, FeatureDict]]:
        """Yield ``(image slice, features of those images)`` chunk by chunk, for streaming to disk."""
        images = self.backbone.check_images(images)
        for index in self.chunks(images.shape[0]):
            yield index, self._wrap(self._extract_chunk(images[index]))

    def chunks(self, count: int) -> Iterator[slice]:
        """The image slices of ``count`` images processed one chunk at a time (``batch_size`` images each)."""
        for start in range(0, count, self.batch_size):
            yield slice(start, min(start + self.batch_size, count))

    def _wrap(self, features: dict[FeatureKey, torch.Tensor]) -> FeatureDict:
        levels = {t: self.backbone.noise_level(t) for t in self.timesteps}
        return FeatureDict(features, noise_levels=levels, feature_info=self.feature_info,
                           noise=str(self.noise), seed=self.seed)

    @torch.inference_mode()
    def _extract_chunk(self, images: torch.Tensor) -> dict[FeatureKey, torch.Tensor]:
        device = self.backbone.device
        x0 = self.backbone.to_model_range(images.to(device))
        n = x0.shape[0]
        groups = [self.timesteps] if self.batch_timesteps else [[t] for t in self.timesteps]
        sums: dict[FeatureKey, torch.Tensor] = {}
        for draw in range(self.noise.draws):
            eps = self.noise.draw(draw, self.seed, tuple(x0.shape[1:]))
            eps = None if eps is None else eps.to(device)
            for group in groups:
                t = torch.tensor(group, device=device).repeat_interleave(n)
                x_in = x0.repeat(len(group), *([1] * (x0.ndim - 1)))
                x_t = x_in if eps is None else self.backbone.schedule.add_noise(x_in, eps.expand_as(x_in), t)
                captured = self._forward(self.compute.prepare_input(x_t), t)
                for node in self.nodes:
                    for j, step in enumerate(group):
                        value = _check_finite(captured[node][j * n:(j + 1) * n].float(), node, step)
                        key = FeatureKey(node, step)
                        sums[key] = value if key not in sums else sums[key] + value
        scale = 1.0 / self.noise.draws
        return {key: (value * scale if self.noise.draws > 1 else value).to("cpu", self.dtype)
                for key, value in sorted(sums.items(), key=lambda kv: (self.nodes.index(kv[0].node), kv[0].timestep))}

    def _forward(self, x_t: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        modules = {n: self.backbone.node_module(n) for n in self.nodes}
        stop = self._last_node if self.early_exit else None
        with capture_nodes(modules, stop_after=stop) as captured, self.compute.autocast_context(x_t.device):
            try:
                self.backbone(x_t, t)
            except StopForward:
                pass
        return dict(captured)


def _check_finite(value: torch.Tensor, node: str, timestep: int) -> torch.Tensor:
    """``value``, or a ValueError naming the node and timestep whose features hold NaN/Inf.

    One reduction decides the common case (a sum of finite values is finite unless it overflows);
    only a non-finite sum pays for the element-wise check.
    """
    if not bool(torch.isfinite(value.sum())) and not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise ValueError(f"features: node {node!r} at timestep {timestep} has {bad} NaN/Inf value(s) of {value.numel()}; "
                         "expected finite features (check the backbone's weights for NaN/Inf)")
    return value
