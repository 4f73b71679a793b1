"""Seeded synthetic lesions on brain slices: an anomaly test set with exact ground truth.

Real lesion data (BraTS, ATLAS, MSLUB) cannot ship with diffrep; synthetic anomalies are what the MOOD
challenge mixes into its hidden test set and what self-supervised methods (e.g. FPI, Tan et al. 2020)
train on. Four kinds, all with soft edges and restricted to the brain mask:

- ``hyper`` / ``hypo``: an ellipse with an irregular, smooth boundary whose intensity is raised /
  lowered by ``contrast`` (tumour- or MS-like hyperintensities, stroke-like hypointensities);
- ``texture``: the region is blended with band-limited noise around its mean intensity;
- ``deform``: a local radial expansion (mass effect, via ``grid_sample``) plus an intensity shift.

The ground truth is where a lesion's soft weight exceeds 0.5, inside the brain. Sizes are in pixels
(defaults suit 64 x 64 slices). Same inputs and seed give the same output.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

LESION_KINDS = ("hyper", "hypo", "texture", "deform")


@dataclass
class LesionConfig:
    """How lesions are drawn. Ranges are inclusive (low, high); lengths are in pixels.

    ``radius`` is the geometric mean of the ellipse's semi-axes; ``aspect`` the minor/major ratio;
    ``softness`` the half-width of the soft edge; ``irregularity`` the relative amplitude of the
    smooth boundary perturbation. With probability ``p_inside`` a centre is drawn from the brain mask
    eroded by ``margin`` pixels, otherwise from the band between that and the brain's edge.
    Every lesion of one image has the same kind, drawn uniformly from ``kinds``.
    """

    kinds: tuple[str, ...] = LESION_KINDS
    radius: tuple[float, float] = (3.0, 9.0)
    contrast: tuple[float, float] = (0.25, 0.6)
    count: tuple[int, int] = (1, 2)
    softness: float = 1.5
    aspect: tuple[float, float] = (0.5, 1.0)
    irregularity: float = 0.15
    p_inside: float = 1.0
    margin: int = 4
    deform_strength: float = 0.6

    def __post_init__(self) -> None:
        self.kinds = tuple(self.kinds)
        bad = [k for k in self.kinds if k not in LESION_KINDS]
        if not self.kinds or bad:
            raise ValueError(f"kinds: expected a non-empty subset of {LESION_KINDS}, got {self.kinds}")
        for name, low_bound in (("radius", 1.0), ("contrast", 0.0), ("count", 1), ("aspect", 1e-3)):
            lo, hi = getattr(self, name)
            if not low_bound <= lo <= hi:
                raise ValueError(f"{name}: expected ({low_bound} <=) low <= high, got {(lo, hi)}")
        if self.aspect[1] > 1:
            raise ValueError(f"aspect: expected minor/major ratios <= 1, got {self.aspect}")
        if self.softness <= 0 or self.irregularity < 0 or self.margin < 0 or self.deform_strength < 0:
            raise ValueError("softness must be > 0 and irregularity, margin, deform_strength >= 0, got "
                             f"{self.softness}, {self.irregularity}, {self.margin}, {self.deform_strength}")
        if not 0 <= self.p_inside <= 1:
            raise ValueError(f"p_inside: expected a probability in [0, 1], got {self.p_inside}")


def _check(images: Any, masks: Any) -> tuple[torch.Tensor, torch.Tensor, bool]:
    as_numpy = isinstance(images, np.ndarray)
    img = torch.from_numpy(np.ascontiguousarray(images)) if as_numpy else images
    brain = torch.from_numpy(np.ascontiguousarray(masks)) if isinstance(masks, np.ndarray) else masks
    if not isinstance(img, torch.Tensor) or not isinstance(brain, torch.Tensor):
        raise TypeError(f"images, masks: expected numpy arrays or torch tensors, got "
                        f"{type(images).__name__}, {type(masks).__name__}")
    if img.ndim != 4 or img.shape[1] != 1 or not img.is_floating_point():
        raise ValueError(f"images: expected float images of shape (N, 1, H, W), got {img.dtype} {tuple(img.shape)}")
    if brain.shape != img.shape:
        raise ValueError(f"masks: expected the images' shape {tuple(img.shape)}, got {tuple(brain.shape)}")
    if not torch.isfinite(img).all() or img.min() < 0 or img.max() > 1:
        raise ValueError(f"images: expected finite values in [0, 1], got range [{float(img.min())}, {float(img.max())}]")
    brain = brain.bool() if brain.dtype == torch.bool or not brain.is_floating_point() else brain > 0.5
    empty = torch.nonzero(~brain.flatten(1).any(1)).flatten().tolist()
    if empty:
        raise ValueError(f"masks: expected a non-empty brain mask for every image, got empty masks at indices {empty[:10]}")
    return img.detach().float().cpu(), brain.cpu(), as_numpy


def _erode(mask: torch.Tensor, margin: int) -> torch.Tensor:
    """Square erosion by ``margin`` pixels; images whose eroded mask is empty keep their mask."""
    if margin == 0:
        return mask
    k = 2 * margin + 1
    eroded = -F.max_pool2d(-(mask.float()), k, stride=1, padding=margin) > 0.5
    keep = eroded.flatten(1).any(1).view(-1, 1, 1, 1)
    return torch.where(keep, eroded, mask)


def _sample_pixels(region: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One uniformly random pixel (row, col) of each image's non-empty region (N, 1, H, W)."""
    n, _, h, w = region.shape
    keys = torch.from_numpy(rng.random((n, h * w))).float()
    index = torch.where(region.flatten(1), keys, torch.full_like(keys, -1.0)).argmax(1)
    return (index // w).float(), (index % w).float()


def _band_noise(n: int, h: int, w: int, feature: float, gen: torch.Generator) -> torch.Tensor:
    """Smooth noise (N, 1, H, W) with unit std per image and features about ``feature`` pixels wide."""
    cells = (max(2, round(h / feature)), max(2, round(w / feature)))
    field = F.interpolate(torch.randn((n, 1, *cells), generator=gen), size=(h, w), mode="bicubic", align_corners=True)
    field = field - field.mean(dim=(2, 3), keepdim=True)
    return field / field.std(dim=(2, 3), keepdim=True).clamp_min(1e-6)


def _to(x: torch.Tensor, as_numpy: bool):
    return x.numpy() if as_numpy else x


def add_lesions(images: Any, masks: Any, config: LesionConfig | None = None, seed: int = 0):
    """Add synthetic lesions to every image (at least one each, with a non-empty ground-truth mask).

    Args:
        images: (N, 1, H, W) floats in [0, 1], numpy or torch; masks: (N, 1, H, W) brain masks.
        config: lesion parameters (defaults suit 64 x 64); seed: all randomness derives from it.

    Returns:
        (lesioned images, lesion masks (N, 1, H, W) bool, kinds: list of N kind names), arrays of
        the same library (numpy or torch) as ``images``. Pixels outside the brain are never changed.
    """
    cfg = config if config is not None else LesionConfig()
    img, brain, as_numpy = _check(images, masks)
    n, _, h, w = img.shape
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
    kind = torch.from_numpy(rng.integers(len(cfg.kinds), size=n)).view(n, 1, 1, 1)
    counts = rng.integers(cfg.count[0], cfg.count[1] + 1, size=n)
    interior = _erode(brain, cfg.margin)
    band = brain & ~interior
    band = torch.where(band.flatten(1).any(1).view(n, 1, 1, 1), band, brain)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    out, lesion = img.clone(), torch.zeros_like(brain)

    def per_image(values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(values, dtype=np.float32)).view(n, 1, 1, 1)

    for j in range(int(counts.max())):
        inside = torch.from_numpy(rng.random(n) < cfg.p_inside).view(n, 1, 1, 1)
        cy, cx = _sample_pixels(torch.where(inside, interior, band), rng)
        cy, cx = cy.view(n, 1, 1, 1), cx.view(n, 1, 1, 1)
        radius, aspect = per_image(rng.uniform(*cfg.radius, n)), per_image(rng.uniform(*cfg.aspect, n))
        angle, contrast = per_image(rng.uniform(0, math.pi, n)), per_image(rng.uniform(*cfg.contrast, n))
        sign = per_image(rng.choice([-1.0, 1.0], n))
        active = torch.from_numpy(j < counts).view(n, 1, 1, 1)
        dy, dx = yy - cy, xx - cx
        u, v = dx * torch.cos(angle) + dy * torch.sin(angle), -dx * torch.sin(angle) + dy * torch.cos(angle)
        rho = torch.sqrt((u * aspect.sqrt() / radius) ** 2 + (v / (aspect.sqrt() * radius)) ** 2)
        wobble = rho * (1 + cfg.irregularity * _band_noise(n, h, w, 2 * float(cfg.radius[1]), gen))
        t = ((radius * (1 - wobble) + cfg.softness) / (2 * cfg.softness)).clamp(0, 1)
        weight = t * t * (3 - 2 * t) * (brain & active)
        # The four effects, computed for every image, then each image keeps its own kind's.
        hyper, hypo = out + contrast * weight, out - contrast * weight
        mean = (out * weight).sum((2, 3), keepdim=True) / weight.sum((2, 3), keepdim=True).clamp_min(1e-6)
        texture = out + weight * (mean + 0.5 * contrast * _band_noise(n, h, w, 3.0, gen) - out)
        bump = (1 - (rho / 1.5) ** 2).clamp_min(0) ** 2 * active
        scale = 1 - cfg.deform_strength * bump
        grid = torch.stack([(cx + dx * scale) / max(w - 1, 1), (cy + dy * scale) / max(h - 1, 1)], -1) * 2 - 1
        warped = F.grid_sample(out, grid.squeeze(1), mode="bilinear", padding_mode="border", align_corners=True)
        deform = warped + 0.5 * sign * contrast * weight
        effects = torch.stack([{"hyper": hyper, "hypo": hypo, "texture": texture, "deform": deform}[k]
                               for k in cfg.kinds])
        chosen = effects.gather(0, kind.unsqueeze(0).expand(1, n, 1, h, w)).squeeze(0)
        out = torch.where(brain, chosen.clamp(0, 1), out)
        lesion |= (weight > 0.5) & brain
    return _to(out, as_numpy), _to(lesion, as_numpy), [cfg.kinds[int(k)] for k in kind.flatten()]


def make_anomaly_test_set(images: Any, masks: Any, config: LesionConfig | None = None, seed: int = 0,
                          anomalous_fraction: float = 0.5) -> dict[str, Any]:
    """A labelled anomaly test set: lesions in a random ``anomalous_fraction`` of the images.

    Returns a dict with ``images`` (lesioned where label 1, untouched copies elsewhere),
    ``lesion_masks`` (empty for healthy images), ``brain_masks``, ``labels`` (int64, 1 = lesioned)
    and ``kinds`` (the lesion kind per image, ``"none"`` for healthy ones).
    """
    if not 0 <= anomalous_fraction <= 1:
        raise ValueError(f"anomalous_fraction: expected a fraction in [0, 1], got {anomalous_fraction!r}")
    img, brain, as_numpy = _check(images, masks)
    n = len(img)
    rng = np.random.default_rng(seed)
    chosen = torch.from_numpy(np.sort(rng.permutation(n)[: int(round(anomalous_fraction * n))]))
    out, lesion, kinds = img.clone(), torch.zeros_like(brain), ["none"] * n
    if len(chosen):
        sub_img, sub_lesion, sub_kinds = add_lesions(img[chosen], brain[chosen], config, int(rng.integers(2 ** 62)))
        out[chosen], lesion[chosen] = sub_img, sub_lesion
        for i, k in zip(chosen, sub_kinds):
            kinds[int(i)] = k
    labels = torch.zeros(n, dtype=torch.int64)
    labels[chosen] = 1
    return {"images": _to(out, as_numpy), "lesion_masks": _to(lesion, as_numpy), "brain_masks": _to(brain.clone(), as_numpy),
            "labels": _to(labels, as_numpy), "kinds": kinds}
