"""DDPM pretraining: recipes, the training loop (single process or torchrun) and its reports."""
from .config import DataConfig, OptimConfig, TrainConfig, load_train_config
from .loop import train

__all__ = ["DataConfig", "OptimConfig", "TrainConfig", "load_train_config", "train"]
