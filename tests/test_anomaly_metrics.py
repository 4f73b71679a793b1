"""Anomaly metrics: agreement with scikit-learn, hand-worked Dice, the precision/recall swap, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from diffrep.anomaly.metrics import (best_dice, dice_at_threshold, evaluate_anomaly, image_ap, image_auroc,
                                     pixel_auprc, pixel_auroc, threshold_at_fpr)


def _toy(seed: int = 0, n: int = 3, size: int = 8):
    """Maps whose lesion pixels score higher on average, with overlap (imperfect detector)."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((n, 1, size, size), dtype=bool)
    truth[:, :, 2:5, 3:6] = True
    maps = rng.random(truth.shape) + 0.6 * truth
    valid = np.ones_like(truth)
    valid[:, :, 0, :] = False
    return maps.astype(np.float32), truth, valid


def _brute_force_best_dice(maps: np.ndarray, truth: np.ndarray) -> float:
    m, t = maps.ravel(), truth.ravel().astype(bool)
    best = 0.0
    for thr in np.unique(m):
        pred = m >= thr
        best = max(best, 2 * np.sum(pred & t) / (pred.sum() + t.sum()))
    return best


def test_pixel_auroc_and_auprc_match_sklearn():
    maps, truth, valid = _toy()
    assert pixel_auroc(maps, truth) == pytest.approx(roc_auc_score(truth.ravel(), maps.ravel()))
    assert pixel_auprc(maps, truth) == pytest.approx(average_precision_score(truth.ravel(), maps.ravel()))
    v = valid.astype(bool)
    assert pixel_auroc(maps, truth, valid) == pytest.approx(roc_auc_score(truth[v], maps[v]))
    assert pixel_auprc(maps, truth, valid) == pytest.approx(average_precision_score(truth[v], maps[v]))


def test_accepts_torch_tensors():
    maps, truth, valid = _toy()
    assert pixel_auroc(torch.from_numpy(maps), torch.from_numpy(truth)) == pytest.approx(pixel_auroc(maps, truth))
    assert best_dice(torch.from_numpy(maps), torch.from_numpy(truth.astype(np.uint8))) == best_dice(maps, truth)


def test_auprc_is_not_swapped():
    # Ranked pixels: positive, negative, positive, negative, negative.
    # Correct AP = mean over positives of precision at their rank = (1/1 + 2/3) / 2 = 5/6.
    # Precision/recall points (R, P): (0.5, 1), (0.5, 0.5), (1, 2/3), (1, 0.5), (1, 0.4).
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    truth = np.array([1, 0, 1, 0, 0])
    precision = np.array([1, 0.5, 2 / 3, 0.5, 0.4])
    recall = np.array([0.5, 0.5, 1, 1, 1])
    correct = np.sum(np.diff(np.r_[0, recall]) * precision)
    swapped = np.sum(np.diff(np.r_[0, precision]) * recall)   # AnoDDPM-style axes swap
    assert correct == pytest.approx(5 / 6)
    assert abs(swapped - correct) > 0.1
    assert pixel_auprc(scores, truth) == pytest.approx(5 / 6)


def test_best_dice_hand_worked():
    # 6 pixels; truth = 3 positives. Thresholds (>=): 0.9 -> TP1 FP0 -> 2/4; 0.8 -> TP1 FP1 -> 2/5;
    # 0.7 -> TP2 FP1 -> 4/6; 0.4 -> TP3 FP1 -> 6/7 (best); 0.3 -> TP3 FP2 -> 6/8; 0.1 -> 6/9.
    maps = np.array([[0.9, 0.8, 0.7], [0.4, 0.3, 0.1]])
    truth = np.array([[1, 0, 1], [1, 0, 0]])
    dice, threshold = best_dice(maps, truth)
    assert dice == pytest.approx(6 / 7)
    assert threshold == pytest.approx(0.4)
    assert dice_at_threshold(maps, truth, 0.4) == pytest.approx(6 / 7)
    assert dice_at_threshold(maps, truth, 0.7) == pytest.approx(4 / 6)
    assert dice_at_threshold(maps, truth, 1.0) == 0.0


