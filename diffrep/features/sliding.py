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

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from .._types import FeatureKey
from ..backbones.backbone import Backbone
from ..errors import as_float_images, check_data_range, check_positive_int
from .extractor import FeatureDict, FeatureExtractor
from .hooks import StopForward, capture_nodes
from .memory_estimate import (MemoryBudgetError, MemoryEstimate, format_bytes, forward_peak_bytes, resolve_budget,
                              stitched_bytes, voxels)

BLEND_MODES = ("gaussian", "constant")
DEFAULT_WINDOW = 64  # per side, when the backbone records no training size
# Whole-volume float32 copies alive at the extractor's peak: the padded input, x0 in the model range,
# the noise draw and x_t with add_noise's two temporaries.
FEATURE_VOLUME_COPIES = 6


@dataclass(frozen=True)
class WindowPlan:
    """Where the windows go and what the run will cost: ``padded`` (the volume's spatial size padded to
    the total stride), ``window``, ``step`` (between window starts, per axis), ``num_windows`` per
    volume, ``sw_batch_size`` (windows per forward), ``estimate`` and ``budget`` (bytes) with its source."""

    spatial: tuple[int, ...]
    padded: tuple[int, ...]
    window: tuple[int, ...]
    step: tuple[int, ...]
    num_windows: int
    sw_batch_size: int
    estimate: MemoryEstimate
    budget: int
    budget_source: str

    @property
    def monai_overlap(self) -> tuple[float, ...]:
        """The overlap per axis that makes MONAI's scan interval int(window x (1 - overlap)) equal ``step``."""
        return tuple(0.0 if w == p or s == w else 1.0 - (s + 0.5) / w for w, s, p in zip(self.window, self.step, self.padded))

    def as_dict(self) -> dict[str, Any]:
        return {"spatial": list(self.spatial), "padded": list(self.padded), "window": list(self.window),
                "step": list(self.step), "num_windows": self.num_windows, "sw_batch_size": self.sw_batch_size,
                "estimate_bytes": self.estimate.as_dict(), "budget_bytes": self.budget, "budget_source": self.budget_source}


# ------------------------------------------------------------------------------------------ geometry
def padded_size(backbone: Backbone, spatial: Sequence[int]) -> tuple[int, ...]:
    """``spatial`` rounded up to multiples of the U-Net's total stride."""
    m = backbone.config.unet.size_multiple
    return tuple(int(math.ceil(int(s) / m) * m) for s in spatial)


def check_window(backbone: Backbone, window: int | Sequence[int], padded: Sequence[int]) -> tuple[int, ...]:
    """A window as a tuple, clipped to the padded volume; every size must be a positive multiple of the total
    stride (a ValueError naming it otherwise)."""
    dims, m = backbone.spatial_dims, backbone.config.unet.size_multiple
    sizes = (window,) * dims if isinstance(window, int) and not isinstance(window, bool) else tuple(window)
    if len(sizes) != dims or not all(_is_multiple(s, m) for s in sizes):
        raise ValueError(f"window: expected {dims} sizes (or one), each a positive multiple of {m}, the total stride "
                         f"of the {backbone.config.unet.levels}-level U-Net (2^(levels-1)), got {window!r}")
    return tuple(min(int(s), int(p)) for s, p in zip(sizes, padded))


def _is_multiple(size: Any, m: int) -> bool:
    try:
        return check_positive_int(size, "window", minimum=m) % m == 0
    except ValueError:
        return False


