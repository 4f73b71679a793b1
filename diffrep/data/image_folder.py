"""A folder of the user's images (PNG/JPEG/TIFF, 8/16-bit, grey or RGB) as one batch, with labels from its layout.

``load_image_folder(root, channels)`` reads every image below ``root`` (recursively, in sorted path order;
hidden files and folders, whose names start with ".", are skipped). When every image lies in a first-level
subfolder, the folder is an ImageFolder tree (torchvision's layout, ``root/<class>/<image>``): the classes
are the sorted subfolder names and each image gets the index of its own. Images of another size than
``size`` are resized (bilinear with antialiasing, to ``size`` x ``size``); without ``size`` mixed sizes are an
error naming an example of each.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..digests import files_digest
from .image_files import IMAGE_SUFFIXES, read_image_file


@dataclass
class ImageSet:
    """Images (N, C, H, W) in [0, 1], their paths relative to ``root``, labels (an ImageFolder tree) or None."""

    images: torch.Tensor
    files: list[str]
    root: Path
    classes: list[str] | None = None
    labels: np.ndarray | None = None
    resized: int = 0
    digest: str = field(default="")

    def describe(self) -> dict:
        """JSON-ready provenance: folder, count, size, classes, how many were resized, digest of the files."""
        return {"source": "image-folder", "root": str(self.root), "images": len(self.files),
                "size": list(self.images.shape[2:]), "channels": int(self.images.shape[1]),
                "classes": self.classes, "resized": self.resized, "files_sha256": self.digest}


def image_files(root: str | os.PathLike) -> list[Path]:
    """The image files below ``root`` in sorted order; a missing/empty folder or another file is an error."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root}: expected a folder of {'/'.join(IMAGE_SUFFIXES)} images, "
                                "found no such folder")
    found = sorted(p for p in root.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    others = [str(p.relative_to(root)) for p in found if p.suffix.lower() not in IMAGE_SUFFIXES]
    if others:
        raise ValueError(f"image folder {root}: {len(others)} file(s) are not {'/'.join(IMAGE_SUFFIXES)} images: "
                         f"{others[:10]}; move them out of the folder")
    if not found:
        raise ValueError(f"image folder {root}: expected {'/'.join(IMAGE_SUFFIXES)} images, found none")
    return found


def load_image_folder(root: str | os.PathLike, channels: int, size: int | None = None) -> ImageSet:
    """Every image below ``root`` as (N, ``channels``, H, W) float32 in [0, 1] (see the module docstring).

    ``channels`` (the U-Net's input channels) decides grey (1) or RGB (3); a file of the other kind is an
    error naming it (see ``read_image_file``).
    """
    root = Path(root)
    files = image_files(root)
    arrays = [read_image_file(f, channels) for f in files]
    resized = 0
    if size is None:
        shapes: dict[tuple[int, ...], Path] = {}
        for f, a in zip(files, arrays):
            shapes.setdefault(a.shape[1:], f)
        if len(shapes) > 1:
            examples = ", ".join(f"{s[0]}x{s[1]} (e.g. {f.relative_to(root)})" for s, f in shapes.items())
            raise ValueError(f"image folder {root}: expected images of one size, got {examples}; "
                             "give a size to resize them")
        images = torch.from_numpy(np.stack(arrays))
    else:
        tensors = []
        for a in arrays:
            t = torch.from_numpy(a)[None]
            if t.shape[2:] != (size, size):
                t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
                resized += 1
            tensors.append(t.clamp_(0.0, 1.0))
        images = torch.cat(tensors)
    relative = [str(f.relative_to(root)) for f in files]
    classes, labels = _class_layout(relative)
    return ImageSet(images=images, files=relative, root=root, classes=classes, labels=labels, resized=resized,
                    digest=files_digest(zip(relative, files)))


def _class_layout(relative: list[str]) -> tuple[list[str] | None, np.ndarray | None]:
    """Classes and labels of an ImageFolder tree (every image in a first-level subfolder), else (None, None)."""
    parts = [Path(r).parts for r in relative]
    if any(len(p) < 2 for p in parts):
        return None, None
    classes = sorted({p[0] for p in parts})
    index = {c: i for i, c in enumerate(classes)}
    return classes, np.array([index[p[0]] for p in parts], dtype=np.int64)
