"""Ship a finished training run as a package default: fp16 weights in diffrep/zoo/NAME, and its
log, loss curve, sample grid and held-out losses under benchmarks/results/pretraining/NAME."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..backbones.checkpoint import load_checkpoint, save_backbone
from ..backbones.zoo import ZOO_DIR

REPORT_FILES = ("log.jsonl", "loss_curve.png", "samples.png", "heldout_losses.json")


def ship_default(run_dir: str | Path, name: str, results_dir: str | Path, zoo_dir: Path = ZOO_DIR) -> Path:
    """Copy ``run_dir/backbone`` into the zoo as ``name`` (fp16 storage) and the run's reports to ``results_dir``."""
    run_dir = Path(run_dir)
    backbone = load_checkpoint(run_dir / "backbone")
    target = Path(zoo_dir) / name
    save_backbone(backbone, target, dtype=torch.float16)
    reports = Path(results_dir) / name
    reports.mkdir(parents=True, exist_ok=True)
    for file in REPORT_FILES:
        if (run_dir / file).is_file():
            shutil.copy2(run_dir / file, reports / file)
    shutil.copy2(target / "config.json", reports / "config.json")
    return target
