"""On-disk cache of anomaly maps for the brain anomaly benchmark, so an interrupted run keeps finished work.

Each entry is one scorer (method, settings, network weights) applied to one image set; it stores the maps,
the image scores and the scoring time per slice measured when it was computed. Entries are written
atomically (diffrep._atomic), so a killed run leaves either a whole entry or none.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from diffrep._atomic import atomic_path
from diffrep.digests import json_digest


class MapCache:
    """``get(key, compute)``: the cached ``{"maps", "scores", "seconds_per_slice"}`` or compute and store it.

    ``key`` is any JSON-serialisable description (method, settings, weights digest, data digest, stage);
    ``root=None`` disables caching.
    """

    def __init__(self, root: str | Path | None) -> None:
        self.root = None if root is None else Path(root)
        self.hits = 0

    def _path(self, key: dict[str, Any]) -> Path:
        name = json_digest(key, length=20)
        return self.root / f"maps-{name}.npz"

    def get(self, key: dict[str, Any], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        if self.root is None:
            return compute()
        path = self._path(key)
        if path.is_file():
            with np.load(path) as stored:
                self.hits += 1
                return {"maps": stored["maps"], "scores": stored["scores"],
                        "seconds_per_slice": float(stored["seconds_per_slice"]), "cached": True}
        result = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, maps=np.asarray(result["maps"]), scores=np.asarray(result["scores"]),
                         seconds_per_slice=np.float64(result["seconds_per_slice"]))
        return {**result, "cached": False}
