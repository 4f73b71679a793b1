"""Reconstruction anomaly maps of whole 3D volumes through sliding windows.

The scorer runs unchanged on the whole (padded) volume: it noises the whole volume with its own
seeded noise (per image: seeded from the seed and the volume's values), and every U-Net call
``backbone(x_t, t)`` of its reverse process (one for ``reverse="x0"``, k for DDIM, L + 1 for DDPM) is
a :class:`~diffrep.features.sliding.SlidingWindowBackbone` call: the noise prediction is computed window
by window and stitched (Gaussian or constant blending), then the scorer forms x0 (clipped), the next
DDIM/DDPM state and the residual on the whole volume as usual. With a window covering the padded
volume and constant blending, the map is the scorer's map of the padded volume, cropped, bit for bit.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from .._types import AnomalyResult
from ..features.sliding import SlidingWindowBackbone, check_volumes, pad_volume
from ..features.windows import WindowPlan, plan_windows
from .postprocess import check_masks, image_scores, postprocess_maps
from .reconstruction import ReconstructionScorer

# Whole-volume float32 copies alive at the peak of a reconstruction: the padded input and its crop, x0 in
# the model range, the noise draw and its concatenation, x_t, the x0 prediction and its clip, the data-range
# reconstruction, the residual and its absolute value, and the NIfTI volume path's reads and writes.
RECONSTRUCTION_VOLUME_COPIES = 14


def plan_reconstruction(scorer: ReconstructionScorer, spatial: Sequence[int], window: Any = "auto",
                        overlap: float = 0.25, sw_batch_size: int = 1,
                        memory_budget: int | float | None = None) -> WindowPlan:
    """The windows and memory estimate of a whole-volume reconstruction of spatial size ``spatial``
    (MemoryBudgetError, before any work, if it does not fit)."""
    backbone = _check_scorer(scorer)
    outputs = [(backbone.config.unet.out_channels, 1)]
    return plan_windows(backbone, spatial, window=window, overlap=overlap, sw_batch_size=sw_batch_size,
                        outputs=outputs, kept=lambda padded: 0, volume_copies=RECONSTRUCTION_VOLUME_COPIES,
                        nodes=None, memory_budget=memory_budget)


def sliding_scorer(scorer: ReconstructionScorer, plan: WindowPlan, blend: str = "gaussian",
                   sigma_scale: float = 0.125, progress: bool = False) -> ReconstructionScorer:
    """A copy of ``scorer`` (same settings, none cloned) whose backbone is the sliding-window one of ``plan``:
    it takes (N, C, *plan.padded) volumes."""
    params = scorer.get_params(deep=False)
    params["backbone"] = SlidingWindowBackbone(_check_scorer(scorer), plan, blend, sigma_scale, progress)
    return type(scorer)(**params)


def score_whole_volume(scorer: ReconstructionScorer, volume: Any, mask: Any = None, window: Any = "auto",
                       overlap: float = 0.25, blend: str = "gaussian", sigma_scale: float = 0.125,
                       sw_batch_size: int = 1, memory_budget: int | float | None = None,
                       progress: bool = False) -> tuple[AnomalyResult, WindowPlan]:
    """The scorer's anomaly map of one whole volume ((C, *spatial) or (1, C, *spatial), data range) through
    sliding windows: ``(AnomalyResult with maps (1, *spatial) and scores (1,), the window plan)``.

    The volume is padded to the U-Net's total stride with the data range's low value, reconstructed
    (module docstring), the raw residual cropped back to ``spatial``, then post-processed with the scorer's
    ``erode``, ``median`` and ``top_fraction`` inside ``mask`` (a (spatial) or (1, [1,] *spatial) array,
    or None). The memory estimate is checked before any work.
    """
    backbone = _check_scorer(scorer)
    x = volume[None] if isinstance(volume, (torch.Tensor, np.ndarray)) and volume.ndim == backbone.spatial_dims + 1 \
        else volume
    x = check_volumes(backbone, x, "volume")
    if x.shape[0] != 1:
        raise ValueError(f"volume: expected one volume, got a batch of {x.shape[0]}")
    spatial = tuple(x.shape[2:])
    if mask is not None:
        mask = np.asarray(mask)
        mask = check_masks(mask[None] if mask.shape == spatial else mask, tuple(x.shape))
    plan = plan_reconstruction(scorer, spatial, window, overlap, sw_batch_size, memory_budget)  # before any work
    backbone.check_image_size(plan.window, refuse=False, name="window")
    padded = pad_volume(x, plan.padded, backbone.config.normalisation.low)
    del x
    raw = sliding_scorer(scorer, plan, blend, sigma_scale, progress).raw_maps(padded)
    del padded
    raw = np.ascontiguousarray(raw[(slice(None), *(slice(0, s) for s in spatial))])
    maps, eroded = postprocess_maps(raw, mask, erode=int(scorer.erode), median=int(scorer.median))
    return AnomalyResult(scores=image_scores(maps, eroded, float(scorer.top_fraction)), maps=maps), plan


def _check_scorer(scorer: Any) -> Any:
    if not isinstance(scorer, ReconstructionScorer):
        raise TypeError(f"scorer: whole-volume sliding-window scoring takes a ReconstructionScorer, got "
                        f"{type(scorer).__name__}")
    backbone = scorer.backbone
    if isinstance(backbone, SlidingWindowBackbone):
        backbone = backbone.backbone
    return backbone
