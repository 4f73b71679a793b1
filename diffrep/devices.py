"""Torch devices from user input: refuse a garbled or unavailable device before anything heavy is loaded."""
from __future__ import annotations

import torch

SUPPORTED = "'cpu', 'cuda', 'cuda:N' or 'mps'"


def resolve_device(name: str | torch.device) -> torch.device:
    """The ``torch.device`` named by ``name`` (e.g. ``--device``), checked to exist on this machine.

    Raises ValueError naming the device and what was expected for a garbled string, a device type
    diffrep does not run on, CUDA or MPS when torch cannot use it here, or a CUDA index beyond the
    visible GPUs. Only availability flags are queried: no CUDA context is created.
    """
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device: expected {SUPPORTED}, got {name!r}") from err
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(name)!r}: expected a usable CUDA GPU, but torch sees none on this machine "
                             f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use 'cpu'")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {str(name)!r}: expected a GPU index in 0..{count - 1} ({count} visible), "
                             f"got {device.index}")
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {str(name)!r}: expected an available Apple MPS device, but torch sees none; "
                             "use 'cpu'")
        return device
    raise ValueError(f"device {str(name)!r}: expected {SUPPORTED}, got device type {device.type!r}")
