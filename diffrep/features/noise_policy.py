"""Noise policies: how the noise of x_t is drawn, explicit, seeded, reproducible bit for bit on CPU.

``noise`` means a policy everywhere in diffrep (the distribution of the noise is ``noise_type``):

- ``"shared"``: one draw from ``seed``, the same for every image and call;
- ``"ensemble(k)"``: k such shared draws, results averaged;
- ``"none"``: no noise (the extractor at t = 0);
- ``"per_image"``, ``"per_image_ensemble(k)"``: each image its own draw (or k of them, averaged), seeded
  from ``seed`` and a hash of the image's values. Only reconstruction scorers take these: features are
  compared across images, so the extractor shares its noise; a reconstruction map should carry no error
  pattern common to all images, and a per-image seed keeps it independent of the batch it came in.

What a policy's draws feed is the caller's: the extractor averages features over the draws of
``ensemble(k)``, a reconstruction scorer averages reconstructions.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

# The policies each caller accepts, as spelled in errors and help texts.
EXTRACTOR_POLICIES = ("shared", "ensemble(k)", "none")
RECONSTRUCTION_POLICIES = ("per_image", "per_image_ensemble(k)", "shared", "ensemble(k)")


def _spelled(policies: tuple[str, ...]) -> str:
    quoted = [repr(p) for p in policies]
    return f"{', '.join(quoted[:-1])} or {quoted[-1]}"


@dataclass(frozen=True)
class NoisePolicy:
    """How x_t is formed from x_0: ``kind`` (``"shared"``, ``"ensemble"``, ``"none"`` or ``"per_image"``)
    and the number of ``draws`` averaged (see the module docstring).

    The extractor's draws (:meth:`draw`): ``shared`` is one Gaussian draw from ``seed``, reused for every
    image, timestep and call (as in Baranchuk et al. 2022, ddpm-segmentation); ``ensemble(k)`` averages
    features over k draws from seeds ``seed .. seed+k-1``; ``none`` feeds the clean image with the
    timestep embedding of t (meant for t = 0).
    """

    kind: str
    draws: int

    @classmethod
    def parse(cls, spec: "str | NoisePolicy", allowed: tuple[str, ...] = EXTRACTOR_POLICIES) -> "NoisePolicy":
        """The policy ``spec`` names; one outside ``allowed`` (default: the extractor's) is a ValueError."""
        if not isinstance(spec, (str, NoisePolicy)):
            raise TypeError(f"noise: expected {_spelled(allowed)}, got {spec!r}")
        policy = spec if isinstance(spec, NoisePolicy) else cls._from_text(spec.strip().lower())
        if policy is None or policy.spelling not in allowed:
            raise ValueError(f"noise: expected {_spelled(allowed)} (k >= 1), got {str(spec)!r}")
        return policy

    @classmethod
    def _from_text(cls, text: str) -> "NoisePolicy | None":
        if text in ("shared", "none", "per_image"):
            return cls(text, 1)
        match = re.fullmatch(r"(per_image_)?ensemble\((\d+)\)", text)
        if match and int(match.group(2)) >= 1:
            return cls("per_image" if match.group(1) else "ensemble", int(match.group(2)))
        return None

    @property
    def spelling(self) -> str:
        """The policy's word in the vocabulary (``ensemble(k)`` for any k)."""
        if self.kind == "per_image":
            return "per_image" if self.draws == 1 else "per_image_ensemble(k)"
        return "ensemble(k)" if self.kind == "ensemble" else self.kind

    @property
    def per_image(self) -> bool:
        """Each image draws its own noise (seeded from the seed and the image's values)."""
        return self.kind == "per_image"

    def __str__(self) -> str:
        return self.spelling.replace("(k)", f"({self.draws})")

    def draw(self, index: int, seed: int, shape: tuple[int, ...]) -> torch.Tensor | None:
        """The extractor's ``index``-th noise draw of shape (C, *spatial), generated on the CPU from the seed."""
        if self.kind == "none":
            return None
        generator = torch.Generator(device="cpu").manual_seed(int(seed) + index)
        return torch.randn(shape, generator=generator, dtype=torch.float32)
