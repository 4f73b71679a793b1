"""``diffrep segment fit|predict``: label-efficient segmentation (Baranchuk et al., ICLR 2022) from the shell.

fit: images (.npy) + label maps (.npy) -> pixel descriptors streamed to an on-disk PixelStore ->
PixelClassifier trained within a pixel budget -> ``OUT/head.safetensors`` + ``OUT/head.json``
(the JSON records backbone, nodes, timesteps, noise and seed, so predict needs no repeated flags).
predict: head directory + images -> label maps (.npy), optionally the uncertainty maps.
Neither command replaces what it would write over (a fitted head, an existing .npy) without
``--overwrite``, and no output may be one of the inputs.
Wire into the main parser with ``add_segment_cli(subparsers)``.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_TIMESTEPS = (50, 150, 250)


def _save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp.npy")
    os.close(fd)
    try:
        np.save(tmp, array)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(int(args.threads))


def _load_labels(path: str) -> np.ndarray:
    """The --labels array; a wrong suffix, a missing or an unreadable file is refused naming it."""
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
    from .heads.pixel_classifier import HEAD_CONFIG, HEAD_WEIGHTS

    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: expected a folder for {HEAD_WEIGHTS} + {HEAD_CONFIG}, got an existing file")
    existing = [name for name in (HEAD_CONFIG, HEAD_WEIGHTS) if (out / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"--out {out}: expected a folder without a fitted head, it already holds "
                              f"{', '.join(existing)}; pass --overwrite to replace it, or choose another folder")


def _cmd_segment_fit(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from .backbones import load_backbone
    from .features import FeatureExtractor
    from .features.io import read_images
    from .features.pixel_store import backbone_digest, build_pixel_store, check_pixel_labels
    from .heads import PixelClassifier
    from .heads.label_maps import check_label_classes

    _threads(args)
    out = Path(args.out)
    _check_head_folder(out, args.overwrite)
    raw_labels = _load_labels(args.labels)
    backbone = load_backbone(args.backbone)
    images = backbone.check_images(read_images(args.images, backbone), name=f"--images {args.images}")
    name = f"--labels {args.labels}"
    labels = check_pixel_labels(raw_labels, None, image_shape=tuple(images.shape[2:]), num_images=images.shape[0],
                                name=name)
    num_classes = check_label_classes(labels, args.num_classes, args.ignore_index, name=name,
                                      num_option="--num-classes", ignore_option="--ignore-index")
    extractor = FeatureExtractor(backbone, args.nodes, args.timesteps, noise=args.noise, seed=args.seed,
                                 batch_size=args.extract_batch * len(args.timesteps), dtype=torch.float16)
    store_root = Path(args.store) if args.store else out / "features"
    store = build_pixel_store(store_root, extractor, images, labels, batch_size=args.extract_batch,
                              progress=lambda it: tqdm(it, desc="features", unit="batch"))
    clf = PixelClassifier(num_classes=num_classes, n_members=args.members, epochs=args.epochs,
                          batch_size=args.batch_size, lr=args.lr, max_pixels_in_memory=args.max_pixels,
                          vote=args.vote, ignore_index=args.ignore_index, random_state=args.seed).fit(store)
    metadata = {"backbone": str(args.backbone), "backbone_digest": backbone_digest(backbone),
                "nodes": list(extractor.nodes), "timesteps": list(extractor.timesteps), "noise": str(extractor.noise),
                "seed": extractor.seed, "image_shape": list(images.shape[2:]), "store": str(store.path),
                "noise_levels": {str(t): backbone.noise_level(t) for t in extractor.timesteps}}
    clf.save(out, metadata=metadata)
    print(f"fitted {args.members} pixel MLPs ({num_classes} classes) on {len(store)} image(s) "
          f"({int(clf.class_pixel_counts_.sum())} labelled pixels, {clf.sample_pixels_} per epoch); head in {out}")
    return 0


def _check_predict_outputs(args: argparse.Namespace) -> None:
    """Refuse --out/--uncertainty that is an input (the images, the head's files) or each other, or that
    exists already (unless --overwrite), before anything is loaded."""
    from .heads.pixel_classifier import HEAD_CONFIG, HEAD_WEIGHTS
    from .outputs import check_output_file

    inputs = {"input images": args.images, "head config": Path(args.head) / HEAD_CONFIG,
              "head weights": Path(args.head) / HEAD_WEIGHTS}
    check_output_file(args.out, {**inputs, "--uncertainty output": args.uncertainty}, overwrite=args.overwrite)
    if args.uncertainty:
        check_output_file(args.uncertainty, inputs, overwrite=args.overwrite, option="--uncertainty")


def _cmd_segment_predict(args: argparse.Namespace) -> int:
    import torch

    from ._types import FeatureKey
    from .backbones import load_backbone
    from .features import FeatureExtractor, upsample_concat
    from .features.io import read_images
    from .features.pixel_store import backbone_digest
    from .heads import PixelClassifier

    _threads(args)
    _check_predict_outputs(args)
    clf = PixelClassifier.load(args.head)
    meta = clf.metadata_
    missing = [k for k in ("backbone", "nodes", "timesteps", "noise", "seed") if k not in meta]
    if missing:
        raise ValueError(f"{args.head}: expected a head saved by `diffrep segment fit`, its metadata lacks {missing}")
    backbone = load_backbone(args.backbone or meta["backbone"])
    digest = backbone_digest(backbone)
    if meta.get("backbone_digest") and digest != meta["backbone_digest"]:
        raise ValueError(f"backbone: expected weights with digest {meta['backbone_digest']} (the one the head was "
                         f"fitted on), got {digest}")
    images = backbone.check_images(read_images(args.images, backbone), name=f"--images {args.images}")
    extractor = FeatureExtractor(backbone, meta["nodes"], meta["timesteps"], noise=meta["noise"], seed=meta["seed"],
                                 batch_size=args.batch_size * len(meta["timesteps"]), dtype=torch.float16)
    keys = [FeatureKey(n, t) for n in extractor.nodes for t in extractor.timesteps]
    labels, uncertainty = [], []
    for _, features in extractor.iter_batches(images):
        descriptors = upsample_concat(features, tuple(images.shape[2:]), keys)
        lab, unc = clf.predict_with_uncertainty(descriptors)
        labels.append(lab)
        uncertainty.append(unc)
    out = _save_npy(args.out, np.concatenate(labels))
    if args.uncertainty:
        _save_npy(args.uncertainty, np.concatenate(uncertainty))
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
    fit.add_argument("--timesteps", nargs="+", type=int, default=list(DEFAULT_TIMESTEPS))
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
    fit.add_argument("--threads", type=int, default=None, help="torch CPU threads")
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
    pred.add_argument("--threads", type=int, default=None)
    pred.set_defaults(func=_cmd_segment_predict)
    return parser