def test_best_dice_matches_brute_force_and_its_threshold():
    maps, truth, valid = _toy(seed=3)
    dice, threshold = best_dice(maps, truth)
    assert dice == pytest.approx(_brute_force_best_dice(maps, truth))
    assert dice_at_threshold(maps, truth, threshold) == pytest.approx(dice)
    v = valid.astype(bool)
    dice_v, thr_v = best_dice(maps, truth, valid)
    assert dice_v == pytest.approx(_brute_force_best_dice(maps[v], truth[v]))
    assert dice_at_threshold(maps, truth, thr_v, valid) == pytest.approx(dice_v)


def test_threshold_at_fpr_flags_one_percent():
    healthy = np.random.default_rng(1).normal(size=(10, 1, 20, 20)).astype(np.float32)  # 4000 pixels
    thr = threshold_at_fpr(healthy, fpr=0.01)
    assert np.mean(healthy >= thr) == pytest.approx(0.01, abs=1 / 4000)
    assert np.mean(healthy >= thr) <= 0.01
    assert np.mean(healthy >= threshold_at_fpr(healthy, fpr=0.0)) == 0.0
    mask = np.zeros(healthy.shape, dtype=bool)
    mask[:5] = True
    thr_masked = threshold_at_fpr(healthy, fpr=0.05, valid=mask)
    assert np.mean(healthy[mask] >= thr_masked) == pytest.approx(0.05, abs=1 / 2000)


def test_threshold_at_fpr_with_ties_never_exceeds():
    healthy = np.r_[np.zeros(95), np.ones(5)]
    assert np.mean(healthy >= threshold_at_fpr(healthy, fpr=0.03)) <= 0.03
    assert threshold_at_fpr(np.arange(10), fpr=0.0) > 9


def test_image_metrics_match_sklearn():
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.2])
    labels = np.array([0, 0, 1, 1, 0])
    assert image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))
    assert image_ap(scores, labels) == pytest.approx(average_precision_score(labels, scores))


def test_evaluate_anomaly_returns_every_metric():
    maps, truth, valid = _toy()
    healthy = np.random.default_rng(2).random((4, 1, 8, 8)).astype(np.float32)
    scores = maps.reshape(len(maps), -1).mean(1)
    out = evaluate_anomaly(maps, truth, np.r_[scores, 0.0], np.r_[np.ones(len(maps)), 0], healthy, valid=valid)
    assert set(out) == {"pixel_auroc", "pixel_auprc", "best_dice", "best_dice_threshold", "dice_at_fpr",
                        "fpr_threshold", "image_auroc", "image_ap"}
    assert all(isinstance(v, float) for v in out.values())
    assert out["dice_at_fpr"] <= out["best_dice"] + 1e-12


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)|\(3, 2\).*\(2, 3\)"):
        pixel_auroc(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="valid"):
        best_dice(np.zeros((2, 3)), np.ones((2, 3)), valid=np.ones((2, 2)))


def test_bad_inputs():
    maps = np.array([0.1, 0.5, 0.9])
    with pytest.raises(ValueError, match="binary"):
        pixel_auroc(maps, np.array([0, 2, 1]))
    with pytest.raises(ValueError, match="NaN"):
        pixel_auprc(np.array([0.1, np.nan, 0.9]), np.array([0, 1, 1]))
    for fn in (pixel_auroc, pixel_auprc, best_dice):
        with pytest.raises(ValueError, match="positive"):
            fn(maps, np.zeros(3))
    with pytest.raises(ValueError, match="positive"):
        dice_at_threshold(maps, np.zeros(3), 0.5)
    with pytest.raises(ValueError, match="negative"):
        pixel_auroc(maps, np.ones(3))
    with pytest.raises(ValueError, match="both"):
        image_auroc(maps, np.ones(3))
    with pytest.raises(ValueError, match="fpr"):
        threshold_at_fpr(maps, fpr=1.5)
