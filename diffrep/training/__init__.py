"""DDPM pretraining: recipes, the training loop (single process or torchrun), divergence guard, reports.

May import backbones, data, sampling and the shared helpers; imported only by the CLI and benchmarks.
"""
from .config import DataConfig, OptimConfig, TrainConfig, load_train_config
from .loop import train

__all__ = ["DataConfig", "OptimConfig", "TrainConfig", "load_train_config", "train"]
