"""Pooled features computed once and reused: on disk, fp16, keyed so a stale cache is never read.

:func:`cached_pooled_features` keeps one :class:`~diffrep.features.store.FeatureStore` per timestep
(every requested node in it), holding globally average-pooled vectors (the DDAE linear-probe
features) chunk by chunk. The store's fingerprint holds a digest of the code that computes features
(``diffrep._provenance.feature_code_digest``: edit it and the cache is recomputed), the checkpoint identity (a digest of the
architecture, schedule, normalisation and every weight), the nodes, the timestep, the noise policy,
the seed, the dataset name, size and content digest, the chunk size and the storage dtype; change any
of them and a different directory is used. Each chunk is written atomically, so an interrupted fill
keeps every finished chunk and the next call computes only the missing ones.

``count`` asks for the first ``count`` images only and computes only the chunks they need; a later
call with a larger ``count`` (or none) continues from there. Put the images you need first in the
order (e.g. validation, then a grid-search subset, then the rest) to search on a subset and reuse the
same cache for the full run.
"""
from __future__ import annotations

import os
from typing import Any, Iterable

import numpy as np
import torch

from .._provenance import feature_code_digest
from .._types import FeatureKey
from ..backbones.backbone import Backbone
from ..digests import array_digest, backbone_identity  # backbone_identity: also imported from here
from ..errors import as_dtype, check_positive_int, dtype_name
from .aggregate import check_pool_grid, pool_map
from .extractor import FeatureExtractor
from .noise_policy import NoisePolicy
from .store import FeatureStore

CACHE_FORMAT = 1
DEFAULT_CACHE_DIR = ".cache/features"
_DTYPES = ("float16", "float32")  # the storage dtypes of a pooled cache


def _extract_pooled(extractor: FeatureExtractor, images: torch.Tensor, grid: int = 1) -> dict[FeatureKey, torch.Tensor]:
    """Pooled features of one chunk of images: {FeatureKey: (n, C * grid**dims) float32}."""
    features = extractor(images)
    return {key: pool_map(value, grid) for key, value in features.items()}


def pooled_store(backbone: Backbone, images: torch.Tensor, nodes: list[str], timestep: int, *, noise: str,
                 seed: int, cache_dir: str | os.PathLike, dataset_id: str, chunk_size: int,
                 dtype: str | torch.dtype, identity: str | None = None, digest: str | None = None,
                 pool_grid: int = 1) -> FeatureStore:
    """The FeatureStore holding pooled features of ``images`` at one timestep (created if absent)."""
    fingerprint = {
        "kind": "pooled-gap" if check_pool_grid(pool_grid) == 1 else f"pooled-grid{pool_grid}", "format": CACHE_FORMAT,
        "code": feature_code_digest(),
        "checkpoint": identity or backbone_identity(backbone),
        "nodes": list(nodes), "timestep": int(timestep), "noise": str(NoisePolicy.parse(noise)), "seed": int(seed),
        "dataset": str(dataset_id), "num_images": int(images.shape[0]),
        "images": digest or array_digest(images), "chunk_size": int(chunk_size), "dtype": dtype_name(dtype),
    }
    return FeatureStore(cache_dir, fingerprint)


def cached_pooled_features(backbone: Backbone, images: Any, nodes: Iterable[str] | None = None,
                           timesteps: Iterable[int] | int = (11,), *, noise: str = "shared", seed: int = 0,
                           cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR, dataset_id: str = "unnamed",
                           count: int | None = None, chunk_size: int = 1000, batch_size: int = 64,
                           dtype: str | torch.dtype = "float16", progress: bool = True,
                           pool_grid: int = 1) -> dict[FeatureKey, np.ndarray]:
    """Pooled features ``{FeatureKey(node, t): (count, C) array}`` of the first ``count`` images, via the cache.

    Args:
        backbone: the U-Net (a loaded checkpoint or an in-memory model; both are identified by weights).
        images: (N, C, H, W) float images in the backbone's data range; N fixes the cache key.
        nodes: node names (default: every node of the backbone).
        timesteps: one or more timesteps; each gets its own store.
        noise, seed: the extraction noise policy and its seed (see FeatureExtractor).
        cache_dir: root of all stores.
        dataset_id: a readable name for the data (its content digest is part of the key anyway).
        count: return (and compute) only the first ``count`` images (default: all).
        chunk_size: images per stored chunk (the unit of resumption).
        batch_size: images per U-Net forward (one timestep each, see FeatureExtractor).
        dtype: float16 (default; halves disk and memory) or float32, a torch dtype or its name.
        progress: tqdm bars per timestep.
        pool_grid: 1 = global average pooling (C values per node); g = a g x g average grid
            (C * g**2 values, channel-major); part of the cache key.

    The arrays are returned in ``dtype``; cast to float32 before fitting (``stack_features`` does).
    """
    images = backbone.check_images(images)
    nodes = backbone.check_nodes(backbone.node_names if nodes is None else nodes)
    if len(set(nodes)) != len(nodes):
        raise ValueError(f"nodes: expected distinct names, got {nodes}")
    timesteps = backbone.check_timesteps(timesteps)
    NoisePolicy.parse(noise)
    check_pool_grid(pool_grid, *backbone.max_pool_grid(nodes, tuple(images.shape[2:])))
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    check_positive_int(batch_size, "batch_size")
    dtype = dtype_name(as_dtype(dtype, allowed=_DTYPES))  # the name is part of the cache key
    n = images.shape[0]
    count = n if count is None else check_positive_int(count, "count")
    if count > n:
        raise ValueError(f"count: expected at most the {n} images given, got {count}")
    num_chunks = -(-count // chunk_size)
    identity, digest = backbone_identity(backbone), array_digest(images)
    out: dict[FeatureKey, np.ndarray] = {}
    for t in timesteps:
        store = pooled_store(backbone, images, nodes, t, noise=noise, seed=seed, cache_dir=cache_dir,
                             dataset_id=dataset_id, chunk_size=chunk_size, dtype=dtype,
                             identity=identity, digest=digest, pool_grid=pool_grid)
        extractor = FeatureExtractor(backbone, nodes, [t], noise=noise, seed=seed, batch_size=batch_size,
                                     dtype=torch.float32)
        pooled = _fill_pooled_store(store, extractor, images, num_chunks, chunk_size, dtype, pool_grid, progress)
        for node in nodes:
            out[FeatureKey(node, t)] = pooled[node][:count].numpy()
    return out


def _fill_pooled_store(store: FeatureStore, extractor: FeatureExtractor, images: torch.Tensor, num_chunks: int,
                       chunk_size: int, dtype: str, pool_grid: int, progress: bool) -> dict[str, torch.Tensor]:
    """Compute the missing chunks of ``store`` (one timestep) and return ``{node: pooled rows of every chunk}``."""
    t = extractor.timesteps[0]

    def compute(i: int) -> dict[str, torch.Tensor]:
        pooled = _extract_pooled(extractor, images[i * chunk_size:(i + 1) * chunk_size], pool_grid)
        return {key.node: value.to(as_dtype(dtype)) for key, value in pooled.items()}

    missing = sum(not store.has(i) for i in range(num_chunks))
    bar = None
    if progress and missing:
        from tqdm.auto import tqdm

        bar = lambda it: tqdm(it, total=missing, desc=f"features t={t}", unit="chunk", leave=False)  # noqa: E731
    store.fill(num_chunks, compute, progress=bar)
    chunks = [store.read(i) for i in range(num_chunks)]
    return {node: torch.cat([c[node] for c in chunks]) for node in extractor.nodes}
