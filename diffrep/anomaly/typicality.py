"""The typicality test for out-of-distribution inputs, over batches (Nalisnick et al. 2019, "Detecting
out-of-distribution inputs to deep generative models using typicality").

A high-dimensional model puts its probability mass in a typical set, not at its mode: inputs of
another kind can get a *higher* likelihood than the training data (constant images, simpler digits),
so a one-sided "low likelihood = anomalous" test fails on them. The typicality test is two-sided:
a batch of M inputs is out of distribution when the mean of its NLLs lies far from the in-distribution
mean, |mean_M NLL - mu| > epsilon.

``fit`` scores held-out in-distribution images with the inner scorer (by default the raw NLL of a
:class:`~diffrep.anomaly.likelihood_scores.LikelihoodScorer`), keeps their mean ``mean_`` and sets
``threshold_`` (epsilon) to the (1 - alpha) quantile of the statistic over ``bootstraps`` batches of
``group_size`` images drawn with replacement from them (Nalisnick et al., Alg. 1): an in-distribution
batch exceeds it with probability about alpha. :meth:`test_groups` applies the test to consecutive
groups of ``group_size`` images; ``score`` gives the M = 1 statistic |NLL(x) - mu| per image.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .._types import AnomalyResult
from ..errors import check_positive_int
from .base import AnomalyScorer
from .likelihood_scores import constant_maps_result
from .postprocess import check_masks


class TypicalityScorer(AnomalyScorer):
    """Two-sided typicality test on the image scores of ``scorer``; see the module docstring.

    Args:
        scorer: the image scorer whose scores are tested (a LikelihoodScorer, or any AnomalyScorer:
            its ``score(images).scores`` are used).
        group_size: M, the number of images tested together. bootstraps: bootstrap batches for the
            threshold. alpha: the in-distribution false-alarm rate the threshold is set for.
        seed: the bootstrap's seed (the inner scorer has its own).
    """

    _fitted_attribute = "mean_"

    def __init__(self, scorer: AnomalyScorer | None = None, group_size: int = 10, bootstraps: int = 1000,
                 alpha: float = 0.01, seed: int = 0) -> None:
        self.scorer = scorer
        self.group_size = group_size
        self.bootstraps = bootstraps
        self.alpha = alpha
        self.seed = seed

    def _validate(self) -> None:
        super()._validate()
        if not isinstance(self.scorer, AnomalyScorer):
            raise TypeError(f"scorer: expected an AnomalyScorer (e.g. a LikelihoodScorer), got "
                            f"{type(self.scorer).__name__}")
        check_positive_int(self.group_size, "group_size")
        check_positive_int(self.bootstraps, "bootstraps")
        check_positive_int(self.seed, "seed", minimum=0)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha: expected a number in (0, 1), got {self.alpha!r}")

    @property
    def unet_calls_per_image(self) -> int:
        """The inner scorer's calls: the test itself needs none."""
        return self.scorer.unet_calls_per_image

    def _check_images(self, images: Any) -> torch.Tensor:
        return self.scorer._check_images(images)

    def inner_scores(self, images: Any) -> np.ndarray:
        """The inner scorer's image scores (N,) float64."""
        if hasattr(self.scorer, "score_images"):
            return np.asarray(self.scorer.score_images(images), dtype=np.float64)
        return np.asarray(self.scorer.score(images).scores, dtype=np.float64)

    # ------------------------------------------------------------------- fit
    def fit(self, healthy_images: Any, masks: Any = None) -> "TypicalityScorer":
        """Score held-out in-distribution images, then :meth:`fit_scores` on them (masks are not used)."""
        self._validate()
        return self.fit_scores(self.inner_scores(self._check_images(healthy_images)))

    def fit_scores(self, scores: Any) -> "TypicalityScorer":
        """Fit on in-distribution image scores already computed (N >= 2): the mean and the bootstrap threshold."""
        self._validate()
        values = np.asarray(scores, dtype=np.float64)
        if values.ndim != 1 or values.size < 2 or not np.isfinite(values).all():
            raise ValueError(f"scores: expected >= 2 finite in-distribution image scores (N,), got shape "
                             f"{values.shape} with {int((~np.isfinite(values)).sum())} non-finite value(s)")
        mean = float(values.mean())
        rng = np.random.default_rng(int(self.seed))
        draws = rng.integers(0, values.size, size=(int(self.bootstraps), int(self.group_size)))
        statistics = np.abs(values[draws].mean(axis=1) - mean)
        self.mean_ = mean
        self.threshold_ = float(np.quantile(statistics, 1.0 - float(self.alpha)))
        self.fit_scores_ = values
        return self

    def _fitted_state(self) -> dict[str, Any]:
        """The in-distribution mean, the threshold and the fitted scores."""
        self._require_fitted()
        return {"mean_": self.mean_, "threshold_": self.threshold_, "fit_scores_": self.fit_scores_}

    # ------------------------------------------------------------------ test
    def statistics(self, scores: Any) -> np.ndarray:
        """|mean of each consecutive group of ``group_size`` scores - mean_| (G,); N must be a multiple of M."""
        self._require_fitted()
        values = np.asarray(scores, dtype=np.float64).reshape(-1)
        m = int(self.group_size)
        if values.size == 0 or values.size % m:
            raise ValueError(f"scores: expected a non-zero multiple of group_size = {m} images, got {values.size}")
        return np.abs(values.reshape(-1, m).mean(axis=1) - self.mean_)

    def test_groups(self, images: Any) -> dict[str, np.ndarray]:
        """The test on consecutive groups of ``group_size`` images: ``statistic`` (G,) and
        ``out_of_distribution`` (G,) bool (statistic > threshold_)."""
        self._validate()
        self._require_fitted()
        statistic = self.statistics(self.inner_scores(self._check_images(images)))
        return {"statistic": statistic, "out_of_distribution": statistic > self.threshold_}

    def score(self, images: Any, masks: Any = None) -> AnomalyResult:
        """The M = 1 statistic |score(x) - mean_| per image; maps hold it at every pixel."""
        self._validate()
        self._require_fitted()
        x = self._check_images(images)
        scores = np.abs(self.inner_scores(x) - self.mean_)
        return constant_maps_result(scores, x, check_masks(masks, tuple(x.shape)), self)

    def _raw_maps(self, images: torch.Tensor) -> torch.Tensor:
        scores = torch.from_numpy(np.abs(self.inner_scores(images) - self.mean_)).float()
        return scores.view(-1, *[1] * (images.ndim - 2)).expand(images.shape[0], *images.shape[2:])
