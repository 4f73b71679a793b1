"""``diffrep probe``: a linear probe on pooled diffusion features, node x timestep chosen on validation.

The protocol (after DDAE, Xiang et al. ICCV 2023, with the search done honestly):

1. carve a stratified validation split from the *training* data;
2. compute pooled features of every node at every timestep for the validation split and a
   grid-search subset of the fit part (cached on disk, see :mod:`diffrep.features.cache`);
3. score every (node, t) and a few concatenations on the validation split
   (:func:`~diffrep.heads.select_node_timestep`);
4. refit the chosen single key and the chosen concatenation on the full training set (fit +
   validation with full labels; only the K-per-class subset with ``labels_per_class``) and report
   their test accuracy. No other candidate ever sees the test set.

:func:`run_probe` is the library call behind the command and the classification benchmark.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from sklearn.base import clone

from ._types import FeatureKey
from .backbones.backbone import Backbone
from .features.aggregate import check_pool_grid
from .features.cache import DEFAULT_CACHE_DIR, backbone_identity, cached_pooled_features
from .features.noise_policy import NoisePolicy
from .heads.linear_probe import LinearProbe
from .heads.selection import (
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
    y = np.asarray(train_labels)
    y_test = np.asarray(test_labels)
    train_images = backbone.check_images(train_images, "train_images")
    test_images = backbone.check_images(test_images, "test_images")
    if y.shape != (train_images.shape[0],) or y_test.shape != (test_images.shape[0],):
        raise ValueError(f"labels: expected one label per image, got {y.shape} for {train_images.shape[0]} train "
                         f"and {y_test.shape} for {test_images.shape[0]} test images")
    nodes = backbone.check_nodes(backbone.node_names if nodes is None else nodes)
    timesteps = list(dict.fromkeys(backbone.check_timesteps(timesteps)))
    check_pool_grid(pool_grid, *backbone.max_pool_grid(nodes, tuple(train_images.shape[2:])))
    probe = LinearProbe() if probe is None else probe
    started = time.perf_counter()
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
        train_idx = np.concatenate([val_idx, fit_idx])
        final_idx = train_idx  # refit on all labelled training data (fit + validation)
    rest = np.setdiff1d(np.arange(n), np.concatenate([val_idx, grid_idx]), assume_unique=True)
    order = np.concatenate([val_idx, grid_idx, rng.permutation(rest)])
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    ordered = train_images[torch.from_numpy(order)]
    n_val, n_grid = val_idx.size, grid_idx.size
    common = dict(noise=noise, seed=seed, cache_dir=cache_dir, chunk_size=chunk_size, batch_size=batch_size,
                  progress=progress, pool_grid=pool_grid)
    train_id = f"{dataset_id}/train(order: val={val_fraction}, seed={seed})"

    grid = cached_pooled_features(backbone, ordered, nodes, timesteps, count=n_val + n_grid,
                                  dataset_id=train_id, **common)
    selection = select_node_timestep(
        {k: v[n_val:] for k, v in grid.items()}, y[grid_idx], {k: v[:n_val] for k, v in grid.items()}, y[val_idx],
        concat_candidates=default_concatenations if concat else (), probe=probe,
        noise_levels={t: backbone.noise_level(t) for t in timesteps}, progress=progress)
    del grid

    chosen = {"single": selection.best_single}
    if selection.best_concat is not None:
        chosen["concat"] = selection.best_concat
    chosen_t = sorted({k.timestep for keys in chosen.values() for k in keys})
    needed = int(position[final_idx].max()) + 1
    features_train = cached_pooled_features(backbone, ordered, nodes, chosen_t, count=needed,
                                            dataset_id=train_id, **common)
    features_test = cached_pooled_features(backbone, test_images, nodes, chosen_t,
                                           dataset_id=f"{dataset_id}/test", **common)
    choices = {}
    for kind, keys in chosen.items():
        model = clone(probe).fit(stack_features(features_train, keys, rows=position[final_idx]), y[final_idx])
        choices[kind] = {**_choice_row(keys, backbone), "dim": int(model.n_features_in_),
                         "val_acc": selection.best_single_val_acc if kind == "single" else selection.best_concat_val_acc,
                         "test_acc": float(model.score(stack_features(features_test, keys), y_test))}
    best_kind = "concat" if "concat" in chosen and selection.best == chosen["concat"] else "single"
    report = {
        "backbone_identity": backbone_identity(backbone),
        "grid": {"nodes": nodes, "timesteps": timesteps,
                 "noise_levels": {str(t): round(backbone.noise_level(t), 6) for t in timesteps}},
        "noise": noise, "seed": seed, "pool_grid": pool_grid, "val_fraction": val_fraction, "labels_per_class": labels_per_class,
        "n_train": int(final_idx.size), "n_val": int(n_val), "n_grid_fit": int(n_grid), "n_test": int(y_test.size),
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
    return ProbeRun(selection=selection, report=report, order=order, position=position, fit_idx=fit_idx,
                    val_idx=val_idx, train_idx=final_idx, features_train=features_train, features_test=features_test)


def load_probe_dataset(name: str, backbone: Backbone, limit_train: int | None = None,
                       limit_test: int | None = None) -> tuple[torch.Tensor, np.ndarray, torch.Tensor, np.ndarray, dict]:
    """Train and test images in the backbone's data range (zero-padded to a size it accepts) and labels."""
    if name != "fmnist":
        raise ValueError(f"dataset: expected one of {list(DATASETS)}, got {name!r}")
    from .data.fashion_mnist import load_fashion_mnist, to_tensor_images

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


