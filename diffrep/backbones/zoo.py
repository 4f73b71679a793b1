"""The shipped pretrained defaults ("the zoo") and ``load_backbone``, which resolves names and paths."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .backbone import Backbone
from .checkpoint import CONFIG_NAME, CheckpointError, load_checkpoint

ZOO_DIR = Path(__file__).resolve().parent.parent / "zoo"


def zoo_names() -> list[str]:
    """Names of the checkpoints shipped inside the package."""
    if not ZOO_DIR.is_dir():
        return []
    return sorted(p.name for p in ZOO_DIR.iterdir() if (p / CONFIG_NAME).is_file())


def zoo_entries() -> list[dict[str, Any]]:
    """Each shipped checkpoint's name, path and provenance (as recorded in its config.json)."""
    entries = []
    for name in zoo_names():
        payload = json.loads((ZOO_DIR / name / CONFIG_NAME).read_text())
        entries.append({"name": name, "path": str(ZOO_DIR / name), "unet": payload.get("unet"),
                        "schedule": payload.get("schedule"), "provenance": payload.get("provenance", {})})
    return entries


def load_backbone(path_or_name: str | os.PathLike, device: str | torch.device = "cpu") -> Backbone:
    """Load a backbone from a checkpoint directory or by the name of a shipped default (offline).

    A directory is a diffrep checkpoint (config.json + model.safetensors) or a diffusers
    UNet2DModel pipeline/model folder (see ``diffrep.backbones.diffusers_import``).
    """
    path = Path(path_or_name)
    if path.is_dir():
        from .diffusers_import import is_diffusers_dir, load_diffusers_unet

        if is_diffusers_dir(path):
            return load_diffusers_unet(path).to(device)
        return load_checkpoint(path).to(device)
    name = str(path_or_name)
    if name in zoo_names():
        return load_checkpoint(ZOO_DIR / name).to(device)
    raise CheckpointError(
        f"load_backbone: {name!r} is neither a checkpoint directory nor a shipped default; "
        f"shipped defaults are {zoo_names() or '(none installed)'}"
    )

