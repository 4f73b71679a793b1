"""Multi-level ensembles: combine anomaly maps from several timesteps, i.e. noise levels (or several scorers).

cDDPM (Behrendt et al. 2025) averages the single-step reconstructions at t in {250, 500, 750};
small L restores fine texture but misses large lesions, large L erases lesions but also detail.
Residual scales differ a lot between levels, so when fitted on healthy images each level's map is
standardised by its healthy statistics (mean and std of healthy residuals inside the mask) before
combining, which keeps one level from dominating only because its residuals are larger.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from sklearn.exceptions import NotFittedError

from ..backbones.backbone import Backbone
from .base import AnomalyScorer, check_choice
from .postprocess import check_masks, erode_masks

COMBINE = ("mean", "max")
NORMALISE = ("healthy", None)


class MultiLevelScorer(AnomalyScorer):
    """Combine the raw maps of several scorers into one map, optionally standardised per level.

    Args:
        backbone, timesteps, scorer_params: build one ``ReconstructionScorer(backbone, timestep=L,
            **scorer_params)`` per timestep L in ``timesteps`` (``batch_size`` defaults to this scorer's).
        scorers: alternatively, a list of ready AnomalyScorers (then backbone/timesteps are ignored).
        combine: ``"mean"`` or ``"max"`` over the members (levels), pixel by pixel.
        normalise: ``"healthy"`` (needs ``fit`` on healthy images) or ``None`` (raw maps combined).
        erode, median, top_fraction: applied once, to the combined map. The members' own
            post-processing settings are not used (their raw maps are combined).

    With ``normalise="healthy"`` level l's map r_l becomes z_l = (r_l - mu_l) / sd_l; the combined
    map is shifted so that a zero residual at every level maps to 0. It is therefore >= 0, 0 outside
    the mask, and with ``combine="mean"`` equals mean_l(r_l / sd_l).
    """

    def __init__(self, backbone: Backbone | None = None, timesteps: Sequence[int] = (250, 500, 750),
                 scorer_params: dict[str, Any] | None = None, scorers: Sequence[AnomalyScorer] | None = None,
                 combine: str = "mean", normalise: str | None = "healthy", erode: int = 0, median: int = 0,
                 top_fraction: float = 0.01, batch_size: int = 32) -> None:
        self.backbone = backbone
        self.timesteps = timesteps
        self.scorer_params = scorer_params
        self.scorers = scorers
        self.combine = combine
        self.normalise = normalise
        self.erode = erode
        self.median = median
        self.top_fraction = top_fraction
        self.batch_size = batch_size

    # ------------------------------------------------------------------ members
    def _members(self) -> list[AnomalyScorer]:
        if self.scorers is not None:
            members = list(self.scorers)
            bad = [type(m).__name__ for m in members if not isinstance(m, AnomalyScorer)]
            if not members or bad:
                raise ValueError(f"scorers: expected a non-empty list of AnomalyScorer, got {bad or 'an empty list'}")
            return members
        from .reconstruction import ReconstructionScorer

        if self.backbone is None:
            raise ValueError("MultiLevelScorer: expected either a backbone (with timesteps) or a list of scorers, "
                             "got neither")
        timesteps = list(self.timesteps)
        if not timesteps:
            raise ValueError("timesteps: expected at least one timestep, got an empty list")
        params = dict(self.scorer_params or {})
        clash = {"backbone", "timestep"} & set(params)
        if clash:
            raise ValueError(f"scorer_params: {sorted(clash)} are set by MultiLevelScorer itself; remove them")
        params.setdefault("batch_size", self.batch_size)
        return [ReconstructionScorer(self.backbone, timestep=t, **params) for t in timesteps]

    def _validate(self) -> None:
        super()._validate()
        check_choice(self.combine, "combine", COMBINE)
        check_choice(self.normalise, "normalise", NORMALISE)

    def _check_images(self, images: Any) -> torch.Tensor:
        return self._current_members()[0]._check_images(images)

    def _current_members(self) -> list[AnomalyScorer]:
        return self.members_ if hasattr(self, "members_") else self._members()

    @property
    def unet_calls_per_image(self) -> int:
        """The sum of the members' U-Net calls."""
        return sum(m.unet_calls_per_image for m in self._current_members())

    # ---------------------------------------------------------------- fit/score
    def fit(self, healthy_images: Any, masks: Any = None) -> "MultiLevelScorer":
        """Build the members; with ``normalise="healthy"`` record each level's healthy mean/std.

        Statistics use the pixels inside the (eroded) masks, or every pixel without masks.
        """
        self._validate()
        members = self._members()
        for m in members:
            m._validate()
        x = members[0]._check_images(healthy_images)
        m = check_masks(masks, tuple(x.shape))
        region = erode_masks(m, int(self.erode)) if m is not None else None
        means, stds = [], []
        if self.normalise == "healthy":
            for member in members:
                raw = member.raw_maps(x)
                values = raw[region] if region is not None else raw.ravel()
                if values.size < 2:
                    raise ValueError(f"fit: expected at least 2 healthy pixels inside the masks, got {values.size}")
                means.append(float(values.mean()))
                stds.append(max(float(values.std()), 1e-12))
        self.members_ = members
        self.level_mean_ = np.asarray(means)
        self.level_std_ = np.asarray(stds)
        return self

    def _require_fitted(self) -> None:
        """With ``normalise="healthy"`` the healthy statistics are needed: NotFittedError without them."""
        if self.normalise == "healthy" and not hasattr(self, "members_"):
            raise NotFittedError("MultiLevelScorer with normalise='healthy' must be fitted on healthy images "
                                 "first (call fit(healthy_images, masks)), or use normalise=None")

    def _fitted_state(self) -> dict[str, Any]:
        """The per-level healthy means and stds (the members are rebuilt from the parameters)."""
        self._require_fitted()
        return {"level_mean_": self.level_mean_, "level_std_": self.level_std_} if hasattr(self, "members_") else {}

    def _set_fitted_state(self, state: dict[str, Any]) -> None:
        super()._set_fitted_state(state)
        if state:
            self.members_ = self._members()

    def _raw_maps(self, images: torch.Tensor) -> torch.Tensor:
        """The combined (normalised) maps of one batch before masking and filtering."""
        self._require_fitted()
        raws = np.stack([member.raw_maps(images) for member in self._current_members()])  # (levels, n, *spatial)
        if self.normalise == "healthy":
            shape = (-1,) + (1,) * (raws.ndim - 1)
            mu, sd = self.level_mean_.reshape(shape), self.level_std_.reshape(shape)
            z, floor = (raws - mu) / sd, -mu / sd
            combined = z.mean(0) - floor.mean() if self.combine == "mean" else z.max(0) - floor.max()
        else:
            combined = raws.mean(0) if self.combine == "mean" else raws.max(0)
        return torch.from_numpy(combined.astype(np.float32))
