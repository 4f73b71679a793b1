"""The windows of a sliding-window run over a volume: geometry, the window plan and its memory check.

The volume is padded at its far ends to a multiple of the U-Net's total stride M = 2^(levels-1);
windows must be multiples of M and the step between them, ``window x (1 - overlap)``, is rounded
down to a multiple of M, so every window starts on every node's grid. :func:`plan_windows` picks (for
``window="auto"``) or checks the window and window batch against a memory budget before any work,
with the estimate of :mod:`diffrep.features.memory_estimate`. Used by :mod:`diffrep.features.sliding`
and :mod:`diffrep.anomaly.sliding`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from ..backbones.backbone import Backbone
from ..errors import check_positive_int
from .memory_estimate import (MemoryBudgetError, MemoryEstimate, format_bytes, forward_peak_bytes, resolve_budget,
                              stitched_bytes, voxels)

DEFAULT_WINDOW = 64  # per side, when the backbone records no training size

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
