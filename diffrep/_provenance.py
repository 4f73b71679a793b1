"""What produced a result: a digest of the code and library versions, for keys of result caches.

A cache keyed only by its inputs (weights, data, settings) silently serves results of older code after
a change to the computation. :func:`code_digest` hashes the source of the named diffrep sub-packages
(or modules), any extra files, and the versions of the numerical libraries, so that a cache entry is
reused only by the code that wrote it.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path
from typing import Iterable

_LIBRARIES = ("torch", "monai", "numpy", "scipy", "sklearn")


def _sources(module: str) -> list[tuple[str, Path]]:
    """(name relative to the top package's folder, path) of every source file of ``module``."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ValueError(f"code_digest: no module named {module!r}")
    origin = Path(spec.origin)
    top = Path(importlib.util.find_spec(module.split(".")[0]).origin).parent.parent
    files = sorted(origin.parent.rglob("*.py")) if spec.submodule_search_locations else [origin]
    return [(p.relative_to(top).as_posix(), p) for p in files]


def library_versions() -> dict[str, str]:
    """Versions of the numerical libraries a computed result depends on."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in _LIBRARIES:
        try:
            out[name] = version("scikit-learn" if name == "sklearn" else name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def code_digest(modules: Iterable[str] = ("diffrep",), extra_files: Iterable[str | Path] = ()) -> str:
    """A short digest of the source of ``modules`` (dotted names; packages include every file below them),
    of ``extra_files`` and of the library versions: equal digests mean the same code computed the result."""
    digest = hashlib.sha256()
    files = [f for m in modules for f in _sources(m)] + [(Path(f).name, Path(f)) for f in extra_files]
    for name, path in files:
        digest.update(f"{name}:{path.stat().st_size}:".encode())
        digest.update(path.read_bytes())
    digest.update(repr(sorted(library_versions().items())).encode())
    return digest.hexdigest()[:16]


# The code that turns images into features: feature caches (pooled and pixel stores) are keyed by it.
FEATURE_CODE = ("diffrep.features", "diffrep.backbones", "diffrep.diffusion", "diffrep.errors", "diffrep.noise")


@functools.lru_cache(maxsize=None)
def feature_code_digest() -> str:
    """``code_digest`` of the modules that compute features (computed once per process)."""
    return code_digest(FEATURE_CODE)
