"""One saved-model format for every fitted head and scorer: ``config.json`` + ``state.safetensors``, no pickle.

:func:`save_fitted` writes a folder holding

* ``config.json``: the format name and version, the class, its ``__init__`` parameters (JSON values;
  tuples are marked so they come back as tuples), the fitted scalar state (numbers, strings, lists,
  dicts), and, for a scorer on a diffusion backbone, a reference to that backbone (its checkpoint
  path or zoo name when known, and its :func:`~diffrep.digests.backbone_identity` digest);
* ``state.safetensors``: every fitted array or tensor, by name.

A parameter that is itself a scorer (``CalibratedScorer.scorer``, ``MultiLevelScorer.scorers``) is
saved the same way in a sub-folder named after the parameter (``scorer/``, ``scorers.0/``...).
Files are written atomically (:mod:`diffrep._atomic`), and nothing is written before the whole object
has been encoded, so a refusal (an unsaveable parameter, an unfitted object) leaves the folder as it was.

:func:`load_fitted` rebuilds the object and refuses, naming the file, a config that is not JSON, of
another format or version, or of an unknown class; a state file that is unreadable (truncated,
corrupt), lacks a tensor the config names, or holds NaN/Inf; and a backbone whose identity differs
from the recorded one (naming both). A version-1 config (written before the parameter renames of issue 12)
loads too: ``diffrep._legacy_formats.RENAMED_PARAMS`` maps its old parameter names to today's.

A saveable class implements ``_fitted_state() -> dict`` (its fitted attributes; raises
NotFittedError when unfitted) and ``_set_fitted_state(state)``; optionally ``_saved_params()``
(default ``get_params(deep=False)``).
"""
from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._atomic import atomic_path, atomic_write_json

FORMAT = "diffrep-fitted"
FORMAT_VERSION = 2  # 2: today's parameter names; 1 (still read): the names before issue 12, see _legacy_formats
READABLE_VERSIONS = (1, 2)
CONFIG_NAME = "config.json"
STATE_NAME = "state.safetensors"
# The classes load_fitted may rebuild (no arbitrary imports from a config file), by module.
CLASSES = {
    "LinearProbe": "diffrep.heads.linear_probe", "PixelClassifier": "diffrep.heads.pixel_classifier",
    "ReconstructionScorer": "diffrep.anomaly.reconstruction", "MultiLevelScorer": "diffrep.anomaly.ensemble",
    "FeatureDistanceScorer": "diffrep.anomaly.feature_distance", "CalibratedScorer": "diffrep.anomaly.calibration",
    "DAEScorer": "diffrep.anomaly.dae",
    "LikelihoodScorer": "diffrep.anomaly.likelihood_scores", "TypicalityScorer": "diffrep.anomaly.typicality",
}


@dataclass
class _Entry:
    """One encoded object: its folder (relative), config and tensors, ready to write."""
    folder: str
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ save
def save_fitted(obj: Any, directory: str | os.PathLike, *, backbone_source: str | None = None) -> Path:
    """Save a fitted head or scorer to ``directory`` (``config.json`` + ``state.safetensors``); returns it.

    ``backbone_source``: the checkpoint path or zoo name of the scorer's backbone, recorded so that
    :func:`load_fitted` can load it again (without it, pass the backbone to ``load_fitted``).
    Raises NotFittedError for an unfitted object and ValueError naming a parameter that cannot be saved.
    """
    from safetensors.torch import save_file

    entries: list[_Entry] = []
    _encode(obj, "", backbone_source, entries)
    directory = Path(directory)
    for entry in entries:
        _check_target(directory / entry.folder if entry.folder else directory)
    for entry in reversed(entries):  # nested objects first, the top-level config last
        folder = directory / entry.folder if entry.folder else directory
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / STATE_NAME) as tmp:
            save_file(entry.tensors, tmp, metadata={"format": FORMAT})
        atomic_write_json(folder / CONFIG_NAME, entry.config)
    return directory


