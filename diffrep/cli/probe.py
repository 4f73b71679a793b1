"""``diffrep probe``: a linear probe on pooled diffusion features (library: :mod:`diffrep.pipelines.probe`)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .options import add_threads_option, apply_threads

# The datasets load_probe_dataset knows, spelled here so that building the parser imports no torch;
# a test checks that this equals diffrep.pipelines.probe.DATASETS.
DATASETS = ("fmnist",)


def _check_probe_args(args: argparse.Namespace, backbone: Any, image_size: int | None = None) -> None:
    """Refuse bad options before any data is loaded or feature computed (errors name the option)."""
    from ..errors import check_positive_int
    from ..features.aggregate import check_pool_grid
    from ..features.noise_policy import NoisePolicy
    from ..pipelines.probe import probe_image_size

    if (args.dataset is None) == (args.train_dir is None):
        raise ValueError("probe: expected either --dataset or --train-dir (an ImageFolder tree), not both or neither")
    if args.test_dir is not None and args.train_dir is None:
        raise ValueError("--test-dir: expected it together with --train-dir")
    nodes = backbone.check_nodes(backbone.node_names if args.nodes is None else args.nodes)
    backbone.check_timesteps(args.timesteps)
    NoisePolicy.parse(args.noise)
    size = probe_image_size(args.dataset, backbone) if args.dataset else image_size
    if size is not None:
        bound, reason = backbone.max_pool_grid(nodes, (size, size))
        check_pool_grid(args.pool_grid, bound, where=f"--pool-grid: {reason}")
    for option in ("batch_size", "chunk_size", "grid_fit", "limit_train", "limit_test", "labels_per_class", "max_iter"):
        if getattr(args, option) is not None:
            check_positive_int(getattr(args, option), f"--{option.replace('_', '-')}")
    if not 0 < args.val_fraction < 1:
        raise ValueError(f"--val-fraction: expected a number in (0, 1), got {args.val_fraction}")
    if Path(args.cache_dir).exists() and not Path(args.cache_dir).is_dir():
        raise ValueError(f"--cache-dir: {args.cache_dir} is an existing file; expected a directory")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out: {args.out} is an existing file; expected a directory")


def _print_run(report: dict) -> None:
    """The ten best validation rows and the chosen keys' validation and test accuracy."""
    print(f"{'key':<28} {'dim':>5} {'val_acc':>8}")
    for row in sorted(report["selection_table"], key=lambda r: -r["val_acc"])[:10]:
        print(f"{row['key']:<28} {row['dim']:>5} {row['val_acc']:>8.4f}")
    for kind, choice in report["choices"].items():
        print(f"chosen {kind}: {choice['key']} (noise level {choice['noise_levels']}) "
              f"val {choice['val_acc']:.4f} test {choice['test_acc']:.4f}")


def _dataset_id(args: argparse.Namespace, info: dict) -> str:
    """What keys the pooled-feature cache: the dataset and its sizes, or the folder's digest and split."""
    if args.train_dir is None:
        return f"{args.dataset}:{info['n_train']}/{info['n_test']}"
    test = info["test"]["files_sha256"] if isinstance(info["test"], dict) else info["test"]
    return f"folder:{info['train']['files_sha256']}:{info['n_train']}/{info['n_test']}:{test}"


def _cmd_probe(args: argparse.Namespace) -> int:
    from .._atomic import atomic_write_json
    from ..backbones import load_backbone
    from ..features.cache import DEFAULT_CACHE_DIR
    from ..heads.linear_probe import LinearProbe
    from ..pipelines.probe import DEFAULT_TIMESTEPS, load_probe_dataset, run_probe

    args.timesteps = list(DEFAULT_TIMESTEPS) if args.timesteps is None else args.timesteps
    args.cache_dir = DEFAULT_CACHE_DIR if args.cache_dir is None else args.cache_dir
    from ..devices import resolve_device

    apply_threads(args)
    backbone = load_backbone(args.backbone, device=resolve_device(args.device))
    if args.train_dir is None:
        _check_probe_args(args, backbone)
        xtr, ytr, xte, yte, data_info = load_probe_dataset(args.dataset, backbone, args.limit_train, args.limit_test)
    else:
        from ..pipelines.probe_folders import load_probe_folders

        _check_probe_args(args, backbone, image_size=None)  # everything but the pool grid, before reading images
        xtr, ytr, xte, yte, data_info = load_probe_folders(backbone, args.train_dir, args.test_dir, args.test_fraction,
                                                           seed=args.seed)
        _check_probe_args(args, backbone, image_size=int(xtr.shape[-1]))
    name = args.dataset or "folder"
    run = run_probe(backbone, xtr, ytr, xte, yte, nodes=args.nodes, timesteps=args.timesteps, noise=args.noise,
                    seed=args.seed, val_fraction=args.val_fraction, labels_per_class=args.labels_per_class,
                    grid_fit=args.grid_fit, concat=not args.no_concat, cache_dir=args.cache_dir,
                    dataset_id=_dataset_id(args, data_info),
                    chunk_size=args.chunk_size, batch_size=args.batch_size,
                    probe=LinearProbe(C=args.C, max_iter=args.max_iter), progress=not args.quiet,
                    pool_grid=args.pool_grid)
    _print_run(run.report)
    if args.out:
        suffix = f"_k{args.labels_per_class}" if args.labels_per_class else ""
        path = Path(args.out) / f"probe_{name}{suffix}.json"
        report = {"backbone": str(args.backbone), "data": data_info, **run.report}
        atomic_write_json(path, report)
        print(f"wrote {path}")
    return 0


def add_probe_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``diffrep probe`` on an ``add_subparsers()`` object."""
    p = subparsers.add_parser("probe", help="linear probe on pooled diffusion features (node x timestep chosen on validation)")
    p.add_argument("--backbone", required=True, help="checkpoint directory or shipped default name")
    p.add_argument("--dataset", default=None, choices=DATASETS, help="a built-in dataset (or give --train-dir)")
    p.add_argument("--train-dir", default=None, help="your labelled images: an ImageFolder tree root/<class>/<image>")
    p.add_argument("--test-dir", default=None, help="test images, an ImageFolder tree (default: --test-fraction of --train-dir)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="stratified test share of --train-dir without --test-dir")
    p.add_argument("--labels-per-class", type=int, default=None, help="train the probe on K labelled images per class")
    p.add_argument("--out", default=None, help="directory for probe_<dataset>.json")
    p.add_argument("--nodes", nargs="+", default=None, help="nodes to search (default: all)")
    p.add_argument("--timesteps", nargs="+", type=int, default=None,
                   help="timesteps to search (default: diffrep.pipelines.probe.DEFAULT_TIMESTEPS, 1 11 50 150 300)")
    p.add_argument("--noise", default="shared")
    p.add_argument("--pool-grid", type=int, default=1,
                   help="average-pool each node to a G x G grid (1 = global average pooling)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--grid-fit", type=int, default=10000, help="fit-part images used to score the grid")
    p.add_argument("--no-concat", action="store_true", help="score single (node, t) keys only")
    p.add_argument("--C", type=float, default=1.0, help="inverse L2 strength of the logistic regression")
    p.add_argument("--max-iter", type=int, default=1000)
    p.add_argument("--cache-dir", default=None, help="pooled-feature cache (default .cache/features)")
    p.add_argument("--chunk-size", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64, help="images per U-Net forward")
    p.add_argument("--limit-train", type=int, default=None, help="use only the first N training images")
    p.add_argument("--limit-test", type=int, default=None, help="use only the first N test images")
    add_threads_option(p)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps; refused if absent on this machine")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_probe)
    return p
