"""Forward hooks that capture named nodes and are always removed, even when the forward raises."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


class StopForward(Exception):
    """Raised by the last requested node's hook to end the forward pass early (early exit)."""


@contextmanager
def capture_nodes(
    modules: dict[str, nn.Module], stop_after: str | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Register hooks on ``modules`` (node name -> module); yield the dict they fill.

    If ``stop_after`` names a node, its hook raises StopForward after storing its output, so the
    caller can skip the rest of the network. Every handle is removed on exit, whatever happened.
    """
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str):
        def hook(_module: nn.Module, _inputs, output) -> None:
            captured[name] = output[0] if isinstance(output, tuple) else output
            if name == stop_after:
                raise StopForward(name)

        return hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(make_hook(name)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()
