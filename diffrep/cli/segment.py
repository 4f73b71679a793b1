"""``diffrep segment fit|predict``: label-efficient segmentation (library: :mod:`diffrep.pipelines.segmentation`).

fit: images (.npy) + label maps (.npy) -> ``OUT/head.safetensors`` + ``OUT/head.json`` (the JSON
records backbone, nodes, timesteps, noise and seed, so predict needs no repeated flags).
predict: head directory + images -> label maps (.npy), optionally the uncertainty maps.
Neither command replaces what it would write over (a fitted head, an existing .npy) without
``--overwrite``, and no output may be one of the inputs.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from .options import add_threads_option, apply_threads


def _save_npy(path: str | os.PathLike, array: Any) -> Path:
    """Write ``array`` to ``path`` (.npy) atomically."""
    import numpy as np

    from .._atomic import atomic_path

    with atomic_path(path, suffix=".tmp.npy") as tmp:
        np.save(tmp, array)
    return Path(path)


def _load_labels(path: str) -> Any:
    """The --labels array; a wrong suffix, a missing or an unreadable file is refused naming it."""
    import numpy as np

    if not str(path).endswith(".npy"):
        raise ValueError(f"--labels: expected a .npy file of label maps (N, H, W), got {path}")
    if not Path(path).is_file():
        raise FileNotFoundError(f"--labels: {path} does not exist; expected a .npy file of label maps (N, H, W)")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:  # pickled objects, truncated or non-.npy bytes
        raise ValueError(f"--labels {path}: expected a readable .npy array of label maps (N, H, W), got "
                         f"{type(err).__name__}: {err}") from err


def _check_head_folder(out: Path, overwrite: bool) -> None:
    """Refuse an --out that is a file, or a folder already holding a fitted head (unless ``overwrite``)."""
    from ..heads.pixel_classifier import HEAD_CONFIG, HEAD_WEIGHTS

    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: expected a folder for {HEAD_WEIGHTS} + {HEAD_CONFIG}, got an existing file")
    existing = [name for name in (HEAD_CONFIG, HEAD_WEIGHTS) if (out / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"--out {out}: expected a folder without a fitted head, it already holds "
                              f"{', '.join(existing)}; pass --overwrite to replace it, or choose another folder")


def _cmd_segment_fit(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..backbones import load_backbone
    from ..features.io import read_images
    from ..features.pixel_store import check_pixel_labels
    from ..heads.label_maps import check_label_classes
    from ..pipelines.segmentation import DEFAULT_TIMESTEPS, fit_segmentation_head

    args.timesteps = list(DEFAULT_TIMESTEPS) if args.timesteps is None else args.timesteps
    apply_threads(args)
    out = Path(args.out)
    _check_head_folder(out, args.overwrite)
    from ..devices import resolve_device

    device = resolve_device(args.device)
    raw_labels = _load_labels(args.labels)
    backbone = load_backbone(args.backbone, device=device)
    images = backbone.check_images(read_images(args.images, backbone), name=f"--images {args.images}")
    name = f"--labels {args.labels}"
    labels = check_pixel_labels(raw_labels, None, image_shape=tuple(images.shape[2:]), num_images=images.shape[0],
                                name=name)
    num_classes = check_label_classes(labels, args.num_classes, args.ignore_index, name=name,
                                      num_option="--num-classes", ignore_option="--ignore-index")
    clf, store, metadata = fit_segmentation_head(
        backbone, images, labels, Path(args.store) if args.store else out / "features", nodes=args.nodes,
        timesteps=args.timesteps, num_classes=num_classes, noise=args.noise, seed=args.seed,
        ignore_index=args.ignore_index, members=args.members, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, max_pixels=args.max_pixels, vote=args.vote, images_per_batch=args.extract_batch,
        backbone_name=str(args.backbone), progress=lambda it: tqdm(it, desc="features", unit="batch"))
    clf.save(out, metadata=metadata)
    print(f"fitted {args.members} pixel MLPs ({num_classes} classes) on {len(store)} image(s) "
          f"({int(clf.class_pixel_counts_.sum())} labelled pixels, {clf.sample_pixels_} per epoch); head in {out}")
    return 0


def _check_predict_outputs(args: argparse.Namespace) -> None:
    """Refuse --out/--uncertainty that is an input (the images, the head's files) or each other, or that
    exists already (unless --overwrite), before anything is loaded."""
    from ..heads.pixel_classifier import HEAD_CONFIG, HEAD_WEIGHTS
    from ..outputs import check_output_file

    inputs = {"input images": args.images, "head config": Path(args.head) / HEAD_CONFIG,
              "head weights": Path(args.head) / HEAD_WEIGHTS}
    check_output_file(args.out, {**inputs, "--uncertainty output": args.uncertainty}, overwrite=args.overwrite)
    if args.uncertainty:
        check_output_file(args.uncertainty, inputs, overwrite=args.overwrite, option="--uncertainty")


def _cmd_segment_predict(args: argparse.Namespace) -> int:
    from ..features.io import read_images
    from ..pipelines.segmentation import load_segmentation_head, predict_segmentation

    apply_threads(args)
    _check_predict_outputs(args)
    from ..devices import resolve_device

    clf, backbone = load_segmentation_head(args.head, args.backbone, device=resolve_device(args.device))
    images = backbone.check_images(read_images(args.images, backbone), name=f"--images {args.images}")
    labels, uncertainty = predict_segmentation(clf, backbone, images, images_per_batch=args.batch_size)
    out = _save_npy(args.out, labels)
    if args.uncertainty:
        _save_npy(args.uncertainty, uncertainty)
    print(f"wrote label maps of {images.shape[0]} image(s) to {out}")
    return 0


def add_segment_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``segment`` (sub-actions ``fit`` and ``predict``) on an argparse subparsers object."""
    parser = subparsers.add_parser("segment", help="label-efficient segmentation: pixel MLP ensemble on diffusion features")
    actions = parser.add_subparsers(dest="segment_action", required=True)

    fit = actions.add_parser("fit", help="extract pixel descriptors to disk and fit the pixel classifier")
    fit.add_argument("backbone", help="checkpoint directory or shipped default name (e.g. brain-ddpm)")
    fit.add_argument("--images", required=True, help=".npy images (N,H,W) or (N,C,H,W), or a folder of PNGs")
    fit.add_argument("--labels", required=True, help=".npy integer label maps (N,H,W) with values 0..C-1")
    fit.add_argument("--nodes", nargs="+", required=True, help="feature nodes, e.g. mid up.0 up.1 up.2 up.3")
    fit.add_argument("--timesteps", nargs="+", type=int, default=None,
                     help="timesteps (default: diffrep.pipelines.segmentation.DEFAULT_TIMESTEPS, 50 150 250)")
    fit.add_argument("--noise", default="shared")
    fit.add_argument("--seed", type=int, default=0, help="noise, sampling and initialisation seed")
    fit.add_argument("--num-classes", type=int, default=None,
                     help="C: labels must lie in 0..C-1 (default: the labels found, which must then be exactly 0..C-1)")
    fit.add_argument("--ignore-index", type=int, default=None,
                     help="label of unlabelled pixels (e.g. 255): left out of training and of the class count")
    fit.add_argument("--members", type=int, default=10)
    fit.add_argument("--epochs", type=int, default=10)
    fit.add_argument("--batch-size", type=int, default=64, help="pixels per minibatch")
    fit.add_argument("--lr", type=float, default=1e-3)
    fit.add_argument("--max-pixels", type=int, default=100_000, help="training pixels held in memory per epoch")
    fit.add_argument("--vote", choices=("majority", "mean"), default="majority")
    fit.add_argument("--store", default=None, help="pixel store root (default OUT/features); reruns resume")
    fit.add_argument("--extract-batch", type=int, default=8, help="images per feature-extraction batch")
    add_threads_option(fit)
    fit.add_argument("--device", default="cpu", help="the U-Net's device: cpu, cuda, cuda:N or mps; refused if absent "
                                                      "on this machine (the pixel MLPs train on the CPU)")
    fit.add_argument("--out", required=True, help="output directory for head.safetensors + head.json")
    fit.add_argument("--overwrite", action="store_true", help="replace a head already fitted in --out")
    fit.set_defaults(func=_cmd_segment_fit)

    pred = actions.add_parser("predict", help="predict label maps with a fitted head")
    pred.add_argument("head", help="directory written by `diffrep segment fit`")
    pred.add_argument("--images", required=True)
    pred.add_argument("--out", required=True, help="output .npy of label maps (N,H,W); never an input")
    pred.add_argument("--uncertainty", default=None, help="optional .npy of vote-entropy maps (N,H,W)")
    pred.add_argument("--overwrite", action="store_true", help="replace existing --out/--uncertainty files")
    pred.add_argument("--backbone", default=None, help="override the backbone path recorded in the head")
    pred.add_argument("--batch-size", type=int, default=8, help="images per batch")
    add_threads_option(pred)
    pred.add_argument("--device", default="cpu", help="the U-Net's device: cpu, cuda, cuda:N or mps; refused if "
                                                       "absent on this machine")
    pred.set_defaults(func=_cmd_segment_predict)
    return parser
