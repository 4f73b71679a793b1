"""Resumable training state: model, EMA, optimiser, LR scheduler, RNG states and data position.

Written atomically (temporary name, then rename) and read back with ``weights_only=True``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .._atomic import atomic_path

STATE_NAME = "train_state.pt"


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Atomically write ``state`` (tensors, dicts, numbers and strings only) to ``path``."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: Path) -> dict[str, Any]:
    """Read a training state written by ``save_state`` (no arbitrary unpickling)."""
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no training state at {path}; start without --resume first")
    return torch.load(path, map_location="cpu", weights_only=True)
