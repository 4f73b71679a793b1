"""Readers of the saved-model folders written before :mod:`diffrep.persistence` (read only, never written).

* a PixelClassifier head: ``head.json`` (format ``diffrep-pixel-classifier``) + ``head.safetensors``;
* a DAEScorer: ``config.json`` (format ``diffrep-dae``, version 1) + ``model.safetensors``;
* the parameter names of ``diffrep-fitted`` version 1 (before each word got one meaning, issue 12):
  :data:`RENAMED_PARAMS`, the one alias table, maps them to today's names (:func:`upgrade_params`).

Existing user folders keep loading; anything garbled is refused naming the file and the format expected.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

LEGACY_HEAD_CONFIG = "head.json"
LEGACY_HEAD_WEIGHTS = "head.safetensors"
LEGACY_HEAD_FORMAT = "diffrep-pixel-classifier"
LEGACY_DAE_FORMAT = "diffrep-dae"

# Old parameter name -> today's, per class, for configs written before the renames of issue 12 item 3
# (``diffrep-fitted`` version 1 and ``head.json`` heads): a timestep is never called a noise level, the
# noise distribution is ``noise_type`` (``noise`` is the noise policy), seeds are ``seed``, British spelling.
RENAMED_PARAMS = {
    "LinearProbe": {"random_state": "seed"},
    "PixelClassifier": {"random_state": "seed", "standardize": "standardise"},
    "ReconstructionScorer": {"noise_level": "timestep", "noise": "noise_type", "noise_options": "noise_type_options"},
    "MultiLevelScorer": {"levels": "timesteps"},
}
# The one value that changed form: ReconstructionScorer's per_image_noise (bool) and draws (int) became its
# noise policy ``noise`` (per_image_noise=True, draws=k: "per_image" or "per_image_ensemble(k)"; False:
# "shared" or "ensemble(k)"). Absent old keys take their old defaults (True, 1).
_OLD_POLICY_KEYS = ("per_image_noise", "draws")


def upgrade_params(class_name: str, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` of a ``class_name`` saved under the old names (see :data:`RENAMED_PARAMS`), renamed.
    A MultiLevelScorer's ``scorer_params`` (ReconstructionScorer parameters) are upgraded too."""
    renamed = RENAMED_PARAMS.get(class_name, {})
    out = {renamed.get(k, k): v for k, v in params.items()}
    if class_name == "ReconstructionScorer" and any(k in out for k in _OLD_POLICY_KEYS):
        per_image, draws = bool(out.pop("per_image_noise", True)), int(out.pop("draws", 1))
        ensemble = f"per_image_ensemble({draws})" if per_image else f"ensemble({draws})"
        out["noise"] = ("per_image" if per_image else "shared") if draws == 1 else ensemble
    if class_name == "MultiLevelScorer" and isinstance(out.get("scorer_params"), dict):
        out["scorer_params"] = upgrade_params("ReconstructionScorer", out["scorer_params"])
    return out


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; unreadable or non-finite ones are refused naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"expected {path}, it does not exist")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path}: expected a readable safetensors file ({err})") from err
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{path}: expected finite weights, got NaN/Inf in {bad[:5]}")
    return tensors


def load_legacy_head(cls: type, directory: Path, device: str) -> Any:
    """A PixelClassifier from a ``head.json`` + ``head.safetensors`` folder."""
    config_path = directory / LEGACY_HEAD_CONFIG
    try:
        config = json.loads(config_path.read_text())
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{config_path}: expected the JSON written by PixelClassifier.save, "
                         f"got unreadable text ({err})") from err
    if not isinstance(config, dict) or config.get("format") != LEGACY_HEAD_FORMAT:
        got = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{config_path}: expected format {LEGACY_HEAD_FORMAT!r}, got {got!r}")
    tensors = _read_weights(directory / LEGACY_HEAD_WEIGHTS)
    try:
        params = dict(upgrade_params(cls.__name__, config["params"]), hidden=tuple(config["params"]["hidden"]),
                      device=device)
        model = cls(**params)
        model._set_fitted_state({
            "ensemble_": {k[len("ensemble."):]: v for k, v in tensors.items() if k.startswith("ensemble.")},
            "mean_": tensors["mean"], "scale_": tensors["scale"], "classes_": np.arange(int(config["num_classes"])),
            "n_features_in_": int(config["n_features_in"]), "n_train_images_": int(config.get("n_train_images", 0)),
            "class_pixel_counts_": np.asarray(config.get("class_pixel_counts", []), dtype=np.int64),
            "loss_curve_": config.get("loss_curve", []), "metadata_": config.get("metadata", {})})
        return model
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{directory}: expected {LEGACY_HEAD_CONFIG} and {LEGACY_HEAD_WEIGHTS} of one head saved by "
                         f"PixelClassifier.save, they do not fit together ({type(err).__name__}: {err})") from err


def load_legacy_dae(cls: type, directory: Path, device: str) -> Any:
    """A DAEScorer from a ``config.json`` (format ``diffrep-dae``) + ``model.safetensors`` folder; the
    training settings recorded there become its ``steps``, ``train_batch_size``, ``lr`` and ``seed``."""
    config_path = directory / "config.json"
    payload = json.loads(config_path.read_text())
    if payload.get("format_version") != 1 or not isinstance(payload.get("params"), dict):
        raise ValueError(f"{config_path}: expected format {LEGACY_DAE_FORMAT!r} version 1 with its params, "
                         f"got version {payload.get('format_version')!r}")
    tensors = _read_weights(directory / "model.safetensors")
    training = payload.get("training") or {}
    params = {k: (tuple(v) if isinstance(v, list) else v) for k, v in payload["params"].items()}
    recorded = {"steps": training.get("steps"), "train_batch_size": training.get("batch_size"),
                "lr": training.get("lr"), "seed": training.get("seed")}
    params.update({k: v for k, v in recorded.items() if v is not None})
    try:
        scorer = cls(**params, device=device)
        scorer._set_fitted_state({"model_": tensors, "training_": payload.get("training")})
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{directory}: expected config.json and model.safetensors of one DAEScorer saved by "
                         f"diffrep, they do not fit together ({type(err).__name__}: {err})") from err
    return scorer
