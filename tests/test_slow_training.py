"""Slow: a short real DDPM training run on the MNI152 slices shipped in the nilearn wheel.

Run with ``python -m pytest -q -m slow``. No data outside the package's dependencies is needed.
"""
from __future__ import annotations

import json

import pytest

from diffrep import load_backbone
from diffrep.backbones import BackboneConfig, UNetConfig
from diffrep.training import TrainConfig, train
from diffrep.training.config import DataConfig, OptimConfig

pytestmark = pytest.mark.slow

STEPS = 300


def test_a_short_real_training_run_lowers_the_heldout_loss(tmp_path):
    """The held-out eps-MSE (val slices, seeded noise) of the EMA weights falls well below the fresh init's."""
    unet = UNetConfig(channels=(16, 32), attention_levels=(False, False), norm_num_groups=8, num_head_channels=8)
    config = TrainConfig(name="slow-brain", data=DataConfig(dataset="brain", size=32, augment=False),
                         backbone=BackboneConfig(unet=unet),
                         optim=OptimConfig(batch_size=8, lr=2e-3, warmup_steps=20, ema_decay=0.99),
                         max_steps=STEPS, checkpoint_every=STEPS, log_every=50, sample_steps=2,
                         eval_timesteps=(100, 250, 500))
    export = train(config, tmp_path / "run", progress=False)
    provenance = load_backbone(export).config.provenance
    assert provenance["steps"] == STEPS and provenance["data"]["dataset"] == "mni152-2009a-axial"
    trained, fresh = provenance["heldout_loss"], provenance["heldout_loss_fresh_init"]
    for t in ("100", "250", "500"):
        assert 0.9 < fresh[t] < 1.1, t  # a fresh U-Net predicts ~0: loss = noise power
        assert trained[t] < 0.5 * fresh[t], (t, trained[t], fresh[t])
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]  # and the training loss fell along the way


@pytest.mark.slow
def test_segmentation_benchmark_quick_reports_label_x_noise_seeds(tmp_path):
    """The quick segmentation benchmark (random-init backbone, ~2 min): U-Net rows over label x noise seeds."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "segmentation_brain.py"
    spec = importlib.util.spec_from_file_location("segmentation_brain_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--quick", "--backbone", "random-brain", "--out", str(tmp_path), "--cache-dir", str(tmp_path / "c"),
                "--skip-memory", "--noise-seeds", "0", "1"])
    rows = json.loads((tmp_path / "segmentation_brain_quick.json").read_text())["rows"]
    for r in rows:
        unet = r["method"] in ("diffrep", "control: random-init U-Net")
        assert r["noise_seeds"] == ([0, 1] if unet else [])
        assert r["miou"]["n"] == len(r["seeds"]) * (2 if unet else 1)
        assert (r["miou"]["spread"]["noise_seeds"] is not None) == unet
