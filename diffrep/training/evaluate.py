"""Held-out denoising loss per timestep: how well a U-Net predicts the noise at fixed t."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

from ..backbones.backbone import Backbone


@torch.inference_mode()
def heldout_losses(backbone: Backbone, images: torch.Tensor, timesteps: Iterable[int], seed: int = 0,
                   batch_size: int = 128) -> dict[int, float]:
    """Mean squared error of eps_theta(x_t, t) against eps at each fixed t, with seeded noise."""
    backbone.unet.eval()
    out: dict[int, float] = {}
    for t in backbone.check_timesteps(list(timesteps)):
        generator = torch.Generator().manual_seed(seed + t)
        noise = torch.randn(images.shape, generator=generator)
        total = 0.0
        for start in range(0, images.shape[0], batch_size):
            x0 = backbone.to_model_range(images[start:start + batch_size].to(backbone.device))
            eps = noise[start:start + batch_size].to(backbone.device)
            steps = torch.full((x0.shape[0],), t, dtype=torch.long, device=backbone.device)
            pred = backbone(backbone.schedule.add_noise(x0, eps, steps), steps)
            total += float(F.mse_loss(pred, eps, reduction="sum"))
        out[t] = total / images.numel()
    return out