def window_steps(backbone: Backbone, window: Sequence[int], padded: Sequence[int], overlap: float) -> tuple[int, ...]:
    """The step between window starts per axis: window x (1 - overlap) rounded down to a multiple of the total
    stride (at least one stride); a window as large as the volume has one position."""
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0.0 <= float(overlap) < 1.0:
        raise ValueError(f"overlap: expected a number in [0, 1), got {overlap!r}")
    m = backbone.config.unet.size_multiple
    return tuple(int(p) if w == p else max(m, int(w * (1.0 - float(overlap))) // m * m) for w, p in zip(window, padded))


def window_starts(window: Sequence[int], step: Sequence[int], padded: Sequence[int]) -> list[tuple[int, ...]]:
    """The start corner of every window, in MONAI's order (``monai.data.utils.dense_patch_slices``)."""
    from monai.data.utils import dense_patch_slices

    return [tuple(s.start for s in slices) for slices in dense_patch_slices(tuple(padded), tuple(window), tuple(step))]


def _candidate_windows(backbone: Backbone, padded: Sequence[int]) -> list[tuple[int, ...]]:
    """Windows to try for ``window="auto"``, largest first: the training size (else DEFAULT_WINDOW per side),
    then sides shrunk by about 0.8 at each step, down to twice the total stride."""
    m = backbone.config.unet.size_multiple
    trained = backbone.trained_image_size
    start = trained if trained is not None and len(trained) == len(padded) else (DEFAULT_WINDOW,) * len(padded)
    side = max(max(int(s) // m * m for s in start), m)
    out: list[tuple[int, ...]] = []
    while True:
        window = tuple(min(side, int(p)) for p in padded)
        if window not in out:
            out.append(window)
        smaller = int(side * 0.8) // m * m
        if smaller < 2 * m or smaller >= side:
            return out
        side = smaller


def plan_windows(backbone: Backbone, spatial: Sequence[int], *, window: int | Sequence[int] | str,
                 overlap: float, sw_batch_size: int, outputs: Sequence[tuple[int, int]],
                 kept: Callable[[tuple[int, ...]], int], volume_copies: int, nodes: Iterable[str] | None = None,
                 early_exit: bool = True, memory_budget: int | float | None = None) -> WindowPlan:
    """The windows of a run and its memory estimate, checked against the budget (MemoryBudgetError if it does
    not fit). ``outputs``: (channels, stride) of every stitched output of one pass; ``kept(padded)``: bytes of
    results kept across passes; ``volume_copies``: whole-volume float32 tensors alive at the peak;
    ``nodes``/``early_exit``: what the window forward captures (None: the full forward, its output)."""
    check_positive_int(sw_batch_size, "sw_batch_size")
    spatial = tuple(int(s) for s in spatial)
    padded = padded_size(backbone, spatial)
    budget, source = resolve_budget(memory_budget)
    nodes = list(nodes) if nodes is not None else None
    fixed = dict(stitched=stitched_bytes(outputs, padded), kept=kept(padded),
                 volume=volume_copies * backbone.in_channels * voxels(padded) * 4)

    def make(win: tuple[int, ...], batch: int) -> WindowPlan:
        steps = window_steps(backbone, win, padded, overlap)
        peak = forward_peak_bytes(backbone, (batch, backbone.in_channels, *win), nodes, early_exit)
        weights = 2 * voxels(win) * 4  # the blending weights and their copy at each output's resolution
        estimate = MemoryEstimate(window=peak + weights, **fixed)
        return WindowPlan(spatial, padded, win, steps, len(window_starts(win, steps, padded)), batch, estimate,
                          budget, source)

    auto = isinstance(window, str)
    if auto and window != "auto":
        raise ValueError(f"window: expected 'auto', a size or one size per axis, got {window!r}")
    windows = _candidate_windows(backbone, padded) if auto else [check_window(backbone, window, padded)]
    batches = [sw_batch_size] + ([b for b in (sw_batch_size // 2 ** k for k in range(1, 32)) if b >= 1] if auto else [])
    tried = []
    for win in windows:
        for batch in dict.fromkeys(batches):
            plan = make(win, batch)
            if plan.estimate.total <= budget:
                return plan
            tried.append(plan)
    raise MemoryBudgetError(_refusal(tried, auto, spatial, budget, source, lambda: _fitting(backbone, padded, make, budget)))


def _fitting(backbone: Backbone, padded: tuple[int, ...], make: Callable[..., WindowPlan], budget: int) -> str:
    for win in _candidate_windows(backbone, padded):
        plan = make(win, 1)
        if plan.estimate.total <= budget:
            return f"window={'x'.join(map(str, win))} with sw_batch_size=1 fits ({format_bytes(plan.estimate.total)})"
    return "no window fits"


def _refusal(tried: list[WindowPlan], auto: bool, spatial: tuple[int, ...], budget: int, source: str,
             fitting: Callable[[], str]) -> str:
    plan = tried[-1] if auto else tried[0]
    window = f"window {'x'.join(map(str, plan.window))} and sw_batch_size {plan.sw_batch_size}"
    what = f"even with the smallest window tried, {window}" if auto else f"with {window}"
    hint = "" if auto else f" {fitting()};"
    fixed = plan.estimate.stitched + plan.estimate.kept + plan.estimate.volume + plan.estimate.allowance
    return (f"memory: a sliding-window run on a {'x'.join(map(str, spatial))} volume needs an estimated "
            f"{plan.estimate.describe()} {what}, over the budget of {format_bytes(budget)} ({source}); nothing was "
            f"run.{hint} the outputs, kept results and volume alone need {format_bytes(fixed)} (fewer nodes or "
            "timesteps, float16 features, a smaller volume or a larger memory_budget lower that part)")


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
