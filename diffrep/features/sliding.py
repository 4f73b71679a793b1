"""Sliding-window 3D features and denoising: a whole scan through a U-Net, one window at a time.

A whole volume never goes through the U-Net at once: its activations (and the middle block's dense
attention, quadratic in the voxel count) would need hundreds of GB for a 1 mm brain scan. Instead:

1. the *whole* volume is noised once per timestep with the extractor's seeded noise (the same draw
   :class:`~diffrep.features.FeatureExtractor` makes for that volume and seed);
2. MONAI's :func:`~monai.inferers.sliding_window_inference` cuts windows of the noised volume, runs the
   U-Net on batches of them (``sw_batch_size``), reads the requested nodes with the extractor's hooks
   (stopping after the last one) and stitches every node at its own stride, with Gaussian or constant
   blending where windows overlap.

Geometry: the volume is padded at its far ends with the data range's low value (the background) to a
multiple of the U-Net's total stride M = 2^(levels-1); windows must be multiples of M; the step
between windows, ``window x (1 - overlap)``, is rounded down to a multiple of M, so every window
starts on every node's grid and a node of stride s is stitched on the padded volume's grid / s.

What holds (tests/test_sliding.py): a window covering the whole (padded) volume gives exactly the
extractor's features, and with overlapping windows every voxel is a blend of the features the U-Net
computes for the windows that cover it. What does not: a window's features are not the whole
volume's features cropped, anywhere in the window, since GroupNorm statistics and the middle
block's attention span the window; the difference shrinks as windows grow
(benchmarks/results/volume3d_memory.json measures it).

Before any work, the peak memory of the run is estimated (:mod:`diffrep.features.memory_estimate`)
and compared with a budget (default: the available RAM): ``window="auto"`` picks the largest window
and window batch that fit, an explicit window that does not fit is refused naming the estimate and
the budget.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from .._types import FeatureKey
from ..backbones.backbone import Backbone
from ..errors import as_float_images, check_data_range
from .extractor import FeatureDict, FeatureExtractor
from .hooks import StopForward, capture_nodes
from .memory_estimate import voxels
from .windows import WindowPlan, plan_windows

BLEND_MODES = ("gaussian", "constant")
# Whole-volume float32 copies alive at the extractor's peak: the padded input, x0 in the model range,
# the noise draw and x_t with add_noise's two temporaries.
FEATURE_VOLUME_COPIES = 6


# ------------------------------------------------------------------------------------------ running
def pad_volume(images: torch.Tensor, padded: Sequence[int], value: float) -> torch.Tensor:
    """(N, C, *spatial) padded at the far end of each axis to ``padded`` with ``value``."""
    extra = [int(p) - int(s) for p, s in zip(padded, images.shape[2:])]
    if not any(extra):
        return images
    pad: list[int] = []
    for e in reversed(extra):
        pad.extend([0, e])
    return F.pad(images, pad, mode="constant", value=float(value))


def slide(inputs: torch.Tensor, plan: WindowPlan, predictor: Callable[[torch.Tensor], Any], blend: str = "gaussian",
          sigma_scale: float = 0.125, sw_device: Any = None, device: Any = None, progress: bool = False) -> Any:
    """MONAI's sliding_window_inference over an already padded (N, C, *plan.padded) tensor with the plan's
    windows; ``predictor`` returns one tensor or a tuple (outputs of different strides allowed)."""
    from monai.inferers import sliding_window_inference

    if blend not in BLEND_MODES:
        raise ValueError(f"blend: expected one of {list(BLEND_MODES)}, got {blend!r}")
    if tuple(inputs.shape[2:]) != plan.padded:
        raise ValueError(f"slide: expected a volume padded to {plan.padded}, got spatial size {tuple(inputs.shape[2:])}")
    return sliding_window_inference(inputs, roi_size=plan.window, sw_batch_size=plan.sw_batch_size,
                                    predictor=predictor, overlap=plan.monai_overlap, mode=blend,
                                    sigma_scale=sigma_scale, padding_mode="constant", cval=0.0,
                                    sw_device=sw_device, device=device, progress=progress)


def check_volumes(backbone: Backbone, volumes: Any, name: str = "volumes") -> torch.Tensor:
    """(N, C, *spatial) float32 volumes in the data range (any spatial size: they are padded, not refused)."""
    tensor = as_float_images(volumes, in_channels=backbone.in_channels, spatial_dims=backbone.spatial_dims, name=name)
    norm = backbone.config.normalisation
    check_data_range(tensor, norm.low, norm.high, name=name, description=norm.description)
    return tensor.float()


class SlidingWindowExtractor:
    """Features of whole volumes by sliding windows (module docstring): the FeatureExtractor's nodes,
    timesteps, noise policy, seed, early exit and dtype, plus

    Args:
        window: ``"auto"`` (the largest of the training size, else 64 per side, and smaller windows, with
            the largest window batch up to ``sw_batch_size``, that fits the budget), one size, or one per
            axis; multiples of the total stride.
        overlap: fraction of a window shared with its neighbour (the step is rounded to the stride).
        blend: ``"gaussian"`` (MONAI's importance map, ``sigma_scale`` x window) or ``"constant"``.
        sw_batch_size: windows per U-Net forward.
        memory_budget: bytes the run may use; None: the available RAM. Checked before any work.
        progress: MONAI's progress bar per pass.

    Calling it on (N, C, *spatial) volumes returns a FeatureDict whose (N, C_node, *padded / stride) maps
    cover the padded volume, with its ``window_plan``. With a window covering the padded volume and
    ``blend="constant"`` the features equal ``FeatureExtractor(..., batch_timesteps=False)`` on the
    padded volume bit for bit on CPU.
    """

    def __init__(self, backbone: Backbone, nodes: Iterable[str], timesteps: Iterable[int] | int,
                 window: int | Sequence[int] | str = "auto", overlap: float = 0.25, blend: str = "gaussian",
                 sigma_scale: float = 0.125, sw_batch_size: int = 1, noise: Any = "shared", seed: int = 0,
                 early_exit: bool = True, dtype: str | torch.dtype = torch.float32, memory_budget: int | float | None = None,
                 progress: bool = False) -> None:
        self.extractor = FeatureExtractor(backbone, nodes, timesteps, noise=noise, seed=seed, batch_size=1,
                                          batch_timesteps=False, early_exit=early_exit, dtype=dtype)
        if blend not in BLEND_MODES:
            raise ValueError(f"blend: expected one of {list(BLEND_MODES)}, got {blend!r}")
        self.backbone = backbone
        self.window, self.overlap, self.blend, self.sigma_scale = window, overlap, blend, sigma_scale
        self.sw_batch_size, self.memory_budget, self.progress = sw_batch_size, memory_budget, progress
        info = self.extractor.feature_info
        # MONAI derives each output's blending weights from the previous output's: finest first keeps them exact
        self._order = sorted(self.extractor.nodes, key=lambda n: (info[n].stride, self.extractor.nodes.index(n)))

    @property
    def nodes(self) -> list[str]:
        return self.extractor.nodes

    @property
    def timesteps(self) -> list[int]:
        return self.extractor.timesteps

    def plan(self, spatial: Sequence[int], num_volumes: int = 1) -> WindowPlan:
        """The windows and memory estimate for volumes of spatial size ``spatial``; MemoryBudgetError if
        they do not fit the budget."""
        ex = self.extractor
        outputs = [(ex.feature_info[n].channels, ex.feature_info[n].stride) for n in self.nodes]
        itemsize = torch.empty((), dtype=ex.dtype).element_size()

        def kept(padded: tuple[int, ...]) -> int:
            per_pass = sum(c * voxels(padded, s) for c, s in outputs)
            passes = num_volumes * len(self.timesteps)
            extra = per_pass * itemsize if ex.dtype != torch.float32 else 0  # the cast's copy
            sums = per_pass * 4 if ex.noise.draws > 1 else 0
            return (passes - 1) * per_pass * itemsize + extra + sums

        return plan_windows(self.backbone, spatial, window=self.window, overlap=self.overlap,
                            sw_batch_size=self.sw_batch_size, outputs=outputs, kept=kept,
                            volume_copies=FEATURE_VOLUME_COPIES + num_volumes - 1, nodes=self.nodes,
                            early_exit=ex.early_exit, memory_budget=self.memory_budget)

    def __call__(self, volumes: Any) -> FeatureDict:
        volumes = check_volumes(self.backbone, volumes)
        plan = self.plan(tuple(volumes.shape[2:]), volumes.shape[0])  # refusals before any work
        self.backbone.check_image_size(plan.window, refuse=False, name="window")
        parts: dict[FeatureKey, list[torch.Tensor]] = {}
        for i in range(volumes.shape[0]):
            for key, value in self._volume(volumes[i:i + 1], plan).items():
                parts.setdefault(key, []).append(value)
        ex = self.extractor
        features = FeatureDict({k: v[0] if len(v) == 1 else torch.cat(v) for k, v in parts.items()},
                               noise_levels={t: self.backbone.noise_level(t) for t in ex.timesteps},
                               feature_info=ex.feature_info, noise=str(ex.noise), seed=ex.seed)
        features.window_plan = plan
        return features

    @torch.inference_mode()
    def _volume(self, volume: torch.Tensor, plan: WindowPlan) -> dict[FeatureKey, torch.Tensor]:
        ex, bb = self.extractor, self.backbone
        x0 = bb.to_model_range(pad_volume(volume, plan.padded, bb.config.normalisation.low))
        out: dict[FeatureKey, torch.Tensor] = {}
        for step in self.timesteps:
            sums: list[torch.Tensor] | None = None
            for draw in range(ex.noise.draws):
                eps = ex.noise.draw(draw, ex.seed, tuple(x0.shape[1:]))
                t = torch.tensor([step]).repeat_interleave(x0.shape[0])
                x_t = x0 if eps is None else bb.schedule.add_noise(x0, eps.expand_as(x0), t)
                del eps
                result = slide(x_t, plan, self._predictor(step), self.blend, self.sigma_scale, sw_device=bb.device,
                               device="cpu", progress=self.progress)
                stitched = list(result) if isinstance(result, (tuple, list)) else [result]
                del x_t
                sums = stitched if sums is None else [a.add_(b) for a, b in zip(sums, stitched)]
            for node, value in zip(self._order, sums or []):
                value = value / ex.noise.draws if ex.noise.draws > 1 else value
                _check_finite(value, node, step)
                out[FeatureKey(node, step)] = value.to(ex.dtype)
        return {FeatureKey(n, s): out[FeatureKey(n, s)] for n in self.nodes for s in self.timesteps}

    def _predictor(self, step: int) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
        bb, ex = self.backbone, self.extractor
        modules = {n: bb.node_module(n) for n in self.nodes}
        order = {i.name: i.index for i in bb.feature_info()}
        stop = max(self.nodes, key=order.__getitem__) if ex.early_exit else None

        def predict(window: torch.Tensor) -> tuple[torch.Tensor, ...]:
            t = torch.full((window.shape[0],), step, device=window.device, dtype=torch.long)
            with capture_nodes(modules, stop_after=stop) as captured:
                try:
                    bb(window, t)
                except StopForward:
                    pass
            return tuple(captured[n].float() for n in self._order)

        return predict


def _check_finite(value: torch.Tensor, node: str, timestep: int) -> None:
    """A ValueError naming the node and timestep if ``value`` holds NaN/Inf. NaN/Inf propagate into the sum,
    checked first: ``torch.isfinite`` on a whole-volume map would allocate temporaries of 1.7x its size."""
    if bool(torch.isfinite(value.sum())) or bool(torch.isfinite(value).all()):  # the second: a sum overflowing
        return
    bad = int((~torch.isfinite(value)).sum())
    raise ValueError(f"features: node {node!r} at timestep {timestep} has {bad} NaN/Inf value(s) of {value.numel()}; "
                     "expected finite features (check the backbone's weights for NaN/Inf)")


# ------------------------------------------------------------------------------------------ denoising
class SlidingWindowBackbone:
    """A Backbone whose forward ``eps_theta(x_t, t)`` on a whole (padded) volume runs the U-Net window by window
    and stitches the noise prediction (MONAI's sliding_window_inference); everything else is the wrapped
    backbone's. Anything that denoises through ``backbone(x_t, t)`` (e.g. ReconstructionScorer) then works on
    whole volumes unchanged: same noise, same reverse process, one window per U-Net call."""

    def __init__(self, backbone: Backbone, plan: WindowPlan, blend: str = "gaussian", sigma_scale: float = 0.125,
                 progress: bool = False) -> None:
        if blend not in BLEND_MODES:
            raise ValueError(f"blend: expected one of {list(BLEND_MODES)}, got {blend!r}")
        self.backbone, self.plan, self.blend, self.sigma_scale, self.progress = backbone, plan, blend, sigma_scale, progress
        self.unet_windows = 0  # windows run so far (U-Net calls x sw_batch_size)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["backbone"], name)

    def check_images(self, images: Any, name: str = "images") -> torch.Tensor:
        """Volumes of the plan's padded size in the data range."""
        tensor = check_volumes(self.backbone, images, name)
        if tuple(tensor.shape[2:]) != self.plan.padded:
            raise ValueError(f"{name}: expected volumes of the planned (padded) size {self.plan.padded}, "
                             f"got {tuple(tensor.shape[2:])}")
        return tensor

    def __call__(self, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        steps = timesteps.reshape(-1)
        if not bool((steps == steps[0]).all()):
            raise ValueError(f"timesteps: the sliding-window forward takes one timestep per call, got {steps.tolist()}")
        t_value = int(steps[0])

        def predict(window: torch.Tensor) -> torch.Tensor:
            self.unet_windows += window.shape[0]
            return self.backbone(window, torch.full((window.shape[0],), t_value, device=window.device,
                                                    dtype=timesteps.dtype))

        return slide(x_t, self.plan, predict, self.blend, self.sigma_scale, sw_device=self.backbone.device,
                     device=x_t.device, progress=self.progress)
