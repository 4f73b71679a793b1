"""DDPM pretraining: recipes, the training loop (single process or torchrun), divergence guard, reports.

May import backbones, data, sampling and the shared helpers; imported by the pipelines, the CLI and the
benchmarks.
"""
from .config import DataConfig, OptimConfig, TrainConfig, load_train_config
from .loop import train

__all__ = ["DataConfig", "OptimConfig", "TrainConfig", "load_train_config", "train"]
