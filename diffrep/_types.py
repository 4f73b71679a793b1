"""Small record types shared across diffrep: feature contracts and anomaly outputs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np


@dataclass(frozen=True)
class FeatureInfo:
    """What a feature node promises: its name, channel count, stride and stage, and where it is read.

    ``stride`` is the spatial reduction relative to the input (1 = input resolution).
    ``stage`` is one of ``"down"``, ``"mid"``, ``"up"``. ``index`` orders nodes by the
    forward pass, which is what early exit relies on. ``module`` is the dotted path, inside the
    U-Net, of the module whose output is the node (``unet.get_submodule(module)``).
    """

    name: str
    channels: int
    stride: int
    stage: str
    index: int
    module: str = ""

    def shape(self, batch: int, spatial: tuple[int, ...]) -> tuple[int, ...]:
        """The tensor shape this node yields for an input of the given batch and spatial size."""
        return (batch, self.channels, *(s // self.stride for s in spatial))


class FeatureKey(NamedTuple):
    """Key of an extracted feature map: the node name and the timestep (0 = least noise)."""

    node: str
    timestep: int


@dataclass(frozen=True)
class AnomalyResult:
    """Typed output of every anomaly scorer. Higher means more anomalous, everywhere.

    ``scores`` has shape (N,), ``maps`` has the shape of the input images without channels
    (N, H, W) or (N, D, H, W).
    """

    scores: np.ndarray
    maps: np.ndarray
