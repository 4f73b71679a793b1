"""Few-step DDIM sampling (Song et al. 2021) from pure noise, for the sample grids of training reports."""
from __future__ import annotations

import torch

from .backbones.backbone import Backbone
from .diffusion import ddim_timesteps


@torch.inference_mode()
def ddim_sample(backbone: Backbone, num_samples: int, spatial: tuple[int, ...], num_inference_steps: int = 50,
                seed: int = 0) -> torch.Tensor:
    """Draw samples from pure noise in ``num_inference_steps`` deterministic DDIM steps (eta = 0, x0 clipped)
    at timesteps evenly spaced from T-1 down to 0, the last step to clean data; returns the data range."""
    if num_inference_steps < 1 or num_inference_steps > backbone.num_timesteps:
        raise ValueError(f"num_inference_steps: expected 1..{backbone.num_timesteps}, got {num_inference_steps}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn((num_samples, backbone.in_channels, *spatial), generator=generator).to(backbone.device)
    steps = ddim_timesteps(backbone.num_timesteps - 1, num_inference_steps)
    for t, t_prev in zip(steps, steps[1:] + [-1]):
        timesteps = torch.full((num_samples,), t, device=x.device, dtype=torch.long)
        x, _ = backbone.schedule.ddim_step(x, backbone(x, timesteps), t, t_prev)
    return backbone.to_data_range(x.clamp(-1, 1))
