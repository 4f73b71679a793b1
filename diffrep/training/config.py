"""Training recipes (configs/train/*.yaml) as typed dataclasses; unknown keys are errors."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..backbones.config import BackboneConfig, UNetConfig
from ..config import from_dict, load_yaml

FMNIST_SIZE = 28
DATA_CHANNELS = 1  # the built-in training sets (fmnist, brain, synthetic) are single-channel
DATASETS = ("fmnist", "brain", "folder", "synthetic")


@dataclass
class DataConfig:
    """Which images to train on. ``dataset`` is ``fmnist``, ``brain``, ``folder`` or ``synthetic`` (tests).

    ``folder``: the images below ``path`` (PNG/JPEG/TIFF, see ``diffrep.data.image_folder``), resized to
    ``size`` x ``size`` where they differ; the U-Net's in_channels decide grey or RGB. A seeded
    ``heldout_size`` of them (at most a tenth, at least one) is held out for the held-out losses.
    """

    dataset: str = "fmnist"
    path: str | None = None
    size: int = 64
    pad_to: int | None = None
    augment: bool = False
    heldout_size: int = 512
    synthetic_count: int = 64

    def validate(self) -> None:
        """Raise ValueError for an unknown dataset or sizes and counts no dataset can have."""
        if self.dataset not in DATASETS:
            raise ValueError(f"data.dataset: expected 'fmnist', 'brain', 'folder' or 'synthetic', got {self.dataset!r}")
        if self.dataset == "folder" and not self.path:
            raise ValueError("data.path: expected the folder of training images for data.dataset 'folder', got none")
        _at_least(1, size=self.size, heldout_size=self.heldout_size, synthetic_count=self.synthetic_count, prefix="data.")
        if self.dataset == "fmnist" and self.pad_to is not None and self.pad_to < FMNIST_SIZE:
            raise ValueError(f"data.pad_to: expected None or >= the Fashion-MNIST size {FMNIST_SIZE}, got {self.pad_to}")

    @property
    def image_size(self) -> int:
        """The side length of the training images: ``pad_to`` (or 28) for Fashion-MNIST, else ``size``."""
        if self.dataset == "fmnist":
            return self.pad_to if self.pad_to is not None else FMNIST_SIZE
        return self.size


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay (timm CosineLRScheduler), clipping, EMA (timm ModelEmaV3)."""

    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 200
    min_lr: float = 1e-6
    batch_size: int = 64
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = True

    def validate(self) -> None:
        """Raise ValueError for learning rates, decays and sizes that cannot train."""
        _at_least(1, batch_size=self.batch_size, prefix="optim.")
        _at_least(0, warmup_steps=self.warmup_steps, prefix="optim.")
        for key, value in (("lr", self.lr), ("grad_clip", self.grad_clip)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"optim.{key}: expected a finite number > 0, got {value}")
        for key, value in (("min_lr", self.min_lr), ("weight_decay", self.weight_decay)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"optim.{key}: expected a finite number >= 0, got {value}")
        if not 0 <= self.ema_decay <= 1:
            raise ValueError(f"optim.ema_decay: expected a number in [0, 1], got {self.ema_decay}")


@dataclass
class TrainConfig:
    """A whole recipe: name, data, backbone architecture and schedule, optimisation, bookkeeping."""

    name: str
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    max_steps: int = 1000
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 50
    eval_timesteps: tuple[int, ...] = (10, 100, 250, 500, 900)
    sample_steps: int = 50
    init_from: str | None = None  # warm start: a train_state.pt of a run with the same backbone architecture

    def validate(self) -> None:
        """Check the whole recipe before step 1: every value, and that the U-Net can take the data."""
        if not self.name or self.name != Path(self.name).name or self.name in (".", ".."):
            raise ValueError(f"name: expected a non-empty name without '/' (the default run directory is "
                             f"runs/NAME), got {self.name!r}")
        self.data.validate()
        self.backbone.validate()
        self.optim.validate()
        _at_least(1, max_steps=self.max_steps, checkpoint_every=self.checkpoint_every, log_every=self.log_every,
                  sample_steps=self.sample_steps)
        last = self.backbone.schedule.num_train_timesteps - 1
        if not self.eval_timesteps or any(not 0 <= t <= last for t in self.eval_timesteps):
            raise ValueError(f"eval_timesteps: expected a non-empty list of timesteps in 0..{last} "
                             f"(backbone.schedule.num_train_timesteps={last + 1}), got {list(self.eval_timesteps)}")
        channels = self.backbone.unet.in_channels if self.data.dataset == "folder" else DATA_CHANNELS  # folder: read as the U-Net takes
        check_data_fits(self.backbone.unet, channels=channels, spatial=(self.data.image_size,) * 2,
                        what=f"data ({self.data.dataset}, {self.data.image_size}x{self.data.image_size}, "
                             f"{channels} channel)")


def check_data_fits(unet: UNetConfig, channels: int, spatial: tuple[int, ...], what: str) -> None:
    """Raise ValueError unless a U-Net built from ``unet`` can train on images of this shape."""
    if len(spatial) != unet.spatial_dims:
        raise ValueError(f"backbone.unet.spatial_dims: expected {len(spatial)} for {what}, got {unet.spatial_dims}")
    for key in ("in_channels", "out_channels"):  # epsilon prediction: the output has the input's shape
        if getattr(unet, key) != channels:
            raise ValueError(f"backbone.unet.{key}: expected {channels} for {what}, got {getattr(unet, key)}")
    if any(side % unet.size_multiple for side in spatial):
        raise ValueError(f"{what}: the image size must be divisible by {unet.size_multiple} "
                         f"(2^(levels-1) for {unet.levels} levels of backbone.unet.channels), got {spatial}")


def _at_least(low: int, prefix: str = "", **values: int) -> None:
    for key, value in values.items():
        if value < low:
            raise ValueError(f"{prefix}{key}: expected an integer >= {low}, got {value}")


def load_train_config(path: str | Path) -> TrainConfig:
    """Read and validate a training recipe from YAML; every error names the file."""
    config = from_dict(TrainConfig, load_yaml(path), where=f"{path}: recipe")
    try:
        config.validate()
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return config
