"""Figures written at the end of training: the loss curve and a DDIM sample grid."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

from .._atomic import atomic_savefig  # noqa: E402
from ..backbones.backbone import Backbone  # noqa: E402
from ..sampling import ddim_sample  # noqa: E402


def write_loss_curve(records: list[dict], path: Path, title: str) -> None:
    """Plot the logged training loss against the step."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records])
    ax.set_xlabel("step")
    ax.set_ylabel("epsilon MSE (logged mean)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=100)
    plt.close(fig)


def write_sample_grid(backbone: Backbone, spatial: tuple[int, ...], path: Path, steps: int, seed: int,
                      title: str, count: int = 64) -> None:
    """Sample ``count`` images with few-step DDIM and save them as a grid PNG (2D backbones only)."""
    if len(spatial) != 2:
        return
    samples = ddim_sample(backbone, count, spatial, num_inference_steps=steps, seed=seed)
    grid = make_grid(samples.float().cpu().clamp(0, 1), nrow=8, padding=2, pad_value=1.0)
    fig, ax = plt.subplots(figsize=(7, 7.4))
    ax.imshow(grid[0].numpy(), cmap="gray", vmin=0, vmax=1)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=100)
    plt.close(fig)