def _check_target(folder: Path) -> None:
    """Refuse a target that is a file, or a folder whose ``config.json`` is not one of ours (a backbone
    checkpoint, an earlier-format head): saving must not overwrite another kind of file."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"save_fitted: expected a folder to write {CONFIG_NAME} + {STATE_NAME} into, "
                         f"got the existing file {folder}")
    config = folder / CONFIG_NAME
    if config.exists():
        try:
            kind = json.loads(config.read_text(encoding="utf-8")).get("format")
        except (ValueError, AttributeError):
            kind = "unreadable"
        if kind != FORMAT:
            raise ValueError(f"save_fitted: {config} exists and is not a saved head or scorer (format {kind!r}, "
                             f"expected {FORMAT!r}); choose another folder")


def _encode(obj: Any, folder: str, backbone_source: str | None, entries: list[_Entry]) -> None:
    """Append the entry of ``obj`` (and of the scorers among its parameters) to ``entries``."""
    name = type(obj).__name__
    if CLASSES.get(name) != type(obj).__module__:
        raise ValueError(f"save_fitted: expected one of {sorted(CLASSES)}, got a {type(obj).__module__}.{name}")
    entry = _Entry(folder, {"format": FORMAT, "format_version": FORMAT_VERSION, "class": name})
    entries.append(entry)
    state = obj._fitted_state()  # raises NotFittedError first: an unfitted object is not saved
    context = _Context(entry, backbone_source, entries)
    saved = obj._saved_params() if hasattr(obj, "_saved_params") else obj.get_params(deep=False)
    entry.config["params"] = {k: context.value(v, f"{name}.{k}", k) for k, v in saved.items()}
    entry.config["backbone"] = context.backbone_ref
    entry.config["fitted"] = {k: context.state(v, k) for k, v in state.items()}


class _Context:
    """Encodes the values of one object: JSON as is, arrays into the entry's tensors, backbones and
    nested scorers by reference."""

    def __init__(self, entry: _Entry, backbone_source: str | None, entries: list[_Entry]) -> None:
        self.entry, self.backbone_source, self.entries = entry, backbone_source, entries
        self.backbone_ref: dict[str, Any] | None = None

    def value(self, value: Any, where: str, path: str) -> Any:
        """A parameter value as JSON (scorers are saved in the sub-folder ``path``)."""
        from .backbones.backbone import Backbone

        if isinstance(value, Backbone):
            return self._backbone(value, where)
        if type(value).__name__ in CLASSES:
            folder = f"{self.entry.folder}/{path}" if self.entry.folder else path
            _encode(value, folder, self.backbone_source, self.entries)
            return {"__saved__": path}
        if isinstance(value, (tuple, list)):
            items = [self.value(v, f"{where}[{i}]", f"{path}.{i}") for i, v in enumerate(value)]
            return {"__tuple__": items} if isinstance(value, tuple) else items
        if isinstance(value, dict) and all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: self.value(v, f"{where}.{k}", f"{path}.{k}") for k, v in value.items()}
        return _scalar(value, where)

    def state(self, value: Any, key: str) -> Any:
        """A fitted value as JSON; tensors and numeric arrays go to ``state.safetensors`` under ``key``."""
        if isinstance(value, torch.Tensor):
            tensor, layout = _memory_order(value.detach().cpu())
            self.entry.tensors[key] = tensor.contiguous().clone()
            return {"__tensor__": key, **layout}
        if isinstance(value, np.ndarray):
            if value.dtype.kind in "biuf":
                tensor, layout = _memory_order(torch.from_numpy(value))
                self.entry.tensors[key] = tensor.contiguous().clone()
                return {"__ndarray__": key, **layout}
            if value.dtype.kind in "US":
                return {"__strings__": value.tolist(), "dtype": value.dtype.str}
            raise ValueError(f"save_fitted: {key}: expected a numeric or string array, got dtype {value.dtype}")
        if isinstance(value, (tuple, list)):
            items = [self.state(v, f"{key}.{i}") for i, v in enumerate(value)]
            return {"__tuple__": items} if isinstance(value, tuple) else items
        if isinstance(value, dict) and all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: self.state(v, f"{key}.{k}") for k, v in value.items()}
        return _scalar(value, key)

    def _backbone(self, backbone: Any, where: str) -> dict[str, bool]:
        from .digests import backbone_identity

        identity = backbone_identity(backbone)
        if self.backbone_ref is not None and self.backbone_ref["identity"] != identity:
            raise ValueError(f"save_fitted: {where}: expected one backbone per object, got two different ones "
                             f"(identities {self.backbone_ref['identity']} and {identity})")
        self.backbone_ref = {"source": self.backbone_source, "identity": identity}
        return {"__backbone__": True}


def _memory_order(tensor: torch.Tensor) -> tuple[torch.Tensor, dict[str, bool]]:
    """A transposed (column-major) tensor as its memory order plus ``{"reversed": True}``, so that the
    loaded copy gets the same layout back: matrix products round differently on another layout, and
    a loaded object must compute bit for bit what the saved one did."""
    dims = tuple(reversed(range(tensor.ndim)))
    if tensor.ndim > 1 and not tensor.is_contiguous() and tensor.permute(dims).is_contiguous():
        return tensor.permute(dims), {"reversed": True}
    return tensor, {}


def _scalar(value: Any, where: str) -> Any:
    """A JSON scalar (numpy scalars become Python ones); anything else cannot be saved."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic) and value.dtype.kind in "biufU":
        return value.item()
    raise ValueError(f"save_fitted: {where}: expected a JSON value (number, string, list, dict), a backbone or a "
                     f"saveable scorer, got {type(value).__name__}; such an object cannot be saved")


# ------------------------------------------------------------------------------------------ load
def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The JSON mapping in ``directory/config.json``; a missing or unreadable file is an error naming it."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"load_fitted: expected {path}, it does not exist")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path}: expected the JSON written by save_fitted, got unreadable text ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON mapping written by save_fitted, got {type(config).__name__}")
    return config


