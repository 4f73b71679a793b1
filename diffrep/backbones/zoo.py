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


def load_backbone(path_or_name: str | os.PathLike, device: str | torch.device = "cpu",
                  cache_dir: str | os.PathLike | None = None, local_files_only: bool | None = None) -> Backbone:
    """Load a backbone from a checkpoint directory, a shipped default's name, or a Hub repository id.

    Resolution order: an existing directory (a diffrep checkpoint, config.json + model.safetensors, or
    a diffusers UNet2DModel pipeline/model folder, see ``diffrep.backbones.diffusers_import``); the
    name of a shipped default; a Hugging Face id ``owner/name[@revision]``, read from the local Hub
    cache (``cache_dir``) and downloaded only where a network is reachable and ``local_files_only``
    is false (see ``diffrep.backbones.hub``).
    """
    path = Path(path_or_name)
    if path.is_dir():
        return _load_directory(path).to(device)
    name = str(path_or_name)
    if name in zoo_names():
        return load_checkpoint(ZOO_DIR / name).to(device)
    from .hub import parse_hub_id, resolve_hub_id

    hub_id = parse_hub_id(name)
    if hub_id is None or path.exists():
        raise CheckpointError(
            f"load_backbone: {name!r} is neither a checkpoint directory, a shipped default nor a Hub id "
            f"'owner/name[@revision]'; shipped defaults are {zoo_names() or '(none installed)'}"
        )
    try:
        folder = resolve_hub_id(hub_id, cache_dir, local_files_only)
    except CheckpointError as exc:
        raise CheckpointError(f"load_backbone: {name!r} is not a directory or a shipped default "
                              f"({zoo_names() or 'none installed'}), and as a Hub id: {exc}") from exc
    return _load_directory(folder).to(device)


def _load_directory(path: Path) -> Backbone:
    """A diffusers folder or a diffrep checkpoint directory."""
    from .diffusers_import import is_diffusers_dir, load_diffusers_unet

    if is_diffusers_dir(path):
        return load_diffusers_unet(path)
    return load_checkpoint(path)
