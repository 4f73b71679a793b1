"""Noise seeds in the probe benchmarks: the chosen keys under other extraction-noise draws, and the spread.

A benchmark's result depends on two kinds of randomness: which images are labelled (label seeds) and
which noise the extractor draws (noise seeds). The selection of (node, t) is done once, with the run's
``--seed``; the chosen keys are then re-extracted under every noise seed and every row is reported as
mean +- std over (label seed x noise seed), with the std split into its two parts (as the anomaly
benchmark does for lesion seeds x noise seeds).
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
import torch

from diffrep._types import FeatureKey
from diffrep.backbones import Backbone
from diffrep.features.cache import cached_pooled_features

Features = dict[FeatureKey, np.ndarray]


def chosen_keys(*key_sets: Iterable[FeatureKey] | None) -> list[FeatureKey]:
    """The distinct keys of several chosen key sets, in first-seen order."""
    return list(dict.fromkeys(k for keys in key_sets if keys is not None for k in keys))


def features_at_noise_seed(backbone: Backbone, keys: Sequence[FeatureKey], train_images: torch.Tensor,
                           test_images: torch.Tensor, noise_seed: int, *, count: int, dataset_id: str,
                           **cache_args: Any) -> tuple[Features, Features]:
    """Pooled features of ``keys`` (train: the first ``count`` images, test: all) with noise seed ``noise_seed``.

    ``train_images`` must be in the order the run's cache used (``run.order``), so that the run's
    ``position`` indexes these rows too. Cached like every pooled feature (the seed is in the key).
    """
    nodes = list(dict.fromkeys(k.node for k in keys))
    timesteps = sorted({k.timestep for k in keys})
    common = dict(cache_args, seed=int(noise_seed))
    train = cached_pooled_features(backbone, train_images, nodes, timesteps, count=count,
                                   dataset_id=f"{dataset_id}/train(order of the selection run)", **common)
    test = cached_pooled_features(backbone, test_images, nodes, timesteps, dataset_id=f"{dataset_id}/test", **common)
    return ({k: train[k] for k in keys}, {k: test[k] for k in keys})


def spread_parts(values: dict[tuple[int, int | None], float]) -> dict[str, float | None]:
    """The two parts of the spread of values keyed by (label seed, noise seed).

    ``label_seeds``: std over label seeds of the per-label-seed means (over noise seeds);
    ``noise_seeds``: mean over label seeds of the std over noise seeds (None when there is one noise seed
    or none, e.g. raw pixels).
    """
    by_label: dict[int, list[float]] = {}
    for (label_seed, _), value in values.items():
        by_label.setdefault(label_seed, []).append(float(value))
    means = [float(np.mean(v)) for v in by_label.values()]
    noise = [float(np.std(v, ddof=1)) for v in by_label.values() if len(v) > 1]
    return {"label_seeds": float(np.std(means, ddof=1)) if len(means) > 1 else 0.0,
            "noise_seeds": float(np.mean(noise)) if noise else None}


def seed_stats(values: dict[tuple[int, int | None], float]) -> dict[str, Any]:
    """Mean, sample std, every value with its (label seed, noise seed), and the spread's two parts."""
    if not values:
        raise ValueError("seed_stats: expected at least one value")
    flat = [float(v) for v in values.values()]
    return {"mean": float(np.mean(flat)), "std": float(np.std(flat, ddof=1)) if len(flat) > 1 else 0.0,
            "n": len(flat), "values": flat,
            "pairs": [{"label_seed": ls, "noise_seed": ns, "value": float(v)} for (ls, ns), v in values.items()],
            "spread": spread_parts(values)}
