"""On-disk feature store: features written chunk by chunk, resumable, keyed so stale data is never read.

A store is a directory ``ROOT/<key>/`` where ``key`` is a hash of the fingerprint (checkpoint,
nodes, timesteps, noise, seed, aggregation, data...). Each chunk is one ``.safetensors`` file
written atomically, so an interrupted fill keeps every finished chunk and resumes where it stopped.
Nothing here ever holds more than one chunk in memory.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .._atomic import atomic_path, atomic_write_bytes
from ..digests import json_digest

MANIFEST = "manifest.json"


def _unreadable(path: Path, err: Exception) -> ValueError:
    return ValueError(f"feature store: chunk {path} is unreadable (truncated or corrupt: {err}); the store is "
                      "resumable: delete that file and the next run recomputes it")


@contextmanager
def open_chunk(path: str | os.PathLike) -> Iterator[Any]:
    """A ``safe_open`` handle on one chunk; a truncated or corrupt chunk is a ValueError naming the file."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            yield handle
    except (SafetensorError, OSError, RuntimeError) as err:
        raise _unreadable(path, err) from err


def fingerprint_key(fingerprint: Mapping[str, Any]) -> str:
    """A short stable hash of a JSON-able fingerprint."""
    return json_digest(fingerprint)


class FeatureStore:
    """A directory of feature chunks under a fingerprint-derived key.

    Args:
        root: parent directory of all stores.
        fingerprint: everything that determines the features; a different fingerprint gives a
            different directory, so a stale store is never read.
    """

    def __init__(self, root: str | os.PathLike, fingerprint: Mapping[str, Any]) -> None:
        self.fingerprint = dict(fingerprint)
        self.key = fingerprint_key(self.fingerprint)
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise ValueError(f"cache dir: {root} is an existing file; expected a directory (or a path to create one)")
        self.path = root / self.key
        self.path.mkdir(parents=True, exist_ok=True)
        manifest = self.path / MANIFEST
        if manifest.is_file():
            try:
                stored = json.loads(manifest.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ValueError(f"feature store: {manifest} is not valid JSON ({err}); delete {self.path} "
                                 "to recompute the store") from err
            if stored.get("fingerprint") != json.loads(json.dumps(self.fingerprint, sort_keys=True, default=str)):
                raise ValueError(f"feature store {self.path}: manifest fingerprint differs from the requested one")
        else:
            atomic_write_bytes(manifest, json.dumps({"fingerprint": self.fingerprint}, sort_keys=True,
                                                    indent=2, default=str).encode())

    def _chunk_path(self, chunk_id: int) -> Path:
        return self.path / f"chunk-{chunk_id:06d}.safetensors"

    def has(self, chunk_id: int) -> bool:
        return self._chunk_path(chunk_id).is_file()

    def chunk_ids(self) -> list[int]:
        return sorted(int(p.stem.split("-")[1]) for p in self.path.glob("chunk-*.safetensors"))

    def write(self, chunk_id: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Atomically write one chunk (temporary name, then rename)."""
        with atomic_path(self._chunk_path(chunk_id)) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)

    def read(self, chunk_id: int) -> dict[str, torch.Tensor]:
        if not self.has(chunk_id):
            raise KeyError(f"feature store {self.path}: chunk {chunk_id} has not been written")
        path = self._chunk_path(chunk_id)
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, RuntimeError) as err:
            raise _unreadable(path, err) from err

    def fill(self, num_chunks: int, compute: Callable[[int], Mapping[str, torch.Tensor]],
             progress: Callable[[Iterator[int]], Iterator[int]] | None = None) -> "FeatureStore":
        """Compute and write every missing chunk 0..num_chunks-1; finished chunks are skipped."""
        todo = [i for i in range(num_chunks) if not self.has(i)]
        for chunk_id in (progress(iter(todo)) if progress else todo):
            self.write(chunk_id, compute(chunk_id))
        return self
