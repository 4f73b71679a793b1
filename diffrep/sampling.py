"""Few-step DDIM sampling (Song et al. 2021) with MONAI's DDIMScheduler, for sample grids."""
from __future__ import annotations

import torch
from monai.networks.schedulers import DDIMScheduler

from .backbones.backbone import Backbone


def make_ddim(backbone: Backbone, num_inference_steps: int) -> DDIMScheduler:
    """A DDIM scheduler sharing the backbone's beta schedule, set to ``num_inference_steps``."""
    sched = backbone.config.schedule
    extra = {"beta_start": sched.beta_start, "beta_end": sched.beta_end} if sched.schedule != "cosine" else {}
    ddim = DDIMScheduler(num_train_timesteps=sched.num_train_timesteps, schedule=sched.schedule,
                         clip_sample=True, prediction_type=sched.prediction_type, **extra)
    ddim.set_timesteps(num_inference_steps)
    return ddim


@torch.inference_mode()
def ddim_sample(backbone: Backbone, num_samples: int, spatial: tuple[int, ...], num_inference_steps: int = 50,
                seed: int = 0) -> torch.Tensor:
    """Draw samples from pure noise in ``num_inference_steps`` deterministic DDIM steps; data range."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    shape = (num_samples, backbone.in_channels, *spatial)
    x = torch.randn(shape, generator=generator).to(backbone.device)
    ddim = make_ddim(backbone, num_inference_steps)
    for t in ddim.timesteps:
        timesteps = torch.full((num_samples,), int(t), device=x.device, dtype=torch.long)
        eps = backbone(x, timesteps)
        x, _ = ddim.step(eps, int(t), x)
    return backbone.to_data_range(x.clamp(-1, 1))
