"""Digests that name data and weights in fingerprints: the one place diffrep hashes arrays, backbones and JSON.

* :func:`array_digest` hashes arrays or tensors (shape, dtype and bytes; ``None`` allowed), so different
  data never share a cache entry; :func:`chunked_digest` gives the same digest chunk by chunk.
* :func:`backbone_identity` hashes a backbone's config and every weight: two backbones with the same
  identity compute the same features. Saved heads and scorers record it, so its value never changes.
* :func:`json_digest` hashes a JSON-able description (cache keys, fingerprints).
* :func:`files_digest` hashes named files' names and bytes (the provenance of a folder of images);
  :func:`file_sha256` is the plain SHA-256 of one file, read in blocks (files of any size).
"""
from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import torch

if TYPE_CHECKING:
    from .backbones.backbone import Backbone

DIGEST_LENGTH = 16  # hex digits kept of a SHA-256


def _dtype_and_bytes(x: Any) -> tuple[str, tuple[int, ...], memoryview | bytes]:
    """(dtype name, shape, raw bytes) of a tensor or array; a tensor and an array of the same values agree."""
    if isinstance(x, torch.Tensor):
        t = x.detach().to("cpu").contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b""
        return str(t.dtype).removeprefix("torch."), tuple(t.shape), data
    a = np.ascontiguousarray(x)
    return str(a.dtype), tuple(a.shape), a.reshape(-1).view(np.uint8).data if a.size else b""


def array_digest(*arrays: Any) -> str:
    """A short SHA-256 of arrays' or tensors' shapes, dtypes and bytes, in order (``None`` allowed)."""
    digest = hashlib.sha256()
    for x in arrays:
        if x is None:
            digest.update(b"|none|")
            continue
        dtype, shape, data = _dtype_and_bytes(x)
        digest.update(data)
        digest.update(f"|{dtype}:{shape}|".encode())
    return digest.hexdigest()[:DIGEST_LENGTH]


def chunked_digest(chunks: Iterable[Any]) -> str:
    """``array_digest`` of the concatenation (along dim 0) of ``chunks``, one chunk in memory at a time.

    For data too large to hold at once (memory-mapped arrays digested chunk by chunk); the chunks must
    share dtype and trailing shape.
    """
    digest, rows, head = hashlib.sha256(), 0, None
    for chunk in chunks:
        dtype, shape, data = _dtype_and_bytes(chunk)
        if head is None:
            head = (dtype, shape[1:])
        elif head != (dtype, shape[1:]):
            raise ValueError(f"chunks: expected dtype {head[0]} and trailing shape {head[1]} in every chunk, "
                             f"got {dtype} {shape[1:]}")
        digest.update(data)
        rows += shape[0]
    if head is None:
        raise ValueError("chunks: expected at least one chunk, got none")
    digest.update(f"|{head[0]}:{(rows, *head[1])}|".encode())
    return digest.hexdigest()[:DIGEST_LENGTH]


def backbone_identity(backbone: "Backbone") -> str:
    """A digest of a backbone's config (architecture, schedule, normalisation) and every weight.

    Works for in-memory backbones as well as loaded checkpoints; two backbones with the same identity
    compute the same features. Fitted heads and scorers store it to refuse another backbone, so the
    computation here must not change (it would orphan every saved model).
    """
    from .config import to_dict

    digest = hashlib.sha256()
    config = to_dict(backbone.config)
    config.pop("provenance", None)  # provenance describes training, not the function computed
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(backbone.unet.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    return digest.hexdigest()[:DIGEST_LENGTH]


def json_digest(payload: Any, length: int = DIGEST_LENGTH) -> str:
    """A short SHA-256 of a JSON-able description (keys sorted; other objects by ``str``)."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def files_digest(named_files: Iterable[tuple[str, Any]]) -> str:
    """SHA-256 (hex, full length) over ``(name, path)`` pairs in the given order: each name, then the file's bytes."""
    from pathlib import Path

    digest = hashlib.sha256()
    for name, path in named_files:
        digest.update(name.encode() + b"\0" + Path(path).read_bytes())
    return digest.hexdigest()


def file_sha256(path: Any, block: int = 1 << 24) -> str:
    """The SHA-256 (hex) of one file's bytes, read ``block`` bytes at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()
