"""Healthy-residual calibration: turn any scorer's raw map into a z-score against healthy look-alike pixels.

A reconstruction residual is not only large at lesions: a weak denoiser also leaves large residuals
at healthy edges (ventricle borders, sulci) and in bright tissue, which swamps the lesion signal.
``CalibratedScorer`` learns, from healthy images, how large the base scorer's raw map usually is at
a pixel with a given input intensity and local gradient magnitude (a 2D table of quantile bins),
and reports z = (r - mean_bin) / std_bin. It costs no extra U-Net calls at test time: the fit runs
the base scorer once over the healthy images.

This is diffrep's own post-hoc normalisation, in the spirit of the per-level healthy
standardisation of cDDPM (Behrendt et al.) and of the intensity-aware thresholds used with DAEs
(Kascenas et al. 2022), applied per pixel class rather than per image.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy import ndimage
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted

from ..errors import check_positive_int
from .base import AnomalyScorer
from .postprocess import check_masks


def intensity_and_gradient(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel descriptors of (N, C, *spatial) images: channel-mean intensity and its Sobel gradient magnitude."""
    intensity = images.mean(axis=1)
    gradient = np.stack([ndimage.generic_gradient_magnitude(img, ndimage.sobel) for img in intensity])
    return intensity.astype(np.float32), gradient.astype(np.float32)


class CalibratedScorer(AnomalyScorer):
    """Wrap ``scorer``; its raw map r becomes (r - mu[b]) / sd[b], b = the (intensity, gradient) bin of the pixel.

    Args:
        scorer: any AnomalyScorer (its own erode/median are not used; this scorer's are).
        bins: quantile bins per descriptor (bins x bins cells), edges from healthy pixels inside the masks.
        min_count: cells with fewer healthy pixels use the global healthy mean and std.
        erode, median, top_fraction, batch_size: as for every AnomalyScorer.

    ``fit(healthy_images, masks)`` must run before ``score``. Maps are z-scores: they can be
    negative inside the mask (a residual smaller than usual for that kind of pixel). ``save`` /
    :func:`diffrep.persistence.save_fitted` stores the table and the base scorer (nested, in ``scorer/``).
    """

    _fitted_attribute = "mean_"

    def __init__(self, scorer: AnomalyScorer | None = None, bins: int = 16, min_count: int = 20, erode: int = 0,
                 median: int = 0, top_fraction: float = 0.01, batch_size: int = 32) -> None:
        self.scorer = scorer
        self.bins = bins
        self.min_count = min_count
        self.erode = erode
        self.median = median
        self.top_fraction = top_fraction
        self.batch_size = batch_size

    def _validate(self) -> None:
        super()._validate()
        if not isinstance(self.scorer, AnomalyScorer):
            raise TypeError(f"scorer: expected an AnomalyScorer, got {type(self.scorer).__name__}")
        check_positive_int(self.bins, "bins")
        check_positive_int(self.min_count, "min_count")

    @property
    def unet_calls_per_image(self) -> int:
        """The base scorer's calls: calibration adds none at test time."""
        return self.scorer.unet_calls_per_image

    def _check_images(self, images: Any) -> torch.Tensor:
        return self.scorer._check_images(images)

    def fit(self, healthy_images: Any, masks: Any = None) -> "CalibratedScorer":
        """Fit the base scorer unless it is already fitted (a trained DAE is not retrained), then the
        mean/std table of its raw maps on the healthy images."""
        self._validate()
        x = self._check_images(healthy_images)
        m = check_masks(masks, tuple(x.shape))
        try:
            check_is_fitted(self.scorer)
        except NotFittedError:
            self.scorer.fit(x, masks)
        raw = self.scorer.raw_maps(x)
        intensity, gradient = intensity_and_gradient(x.numpy())
        inside = np.ones(raw.shape, dtype=bool) if m is None else m
        if not inside.any():
            raise ValueError("masks: expected at least one healthy pixel inside the masks, got none")
        quantiles = np.linspace(0.0, 1.0, int(self.bins) + 1)[1:-1]
        self.intensity_edges_ = np.quantile(intensity[inside], quantiles)
        self.gradient_edges_ = np.quantile(gradient[inside], quantiles)
        cells = self._cells(intensity[inside], gradient[inside])
        values = raw[inside].astype(np.float64)
        n_cells = int(self.bins) ** 2
        count = np.bincount(cells, minlength=n_cells)
        total = np.bincount(cells, weights=values, minlength=n_cells)
        square = np.bincount(cells, weights=values ** 2, minlength=n_cells)
        enough = count >= int(self.min_count)
        mean = np.where(enough, total / np.maximum(count, 1), values.mean())
        var = np.where(enough, square / np.maximum(count, 1) - mean ** 2, values.var())
        floor = 1e-3 * values.std() + 1e-12  # a cell of identical residuals must not divide by zero
        self.mean_ = mean.astype(np.float32)
        self.std_ = np.sqrt(np.maximum(var, 0.0)).clip(min=floor).astype(np.float32)
        self.cell_counts_ = count
        return self

    def _fitted_state(self) -> dict[str, Any]:
        """The bin edges and the per-cell healthy mean, std and pixel count."""
        self._require_fitted()
        names = ("intensity_edges_", "gradient_edges_", "mean_", "std_", "cell_counts_")
        return {name: getattr(self, name) for name in names}

    def _cells(self, intensity: np.ndarray, gradient: np.ndarray) -> np.ndarray:
        return (np.digitize(intensity, self.intensity_edges_) * int(self.bins)
                + np.digitize(gradient, self.gradient_edges_))

    def _raw_maps(self, images: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "mean_"):
            raise NotFittedError("CalibratedScorer: call fit(healthy_images, masks) before score")
        raw = self.scorer._raw_maps(images).detach().float().cpu().numpy()
        cells = self._cells(*intensity_and_gradient(images.detach().float().cpu().numpy()))
        return torch.from_numpy((raw - self.mean_[cells]) / self.std_[cells])
