"""How a U-Net forward runs on the hardware: autocast precision and memory layout (the GPU path's two levers).

``ComputeOptions(autocast="bfloat16")`` runs the forward under ``torch.autocast`` (convolutions and matmuls
in bfloat16, reductions in float32; features come back in float32), the usual 1.5-3x on recent GPUs.
``ComputeOptions(channels_last=True)`` stores the U-Net's weights and the input in NHWC (NDHWC for 3D),
the layout cuDNN's fastest convolution kernels use. Both are off by default and neither changes what is
computed, only its rounding:

- ``channels_last``: features agree with the default within atol = rtol = 1e-5 (float32 rounding);
- ``autocast="bfloat16"``: bfloat16 keeps 8 bits of mantissa, so every feature element agrees within
  0.08 x that feature's standard deviation and the mean absolute difference stays under 0.01 x it
  (measured on the shipped defaults: max 0.05, mean 0.006; tests/test_compute.py checks these bounds).
  ``"float16"`` is accepted on CUDA only (CPU autocast does not support it well).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ContextManager

import torch
from torch import nn

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ComputeOptions:
    """Precision and memory layout of U-Net forwards (see the module docstring for the tolerances).

    Args:
        autocast: None (float32 throughout), ``"bfloat16"`` or ``"float16"`` (CUDA only).
        channels_last: keep weights and inputs in channels-last layout.
    """

    autocast: str | None = None
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.autocast is not None and self.autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast: expected None or one of {sorted(AUTOCAST_DTYPES)}, got {self.autocast!r}")
        if not isinstance(self.channels_last, bool):
            raise ValueError(f"channels_last: expected True or False, got {self.channels_last!r}")

    def check_device(self, device: torch.device) -> None:
        """Refuse a precision the device cannot autocast to (float16 needs CUDA)."""
        if self.autocast == "float16" and device.type != "cuda":
            raise ValueError(f"autocast 'float16': expected a CUDA device, got {str(device)!r}; "
                             "use 'bfloat16' on CPU")

    def autocast_context(self, device: torch.device) -> ContextManager:
        """``torch.autocast`` for ``device`` when ``autocast`` is set, else a no-op context."""
        if self.autocast is None:
            return contextlib.nullcontext()
        self.check_device(device)
        return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[self.autocast])

    def prepare_module(self, module: nn.Module, spatial_dims: int) -> nn.Module:
        """Convert ``module``'s weights in place to channels-last when asked (values unchanged)."""
        if self.channels_last:
            module.to(memory_format=_memory_format(spatial_dims))
        return module

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in channels-last layout when asked (values unchanged)."""
        if not self.channels_last:
            return x
        return x.contiguous(memory_format=_memory_format(x.ndim - 2))

    def describe(self) -> dict:
        """JSON-ready settings, for provenance."""
        return {"autocast": self.autocast, "channels_last": self.channels_last}


def _memory_format(spatial_dims: int) -> torch.memory_format:
    if spatial_dims == 2:
        return torch.channels_last
    if spatial_dims == 3:
        return torch.channels_last_3d
    raise ValueError(f"channels_last: expected 2D or 3D data, got {spatial_dims} spatial dimension(s)")
