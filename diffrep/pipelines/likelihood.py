"""The likelihood pipeline behind ``diffrep likelihood``: images in, one CSV row of scores per image out.

Inputs are read by the library's readers: a ``.npy`` array or a folder of PNG/JPEG/TIFF images
(:func:`diffrep.features.io.read_images`), or a 3D NIfTI volume sliced exactly as the brain training data
and volume scoring slice it (:func:`diffrep.data.nifti.read_nifti`, a brain mask derived by Otsu,
:func:`diffrep.data.brain.slice_brain`; slices whose mask covers less than 5% are left out, as in the
training data). The likelihood is defined on the size the backbone was trained on, so other sizes are
refused. Scores come from :meth:`diffrep.anomaly.LikelihoodScorer.nll_table`; each row names its image
(a file name, ``file[i]`` for an array, ``file:z=K`` for a slice).
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..anomaly.likelihood_scores import LikelihoodScorer
from ..backbones import Backbone

CSV_COLUMNS = ("image", "index", "nll_bits_per_dim", "png_bits_per_dim", "corrected_bits_per_dim", "method",
               "unet_calls", "seed")
MIN_BRAIN_FRACTION = 0.05
NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass
class LikelihoodInputs:
    """Images (N, C, *spatial) in the data range, checked for the backbone, and the name of each row."""

    images: torch.Tensor
    names: list[str]


def read_likelihood_inputs(path: str | os.PathLike, backbone: Backbone, size: int | None = None) -> LikelihoodInputs:
    """Read ``path`` (.npy, image folder or NIfTI) for ``backbone``; NIfTI slices get side ``size``
    (default: the backbone's training size). Refusals name the file and what was expected."""
    path = Path(path)
    if path.name.endswith(NIFTI_SUFFIXES):
        inputs = _read_nifti_slices(path, backbone, size)
    else:
        from ..features.io import read_images

        images = read_images(path, backbone)
        names = (sorted(p.name for p in path.iterdir()) if path.is_dir()
                 else [f"{path.name}[{i}]" for i in range(images.shape[0])])
        inputs = LikelihoodInputs(images, names)
    trained, spatial = backbone.trained_image_size, tuple(inputs.images.shape[2:])
    if trained is not None and inputs.images.ndim == backbone.spatial_dims + 2 and spatial != trained:
        raise ValueError(f"{path}: expected images of the size the backbone was trained on {trained}, got {spatial}; "
                         "its likelihood is defined on that size only: resize the images first")
    inputs.images = backbone.check_images(inputs.images, name=str(path))
    return inputs


def _read_nifti_slices(path: Path, backbone: Backbone, size: int | None) -> LikelihoodInputs:
    """The brain slices of a 3D NIfTI with at least MIN_BRAIN_FRACTION of brain, named ``file:z=K``."""
    from ..data.brain import derive_brain_mask, slice_brain
    from ..data.nifti import read_nifti
    from ..errors import check_positive_int

    if backbone.in_channels != 1 or backbone.spatial_dims != 2:
        raise ValueError(f"{path}: NIfTI slices are 1-channel 2D images; expected a 1-channel 2D backbone, got "
                         f"{backbone.in_channels} channel(s), {backbone.spatial_dims}D")
    trained = backbone.trained_image_size
    if size is None and trained is None:
        raise ValueError(f"{path}: slicing a NIfTI needs a slice size; the backbone records no training size, "
                         "expected --size")
    side = check_positive_int(size if size is not None else trained[0], "size", minimum=8)
    volume = read_nifti(path, "volume")
    if not np.any(volume.data):
        raise ValueError(f"{path}: expected a non-empty volume, got all-zero intensities")
    mask, _ = derive_brain_mask(volume.data, None, None, str(path))
    images, labels, _, _ = slice_brain(volume.data, mask, side, name=str(path))
    keep = np.flatnonzero((labels > 0).mean(axis=(1, 2)) >= MIN_BRAIN_FRACTION)
    if keep.size == 0:
        raise ValueError(f"{path}: expected slices with at least {MIN_BRAIN_FRACTION:.0%} brain, found none")
    return LikelihoodInputs(torch.from_numpy(images[keep]), [f"{path.name}:z={int(z)}" for z in keep])


def likelihood_rows(scorer: LikelihoodScorer, inputs: LikelihoodInputs, progress: bool = False) -> list[dict[str, Any]]:
    """One dict per image with :data:`CSV_COLUMNS`, from ``scorer.nll_table``."""
    table = scorer.nll_table(inputs.images, progress=progress)
    return [{"image": name, "index": i, "nll_bits_per_dim": float(table["nll_bits_per_dim"][i]),
             "png_bits_per_dim": float(table["png_bits_per_dim"][i]),
             "corrected_bits_per_dim": float(table["corrected_bits_per_dim"][i]), "method": scorer.method,
             "unet_calls": int(table["unet_calls"][i]), "seed": int(scorer.seed)}
            for i, name in enumerate(inputs.names)]


def write_likelihood_csv(rows: list[dict[str, Any]], out: str | os.PathLike) -> Path:
    """Write the rows (``repr`` precision for floats) to ``out`` atomically."""
    from .._atomic import atomic_path

    with atomic_path(out, suffix=".tmp.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()} for row in rows)
    return Path(out)
