"""diffrep.config: from_dict checks every value against its field's type hint; load_yaml names the file."""
from __future__ import annotations

from pathlib import Path

import pytest

from diffrep.backbones import BackboneConfig, load_backbone, zoo_entries
from diffrep.config import from_dict, load_yaml, to_dict
from diffrep.training.config import TrainConfig


@pytest.mark.parametrize("mapping, match", [
    ({"optim": {"lr": "fast"}}, r"recipe\.optim\.lr: expected a number, got 'fast' \(str\)"),
    ({"backbone": {"unet": {"channels": "16,32"}}}, r"unet\.channels: expected a list of integers, got '16,32' \(str\)"),
    ({"max_steps": 1.5}, r"recipe\.max_steps: expected an integer, got 1\.5 \(float\)"),
    ({"max_steps": True}, r"recipe\.max_steps: expected an integer, got True \(bool\)"),
    ({"backbone": {"unet": {"attention_levels": [0, 1]}}}, r"attention_levels: expected a list of booleans, got \[0, 1\]"),
    ({"backbone": {"unet": {"num_head_channels": [8, "a"]}}}, r"num_head_channels: expected an integer or a list of integers"),
    ({"data": {"pad_to": "32"}}, r"data\.pad_to: expected an integer or null, got '32' \(str\)"),
    ({"data": ["fmnist"]}, r"recipe\.data: expected a mapping \(DataConfig\), got \['fmnist'\]"),
    ({"eval_timesteps": 10}, r"eval_timesteps: expected a list of integers, got 10 \(int\)"),
    ({"optim": {"ema_warmup": "yes please"}}, r"ema_warmup: expected a boolean \(true/false\), got 'yes please'"),
    ({"name": 7}, r"recipe\.name: expected a string, got 7 \(int\)"),
])
def test_wrong_types_name_the_key_the_value_and_the_expected_type(mapping, match):
    with pytest.raises(TypeError, match=match):
        from_dict(TrainConfig, {"name": "r", **mapping}, where="r.yaml: recipe")


def test_values_are_converted_where_the_type_allows():
    config = from_dict(TrainConfig, {"name": "r", "optim": {"lr": "1e-4", "grad_clip": 2},
                                     "eval_timesteps": [1, 2], "backbone": {"unet": {"num_res_blocks": [1, 2, 1]}}})
    assert config.optim.lr == 1e-4 and isinstance(config.optim.grad_clip, float)  # YAML 1.1 reads 1e-4 as a string
    assert config.eval_timesteps == (1, 2) and config.backbone.unet.num_res_blocks == (1, 2, 1)
    assert from_dict(BackboneConfig, to_dict(config.backbone)) == config.backbone


def test_the_shipped_checkpoints_still_load():
    names = [entry["name"] for entry in zoo_entries()]
    assert {"fmnist-ddpm", "brain-ddpm", "fmnist-ddpm-long"} <= set(names)
    for name in names:
        assert load_backbone(name).config.unet.in_channels == 1


@pytest.mark.parametrize("content, match", [
    (b"name: [unclosed\n", r"bad\.yaml: not valid YAML"),
    (b"\xff\xfe\x00garbage", r"bad\.yaml: expected a UTF-8 YAML text file"),
    (b"- a\n- b\n", r"bad\.yaml: expected a YAML mapping at the top level, got list"),
])
def test_load_yaml_errors_name_the_file(content, match, tmp_path: Path):
    (tmp_path / "bad.yaml").write_bytes(content)
    with pytest.raises(ValueError, match=match):
        load_yaml(tmp_path / "bad.yaml")
    with pytest.raises(IsADirectoryError, match="expected a YAML file, got the directory"):
        load_yaml(tmp_path)


@pytest.mark.parametrize("kwargs, match", [
    ({"norm_num_groups": 0}, r"norm_num_groups: expected integers >= 1, got 0"),  # was a ZeroDivisionError
    ({"channels": (), "attention_levels": ()}, r"channels: expected a non-empty list of integers, got \(\)"),
    ({"channels": (0, 16, 16)}, r"channels: expected integers >= 1, got \(0, 16, 16\)"),
    ({"num_res_blocks": 0}, r"num_res_blocks: expected integers >= 1, got 0"),
    ({"num_res_blocks": (1, 1)}, r"num_res_blocks: expected one integer or 3 \(one per channels entry\), got \(1, 1\)"),
    ({"num_head_channels": (32,)}, r"num_head_channels: expected one integer or 3 \(one per channels entry\)"),
])
def test_unet_sizes_monai_would_reject_are_named_before_building(kwargs, match):
    from diffrep.backbones import UNetConfig

    with pytest.raises(ValueError, match=match):
        UNetConfig(**kwargs).validate()
