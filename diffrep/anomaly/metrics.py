"""Anomaly detection and segmentation metrics used in the brain-MRI literature.

Convention everywhere: a higher score means more anomalous, and a pixel is predicted anomalous when
its score is >= the threshold (scikit-learn's convention). Pixel metrics pool all pixels of the set
(optionally only those inside a ``valid`` mask, e.g. the brain mask), as in Baur et al. (MedIA 2021)
and Behrendt et al. (pDDPM, MIDL 2023); they are not per-image averages.

Precision is TP / (TP + FP) and recall is TP / (TP + FN): AnoDDPM's ``evaluation.py`` swaps the two,
which changes AUPRC; the tests pin the correct orientation.

Inputs may be numpy arrays or torch tensors; outputs are Python floats.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score


def _array(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):                                  # torch.Tensor, without importing torch
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as err:  # noqa: BLE001
        raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(x).__name__}") from err


def _scores(x: Any, name: str) -> np.ndarray:
    a = _array(x, name)
    if a.dtype == bool or not np.issubdtype(a.dtype, np.number):
        raise TypeError(f"{name}: expected real-valued scores, got dtype {a.dtype}")
    if a.size == 0:
        raise ValueError(f"{name}: expected at least one value, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: expected finite scores, got {int(np.isnan(a).sum())} NaN and "
                         f"{int(np.isinf(a).sum())} Inf value(s)")
    return a.astype(np.float64, copy=False)


def _binary(x: Any, name: str, like: np.ndarray, like_name: str) -> np.ndarray:
    a = _array(x, name)
    if a.shape != like.shape:
        raise ValueError(f"{name}: expected the shape of {like_name} {like.shape}, got {a.shape}")
    if a.dtype != bool:
        if not np.isin(a, (0, 1)).all():
            raise ValueError(f"{name}: expected binary values (bool or 0/1), got values such as "
                             f"{np.unique(a[~np.isin(a, (0, 1))])[:5].tolist()}")
        a = a.astype(bool)
    return a


def _pixels(maps: Any, truth: Any, valid: Any = None, *, need_negatives: bool = False,
            what: str = "this metric") -> tuple[np.ndarray, np.ndarray]:
    """Flatten (maps, truth) to 1-D, keep pixels inside ``valid``, and check both are usable."""
    m = _scores(maps, "maps")
    t = _binary(truth, "truth", m, "maps")
    if valid is not None:
        v = _binary(valid, "valid", m, "maps")
        m, t = m[v], t[v]
    else:
        m, t = m.ravel(), t.ravel()
    if m.size == 0:
        raise ValueError("valid: expected at least one valid pixel, got none")
    if not t.any():
        raise ValueError(f"truth: {what} needs at least one anomalous (positive) pixel, got none"
                         f"{' inside valid' if valid is not None else ''}")
    if need_negatives and t.all():
        raise ValueError(f"truth: {what} needs at least one normal (negative) pixel, got none")
    return m, t


def _images(scores: Any, labels: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    s = _scores(scores, "scores")
    if s.ndim != 1:
        raise ValueError(f"scores: expected one score per image (1-D), got shape {s.shape}")
    y = _binary(labels, "labels", s, "scores")
    if not y.any() or (what == "image AUROC" and y.all()):
        raise ValueError(f"labels: {what} needs both normal (0) and anomalous (1) images, "
                         f"got {int(y.sum())} anomalous of {y.size}")
    return s, y


def pixel_auroc(maps: Any, truth: Any, valid: Any = None) -> float:
    """Pixel-level area under the ROC curve, pooled over all (valid) pixels of the set."""
    m, t = _pixels(maps, truth, valid, need_negatives=True, what="pixel AUROC")
    return float(roc_auc_score(t, m))


def pixel_auprc(maps: Any, truth: Any, valid: Any = None) -> float:
    """Pixel-level average precision (AUPRC; MOOD challenge, Kascenas et al. 2022), pooled over pixels."""
    m, t = _pixels(maps, truth, valid, what="pixel AUPRC")
    return float(average_precision_score(t, m))


def best_dice(maps: Any, truth: Any, valid: Any = None) -> tuple[float, float]:
    """Best achievable Dice over all thresholds, ⌈Dice⌉ (Baur et al. 2021; Behrendt et al. 2023).

    Exact: every distinct score is tried as a threshold via one sorted sweep
    (``precision_recall_curve``), using Dice = 2PR / (P + R). Pooled over all (valid) pixels.
    An oracle upper bound: the threshold is chosen on the very set it is scored on.

    Returns:
        (dice, threshold), where pixels with score >= threshold are predicted anomalous.
    """
    m, t = _pixels(maps, truth, valid, what="best Dice")
    precision, recall, thresholds = precision_recall_curve(t, m)
    precision, recall = precision[:-1], recall[:-1]           # the last point (P=1, R=0) has no threshold
    denom = precision + recall
    dice = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    best = int(np.argmax(dice))
    return float(dice[best]), float(thresholds[best])


def dice_at_threshold(maps: Any, truth: Any, threshold: float, valid: Any = None) -> float:
    """Pooled Dice of the segmentation ``maps >= threshold`` against ``truth`` (over valid pixels)."""
    if not np.isfinite(float(threshold)):
        raise ValueError(f"threshold: expected a finite number, got {threshold!r}")
    m, t = _pixels(maps, truth, valid, what="Dice")
    pred = m >= float(threshold)
    tp = np.count_nonzero(pred & t)
    return float(2 * tp / (np.count_nonzero(pred) + np.count_nonzero(t)))


def threshold_at_fpr(healthy_maps: Any, fpr: float = 0.01, valid: Any = None) -> float:
    """Threshold that flags (at most, and as close as ties allow) ``fpr`` of healthy pixels.

    The "unbiased" operating point of ANDi / UAD-IMAG (Frotscher et al.): fixed on healthy validation
    maps, where every pixel is negative, so no lesion labels are used. The returned value is an
    observed score; the fraction of healthy (valid) pixels with score >= threshold is <= ``fpr``.
    """
    if not 0 <= float(fpr) < 1:
        raise ValueError(f"fpr: expected a fraction in [0, 1), got {fpr!r}")
    m = _scores(healthy_maps, "healthy_maps")
    s = m[_binary(valid, "valid", m, "healthy_maps")] if valid is not None else m.ravel()
    if s.size == 0:
        raise ValueError("valid: expected at least one valid healthy pixel, got none")
    s = np.sort(s)
    k = min(int(np.floor(float(fpr) * s.size + 1e-9)), s.size - 1)   # pixels allowed above the threshold
    first_above = int(np.searchsorted(s, s[s.size - k - 1], side="right"))
    if first_above < s.size:
        return float(s[first_above])
    # Nothing may be flagged: the next representable value above the maximum, in the maps' own
    # precision, so that float32 maps compared with the returned float still flag nothing.
    dtype = _array(healthy_maps, "healthy_maps").dtype
    dtype = dtype if np.issubdtype(dtype, np.floating) else np.dtype(np.float64)
    return float(np.nextafter(dtype.type(s[-1]), dtype.type(np.inf)))


def image_auroc(scores: Any, labels: Any) -> float:
    """Image-level (sample-wise) AUROC of one anomaly score per image."""
    s, y = _images(scores, labels, "image AUROC")
    return float(roc_auc_score(y, s))


def image_ap(scores: Any, labels: Any) -> float:
    """Image-level (sample-wise) average precision of one anomaly score per image."""
    s, y = _images(scores, labels, "image AP")
    return float(average_precision_score(y, s))


def evaluate_anomaly(maps: Any, truth: Any, scores: Any, image_labels: Any, healthy_maps: Any,
                     valid: Any = None, healthy_valid: Any = None, fpr: float = 0.01) -> dict[str, float]:
    """All standard metrics of one anomaly detector on one test set.

    Args:
        maps, truth, valid: pixel anomaly maps, lesion masks and (optional) brain masks of the test set.
        scores, image_labels: one score and one 0/1 label per test image.
        healthy_maps, healthy_valid: maps of held-out healthy images, used only to fix the threshold at
            ``fpr`` (``dice_at_fpr``); never the test set itself.

    Returns:
        pixel_auroc, pixel_auprc, best_dice, best_dice_threshold, dice_at_fpr, fpr_threshold,
        image_auroc, image_ap.
    """
    dice, dice_threshold = best_dice(maps, truth, valid)
    fpr_threshold = threshold_at_fpr(healthy_maps, fpr, healthy_valid)
    return {
        "pixel_auroc": pixel_auroc(maps, truth, valid),
        "pixel_auprc": pixel_auprc(maps, truth, valid),
        "best_dice": dice,
        "best_dice_threshold": dice_threshold,
        "dice_at_fpr": dice_at_threshold(maps, truth, fpr_threshold, valid),
        "fpr_threshold": fpr_threshold,
        "image_auroc": image_auroc(scores, image_labels),
        "image_ap": image_ap(scores, image_labels),
    }