def _check_probe_args(args: argparse.Namespace, backbone: Backbone) -> None:
    """Refuse bad options before any data is loaded or feature computed (errors name the option)."""
    nodes = backbone.check_nodes(backbone.node_names if args.nodes is None else args.nodes)
    backbone.check_timesteps(args.timesteps)
    NoisePolicy.parse(args.noise)
    size = probe_image_size(args.dataset, backbone)
    bound, reason = backbone.max_pool_grid(nodes, (size, size))
    check_pool_grid(args.pool_grid, bound, where=f"--pool-grid: {reason}")
    for option in ("batch_size", "chunk_size", "grid_fit", "limit_train", "limit_test", "labels_per_class", "max_iter"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise ValueError(f"--{option.replace('_', '-')}: expected a positive integer, got {value}")
    if not 0 < args.val_fraction < 1:
        raise ValueError(f"--val-fraction: expected a number in (0, 1), got {args.val_fraction}")
    if Path(args.cache_dir).exists() and not Path(args.cache_dir).is_dir():
        raise ValueError(f"--cache-dir: {args.cache_dir} is an existing file; expected a directory")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out: {args.out} is an existing file; expected a directory")


def _cmd_probe(args: argparse.Namespace) -> int:
    from .backbones import load_backbone

    if args.threads:
        torch.set_num_threads(args.threads)
    backbone = load_backbone(args.backbone)
    _check_probe_args(args, backbone)
    xtr, ytr, xte, yte, data_info = load_probe_dataset(args.dataset, backbone, args.limit_train, args.limit_test)
    run = run_probe(backbone, xtr, ytr, xte, yte, nodes=args.nodes, timesteps=args.timesteps, noise=args.noise,
                    seed=args.seed, val_fraction=args.val_fraction, labels_per_class=args.labels_per_class,
                    grid_fit=args.grid_fit, concat=not args.no_concat, cache_dir=args.cache_dir,
                    dataset_id=f"{args.dataset}:{data_info['n_train']}/{data_info['n_test']}",
                    chunk_size=args.chunk_size, batch_size=args.batch_size,
                    probe=LinearProbe(C=args.C, max_iter=args.max_iter), progress=not args.quiet,
                    pool_grid=args.pool_grid)
    report = {"backbone": str(args.backbone), "data": data_info, **run.report}
    print(f"{'key':<28} {'dim':>5} {'val_acc':>8}")
    for row in sorted(run.report["selection_table"], key=lambda r: -r["val_acc"])[:10]:
        print(f"{row['key']:<28} {row['dim']:>5} {row['val_acc']:>8.4f}")
    for kind, choice in run.report["choices"].items():
        print(f"chosen {kind}: {choice['key']} (noise level {choice['noise_levels']}) "
              f"val {choice['val_acc']:.4f} test {choice['test_acc']:.4f}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        suffix = f"_k{args.labels_per_class}" if args.labels_per_class else ""
        path = out / f"probe_{args.dataset}{suffix}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(path)
        print(f"wrote {path}")
    return 0


def add_probe_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``diffrep probe`` on an ``add_subparsers()`` object."""
    p = subparsers.add_parser("probe", help="linear probe on pooled diffusion features (node x timestep chosen on validation)")
    p.add_argument("--backbone", required=True, help="checkpoint directory or shipped default name")
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--labels-per-class", type=int, default=None, help="train the probe on K labelled images per class")
    p.add_argument("--out", default=None, help="directory for probe_<dataset>.json")
    p.add_argument("--nodes", nargs="+", default=None, help="nodes to search (default: all)")
    p.add_argument("--timesteps", nargs="+", type=int, default=list(DEFAULT_TIMESTEPS))
    p.add_argument("--noise", default="shared")
    p.add_argument("--pool-grid", type=int, default=1,
                   help="average-pool each node to a G x G grid (1 = global average pooling)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--grid-fit", type=int, default=10000, help="fit-part images used to score the grid")
    p.add_argument("--no-concat", action="store_true", help="score single (node, t) keys only")
    p.add_argument("--C", type=float, default=1.0, help="inverse L2 strength of the logistic regression")
    p.add_argument("--max-iter", type=int, default=1000)
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR)
    p.add_argument("--chunk-size", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--limit-train", type=int, default=None, help="use only the first N training images")
    p.add_argument("--limit-test", type=int, default=None, help="use only the first N test images")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_probe)
    return p
