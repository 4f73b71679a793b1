"""Noise policies for feature extraction: explicit, seeded, reproducible bit for bit on CPU."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NoisePolicy:
    """How x_t is formed from x_0 when extracting features.

    - ``shared``: one Gaussian draw from ``seed``, reused for every image, timestep and call
      (as in Baranchuk et al. 2022, ddpm-segmentation);
    - ``ensemble(k)``: features averaged over k draws from seeds ``seed .. seed+k-1``;
    - ``none``: no noise; the U-Net sees the clean image with the timestep embedding of t
      (meant for t = 0).
    """

    kind: str
    draws: int

    @classmethod
    def parse(cls, spec: "str | NoisePolicy") -> "NoisePolicy":
        if isinstance(spec, NoisePolicy):
            return spec
        if not isinstance(spec, str):
            raise TypeError(f"noise: expected 'shared', 'ensemble(k)' or 'none', got {spec!r}")
        text = spec.strip().lower()
        if text == "shared":
            return cls("shared", 1)
        if text == "none":
            return cls("none", 1)
        match = re.fullmatch(r"ensemble\((\d+)\)", text)
        if match and int(match.group(1)) >= 1:
            return cls("ensemble", int(match.group(1)))
        raise ValueError(f"noise: expected 'shared', 'ensemble(k)' with k >= 1, or 'none', got {spec!r}")

    def __str__(self) -> str:
        return f"ensemble({self.draws})" if self.kind == "ensemble" else self.kind

    def draw(self, index: int, seed: int, shape: tuple[int, ...]) -> torch.Tensor | None:
        """The ``index``-th noise draw of shape (C, *spatial), generated on the CPU from the seed."""
        if self.kind == "none":
            return None
        generator = torch.Generator(device="cpu").manual_seed(int(seed) + index)
        return torch.randn(shape, generator=generator, dtype=torch.float32)
