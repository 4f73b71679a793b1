"""The segmentation pipeline (Baranchuk et al., ICLR 2022): pixel descriptors to disk, a pixel MLP ensemble, label maps.

fit: images + label maps -> descriptors of the chosen nodes x timesteps (shared seeded noise, bilinearly
upsampled, float16) streamed to an on-disk :class:`~diffrep.features.pixel_store.PixelStore` ->
:class:`~diffrep.heads.PixelClassifier` trained within a pixel budget; the returned metadata records
what predict needs (backbone, nodes, timesteps, noise, seed). predict: a saved head + images -> label
maps and vote-entropy uncertainty maps, one batch of features in memory at a time.
Used by ``diffrep segment`` (:mod:`diffrep.cli.segment`) and benchmarks/segmentation_brain.py.
"""
from __future__ import annotations

import os
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch

from .._types import FeatureKey
from ..backbones import Backbone, load_backbone
from ..features import FeatureExtractor, upsample_concat
from ..digests import backbone_identity
from ..features.pixel_store import PixelStore, build_pixel_store
from ..heads import PixelClassifier

DEFAULT_TIMESTEPS = (50, 150, 250)
HEAD_METADATA = ("backbone", "nodes", "timesteps", "noise", "seed")


class FittedHead(NamedTuple):
    """What :func:`fit_segmentation_head` made: the fitted head, its training store and the head's metadata."""

    classifier: PixelClassifier
    store: PixelStore
    metadata: dict[str, Any]


def pixel_extractor(backbone: Backbone, nodes: Sequence[str], timesteps: Sequence[int], *, noise: str = "shared",
                    seed: int = 0, images_per_batch: int = 8) -> FeatureExtractor:
    """The extractor of pixel descriptors: float16 node maps, ``images_per_batch`` images per U-Net batch."""
    return FeatureExtractor(backbone, nodes, timesteps, noise=noise, seed=seed, batch_size=images_per_batch,
                            dtype=torch.float16)


def extract_pixel_store(root: str | os.PathLike, backbone: Backbone, nodes: Sequence[str], timesteps: Sequence[int],
                        images: Any, labels: Any, *, noise: str = "shared", seed: int = 0,
                        num_classes: int | None = None, images_per_batch: int = 8,
                        progress: Callable | None = None) -> PixelStore:
    """Pixel descriptors and labels of ``images`` written to (or resumed from) a PixelStore under ``root``."""
    extractor = pixel_extractor(backbone, nodes, timesteps, noise=noise, seed=seed, images_per_batch=images_per_batch)
    return build_pixel_store(root, extractor, images, labels, num_classes=num_classes, batch_size=images_per_batch,
                             progress=progress)


def fit_segmentation_head(backbone: Backbone, images: torch.Tensor, labels: Any, store_root: str | os.PathLike, *,
                          nodes: Sequence[str], timesteps: Sequence[int], num_classes: int, noise: str = "shared",
                          seed: int = 0, ignore_index: int | None = None, members: int = 10, epochs: int = 10,
                          batch_size: int = 64, lr: float = 1e-3, max_pixels: int = 100_000, vote: str = "majority",
                          images_per_batch: int = 8, backbone_name: str | None = None,
                          progress: Callable | None = None) -> FittedHead:
    """Extract descriptors of labelled ``images`` to a store under ``store_root`` and fit a PixelClassifier.

    ``labels`` are (N, H, W) integer maps in 0..num_classes-1 (``ignore_index`` marks unlabelled
    pixels); ``seed`` seeds the noise, the pixel sampling and the MLPs' initialisation. The metadata
    (save it with ``classifier.save(folder, metadata=...)``) lets :func:`predict_segmentation` rebuild
    the same descriptors; ``backbone_name`` is how the backbone is found again (a checkpoint or zoo name).
    """
    extractor = pixel_extractor(backbone, nodes, timesteps, noise=noise, seed=seed, images_per_batch=images_per_batch)
    store = build_pixel_store(store_root, extractor, images, labels, batch_size=images_per_batch, progress=progress)
    clf = PixelClassifier(num_classes=num_classes, n_members=members, epochs=epochs, batch_size=batch_size, lr=lr,
                          max_pixels_in_memory=max_pixels, vote=vote, ignore_index=ignore_index,
                          seed=seed).fit(store)
    metadata = {"backbone": str(backbone_name), "backbone_digest": backbone_identity(backbone),
                "nodes": list(extractor.nodes), "timesteps": list(extractor.timesteps), "noise": str(extractor.noise),
                "seed": extractor.seed, "image_shape": list(images.shape[2:]), "store": str(store.path),
                "noise_levels": {str(t): backbone.noise_level(t) for t in extractor.timesteps}}
    return FittedHead(clf, store, metadata)


def load_segmentation_head(head_dir: str | os.PathLike, backbone: str | None = None,
                           device: str | torch.device = "cpu") -> tuple[PixelClassifier, Backbone]:
    """A head saved by ``fit_segmentation_head`` + ``save`` and its backbone on ``device`` (``backbone`` overrides
    the recorded one; its weights must still be the ones the head was fitted on)."""
    clf = PixelClassifier.load(head_dir)
    meta = clf.metadata_
    missing = [k for k in HEAD_METADATA if k not in meta]
    if missing:
        raise ValueError(f"{head_dir}: expected a head saved by `diffrep segment fit`, its metadata lacks {missing}")
    model = load_backbone(backbone or meta["backbone"], device=device)
    digest = backbone_identity(model)
    if meta.get("backbone_digest") and digest != meta["backbone_digest"]:
        raise ValueError(f"backbone: expected weights with digest {meta['backbone_digest']} (the one the head was "
                         f"fitted on), got {digest}")
    return clf, model


def predict_segmentation(classifier: PixelClassifier, backbone: Backbone, images: torch.Tensor, *,
                         images_per_batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Label maps and vote-entropy maps (N, H, W) of checked ``images``, with the descriptors the head's metadata
    names (nodes, timesteps, noise, seed); only one batch of features is in memory at a time."""
    meta = classifier.metadata_
    extractor = pixel_extractor(backbone, meta["nodes"], meta["timesteps"], noise=meta["noise"], seed=meta["seed"],
                                images_per_batch=images_per_batch)
    keys = [FeatureKey(n, t) for n in extractor.nodes for t in extractor.timesteps]
    labels, uncertainty = [], []
    for _, features in extractor.iter_batches(images):
        descriptors = upsample_concat(features, tuple(images.shape[2:]), keys).cpu()  # the head's device is its own
        lab, unc = classifier.predict_with_uncertainty(descriptors)
        labels.append(lab)
        uncertainty.append(unc)
    return np.concatenate(labels), np.concatenate(uncertainty)
