"""Label maps of segmentation heads: the classes they hold, the pixels they leave out, and scoring against them."""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch


def _listing(values: list[int], limit: int = 12) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return f"[{shown}{f', ... ({len(values)} distinct)' if len(values) > limit else ''}]"


def check_label_classes(labels: torch.Tensor | Iterable[torch.Tensor], num_classes: int | None = None,
                        ignore_index: int | None = None, *, name: str = "labels",
                        num_option: str = "num_classes", ignore_option: str = "ignore_index") -> int:
    """The number of classes C of integer label maps, checked before anything is trained on them.

    Pixels equal to ``ignore_index`` are unlabelled: they do not count as a class. With
    ``num_classes`` every other label must lie in 0..num_classes-1. Without it the labels found must
    be exactly 0..K-1 with K >= 2 (C = K): labels 10..13 or a stray 255 would otherwise silently
    make a 14- or 256-class head. ``labels`` is one tensor or an iterable of them (e.g. one per
    image); ``num_option``/``ignore_option`` name the settings in the messages (e.g. CLI flags).
    Raises ValueError giving the labels found and what was expected.
    """
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer))
                                    or num_classes < 2):
        raise ValueError(f"{num_option}: expected an integer >= 2 (the number of classes), got {num_classes!r}")
    found: set[int] = set()
    any_pixels = False
    for part in [labels] if isinstance(labels, torch.Tensor) else labels:  # one image at a time, none kept
        any_pixels = any_pixels or part.numel() > 0
        found.update(int(v) for v in torch.unique(part).tolist())
    if ignore_index is not None:
        found.discard(int(ignore_index))
    values = sorted(found)
    if not values:
        unlabelled = f" (every pixel is {ignore_option} {ignore_index})" if ignore_index is not None and any_pixels else ""
        raise ValueError(f"{name}: expected at least one labelled pixel, got none{unlabelled}")
    ignore_hint = f" or {ignore_option} {ignore_index}" if ignore_index is not None else ""
    if num_classes is not None:
        bad = [v for v in values if not 0 <= v < num_classes]
        if bad:
            raise ValueError(f"{name}: expected labels in 0..{num_classes - 1} ({num_option} {num_classes}){ignore_hint}, "
                             f"found labels {_listing(values)}, out of range: {_listing(bad)}")
        return int(num_classes)
    if values != list(range(len(values))) or len(values) < 2:
        raise ValueError(
            f"{name}: expected labels 0..C-1 with C >= 2 and every class present{ignore_hint}, found labels "
            f"{_listing(values)}; relabel them, give {num_option} when some classes are absent from these maps, "
            f"or {ignore_option} for the value that marks unlabelled pixels (e.g. 255)")
    return len(values)


def segmentation_metrics(pred: Any, truth: Any, num_classes: int, ignore_index: int | None = None
                         ) -> dict[str, Any]:
    """Per-class IoU and Dice from the confusion matrix pooled over all images, and their means.

    Classes absent from both truth and prediction get NaN and are left out of the means
    (``miou``, ``mdice``), as in ddpm-segmentation's evaluation over all test images.
    """
    p = np.asarray(pred).reshape(-1).astype(np.int64)
    t = np.asarray(truth).reshape(-1).astype(np.int64)
    if p.shape != t.shape:
        raise ValueError(f"pred: expected {np.asarray(truth).shape} to match truth, got {np.asarray(pred).shape}")
    keep = t != ignore_index if ignore_index is not None else np.ones_like(t, bool)
    p, t = p[keep], t[keep]
    confusion = np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    tp = np.diag(confusion).astype(np.float64)
    fp, fn = confusion.sum(0) - tp, confusion.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(tp + fp + fn > 0, tp / (tp + fp + fn), np.nan)
        dice = np.where(tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
    return {"iou": iou.tolist(), "dice": dice.tolist(), "miou": float(np.nanmean(iou)),
            "mdice": float(np.nanmean(dice)), "confusion": confusion.tolist()}
