"""The user's labelled images for ``diffrep probe``: ImageFolder trees (``root/<class>/<image>``).

A train tree and either a test tree (classes matched by name; a test class the train tree lacks is an
error) or a stratified, seeded test fraction of the train tree. Images are read as the backbone takes
them (its channels; resized to the size it was trained on when that is recorded) and returned in its
data range, with the file lists for the report.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from ..backbones.backbone import Backbone
from ..data.image_folder import ImageSet, load_image_folder


def _read_tree(root: str | os.PathLike, backbone: Backbone, what: str, min_classes: int = 1) -> ImageSet:
    trained = backbone.trained_image_size
    found = load_image_folder(root, backbone.in_channels, size=None if trained is None else trained[0])
    if found.classes is None:
        raise ValueError(f"{what} {root}: expected an ImageFolder tree (one subfolder per class, root/<class>/<image>), "
                         "but some images lie directly in the folder")
    if len(found.classes) < min_classes:
        raise ValueError(f"{what} {root}: expected at least {min_classes} class subfolders, got {found.classes}")
    return found


def load_probe_folders(backbone: Backbone, train_dir: str | os.PathLike, test_dir: str | os.PathLike | None = None,
                       test_fraction: float = 0.2, seed: int = 0
                       ) -> tuple[torch.Tensor, np.ndarray, torch.Tensor, np.ndarray, dict[str, Any]]:
    """Train and test images in the backbone's data range, integer labels, and a JSON-ready description."""
    from sklearn.model_selection import train_test_split

    train = _read_tree(train_dir, backbone, "--train-dir", min_classes=2)
    norm = backbone.config.normalisation
    to_range = lambda x: x * (norm.high - norm.low) + norm.low  # noqa: E731
    if test_dir is not None:
        test = _read_tree(test_dir, backbone, "--test-dir")
        unknown = sorted(set(test.classes) - set(train.classes))
        if unknown:
            raise ValueError(f"--test-dir {test_dir}: classes {unknown} are not in --train-dir {train_dir} "
                             f"(classes {train.classes})")
        index = {c: i for i, c in enumerate(train.classes)}
        yte = np.array([index[test.classes[label]] for label in test.labels], dtype=np.int64)
        split = {"test": test.describe(), "test_files": test.files}
        return to_range(train.images), train.labels, to_range(test.images), yte, {
            **_info(train, split), "n_test": int(yte.size)}
    if not 0 < test_fraction < 1:
        raise ValueError(f"--test-fraction: expected a number in (0, 1), got {test_fraction}")
    positions = np.arange(len(train.files))
    fit, held = train_test_split(positions, test_size=test_fraction, stratify=train.labels, random_state=seed)
    fit, held = np.sort(fit), np.sort(held)
    split = {"test": f"stratified {test_fraction} of the train tree (seed {seed})",
             "test_files": [train.files[i] for i in held]}
    info = _info(train, split, fit)
    return (to_range(train.images[fit]), train.labels[fit], to_range(train.images[held]), train.labels[held],
            {**info, "n_test": int(held.size)})


def _info(train: ImageSet, split: dict, fit: np.ndarray | None = None) -> dict[str, Any]:
    n_train = len(train.files) if fit is None else int(fit.size)
    return {"dataset": "image-folder", "train": train.describe(), "classes": train.classes, "n_train": n_train,
            "image_size": int(train.images.shape[-1]), **split}
