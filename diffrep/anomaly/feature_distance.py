"""Feature-distance anomaly scoring on diffusion U-Net pixel descriptors (no reconstruction).

Pixel descriptors are the upsampled, concatenated activations of chosen U-Net nodes at chosen
timesteps (Baranchuk et al. 2022), extracted with a fixed, shared, seeded noise so that healthy and
test images see the same noise. Two ways to turn them into an anomaly map:

- ``method="knn"``: a PatchCore-style memory bank (Roth et al. 2022). ``fit`` keeps a random subset
  of at most ``max_pixels`` healthy in-mask descriptors (drawn batch by batch, proportionally, so
  the full descriptor set is never held in memory), optionally reduced with PCA; the map is the
  mean Euclidean distance of each test pixel to its ``k`` nearest bank descriptors (torch.cdist in
  chunks). Position-free: a descriptor may match healthy tissue anywhere.
- ``method="gaussian"``: PaDiM (Defard et al. 2021). Descriptors are average-pooled to a
  ``gaussian_size`` grid; at every grid position a Gaussian is fitted over the healthy images with
  Ledoit-Wolf shrinkage (scikit-learn); the map is the Mahalanobis distance, upsampled bilinearly.
  Position-specific: assumes aligned images (e.g. registered brain slices). Memory: the pooled
  descriptors (N x D x grid) plus one D x D precision matrix per position; use ``pca_components``.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..backbones.backbone import Backbone
from ..features import FeatureExtractor, NoisePolicy, upsample_concat
from ..features.aggregate import pool_to
from ..errors import check_positive_int
from .base import AnomalyScorer, check_choice
from .postprocess import check_masks

METHODS = ("knn", "gaussian")
_CDIST_ELEMENTS = 2 ** 24  # query rows x bank rows per torch.cdist call (64 MB of float32)


def _pooled(features: dict, size: tuple[int, ...]) -> torch.Tensor:
    """Every map average-pooled (or, if smaller, bilinearly upsampled) to ``size``; channels concatenated."""
    out = []
    for value in features.values():
        value = value.float()
        if all(s >= g for s, g in zip(value.shape[2:], size)):
            out.append(pool_to(value, size))
        else:
            out.append(F.interpolate(value, size=size, mode="bilinear" if value.ndim == 4 else "trilinear",
                                     align_corners=False))
    return torch.cat(out, dim=1)


class FeatureDistanceScorer(AnomalyScorer):
    """Distance of test pixel descriptors to healthy ones; see the module docstring.

    ``fit`` must run before ``score`` (NotFittedError otherwise); a fitted scorer is saved with
    ``save`` / :func:`diffrep.persistence.save_fitted` (a reference to its backbone included).

    Args:
        backbone: the pretrained U-Net. nodes, timesteps, noise, seed: as for FeatureExtractor.
        method: ``"knn"`` (memory bank) or ``"gaussian"`` (per-position Mahalanobis, PaDiM).
        k: neighbours averaged for ``"knn"``.
        max_pixels: memory-bank budget (healthy descriptors kept) for ``"knn"`` and for fitting PCA.
        pca_components: reduce descriptors to this many dimensions with PCA fitted on the bank (None = off).
        gaussian_size: grid side for ``"gaussian"`` (positions = gaussian_size^spatial_dims).
        erode, median, top_fraction, batch_size: see AnomalyScorer.
    """

    _fitted_attribute = "extractor_"

    def __init__(self, backbone: Backbone, nodes: Sequence[str], timesteps: Sequence[int] | int,
                 method: str = "knn", k: int = 1, max_pixels: int = 50_000, pca_components: int | None = None,
                 noise: str = "shared", seed: int = 0, gaussian_size: int = 16, erode: int = 0, median: int = 0,
                 top_fraction: float = 0.01, batch_size: int = 32) -> None:
        self.backbone = backbone
        self.nodes = nodes
        self.timesteps = timesteps
        self.method = method
        self.k = k
        self.max_pixels = max_pixels
        self.pca_components = pca_components
        self.noise = noise
        self.seed = seed
        self.gaussian_size = gaussian_size
        self.erode = erode
        self.median = median
        self.top_fraction = top_fraction
        self.batch_size = batch_size

    def _validate(self) -> None:
        super()._validate()
        check_choice(self.method, "method", METHODS)
        for name in ("k", "max_pixels", "gaussian_size"):
            check_positive_int(getattr(self, name), name)
        if self.pca_components is not None:
            check_positive_int(self.pca_components, "pca_components")

    def _extractor(self) -> FeatureExtractor:
        return FeatureExtractor(self.backbone, self.nodes, self.timesteps, noise=self.noise, seed=self.seed,
                                batch_size=self.batch_size)

    @property
    def unet_calls_per_image(self) -> int:
        """One (early-exited) U-Net call per timestep and noise draw."""
        self._validate()
        return len(self.backbone.check_timesteps(self.timesteps)) * NoisePolicy.parse(self.noise).draws

    # --------------------------------------------------------------------- fit
    def fit(self, healthy_images: Any, masks: Any = None) -> "FeatureDistanceScorer":
        """Build the memory bank (knn) or the per-position Gaussians (gaussian) from healthy images."""
        self._validate()
        extractor = self._extractor()
        x = self._check_images(healthy_images)
        m = check_masks(masks, tuple(x.shape))
        m = torch.from_numpy(m) if m is not None else torch.ones((x.shape[0], *x.shape[2:]), dtype=torch.bool)
        total = int(m.sum())
        if total == 0:
            raise ValueError("masks: expected at least one healthy pixel inside the masks, got all-empty masks")
        rng = np.random.default_rng(int(self.seed))
        spatial, grid = tuple(x.shape[2:]), (int(self.gaussian_size),) * (x.ndim - 2)
        bank, pooled = [], []
        for index, feats in extractor.iter_batches(x):
            desc = upsample_concat(feats, spatial)  # (n, D, *spatial)
            pixels = desc.movedim(1, -1)[m[index]]  # (P, D) in-mask descriptors
            quota = min(len(pixels), int(np.ceil(self.max_pixels * len(pixels) / total)))
            bank.append(pixels[torch.from_numpy(np.sort(rng.choice(len(pixels), quota, replace=False)))])
            if self.method == "gaussian":
                pooled.append(_pooled(feats, grid))
        bank_t = torch.cat(bank)[: int(self.max_pixels)]
        self._fit_pca(bank_t)
        self.extractor_ = extractor
        if self.method == "knn":
            if int(self.k) > len(bank_t):
                raise ValueError(f"k: expected at most the memory-bank size {len(bank_t)}, got {self.k}")
            self.memory_bank_ = self._project(bank_t)
        else:
            self._fit_gaussians(torch.cat(pooled))
        return self

    def _fit_pca(self, bank: torch.Tensor) -> None:
        self.pca_mean_ = self.pca_components_ = None
        if self.pca_components is None:
            return
        from sklearn.decomposition import PCA

        if int(self.pca_components) > min(bank.shape):
            raise ValueError(f"pca_components: expected at most min(bank pixels, descriptor dim) = "
                             f"{min(bank.shape)}, got {self.pca_components}")
        pca = PCA(n_components=int(self.pca_components), random_state=int(self.seed)).fit(bank.numpy())
        self.pca_mean_ = torch.from_numpy(pca.mean_).float()
        self.pca_components_ = torch.from_numpy(pca.components_).float()

    def _project(self, desc: torch.Tensor) -> torch.Tensor:
        """(..., D) descriptors -> PCA space (or unchanged)."""
        if self.pca_components_ is None:
            return desc.float()
        return (desc.float() - self.pca_mean_) @ self.pca_components_.T

    def _fit_gaussians(self, pooled: torch.Tensor) -> None:
        from sklearn.covariance import LedoitWolf

        if pooled.shape[0] < 2:
            raise ValueError(f"method='gaussian': expected at least 2 healthy images, got {pooled.shape[0]}")
        samples = self._project(pooled.flatten(2).transpose(1, 2)).transpose(0, 1).numpy()  # (positions, N, D)
        fits = [LedoitWolf().fit(s.astype(np.float64)) for s in samples]
        self.gaussian_mean_ = torch.from_numpy(np.stack([f.location_ for f in fits])).float()
        self.gaussian_precision_ = torch.from_numpy(np.stack([f.precision_ for f in fits])).float()

    # ------------------------------------------------------------- persistence
    def _fitted_state(self) -> dict[str, Any]:
        """The PCA, and the memory bank (knn) or the per-position Gaussians (gaussian)."""
        self._require_fitted()
        names = ["pca_mean_", "pca_components_"]
        names += ["memory_bank_"] if self.method == "knn" else ["gaussian_mean_", "gaussian_precision_"]
        return {name: getattr(self, name) for name in names}

    def _set_fitted_state(self, state: dict[str, Any]) -> None:
        super()._set_fitted_state(state)
        self.extractor_ = self._extractor()

    # ------------------------------------------------------------------- score
    @torch.inference_mode()
    def _raw_maps(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.extractor_(images)
        spatial = tuple(images.shape[2:])
        if self.method == "knn":
            desc = upsample_concat(feats, spatial).movedim(1, -1)
            desc = self._project(desc.reshape(-1, desc.shape[-1]))
            return self._knn(desc).reshape(images.shape[0], *spatial)
        grid = tuple(self.gaussian_size for _ in spatial)
        x = self._project(_pooled(feats, grid).flatten(2).transpose(1, 2))  # (n, positions, D)
        diff = x - self.gaussian_mean_
        dist = torch.einsum("npd,pde,npe->np", diff, self.gaussian_precision_, diff).clamp_min(0).sqrt()
        dist = dist.reshape(images.shape[0], 1, *grid)
        mode = "bilinear" if len(spatial) == 2 else "trilinear"
        return F.interpolate(dist, size=spatial, mode=mode, align_corners=False)[:, 0]

    def _knn(self, queries: torch.Tensor) -> torch.Tensor:
        bank, k = self.memory_bank_, int(self.k)
        rows = max(1, _CDIST_ELEMENTS // len(bank))
        out = [torch.cdist(queries[i:i + rows], bank).topk(k, dim=1, largest=False).values.mean(dim=1)
               for i in range(0, len(queries), rows)]
        return torch.cat(out)
