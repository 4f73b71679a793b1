"""Backbone checkpoints: a directory with ``config.json`` and ``model.safetensors``. No pickle, ever.

Weights may be stored in fp16 to keep the shipped defaults small; they always load as float32.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from monai.networks.nets import DiffusionModelUNet
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .._atomic import atomic_path, atomic_write_json
from ..config import from_dict, to_dict
from ..errors import as_dtype
from .backbone import Backbone
from .config import BackboneConfig

FORMAT = "diffrep-backbone"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, corrupt, or its config and weights disagree."""


def save_backbone(backbone: Backbone, directory: str | os.PathLike, *, dtype: str | torch.dtype = torch.float32) -> Path:
    """Save ``backbone`` as ``directory/config.json`` + ``directory/model.safetensors`` (atomic writes), the
    floating weights stored in ``dtype`` (a torch dtype or its name, e.g. ``"float16"``; they load as float32)."""
    dtype = as_dtype(dtype)
    if not isinstance(backbone.unet, DiffusionModelUNet):
        raise CheckpointError(f"save_backbone: diffrep checkpoints hold MONAI DiffusionModelUNets, got "
                              f"{type(backbone.unet).__name__}; keep a diffusers model in its own folder "
                              "(save_pretrained) and load it with load_backbone(folder)")
    check_weights(backbone.unet.state_dict(), source=f"save_backbone to {directory}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
             for k, v in backbone.unet.state_dict().items()}
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "weights_dtype": str(dtype).removeprefix("torch."),
               **to_dict(backbone.config)}
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(state, tmp, metadata={"format": FORMAT})
    atomic_write_json(directory / CONFIG_NAME, payload, sort_keys=True)
    return directory


def read_config(directory: str | os.PathLike) -> BackboneConfig:
    """Read and validate ``config.json``; unknown keys and a wrong format are errors."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint: expected a directory holding {CONFIG_NAME} and {WEIGHTS_NAME}, got {directory}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint: {path} is missing")
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"checkpoint: {path} is not valid JSON ({err})") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        got = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"checkpoint: {path} expected format {FORMAT!r}, got {got!r}")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint: {path} expected format_version {FORMAT_VERSION}, got {payload.get('format_version')!r}")
    body = {k: v for k, v in payload.items() if k not in ("format", "format_version", "weights_dtype")}
    try:
        config = from_dict(BackboneConfig, body, where=str(path))
        config.validate()
    except (TypeError, ValueError) as err:
        raise CheckpointError(str(err)) from err
    return config


def load_checkpoint(directory: str | os.PathLike) -> Backbone:
    """Load a backbone directory; every mismatch between config and weights is named in the error."""
    directory = Path(directory)
    config = read_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"checkpoint: {weights} is missing")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint: {weights} is not a readable safetensors file ({err})") from err
    backbone = Backbone(config)
    load_state_checked(backbone.unet, state, source=str(weights))
    return backbone


def check_weights(state: dict[str, torch.Tensor], source: str,
                  expected: dict[str, torch.Tensor] | None = None) -> None:
    """Refuse weights that would load silently but compute garbage: a non-float tensor where the model
    holds floats (e.g. int8 quantised weights), or NaN/Inf values. Raises CheckpointError naming
    ``source`` and the tensors."""
    wrong_dtype = [f"{k} ({v.dtype})" for k, v in sorted(state.items())
                   if not v.is_floating_point() and (expected is None or expected[k].is_floating_point())]
    if wrong_dtype:
        raise CheckpointError(f"checkpoint: {source} holds {len(wrong_dtype)} non-float weight tensor(s), e.g. "
                              f"{wrong_dtype[:5]}; expected float16/bfloat16/float32/float64 weights "
                              "(quantised checkpoints are not supported)")
    bad = [f"{k} ({int((~torch.isfinite(v)).sum())} of {v.numel()})" for k, v in sorted(state.items())
           if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"checkpoint: {source} holds NaN/Inf values in {len(bad)} tensor(s), e.g. {bad[:5]}; "
                              "expected finite weights")


def load_state_checked(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``module`` after checking keys, shapes, dtypes and finiteness; casts floats to fp32."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k}: config expects {tuple(expected[k].shape)}, weights have {tuple(state[k].shape)}"
                  for k in sorted(set(expected) & set(state)) if expected[k].shape != state[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[:5]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:5]}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es), e.g. {mismatched[:5]}")
        raise CheckpointError(f"checkpoint: {source} does not match its config: " + "; ".join(parts))
    check_weights(state, source, expected)
    cast = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    module.load_state_dict(cast, strict=True)
