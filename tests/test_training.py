"""DDPM training: exact resume, torchrun with 2 CPU processes, outputs with provenance."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from diffrep import load_backbone
from diffrep.config import from_dict, to_dict
from diffrep.training import TrainConfig, load_train_config, train
from diffrep.training.config import DataConfig, OptimConfig
from diffrep.backbones import BackboneConfig

from .conftest import TINY_CONFIGS, free_port

REPO = Path(__file__).resolve().parents[1]


def tiny_recipe(max_steps: int = 6) -> TrainConfig:
    return TrainConfig(name="tiny", data=DataConfig(dataset="synthetic", size=16, synthetic_count=24),
                       backbone=BackboneConfig(unet=TINY_CONFIGS["2d-2level"]),
                       optim=OptimConfig(batch_size=4, warmup_steps=2), max_steps=max_steps,
                       checkpoint_every=3, log_every=2, sample_steps=2, eval_timesteps=(10, 500))


def _state(run: Path) -> dict:
    return torch.load(run / "train_state.pt", weights_only=True)


def test_resume_is_exact(tmp_path):
    config = tiny_recipe()
    train(config, tmp_path / "straight", progress=False)
    train(config, tmp_path / "split", max_steps=3, progress=False)
    assert _state(tmp_path / "split")["step"] == 3
    train(config, tmp_path / "split", resume=True, progress=False)
    a, b = _state(tmp_path / "straight"), _state(tmp_path / "split")
    assert b["step"] == 6
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    wa = load_file(str(tmp_path / "straight" / "backbone" / "model.safetensors"))
    wb = load_file(str(tmp_path / "split" / "backbone" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_training_outputs_and_provenance(tmp_path):
    export = train(tiny_recipe(), tmp_path / "run", progress=False)
    for name in ("log.jsonl", "loss_curve.png", "samples.png", "heldout_losses.json", "train_state.pt"):
        assert (tmp_path / "run" / name).is_file(), name
    backbone = load_backbone(export)
    prov = backbone.config.provenance
    assert prov["steps"] == 6 and prov["complete"] is True and prov["weights"] == "EMA"
    assert set(prov["heldout_loss"]) == {"10", "500"} and set(prov["heldout_loss_fresh_init"]) == {"10", "500"}
    assert prov["recipe"]["name"] == "tiny" and "torch" in prov["versions"]
    state = _state(tmp_path / "run")
    assert {"model", "ema", "optimizer", "lr_schedule", "torch_rng", "data_position"} <= set(state)


def test_resume_refuses_a_different_recipe(tmp_path):
    train(tiny_recipe(), tmp_path / "run", max_steps=2, progress=False)
    with pytest.raises(ValueError, match="recipe differs"):
        train(tiny_recipe(max_steps=8), tmp_path / "run", resume=True, progress=False)
    with pytest.raises(FileNotFoundError, match="no training state"):
        train(tiny_recipe(), tmp_path / "fresh", resume=True, progress=False)


def _warm_recipe(init_from: Path, max_steps: int = 2) -> TrainConfig:
    config = tiny_recipe(max_steps=max_steps)
    config.init_from = str(init_from)
    config.optim.ema_warmup = False
    return config


def test_warm_start_continues_from_another_run(tmp_path):
    train(tiny_recipe(), tmp_path / "first", progress=False)
    first = _state(tmp_path / "first")
    config = _warm_recipe(tmp_path / "first" / "train_state.pt")
    config.optim.lr = 1e-30  # (> 0 is required) the weights stay where the warm start put them; the EMA follows its formula
    train(config, tmp_path / "second", max_steps=1, progress=False)
    train(config, tmp_path / "second", resume=True, progress=False)  # a warm-started run resumes as usual
    second = _state(tmp_path / "second")
    assert second["step"] == 2 and second["recipe"]["init_from"] == config.init_from
    decay = config.optim.ema_decay ** 2
    for key, value in first["model"].items():
        torch.testing.assert_close(second["model"][key], value, rtol=0, atol=1e-20, msg=key)
        if value.is_floating_point():
            expected = decay * first["ema"][key] + (1 - decay) * value
            assert torch.allclose(second["ema"][key], expected, atol=1e-6), key
    cold = tiny_recipe(max_steps=2)
    cold.optim.lr = 1e-30
    train(cold, tmp_path / "cold", progress=False)
    assert not all(torch.equal(_state(tmp_path / "cold")["model"][k], v) for k, v in first["model"].items())


def test_warm_start_refuses_another_architecture_or_a_missing_state(tmp_path):
    train(tiny_recipe(), tmp_path / "first", progress=False)
    config = _warm_recipe(tmp_path / "first" / "train_state.pt")
    config.backbone = BackboneConfig(unet=TINY_CONFIGS["2d-3level-attn"])
    with pytest.raises(ValueError, match="init_from: .* must match"):
        train(config, tmp_path / "second", progress=False)
    with pytest.raises(FileNotFoundError, match="init_from: expected a train_state.pt"):
        train(_warm_recipe(tmp_path / "missing.pt"), tmp_path / "third", progress=False)


def test_shipped_recipes_parse_and_unknown_keys_fail(tmp_path):
    for name in ("fmnist-ddpm", "brain-ddpm", "fmnist-ddpm-long"):
        config = load_train_config(REPO / "configs" / "train" / f"{name}.yaml")
        assert config.name == name and config.backbone.schedule.num_train_timesteps == 1000
        if config.init_from:  # a warm start continues the shipped recipe's run
            assert config.init_from == "runs/fmnist-ddpm/train_state.pt"
    bad = to_dict(tiny_recipe())
    bad["optim"]["learning_rate"] = 1.0
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['learning_rate'\]"):
        load_train_config(tmp_path / "bad.yaml")


def test_torchrun_two_cpu_processes_matches_single_process(tmp_path):
    recipe = to_dict(tiny_recipe(max_steps=4))
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "diffrep.cli", "train", "--config", str(tmp_path / "tiny.yaml"), "--out", str(tmp_path / "ddp"),
           "--threads", "1"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    train(tiny_recipe(max_steps=4), tmp_path / "single", progress=False)
    ddp, single = _state(tmp_path / "ddp"), _state(tmp_path / "single")
    assert ddp["step"] == 4
    for k in single["model"]:
        torch.testing.assert_close(ddp["model"][k], single["model"][k], rtol=1e-4, atol=1e-5)
    log = [json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4]


def _real_data_recipe(dataset: str) -> TrainConfig:
    from diffrep.backbones import UNetConfig

    unet = UNetConfig(channels=(8, 16), attention_levels=(False, False), norm_num_groups=8, num_head_channels=8)
    return TrainConfig(name=f"tiny-{dataset}", data=DataConfig(dataset=dataset, size=32, augment=True, heldout_size=8),
                       backbone=BackboneConfig(unet=unet), optim=OptimConfig(batch_size=4, warmup_steps=1),
                       max_steps=2, checkpoint_every=1, log_every=1, sample_steps=2, eval_timesteps=(10,))


def _write_tiny_fmnist(folder: Path) -> Path:
    import gzip
    import struct

    import numpy as np

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, count in (("train", 24), ("t10k", 12)):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, count, dtype=np.uint8)
        with gzip.open(folder / f"{split}-images-idx3-ubyte.gz", "wb") as handle:
            handle.write(struct.pack(">BBBBIII", 0, 0, 8, 3, count, 28, 28) + images.tobytes())
        with gzip.open(folder / f"{split}-labels-idx1-ubyte.gz", "wb") as handle:
            handle.write(struct.pack(">BBBBI", 0, 0, 8, 1, count) + labels.tobytes())
    return folder


@pytest.mark.parametrize("dataset", ["fmnist", "brain"])
def test_trains_end_to_end_on_the_real_datasets(dataset, tmp_path):
    config = _real_data_recipe(dataset)
    if dataset == "fmnist":  # the real IDX reader and search path, on tiny IDX files the test writes
        config.data.path = str(_write_tiny_fmnist(tmp_path / "fmnist"))
    train(config, tmp_path / "run", max_steps=1, progress=False)
    export = train(config, tmp_path / "run", resume=True, progress=False)
    prov = load_backbone(export).config.provenance
    assert prov["steps"] == 2 and prov["complete"] is True
    expected = "fashion-mnist" if dataset == "fmnist" else "mni152-2009a-axial"
    assert prov["data"]["dataset"] == expected


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_training_into_an_existing_run_without_resume_is_refused_and_changes_nothing(tmp_path):
    config = tiny_recipe(max_steps=2)
    train(config, tmp_path / "done", progress=False)  # finished
    train(config, tmp_path / "half", max_steps=1, progress=False)  # interrupted
    for run in ("done", "half"):
        before = _tree(tmp_path / run)
        with pytest.raises(FileExistsError, match=rf"{run} already holds a training run .*pass --resume .*another --out"):
            train(tiny_recipe(max_steps=4), tmp_path / run, progress=False)
        assert _tree(tmp_path / run) == before, run
    train(config, tmp_path / "half", resume=True, progress=False)  # --resume still continues it
    assert _state(tmp_path / "half")["step"] == 2


def test_divergence_stops_with_the_step_and_keeps_the_last_finite_checkpoint(tmp_path):
    from diffrep.training.guard import DivergenceError

    config = tiny_recipe(max_steps=40)
    config.optim.lr = 1e6
    config.checkpoint_every = 2
    with pytest.raises(DivergenceError, match=r"diverged at step (\d+): loss nan.*train_state.pt \(step \d+\), is kept") as info:
        train(config, tmp_path / "run", progress=False)
    import re

    diverged, kept = map(int, re.search(r"diverged at step (\d+).*\(step (\d+)\)", str(info.value), re.S).groups())
    state = _state(tmp_path / "run")
    assert state["step"] == kept and kept < diverged and kept % config.checkpoint_every == 0  # the last checkpoint before it
    for part in ("model", "ema"):
        assert all(torch.isfinite(v).all() for v in state[part].values()), part
    assert not (tmp_path / "run" / "backbone").exists() and not (tmp_path / "run" / "heldout_losses.json").exists()
    config.checkpoint_every = 100  # diverging before the first checkpoint: nothing to keep, nothing exported
    with pytest.raises(DivergenceError, match=r"No checkpoint was written"):
        train(config, tmp_path / "early", progress=False)
    assert not (tmp_path / "early" / "train_state.pt").exists() and not (tmp_path / "early" / "backbone").exists()


def test_non_finite_weights_are_never_saved_or_exported(tmp_path):
    from diffrep.training.guard import DivergenceError, check_weights_finite

    train(tiny_recipe(max_steps=2), tmp_path / "run", progress=False)
    state = _state(tmp_path / "run")
    key = next(k for k, v in state["ema"].items() if v.is_floating_point())
    state["ema"][key][0] = float("inf")
    with pytest.raises(DivergenceError, match=rf"1 EMA tensor\(s\) are not finite, e.g. \['{key}'\]"):
        check_weights_finite(state["ema"], "EMA", 2, "kept")
    torch.save(state, tmp_path / "run" / "train_state.pt")  # a resumed NaN state is not re-exported
    before = _tree(tmp_path / "run" / "backbone")
    with pytest.raises(DivergenceError, match="EMA tensor"):
        train(tiny_recipe(max_steps=2), tmp_path / "run", resume=True, progress=False)
    assert _tree(tmp_path / "run" / "backbone") == before


@pytest.mark.parametrize("change, match", [
    ({"log_every": 0}, r"log_every: expected an integer >= 1, got 0"),
    ({"checkpoint_every": 0}, r"checkpoint_every: expected an integer >= 1, got 0"),
    ({"max_steps": 0}, r"max_steps: expected an integer >= 1, got 0"),
    ({"eval_timesteps": [10, 1000]}, r"eval_timesteps: expected a non-empty list of timesteps in 0\.\.999 .*\[10, 1000\]"),
    ({"eval_timesteps": []}, r"eval_timesteps: expected a non-empty list"),
    ({"optim": {"lr": -1.0}}, r"optim\.lr: expected a finite number > 0, got -1\.0"),
    ({"optim": {"lr": float("nan")}}, r"optim\.lr: expected a finite number > 0, got nan"),
    ({"optim": {"ema_decay": 1.5}}, r"optim\.ema_decay: expected a number in \[0, 1\], got 1\.5"),
    ({"data": {"size": 15}}, r"data \(synthetic, 15x15, 1 channel\): the image size must be divisible by 2 .*got \(15, 15\)"),
    ({"data": {"dataset": "fmnist"}, "backbone": {"unet": {"channels": [8, 16, 16, 16],
                                                          "attention_levels": [False] * 4}}},
     r"data \(fmnist, 28x28, 1 channel\): the image size must be divisible by 8"),
    ({"data": {"dataset": "fmnist", "pad_to": 20}}, r"data\.pad_to: expected None or >= the Fashion-MNIST size 28"),
    ({"backbone": {"unet": {"in_channels": 3}}}, r"backbone\.unet\.in_channels: expected 1 for data .*got 3"),
    ({"backbone": {"unet": {"spatial_dims": 3}}}, r"backbone\.unet\.spatial_dims: expected 2 for data .*got 3"),
    ({"name": "../elsewhere"}, r"name: expected a non-empty name without '/' .*got '\.\./elsewhere'"),
    ({"name": ""}, r"name: expected a non-empty name"),
])
def test_the_whole_recipe_is_validated_before_step_1(change, match, tmp_path):
    recipe = to_dict(tiny_recipe())
    for key, value in change.items():
        if isinstance(value, dict):
            for sub, inner in value.items():
                recipe[key][sub] = {**recipe[key][sub], **inner} if isinstance(inner, dict) else inner
        else:
            recipe[key] = value
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match=r"r\.yaml: " + match):
        load_train_config(tmp_path / "r.yaml")
    config = from_dict(TrainConfig, recipe)
    with pytest.raises(ValueError, match=match):  # train() validates too, before it writes anything
        train(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_training_images_the_unet_cannot_take_are_refused_before_step_1(tmp_path):
    from diffrep.training.data import TrainingData

    data = TrainingData(images=torch.rand(8, 1, 17, 17), heldout=torch.rand(2, 1, 17, 17), description={})
    with pytest.raises(ValueError, match=r"training images of shape \(8, 1, 17, 17\): the image size must be divisible by 2"):
        train(tiny_recipe(), tmp_path / "run", progress=False, data=data)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kwargs, match", [({"max_steps": 0}, r"max_steps \(--max-steps\): expected an integer >= 1, got 0"),
                                           ({"num_threads": 0}, r"num_threads \(--threads\): expected an integer >= 1, got 0")])
def test_train_arguments_are_checked(kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        train(tiny_recipe(), tmp_path / "run", progress=False, **kwargs)
    assert not (tmp_path / "run").exists()
