"""Typed configs: plain dataclasses built from mappings (YAML/JSON) where unknown keys are errors."""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

T = TypeVar("T")


def from_dict(cls: type[T], mapping: Mapping[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from ``mapping``; nested dataclass fields are built recursively.

    Raises ValueError naming the unknown keys and the valid ones, or the missing required keys.
    Lists become tuples where the field is typed as a tuple.
    """
    if not isinstance(mapping, Mapping):
        raise TypeError(f"{where}: expected a mapping for {cls.__name__}, got {type(mapping).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} for {cls.__name__}; valid keys are {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in mapping.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}")
    missing = [
        name for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"{where}: missing required key(s) {missing} for {cls.__name__}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
        return from_dict(hint, value, where)
    origin = typing.get_origin(hint)
    if origin is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for arg in typing.get_args(hint):
            if dataclasses.is_dataclass(arg) and isinstance(value, Mapping):
                return from_dict(arg, value, where)
            if typing.get_origin(arg) is tuple and isinstance(value, (list, tuple)):
                return tuple(value)
    return value


def to_dict(obj: Any) -> dict[str, Any]:
    """A JSON/YAML-ready dict of a dataclass (tuples become lists)."""
    def convert(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value
    return convert(dataclasses.asdict(obj))


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML file with safe_load; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    with path.open() as handle:
        data = yaml.safe_load(handle)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a YAML mapping at the top level, got {type(data).__name__}")
    return data
