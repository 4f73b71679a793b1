"""Reading image inputs for the CLI and writing extracted features with their metadata."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from safetensors.torch import save_file

from .._atomic import atomic_path
from ..backbones.backbone import Backbone
from .extractor import FeatureDict, FeatureExtractor


def read_images(path: str | os.PathLike, backbone: Backbone) -> torch.Tensor:
    """Read a ``.npy`` array ((N,C,H,W), or (N,H,W) for one channel) or a folder of PNGs.

    uint8 input is scaled with the backbone's documented normalisation; float input must already be
    in its data range. PNG folders are read in sorted file-name order.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input: {path} does not exist; expected a .npy file or a folder of PNGs")
    if path.is_dir():
        from PIL import Image

        files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".png")
        if not files:
            raise ValueError(f"input: expected PNG files in {path}, found none")
        mode = "L" if backbone.in_channels == 1 else "RGB"
        arrays = [np.asarray(Image.open(f).convert(mode)) for f in files]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise ValueError(f"input: expected PNGs of one size in {path}, got sizes {sorted(shapes)}")
        array = np.stack(arrays)
        array = array[:, None] if array.ndim == 3 else array.transpose(0, 3, 1, 2)
    elif path.suffix == ".npy":
        array = np.load(path, allow_pickle=False)
        if array.ndim == backbone.spatial_dims + 1 and backbone.in_channels == 1:
            array = array[:, None]
    else:
        raise ValueError(f"input: expected a .npy file or a folder of PNGs, got {path}")
    return backbone.normalise(array)


def extract_to_file(backbone: Backbone, images: torch.Tensor, nodes: Iterable[str], timesteps: Iterable[int],
                    out: Path, noise: str = "shared", seed: int = 0, batch_size: int = 64) -> Path:
    """Extract features and write them with ``save_features``."""
    extractor = FeatureExtractor(backbone, list(nodes), list(timesteps), noise=noise, seed=seed, batch_size=batch_size)
    return save_features(extractor(images), out, backbone_name=_backbone_name(backbone))


def _backbone_name(backbone: Backbone) -> str:
    return backbone.config.provenance.get("recipe", {}).get("name", "unnamed")


def save_features(features: FeatureDict, out: str | os.PathLike, backbone_name: str = "unnamed") -> Path:
    """Write one ``.safetensors`` file (tensor names ``node@t``) with the FeatureDict metadata in its header."""
    tensors = {f"{k.node}@{k.timestep}": v.contiguous() for k, v in features.items()}
    metadata = {**features.metadata(), "backbone": backbone_name}
    out = Path(out)
    if out.suffix != ".safetensors":
        out = out.with_name(out.name + ".safetensors")
    with atomic_path(out) as tmp:
        save_file(tensors, tmp, metadata={"diffrep": json.dumps(metadata)})
    return out
