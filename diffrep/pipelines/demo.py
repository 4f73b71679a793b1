"""The README's demo: diffusion features of held-out brain MRI slices from the shipped default.

It loads ``brain-ddpm`` (or, if the package holds no default yet, a freshly initialised U-Net of
the same recipe, and says so), extracts decoder features at three timesteps from the MNI152 test
slices and writes the features, a JSON summary and a figure.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .._atomic import atomic_savefig, atomic_write_json
from ..backbones import Backbone, load_backbone, zoo_names
from ..features import FeatureExtractor, upsample_concat

DEFAULT_NAME = "brain-ddpm"


def _backbone() -> tuple[Backbone, str]:
    if DEFAULT_NAME in zoo_names():
        return load_backbone(DEFAULT_NAME), f"shipped default {DEFAULT_NAME!r}"
    from importlib import resources

    from ..training.config import load_train_config

    recipe = Path(str(resources.files("diffrep"))).parent / "configs" / "train" / f"{DEFAULT_NAME}.yaml"
    if not recipe.is_file():
        raise FileNotFoundError(f"demo: no shipped default {DEFAULT_NAME!r} and no recipe at {recipe}")
    torch.manual_seed(0)
    return Backbone(load_train_config(recipe).backbone), "a freshly initialised U-Net (no shipped default installed)"


def run_demo(out_dir: str | Path, timesteps: tuple[int, ...] = (50, 150, 250)) -> dict:
    """Run the demo (``diffrep demo``), write its outputs under ``out_dir`` and return the summary dict."""
    from ..data.brain import load_brain_split
    from ..features.io import save_features

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    backbone, source = _backbone()
    slices = load_brain_split("test", size=64)
    images = torch.from_numpy(slices.images)
    nodes = [n for n in backbone.node_names if n.startswith("up.")]
    extractor = FeatureExtractor(backbone, nodes, timesteps, noise="shared", seed=0, batch_size=16)
    start = time.perf_counter()
    features = extractor(images)
    seconds = time.perf_counter() - start
    descriptors = upsample_concat(features, images.shape[2:])
    feature_file = save_features(features, out_dir / "features.safetensors", backbone_name=source)
    summary = {
        "backbone": source,
        "provenance_steps": backbone.config.provenance.get("steps"),
        "images": {"count": int(images.shape[0]), "shape": list(images.shape[1:]), "data": "MNI152 2009a T1, test slices"},
        "nodes": [{"name": i.name, "channels": i.channels, "stride": i.stride} for i in backbone.feature_info() if i.name in nodes],
        "timesteps": [{"t": t, "noise_level": round(backbone.noise_level(t), 4)} for t in timesteps],
        "pixel_descriptor_dim": int(descriptors.shape[1]),
        "seconds": round(seconds, 3),
        "outputs": {"features": str(feature_file), "figure": str(out_dir / "features.png"), "summary": str(out_dir / "summary.json")},
    }
    _figure(images, descriptors, out_dir / "features.png")
    atomic_write_json(out_dir / "summary.json", summary)
    return summary


def _figure(images: torch.Tensor, descriptors: torch.Tensor, path: Path) -> None:
    """Input slices beside the first three principal components of their pixel descriptors as RGB."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(4, images.shape[0])
    picks = torch.linspace(0, images.shape[0] - 1, n).long()
    flat = descriptors[picks].permute(0, 2, 3, 1).reshape(-1, descriptors.shape[1])
    flat = flat - flat.mean(0)
    _, _, v = torch.pca_lowrank(flat, q=3, center=False)
    rgb = (flat @ v[:, :3]).reshape(n, *descriptors.shape[2:], 3)
    rgb = (rgb - rgb.amin((0, 1, 2))) / (rgb.amax((0, 1, 2)) - rgb.amin((0, 1, 2)) + 1e-8)
    fig, axes = plt.subplots(2, n, figsize=(2.2 * n, 4.6))
    for j in range(n):
        axes[0, j].imshow(images[picks[j], 0], cmap="gray")
        axes[1, j].imshow(rgb[j].numpy())
        axes[0, j].axis("off")
        axes[1, j].axis("off")
    axes[0, 0].set_title("input", fontsize=9, loc="left")
    axes[1, 0].set_title("feature PCA", fontsize=9, loc="left")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=100)
    plt.close(fig)
