"""The AnomalyScorer contract shared by every anomaly method in diffrep.

Scikit-learn conventions (DESIGN.md): ``__init__`` stores its arguments and nothing else (so
``sklearn.base.clone`` and ``get_params`` work), validation happens in ``fit``/``score``, fitted
state ends in ``_``, ``fit`` returns ``self``. Higher scores mean more anomalous, everywhere.

A subclass implements ``_raw_maps`` (a float tensor (n, *spatial) per batch: the unprocessed
anomaly evidence, e.g. a residual in the data range) and ``unet_calls_per_image``; the base class
does batching, brain-mask handling, erosion, median filtering and image scores.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError

from .._types import AnomalyResult
from ..errors import check_positive_int
from .postprocess import check_masks, image_scores, postprocess_maps


class AnomalyScorer(BaseEstimator, ABC):
    """Base class: ``fit(healthy_images, masks=None) -> self``, ``score(images, masks=None) -> AnomalyResult``.

    Subclasses have the attributes ``erode`` (mask erosion in pixels), ``median`` (median filter
    size, 0 = none), ``top_fraction`` (image score = mean of the top fraction of map values inside
    the mask; 1.0 = mean over the mask) and ``batch_size``.
    """

    erode: int = 0
    median: int = 0
    top_fraction: float = 0.01
    batch_size: int = 32
    # The fitted attribute whose absence means "not fitted" (None: nothing to fit, e.g. reconstruction).
    _fitted_attribute: str | None = None

    # ---------------------------------------------------------------- contract
    @property
    @abstractmethod
    def unet_calls_per_image(self) -> int:
        """Network evaluations spent on one image (slice) with the configured settings (NFE)."""

    @abstractmethod
    def _raw_maps(self, images: torch.Tensor) -> torch.Tensor:
        """Unprocessed anomaly maps (n, *spatial) of one validated batch (data range)."""

    def _check_images(self, images: Any) -> torch.Tensor:
        """Validate an image batch; the default asks the scorer's backbone."""
        return self.backbone.check_images(images)  # type: ignore[attr-defined]

    def _validate(self) -> None:
        """Check the stored arguments; raise ValueError naming valid values. Extended by subclasses."""
        check_positive_int(self.batch_size, "batch_size")
        for name in ("erode", "median"):
            check_positive_int(getattr(self, name), name, minimum=0)
        if not (isinstance(self.top_fraction, (int, float)) and 0.0 < float(self.top_fraction) <= 1.0):
            raise ValueError(f"top_fraction: expected a number in (0, 1], got {self.top_fraction!r}")

    # ------------------------------------------------------------------ public
    def fit(self, healthy_images: Any, masks: Any = None) -> "AnomalyScorer":
        """Nothing to learn for a pure reconstruction scorer: validate the settings, return self."""
        self._validate()
        self._check_images(healthy_images)
        return self

    def raw_maps(self, images: Any) -> np.ndarray:
        """Unprocessed anomaly maps (N, *spatial) float32, computed in batches of ``batch_size``."""
        self._validate()
        self._require_fitted()
        x = self._check_images(images)
        return self._batched_raw_maps(x)

    def score(self, images: Any, masks: Any = None) -> AnomalyResult:
        """Anomaly maps (N, *spatial) and image scores (N,) for images in the data range.

        Maps are post-processed (see :func:`diffrep.anomaly.postprocess.postprocess_maps`): zeroed
        outside the eroded mask when masks are given, then median-filtered.
        """
        self._validate()
        self._require_fitted()
        x = self._check_images(images)
        m = check_masks(masks, tuple(x.shape))
        return self._finish(self._batched_raw_maps(x), m)

    # ------------------------------------------------------------- persistence
    def _require_fitted(self) -> None:
        """Raise NotFittedError (naming the scorer) if it needs ``fit`` and has not had it."""
        if self._fitted_attribute is not None and not hasattr(self, self._fitted_attribute):
            raise NotFittedError(f"{type(self).__name__}: call fit(healthy_images, masks) (or load a saved one "
                                 "with load_fitted) first")

    def _fitted_state(self) -> dict[str, Any]:
        """The fitted attributes to save (see diffrep.persistence); none for a scorer without fitting."""
        self._require_fitted()
        return {}

    def _set_fitted_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`_fitted_state` returned (attribute by attribute)."""
        for name, value in state.items():
            setattr(self, name, value)

    def save(self, directory: str | os.PathLike, backbone_source: str | None = None) -> Path:
        """Save with :func:`diffrep.persistence.save_fitted` (``config.json`` + ``state.safetensors``)."""
        from ..persistence import save_fitted

        return save_fitted(self, directory, backbone_source=backbone_source)

    @classmethod
    def load(cls, directory: str | os.PathLike, backbone: Any = None, **params: Any) -> "AnomalyScorer":
        """A scorer of this class saved by :meth:`save` (see :func:`diffrep.persistence.load_fitted`)."""
        from ..persistence import load_fitted

        return load_fitted(directory, backbone=backbone, expected=cls, params=params)

    # ----------------------------------------------------------------- helpers
    def _batched_raw_maps(self, x: torch.Tensor) -> np.ndarray:
        parts = [self._raw_maps(x[i:i + self.batch_size]).detach().float().cpu().numpy()
                 for i in range(0, x.shape[0], self.batch_size)]
        return np.concatenate(parts).astype(np.float32, copy=False)

    def _finish(self, raw: np.ndarray, masks: np.ndarray | None) -> AnomalyResult:
        maps, eroded = postprocess_maps(raw, masks, erode=int(self.erode), median=int(self.median))
        return AnomalyResult(scores=image_scores(maps, eroded, float(self.top_fraction)), maps=maps)


def check_choice(value: Any, name: str, valid: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``valid``; otherwise raise a ValueError listing the valid values."""
    if value not in valid:
        raise ValueError(f"{name}: expected one of {list(valid)}, got {value!r}")
    return value
