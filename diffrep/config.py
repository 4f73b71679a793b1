"""Typed configs: plain dataclasses built from mappings (YAML/JSON) where unknown keys are errors."""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

T = TypeVar("T")


def from_dict(cls: type[T], mapping: Mapping[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from ``mapping``; nested dataclass fields are built recursively.

    Raises ValueError naming the unknown keys and the valid ones, or the missing required keys, and
    TypeError naming the key, the value and the expected type when a value does not fit its field's
    type hint (bools are not ints; ints and numeric strings such as '1e-4' are floats). Lists become
    tuples where the field is typed as a tuple.
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


class _Mismatch(Exception):
    """A value that does not have the type a field declares (internal; turned into a TypeError)."""


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """``value`` checked against the type hint ``hint`` (tuples built from lists, ints widened to floats).

    Raises TypeError naming the key, the value and the expected type.
    """
    try:
        return _convert(hint, value, where)
    except _Mismatch:
        raise TypeError(f"{where}: expected {_describe(hint)}, got {value!r} ({type(value).__name__})") from None


def _convert(hint: Any, value: Any, where: str) -> Any:
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        if isinstance(value, Mapping):
            return from_dict(hint, value, where)
        raise _Mismatch
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _convert(arg, value, where)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) != len(value):
            raise _Mismatch
        return tuple(_convert(arg, item, where) for arg, item in zip(items, value))
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise _Mismatch
        return dict(value)
    return _scalar(hint, value)


def _scalar(hint: Any, value: Any) -> Any:
    """Scalars: bools are not ints, ints are floats, and a numeric string such as '1e-4' (which YAML 1.1
    reads as a string) is a float."""
    if hint is type(None):
        if value is None:
            return None
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif isinstance(hint, type):
        if isinstance(value, hint):
            return value
    else:
        return value  # a hint this module does not check (e.g. Literal): passed through as before
    raise _Mismatch


_NAMES = {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string", type(None): "null"}


def _describe(hint: Any) -> str:
    """The type ``hint`` in words, for error messages."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(args[0])}"
        return f"a list of {len(args)} items ({', '.join(_describe(a) for a in args)})"
    if origin is dict or hint is dict:
        return "a mapping"
    if dataclasses.is_dataclass(hint):
        return f"a mapping ({hint.__name__})"
    return _NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def _plural(hint: Any) -> str:
    return {bool: "booleans", int: "integers", float: "numbers", str: "strings"}.get(hint, _describe(hint))


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
    """Read a YAML file with safe_load; errors (missing, a folder, undecodable, not YAML, not a mapping) name the file."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"config file: expected a YAML file, got the directory {path}")
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        with path.open(encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: expected a UTF-8 YAML text file, got undecodable bytes ({err.reason} at byte {err.start})") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a YAML mapping at the top level, got {type(data).__name__}")
    return data
