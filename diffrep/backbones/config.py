"""The configuration a backbone checkpoint carries: architecture, noise schedule, normalisation."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class UNetConfig:
    """Arguments of MONAI's ``DiffusionModelUNet`` that diffrep records (2D or 3D via spatial_dims)."""

    spatial_dims: int = 2
    in_channels: int = 1
    out_channels: int = 1
    channels: tuple[int, ...] = (32, 64, 64)
    attention_levels: tuple[bool, ...] = (False, False, True)
    num_res_blocks: int | tuple[int, ...] = 1
    norm_num_groups: int = 16
    num_head_channels: int | tuple[int, ...] = 32
    resblock_updown: bool = False

    def validate(self) -> None:
        """Raise ValueError for configurations MONAI would reject less clearly."""
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims: expected 2 or 3, got {self.spatial_dims}")
        if not self.channels:
            raise ValueError(f"channels: expected a non-empty list of integers, got {self.channels}")
        for key in ("channels", "num_res_blocks", "num_head_channels", "norm_num_groups"):
            value = getattr(self, key)
            values = tuple(value) if isinstance(value, (list, tuple)) else (value,)
            if key in ("num_res_blocks", "num_head_channels") and isinstance(value, (list, tuple)) \
                    and len(values) != len(self.channels):
                raise ValueError(f"{key}: expected one integer or {len(self.channels)} (one per channels entry), got {value}")
            if any(v < 1 for v in values):
                raise ValueError(f"{key}: expected integers >= 1, got {value}")
        if len(self.attention_levels) != len(self.channels):
            raise ValueError(
                f"attention_levels: expected {len(self.channels)} entries (one per channels entry), "
                f"got {len(self.attention_levels)}"
            )
        bad = [c for c in self.channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"channels: every entry must be divisible by norm_num_groups={self.norm_num_groups}, got {bad}")
        heads = self.num_head_channels
        heads = tuple(heads) if isinstance(heads, (list, tuple)) else (heads,) * self.levels
        # MONAI's middle block always has attention; attention levels need it too.
        needs = [(c, h) for c, h, a in zip(self.channels, heads, self.attention_levels) if a] + [(self.channels[-1], heads[-1])]
        bad_heads = [c for c, h in needs if c % h]
        if bad_heads:
            raise ValueError(
                f"num_head_channels: channels of attention levels and of the middle block must be divisible by it, "
                f"got num_head_channels={self.num_head_channels} for channels {bad_heads}"
            )

    @property
    def levels(self) -> int:
        return len(self.channels)

    @property
    def size_multiple(self) -> int:
        """Each spatial size must be a multiple of this (one downsampling per level but the last)."""
        return 2 ** (self.levels - 1)


@dataclass
class ScheduleConfig:
    """The DDPM noise schedule (MONAI ``DDPMScheduler``); timesteps run 0..T-1, 0 = least noise."""

    num_train_timesteps: int = 1000
    schedule: str = "linear_beta"
    beta_start: float = 1e-4
    beta_end: float = 2e-2
    prediction_type: str = "epsilon"

    def validate(self) -> None:
        allowed = ("linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine")
        if self.schedule not in allowed:
            raise ValueError(f"schedule: expected one of {allowed}, got {self.schedule!r}")
        if self.prediction_type != "epsilon":
            raise ValueError(f"prediction_type: only 'epsilon' is supported, got {self.prediction_type!r}")
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps: expected >= 2, got {self.num_train_timesteps}")


@dataclass
class Normalisation:
    """How data-range images map to the U-Net's [-1, 1] range: x_model = 2 (x - low) / (high - low) - 1.

    diffrep's public calls take images in the data range [low, high] (by default [0, 1]).
    """

    low: float = 0.0
    high: float = 1.0
    description: str = "images scaled to [0, 1]"

    def validate(self) -> None:
        if not self.high > self.low:
            raise ValueError(f"normalisation: expected high > low, got low={self.low}, high={self.high}")


@dataclass
class BackboneConfig:
    """Everything needed to rebuild a backbone, plus free-form provenance (recipe, steps, losses...)."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    normalisation: Normalisation = field(default_factory=Normalisation)
    provenance: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        self.unet.validate()
        self.schedule.validate()
        self.normalisation.validate()

    def trained_image_size(self) -> tuple[int, ...] | None:
        """The spatial size of the images the U-Net was trained on, read from ``provenance``; None if unknown.

        In order: ``provenance["image_size"]`` (set it in an import's architecture YAML), then
        ``provenance["data"]["image_size"]``, then the training data description diffrep writes:
        ``data["size"]`` (brain slices, synthetic blobs) or Fashion-MNIST's 28 (or its ``pad_to``).
        An int means a square (cubic in 3D) size.
        """
        data = self.provenance.get("data") if isinstance(self.provenance.get("data"), dict) else {}
        size = self.provenance.get("image_size", data.get("image_size", data.get("size")))
        if size is None and data.get("dataset") == "fashion-mnist":
            size = data.get("pad_to") or 28
        if size is None:
            return None
        if isinstance(size, (list, tuple)):
            return tuple(int(s) for s in size)
        return (int(size),) * self.unet.spatial_dims
