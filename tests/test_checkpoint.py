"""Checkpoint round trip: same outputs after save/load, fp16 storage loads as fp32, no pickle."""
from __future__ import annotations

import json

import pytest
import torch

from diffrep import FeatureExtractor, load_backbone
from diffrep.backbones import save_backbone

from .conftest import TINY_CONFIGS, make_backbone, make_images


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_round_trip_gives_identical_outputs(name, tmp_path):
    tiny_backbone = make_backbone(name)
    tiny_backbone.config.provenance = {"recipe": {"name": "tiny"}, "steps": 3}
    save_backbone(tiny_backbone, tmp_path / "ckpt")
    loaded = load_backbone(tmp_path / "ckpt")
    images = make_images(tiny_backbone)
    t = torch.full((images.shape[0],), 123)
    with torch.no_grad():
        before, after = tiny_backbone(images, t), loaded(images, t)
        other = make_backbone(name, seed=1)(images, t)  # same architecture, other weights
    assert before.abs().amax() > 1e-3 and not torch.allclose(before, other, atol=1e-3)  # the check can fail
    assert torch.equal(before, after)
    a = FeatureExtractor(tiny_backbone, tiny_backbone.node_names, [5], seed=1)(images)
    b = FeatureExtractor(loaded, loaded.node_names, [5], seed=1)(images)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.config == tiny_backbone.config
    assert loaded.feature_info() == tiny_backbone.feature_info()


def test_fp16_storage_loads_as_fp32(backbone_2d, tmp_path):
    save_backbone(backbone_2d, tmp_path / "ckpt", dtype=torch.float16)
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["weights_dtype"] == "float16"
    loaded = load_backbone(tmp_path / "ckpt")
    assert all(p.dtype == torch.float32 for p in loaded.unet.parameters())
    for (name, p), q in zip(backbone_2d.unet.named_parameters(), loaded.unet.parameters()):
        torch.testing.assert_close(q, p.half().float(), msg=name)


def test_checkpoint_has_no_pickle(backbone_2d, tmp_path):
    save_backbone(backbone_2d, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    payload = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert {"unet", "schedule", "normalisation", "provenance"} <= set(payload)


@pytest.mark.parametrize("schedule", ["linear_beta", "cosine"])
def test_schedule_round_trip(schedule, tmp_path):
    from diffrep.backbones import Backbone, BackboneConfig, ScheduleConfig

    from .conftest import TINY_CONFIGS

    backbone = Backbone(BackboneConfig(unet=TINY_CONFIGS["2d-2level"], schedule=ScheduleConfig(schedule=schedule)))
    save_backbone(backbone, tmp_path / "ckpt")
    loaded = load_backbone(tmp_path / "ckpt")
    torch.testing.assert_close(loaded.schedule.alphas_cumprod, backbone.schedule.alphas_cumprod)


def _rewrite_weights(directory, change):
    from safetensors.torch import load_file, save_file

    state = load_file(str(directory / "model.safetensors"))
    change(state)
    save_file(state, str(directory / "model.safetensors"))


def test_int8_weights_are_refused_naming_file_and_tensor(backbone_2d, tmp_path):
    from diffrep.backbones import CheckpointError

    save_backbone(backbone_2d, tmp_path / "ckpt")
    name = "conv_in.conv.weight"
    _rewrite_weights(tmp_path / "ckpt", lambda s: s.update({name: s[name].mul(100).to(torch.int8)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors holds 1 non-float .*conv_in\.conv\.weight \(torch\.int8\)"):
        load_backbone(tmp_path / "ckpt")


def test_non_finite_weights_are_refused_at_load_and_save(backbone_2d, tmp_path):
    from diffrep.backbones import CheckpointError

    save_backbone(backbone_2d, tmp_path / "ckpt")
    name = "middle_block.resnet_1.conv1.conv.weight"
    def poison(state):
        state[name].view(-1)[0] = float("nan")
    _rewrite_weights(tmp_path / "ckpt", poison)
    with pytest.raises(CheckpointError, match=r"model\.safetensors holds NaN/Inf .*middle_block\.resnet_1\.conv1\.conv\.weight \(1 of"):
        load_backbone(tmp_path / "ckpt")
    with torch.no_grad():
        backbone_2d.unet.out[2].conv.bias[0] = float("inf")
    with pytest.raises(CheckpointError, match=r"NaN/Inf values in 1 tensor.*out\.2\.conv\.bias"):
        save_backbone(backbone_2d, tmp_path / "other")
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_corrupt_weights_name_the_file(backbone_2d, tmp_path, damage):
    from diffrep.backbones import CheckpointError

    save_backbone(backbone_2d, tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    with pytest.raises(CheckpointError, match=r"ckpt/model\.safetensors is not a readable safetensors file"):
        load_backbone(tmp_path / "ckpt")
