"""Training recipes (configs/train/*.yaml) as typed dataclasses; unknown keys are errors."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..backbones.config import BackboneConfig
from ..config import from_dict, load_yaml


@dataclass
class DataConfig:
    """Which images to train on. ``dataset`` is ``fmnist``, ``brain`` or ``synthetic`` (tests)."""

    dataset: str = "fmnist"
    path: str | None = None
    size: int = 64
    pad_to: int | None = None
    augment: bool = False
    heldout_size: int = 512
    synthetic_count: int = 64

    def validate(self) -> None:
        if self.dataset not in ("fmnist", "brain", "synthetic"):
            raise ValueError(f"data.dataset: expected 'fmnist', 'brain' or 'synthetic', got {self.dataset!r}")


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
        self.data.validate()
        self.backbone.validate()
        if self.max_steps < 1:
            raise ValueError(f"max_steps: expected >= 1, got {self.max_steps}")
        if self.optim.batch_size < 1:
            raise ValueError(f"optim.batch_size: expected >= 1, got {self.optim.batch_size}")


def load_train_config(path: str | Path) -> TrainConfig:
    """Read and validate a training recipe from YAML."""
    config = from_dict(TrainConfig, load_yaml(path), where=str(path))
    config.validate()
    return config
