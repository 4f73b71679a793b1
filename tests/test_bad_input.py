"""Every bad input at the library's edge gets a clear error naming what was expected."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffrep import FeatureExtractor, load_backbone
from diffrep.backbones import BackboneConfig, CheckpointError, UNetConfig, save_backbone
from diffrep.config import from_dict

from .conftest import make_backbone, make_images


@pytest.fixture
def backbone():
    return make_backbone("2d-3level-attn")


@pytest.mark.parametrize("shape, match", [
    ((1, 16, 16), "rank 4"),
    ((2, 3, 16, 16), "1 channel"),
    ((2, 1, 18, 16), "divisible by 4"),
    ((0, 1, 16, 16), "non-empty batch"),
])
def test_bad_shapes(backbone, shape, match):
    with pytest.raises(ValueError, match=match):
        FeatureExtractor(backbone, ["mid"], [10])(torch.rand(shape))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values(backbone, bad):
    images = make_images(backbone)
    images[0, 0, 3, 3] = bad
    with pytest.raises(ValueError, match="NaN/Inf"):
        FeatureExtractor(backbone, ["mid"], [10])(images)


def test_uint8_refused_with_a_pointer_to_normalise(backbone):
    images = (np.random.default_rng(0).random((2, 1, 16, 16)) * 255).astype(np.uint8)
    with pytest.raises(TypeError, match="normalise"):
        FeatureExtractor(backbone, ["mid"], [10])(images)
    converted = backbone.normalise(images)
    assert converted.dtype == torch.float32 and float(converted.max()) <= 1.0
    torch.testing.assert_close(converted, torch.from_numpy(images).float() / 255)


def test_wrong_type(backbone):
    with pytest.raises(TypeError, match="torch.Tensor or numpy.ndarray"):
        FeatureExtractor(backbone, ["mid"], [10])([[1.0]])


@pytest.mark.parametrize("timesteps", [[-1], [1000], [1.5], []])
def test_timestep_outside_range(backbone, timesteps):
    with pytest.raises(ValueError, match="timesteps"):
        FeatureExtractor(backbone, ["mid"], timesteps)


def test_unknown_node_lists_valid_names(backbone):
    with pytest.raises(ValueError, match=r"unknown node name\(s\) \['decoder.9'\]; valid names are \['down.0'"):
        FeatureExtractor(backbone, ["mid", "decoder.9"], [10])


@pytest.mark.parametrize("noise", ["gaussian", "ensemble(0)", 3])
def test_unknown_noise_policy(backbone, noise):
    with pytest.raises((ValueError, TypeError), match="noise"):
        FeatureExtractor(backbone, ["mid"], [10], noise=noise)


def test_bad_batch_size(backbone):
    with pytest.raises(ValueError, match="batch_size"):
        FeatureExtractor(backbone, ["mid"], [10], batch_size=0)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="neither a checkpoint directory, a shipped default nor a Hub id"):
        load_backbone(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_backbone(tmp_path / "empty")


def test_corrupt_weights(backbone, tmp_path):
    save_backbone(backbone, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_backbone(tmp_path / "ckpt")


def test_missing_weights(backbone, tmp_path):
    save_backbone(backbone, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        load_backbone(tmp_path / "ckpt")


def test_corrupt_config(backbone, tmp_path):
    save_backbone(backbone, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_backbone(tmp_path / "ckpt")


def test_config_and_weights_mismatch_is_named(backbone, tmp_path):
    save_backbone(backbone, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "config.json"
    payload = json.loads(path.read_text())
    payload["unet"]["channels"] = [8, 16, 32]
    payload["unet"]["num_head_channels"] = 8
    path.write_text(json.dumps(payload))
    with pytest.raises(CheckpointError, match=r"shape mismatch\(es\), e.g. \[.*config expects"):
        load_backbone(tmp_path / "ckpt")
    payload["unet"]["channels"] = [8, 16]
    payload["unet"]["attention_levels"] = [False, False]
    path.write_text(json.dumps(payload))
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\)"):
        load_backbone(tmp_path / "ckpt")


def test_unknown_config_keys(backbone, tmp_path):
    save_backbone(backbone, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "config.json"
    payload = json.loads(path.read_text())
    payload["unet"]["chanels"] = [8, 16, 16]
    path.write_text(json.dumps(payload))
    with pytest.raises(CheckpointError, match=r"unknown key\(s\) \['chanels'\]"):
        load_backbone(tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['colour'\]"):
        from_dict(BackboneConfig, {"colour": 1})


@pytest.mark.parametrize("kwargs, match", [
    ({"channels": (8, 12), "attention_levels": (False, False), "norm_num_groups": 8}, "divisible by norm_num_groups"),
    ({"channels": (8, 16), "attention_levels": (False,)}, "attention_levels"),
    ({"spatial_dims": 4}, "spatial_dims"),
])
def test_invalid_architecture(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UNetConfig(**kwargs).validate()
