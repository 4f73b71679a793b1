"""Peak-memory estimates for sliding-window runs, checked against a budget before any work.

The U-Net part is not a per-voxel guess: :func:`forward_peak_bytes` runs the U-Net once on the *meta*
device (shapes only, no data, no arithmetic; milliseconds) under a dispatch mode that follows every
tensor storage the forward creates and frees, and returns the largest total alive at once. That is
the forward's own activation peak at exactly the window and batch asked for, skip connections, the
captured nodes, and the middle block's attention (quadratic in the window's voxel count) included.
What it cannot see (kernel workspaces, allocator slack, first-call buffers) is a fixed
:data:`RUNTIME_ALLOWANCE`. The rest of a run is arithmetic on the volume's size: the stitched
outputs and their count maps (channels x voxels / stride^3 x 4 bytes per output), the results kept
from earlier passes, and a stated number of whole-volume float32 copies.

Measured against the peak RSS of real runs (tests/test_sliding.py and
benchmarks/volume3d_memory.py), the estimate is within the factor stated there.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from itertools import chain
from typing import Any, Iterable, Sequence

import torch

from .hooks import StopForward, capture_nodes

MiB = 2**20
GiB = 2**30
# Memory a forward uses that no tensor storage shows: oneDNN/BLAS workspaces, allocator slack, buffers
# of a process's first convolutions. Measured on CPU (torch 2.x): 20-100 MiB above the tracked peak.
RUNTIME_ALLOWANCE = 128 * MiB


class MemoryBudgetError(ValueError):
    """A run whose estimated peak memory exceeds the budget; raised before any work."""


def available_memory_bytes() -> tuple[int, str]:
    """(bytes, source) of memory available to this process now: psutil if installed, else /proc/meminfo's
    MemAvailable (Linux), else ``os.sysconf`` free pages."""
    try:
        import psutil

        return int(psutil.virtual_memory().available), "available RAM (psutil)"
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available RAM (/proc/meminfo MemAvailable)"
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")), "free RAM (os.sysconf)"


def format_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


class _LivePeak(torch.utils._python_dispatch.TorchDispatchMode):
    """Follows the storage of every tensor an op returns until it is freed; ``peak`` is the largest
    number of bytes alive at once (storages that existed before the mode, e.g. weights, are not counted)."""

    def __init__(self) -> None:
        super().__init__()
        from torch.multiprocessing.reductions import StorageWeakRef

        self._ref = StorageWeakRef
        self.live: dict[int, tuple[Any, int]] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]
        inputs = {t.untyped_storage()._cdata for t in _tensors((args, kwargs))}  # views and in-place ops allocate nothing
        for value in _tensors(out):
            storage = value.untyped_storage()
            if storage._cdata not in self.live and storage._cdata not in inputs:
                self.live[storage._cdata] = (self._ref(storage), storage.nbytes())
                self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors in nested tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    return []


def forward_peak_bytes(backbone: Any, shape: Sequence[int], nodes: Iterable[str] | None = None,
                       early_exit: bool = True) -> int:
    """Peak bytes of tensors alive during one U-Net forward on a float32 input of ``shape`` (N, C, *spatial),
    the input included: with ``nodes``, the forward that captures them (stopping after the last one if
    ``early_exit``), without, the full forward and its output.

    Runs on the meta device (the parameters are swapped for meta tensors for the call; nothing is
    computed); a network with an op that has no meta kernel is run for real on its device instead.
    """
    unet = backbone.unet
    names = list(nodes) if nodes is not None else []
    modules = {n: backbone.node_module(n) for n in names}
    order = {i.name: i.index for i in backbone.feature_info()}
    stop = max(names, key=order.__getitem__) if names and early_exit else None
    meta = {name: torch.empty_like(v, device="meta") for name, v in chain(unet.named_parameters(), unet.named_buffers())}
    try:
        return _tracked_forward(unet, modules, stop, shape, torch.device("meta"), meta)
    except (NotImplementedError, RuntimeError):  # no meta kernel for some op: measure a real forward
        return _tracked_forward(unet, modules, stop, shape, backbone.device, None)


def _tracked_forward(unet: torch.nn.Module, modules: dict[str, torch.nn.Module], stop: str | None,
                     shape: Sequence[int], device: torch.device, state: dict[str, torch.Tensor] | None) -> int:
    from torch.func import functional_call

    tracker = _LivePeak()
    with torch.inference_mode(), capture_nodes(modules, stop_after=stop) as captured, tracker:
        x = torch.zeros(tuple(shape), device=device)
        t = torch.zeros((shape[0],), device=device, dtype=torch.long)
        try:
            out = functional_call(unet, state, (x, t)) if state is not None else unet(x, t)
            del out
        except StopForward:
            pass
        peak = tracker.peak
        captured.clear()
    return int(peak)


@dataclass(frozen=True)
class MemoryEstimate:
    """The estimated peak of a sliding-window run, by part (bytes).

    ``window``: one window batch through the U-Net (:func:`forward_peak_bytes`) and the blending weights;
    ``stitched``: one pass's stitched float32 outputs and their count maps; ``kept``: results kept from
    earlier passes (other timesteps, draws, images); ``volume``: whole-volume float32 tensors (the
    input, its noise, x_t, ...); ``allowance``: :data:`RUNTIME_ALLOWANCE`.
    """

    window: int
    stitched: int
    kept: int
    volume: int
    allowance: int = RUNTIME_ALLOWANCE

    @property
    def total(self) -> int:
        return self.window + self.stitched + self.kept + self.volume + self.allowance

    def describe(self) -> str:
        return (f"{format_bytes(self.total)} (window batch {format_bytes(self.window)}, stitched outputs "
                f"{format_bytes(self.stitched)}, kept results {format_bytes(self.kept)}, whole-volume tensors "
                f"{format_bytes(self.volume)}, runtime allowance {format_bytes(self.allowance)})")

    def as_dict(self) -> dict[str, int]:
        return {"window": self.window, "stitched": self.stitched, "kept": self.kept, "volume": self.volume,
                "allowance": self.allowance, "total": self.total}


def stitched_bytes(outputs: Sequence[tuple[int, int]], padded: Sequence[int], batch: int = 1) -> int:
    """Bytes of one pass's stitched float32 outputs plus their one-channel count maps: ``outputs`` holds
    (channels, stride) per output, ``padded`` the volume's spatial size."""
    return sum(batch * (channels + 1) * voxels(padded, stride) * 4 for channels, stride in outputs)


def voxels(spatial: Sequence[int], stride: int = 1) -> int:
    return math.prod(int(s) // int(stride) for s in spatial)


def resolve_budget(memory_budget: int | float | None) -> tuple[int, str]:
    """(bytes, what it is) of a budget argument: bytes as given, or the available memory when None."""
    if memory_budget is None:
        return available_memory_bytes()
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)) or memory_budget <= 0:
        raise ValueError(f"memory_budget: expected a positive number of bytes or None (available RAM), got {memory_budget!r}")
    return int(memory_budget), "memory_budget"