def load_fitted(directory: str | os.PathLike, *, backbone: Any = None, expected: type | None = None,
                params: dict[str, Any] | None = None) -> Any:
    """Rebuild the head or scorer that :func:`save_fitted` wrote to ``directory``.

    ``backbone``: a Backbone (or a checkpoint path / zoo name) to use instead of the recorded source;
    its identity must equal the recorded one. ``expected``: the class the caller wants (another class
    is refused). ``params``: ``__init__`` parameters to override (e.g. ``{"device": "cuda"}``).
    """
    from .backbones.backbone import Backbone

    if backbone is not None and not isinstance(backbone, Backbone):
        from .backbones.zoo import load_backbone

        backbone = load_backbone(backbone)
    return _Loader(backbone).load(Path(directory), expected, params or {})


class _Loader:
    """Loads one folder tree, sharing one backbone between the objects that need it."""

    def __init__(self, backbone: Any) -> None:
        self.backbone = backbone

    def load(self, directory: Path, expected: type | None, overrides: dict[str, Any]) -> Any:
        config, path = read_config(directory), directory / CONFIG_NAME
        if config.get("format") != FORMAT or config.get("format_version") not in READABLE_VERSIONS:
            raise ValueError(f"{path}: expected format {FORMAT!r} version {FORMAT_VERSION} (or 1), "
                             f"got {config.get('format')!r} version {config.get('format_version')!r}")
        name = config.get("class")
        if name not in CLASSES:
            raise ValueError(f"{path}: expected a class among {sorted(CLASSES)}, got {name!r}")
        cls = getattr(importlib.import_module(CLASSES[name]), name)
        if expected is not None and cls is not expected:
            raise ValueError(f"{path}: expected a saved {expected.__name__}, got a saved {name}")
        tensors = _read_state(directory / STATE_NAME)
        backbone = self._backbone(config.get("backbone"), path)
        try:
            params = config["params"]
            if config["format_version"] == 1:
                from ._legacy_formats import upgrade_params

                params = upgrade_params(name, params)
            kwargs = {k: self._param(v, directory, backbone) for k, v in params.items()}
            obj = cls(**{**kwargs, **overrides})
            obj._set_fitted_state({k: _decode_state(v, tensors) for k, v in config["fitted"].items()})
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as err:
            raise ValueError(f"{directory}: expected {CONFIG_NAME} and {STATE_NAME} of one {name} saved by "
                             f"save_fitted, they do not fit together ({type(err).__name__}: {err})") from err
        return obj

    def _param(self, value: Any, directory: Path, backbone: Any) -> Any:
        if isinstance(value, list):
            return [self._param(v, directory, backbone) for v in value]
        if isinstance(value, dict):
            if "__tuple__" in value:
                return tuple(self._param(v, directory, backbone) for v in value["__tuple__"])
            if "__backbone__" in value:
                if backbone is None:
                    raise KeyError("a backbone parameter but no backbone reference")
                return backbone
            if "__saved__" in value:
                return self.load(directory / value["__saved__"], None, {})
            return {k: self._param(v, directory, backbone) for k, v in value.items()}
        return value

    def _backbone(self, ref: Any, path: Path) -> Any:
        """The backbone this config needs (loaded from its source unless given), its identity checked."""
        if ref is None:
            return None
        from .digests import backbone_identity

        source, identity = ref.get("source"), ref.get("identity")
        if self.backbone is None:
            if source is None:
                raise ValueError(f"{path}: the scorer needs its backbone (identity {identity}), saved without a "
                                 "checkpoint path or zoo name; pass it: load_fitted(directory, backbone=...)")
            from .backbones.zoo import load_backbone

            self.backbone = load_backbone(source)
        actual = backbone_identity(self.backbone)
        if actual != identity:
            raise ValueError(f"{path}: expected the backbone it was fitted on (identity {identity}, source "
                             f"{source or 'not recorded'}), got a backbone with identity {actual}")
        return self.backbone


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a state file; an unreadable (truncated, corrupt) file or NaN/Inf values name the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"load_fitted: expected {path}, it does not exist")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{path}: expected a readable safetensors file written by save_fitted ({err})") from None
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{path}: expected finite values, got NaN/Inf in {sorted(bad)[:5]}")
    return tensors


def _decode_state(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """A fitted value back from JSON; a tensor the config names but the state file lacks is a KeyError."""
    if isinstance(value, list):
        return [_decode_state(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value or "__ndarray__" in value:
        tensor = tensors[value.get("__tensor__", value.get("__ndarray__"))]
        if value.get("reversed"):
            tensor = tensor.permute(tuple(reversed(range(tensor.ndim))))
        return tensor if "__tensor__" in value else tensor.numpy()
    if "__strings__" in value:
        return np.asarray(value["__strings__"], dtype=value["dtype"])
    if "__tuple__" in value:
        return tuple(_decode_state(v, tensors) for v in value["__tuple__"])
    return {k: _decode_state(v, tensors) for k, v in value.items()}
