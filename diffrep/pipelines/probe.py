"""The linear-probe pipeline: a probe on pooled diffusion features, node x timestep chosen on validation.

The protocol (after DDAE, Xiang et al. ICCV 2023, with the search done honestly):

1. carve a stratified validation split from the *training* data;
2. compute pooled features of every node at every timestep for the validation split and a
   grid-search subset of the fit part (cached on disk, see :mod:`diffrep.features.cache`);
3. score every (node, t) and a few concatenations on the validation split
   (:func:`~diffrep.heads.select_node_timestep`);
4. refit the chosen single key and the chosen concatenation on the full training set (fit +
   validation with full labels; only the K-per-class subset with ``labels_per_class``) and report
   their test accuracy. No other candidate ever sees the test set.

:func:`run_probe` is the library call behind ``diffrep probe`` (:mod:`diffrep.cli.probe`) and the
classification benchmarks; :func:`load_probe_dataset` gives them the images.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from sklearn.base import clone

from .._types import FeatureKey
from ..backbones.backbone import Backbone
from ..features.aggregate import check_pool_grid
from ..digests import backbone_identity
from ..features.cache import DEFAULT_CACHE_DIR, cached_pooled_features
from ..heads.linear_probe import LinearProbe
from ..heads.selection import (
    SelectionResult, carve_validation, default_concatenations, key_name, sample_per_class, select_node_timestep,
    stack_features,
)

DEFAULT_TIMESTEPS = (1, 11, 50, 150, 300)
DATASETS = ("fmnist",)


@dataclass
class ProbeRun:
    """Everything a probe run produced; ``report`` is the JSON-ready summary.

    ``order`` is the permutation of the training set used for the cache (validation first, then the
    grid-search subset, then the rest); ``features_train[key][position[i]]`` is training image i.
    ``features_train`` and ``features_test`` hold every node at the chosen timesteps.
    """

    selection: SelectionResult
    report: dict
    order: np.ndarray
    position: np.ndarray
    fit_idx: np.ndarray
    val_idx: np.ndarray
    train_idx: np.ndarray
    features_train: dict[FeatureKey, np.ndarray] = field(repr=False)
    features_test: dict[FeatureKey, np.ndarray] = field(repr=False)


def _choice_row(keys: tuple[FeatureKey, ...], backbone: Backbone) -> dict:
    return {"key": key_name(keys), "nodes": [k.node for k in keys], "timesteps": [k.timestep for k in keys],
            "noise_levels": [round(backbone.noise_level(k.timestep), 6) for k in keys]}


def run_probe(backbone: Backbone, train_images: torch.Tensor, train_labels: Any, test_images: torch.Tensor,
              test_labels: Any, *, nodes: Sequence[str] | None = None, timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
              noise: str = "shared", seed: int = 0, val_fraction: float = 0.1, labels_per_class: int | None = None,
              grid_fit: int | None = 10000, concat: bool = True, cache_dir: str = DEFAULT_CACHE_DIR,
              dataset_id: str = "data", chunk_size: int = 1000, batch_size: int = 64, probe: Any = None,
              progress: bool = True, pool_grid: int = 1) -> ProbeRun:
    """Select (node, t) on a validation split carved from the training data, then score the choice on test.

    Args:
        backbone: the frozen U-Net.
        train_images, test_images: (N, C, H, W) float images in the backbone's data range.
        train_labels, test_labels: integer class labels.
        nodes, timesteps: the search grid (default: every node; ``DEFAULT_TIMESTEPS``).
        noise, seed: extraction noise policy and seed; ``seed`` also seeds the validation split and
            the labelled subset.
        val_fraction: share of the training data carved out for validation (stratified).
        labels_per_class: train the probe on only K labelled images per class of the fit part.
        grid_fit: fit-part images used to score the grid (None: all); the chosen keys are refitted
            on the whole training set afterwards. Ignored with ``labels_per_class``.
        concat: also score concatenations (``default_concatenations``).
        probe: an unfitted classifier (default ``LinearProbe()``).
        pool_grid: 1 = global average pooling (DDAE); g = a g x g average grid per node.
    """
    y, y_test, train_images, test_images = _check_probe_inputs(backbone, train_images, train_labels, test_images,
                                                               test_labels)
    nodes = backbone.check_nodes(backbone.node_names if nodes is None else nodes)
    timesteps = list(dict.fromkeys(backbone.check_timesteps(timesteps)))
    check_pool_grid(pool_grid, *backbone.max_pool_grid(nodes, tuple(train_images.shape[2:])))
    probe = LinearProbe() if probe is None else probe
    started = time.perf_counter()
    split = _split_training_set(y, val_fraction, seed, labels_per_class, grid_fit)
    ordered = train_images[torch.from_numpy(split.order)]
    common = dict(noise=noise, seed=seed, cache_dir=cache_dir, chunk_size=chunk_size, batch_size=batch_size,
                  progress=progress, pool_grid=pool_grid)
    train_id = f"{dataset_id}/train(order: val={val_fraction}, seed={seed})"
    selection = _select_on_validation(backbone, ordered, y, split, nodes, timesteps, probe, concat,
                                      dict(common, dataset_id=train_id))

    chosen = {"single": selection.best_single}
    if selection.best_concat is not None:
        chosen["concat"] = selection.best_concat
    chosen_t = sorted({k.timestep for keys in chosen.values() for k in keys})
    needed = int(split.position[split.final_idx].max()) + 1
    features_train = cached_pooled_features(backbone, ordered, nodes, chosen_t, count=needed,
                                            dataset_id=train_id, **common)
    features_test = cached_pooled_features(backbone, test_images, nodes, chosen_t,
                                           dataset_id=f"{dataset_id}/test", **common)
    choices = _score_choices(backbone, chosen, selection, probe, features_train, features_test,
                             split.position[split.final_idx], y[split.final_idx], y_test)
    best_kind = "concat" if "concat" in chosen and selection.best == chosen["concat"] else "single"
    report = _probe_report(backbone, selection, probe, choices, best_kind, nodes=nodes, timesteps=timesteps,
                           split=split, n_test=int(y_test.size), noise=noise, seed=seed, pool_grid=pool_grid,
                           val_fraction=val_fraction, labels_per_class=labels_per_class, started=started)
    return ProbeRun(selection=selection, report=report, order=split.order, position=split.position,
                    fit_idx=split.fit_idx, val_idx=split.val_idx, train_idx=split.final_idx,
                    features_train=features_train, features_test=features_test)


def _select_on_validation(backbone: Backbone, ordered: torch.Tensor, y: np.ndarray, split: "_Split",
                          nodes: Sequence[str], timesteps: Sequence[int], probe: Any, concat: bool,
                          cache_args: dict[str, Any]) -> SelectionResult:
    """Score the (node, t) grid on the grid-fit part of the ordered training images against their validation part."""
    n_val, n_grid = split.val_idx.size, split.grid_idx.size
    grid = cached_pooled_features(backbone, ordered, nodes, timesteps, count=n_val + n_grid, **cache_args)
    return select_node_timestep(
        {k: v[n_val:] for k, v in grid.items()}, y[split.grid_idx], {k: v[:n_val] for k, v in grid.items()},
        y[split.val_idx], concat_candidates=default_concatenations if concat else (), probe=probe,
        noise_levels={t: backbone.noise_level(t) for t in timesteps}, progress=cache_args["progress"])


def _check_probe_inputs(backbone: Backbone, train_images: torch.Tensor, train_labels: Any, test_images: torch.Tensor,
                        test_labels: Any) -> tuple[np.ndarray, np.ndarray, torch.Tensor, torch.Tensor]:
    """Labels as arrays and checked images; one label per image, or a ValueError saying what came instead."""
    y = np.asarray(train_labels)
    y_test = np.asarray(test_labels)
    train_images = backbone.check_images(train_images, "train_images")
    test_images = backbone.check_images(test_images, "test_images")
    if y.shape != (train_images.shape[0],) or y_test.shape != (test_images.shape[0],):
        raise ValueError(f"labels: expected one label per image, got {y.shape} for {train_images.shape[0]} train "
                         f"and {y_test.shape} for {test_images.shape[0]} test images")
    return y, y_test, train_images, test_images


@dataclass
class _Split:
    """How run_probe divides the training set (indices into it) and the cache order built from that."""

    fit_idx: np.ndarray
    val_idx: np.ndarray
    grid_idx: np.ndarray
    final_idx: np.ndarray
    order: np.ndarray
    position: np.ndarray


def _split_training_set(y: np.ndarray, val_fraction: float, seed: int, labels_per_class: int | None,
                        grid_fit: int | None) -> _Split:
    """Stratified validation split, grid-search subset and refit set; ``order`` puts validation first, then
    the grid subset, then the rest (so the cache's first rows serve the grid search)."""
    n = y.shape[0]
    fit_idx, val_idx = carve_validation(n, val_fraction, seed, stratify=y)
    rng = np.random.default_rng(seed)
    if labels_per_class is not None:
        train_idx = fit_idx[sample_per_class(y[fit_idx], labels_per_class, seed)]
        grid_idx = train_idx
        final_idx = train_idx  # the labelled budget: validation labels only choose (node, t)
    else:
        shuffled = rng.permutation(fit_idx)
        grid_idx = shuffled if grid_fit is None else shuffled[:min(int(grid_fit), shuffled.size)]
        final_idx = np.concatenate([val_idx, fit_idx])  # refit on all labelled training data (fit + validation)
    rest = np.setdiff1d(np.arange(n), np.concatenate([val_idx, grid_idx]), assume_unique=True)
    order = np.concatenate([val_idx, grid_idx, rng.permutation(rest)])
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    return _Split(fit_idx, val_idx, grid_idx, final_idx, order, position)


def _score_choices(backbone: Backbone, chosen: dict[str, tuple[FeatureKey, ...]], selection: SelectionResult,
                   probe: Any, features_train: dict, features_test: dict, rows: np.ndarray, y_final: np.ndarray,
                   y_test: np.ndarray) -> dict[str, dict]:
    """Refit each chosen key set on the final training rows and score it on the test set (the only test use)."""
    choices = {}
    for kind, keys in chosen.items():
        model = clone(probe).fit(stack_features(features_train, keys, rows=rows), y_final)
        choices[kind] = {**_choice_row(keys, backbone), "dim": int(model.n_features_in_),
                         "val_acc": selection.best_single_val_acc if kind == "single" else selection.best_concat_val_acc,
                         "test_acc": float(model.score(stack_features(features_test, keys), y_test))}
    return choices


def _probe_report(backbone: Backbone, selection: SelectionResult, probe: Any, choices: dict[str, dict], best_kind: str,
                  *, nodes: list[str], timesteps: list[int], split: _Split, n_test: int, noise: str, seed: int,
                  pool_grid: int, val_fraction: float, labels_per_class: int | None, started: float) -> dict:
    """The JSON-ready summary of a probe run (``ProbeRun.report``)."""
    return {
        "backbone_identity": backbone_identity(backbone),
        "grid": {"nodes": nodes, "timesteps": timesteps,
                 "noise_levels": {str(t): round(backbone.noise_level(t), 6) for t in timesteps}},
        "noise": noise, "seed": seed, "pool_grid": pool_grid, "val_fraction": val_fraction, "labels_per_class": labels_per_class,
        "n_train": int(split.final_idx.size), "n_val": int(split.val_idx.size), "n_grid_fit": int(split.grid_idx.size),
        "n_test": n_test,
        "probe": {"class": type(probe).__name__, **probe.get_params()},
        "selection_table": selection.table,
        "choices": choices,
        "best": best_kind, "test_acc": choices[best_kind]["test_acc"],
        "notes": ("(node, t) and the concatenation are chosen on the validation split carved from the "
                  "training data; only the chosen ones are scored on the test set."
                  + (" With labels_per_class, the validation split's labels are used for that choice."
                     if labels_per_class is not None else "")),
        "seconds": round(time.perf_counter() - started, 1),
    }


def load_probe_dataset(name: str, backbone: Backbone, limit_train: int | None = None,
                       limit_test: int | None = None) -> tuple[torch.Tensor, np.ndarray, torch.Tensor, np.ndarray, dict]:
    """Train and test images in the backbone's data range (zero-padded to a size it accepts) and labels."""
    if name != "fmnist":
        raise ValueError(f"dataset: expected one of {list(DATASETS)}, got {name!r}")
    from ..data.fashion_mnist import load_fashion_mnist, to_tensor_images

    size = probe_image_size(name, backbone)
    xtr, ytr = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    if limit_train is not None:
        xtr, ytr = xtr[:limit_train], ytr[:limit_train]
    if limit_test is not None:
        xte, yte = xte[:limit_test], yte[:limit_test]
    pad = None if size == 28 else size
    to_range = lambda x: backbone.to_data_range(to_tensor_images(x, pad_to=pad) * 2 - 1)  # noqa: E731
    info = {"dataset": "fashion-mnist", "n_train": int(ytr.size), "n_test": int(yte.size), "image_size": size,
            "padding": "none" if pad is None else f"zero-pad 28 -> {pad}"}
    return to_range(xtr), ytr, to_range(xte), yte, info


def probe_image_size(name: str, backbone: Backbone) -> int:
    """The side of the (square) images ``load_probe_dataset`` gives ``backbone``: 28, zero-padded to its size multiple."""
    if name != "fmnist":
        raise ValueError(f"dataset: expected one of {list(DATASETS)}, got {name!r}")
    multiple = backbone.config.unet.size_multiple
    return math.ceil(28 / multiple) * multiple
