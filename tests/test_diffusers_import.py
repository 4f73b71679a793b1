"""Loading diffusers UNet2DModel folders (pipeline and model layouts) as diffrep Backbones."""
from __future__ import annotations

import json

import pytest
import torch

from diffrep import load_backbone
from diffrep.backbones import CheckpointError, save_backbone
from diffrep.features import FeatureExtractor

from .test_extractor import BATCHING_TOLERANCE

diffusers = pytest.importorskip("diffusers", reason="diffusers is in the dev extra; install diffrep[dev]")

ARCH = dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
            norm_num_groups=4, attention_head_dim=8)
LAYOUTS = {
    "no-attention": dict(down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D")),
    "attention": dict(down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                      up_block_types=("AttnUpBlock2D", "UpBlock2D")),
    "3-level": dict(block_out_channels=(8, 16, 16), down_block_types=("DownBlock2D",) * 3,
                    up_block_types=("UpBlock2D",) * 3),
}


def _user_model(layout: str = "attention", **overrides) -> "diffusers.UNet2DModel":
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(**{**ARCH, **LAYOUTS[layout], **overrides})
    with torch.no_grad():  # make the output informative everywhere
        for p in model.conv_out.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def _pipeline(tmp_path, model, **scheduler_args):
    folder = tmp_path / "pipeline"
    model.save_pretrained(folder / "unet")
    diffusers.DDPMScheduler(**scheduler_args).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline",
                                                         "unet": ["diffusers", "UNet2DModel"],
                                                         "scheduler": ["diffusers", "DDPMScheduler"]}))
    return folder


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_pipeline_folder_loads_with_the_same_outputs_and_nodes(tmp_path, layout):
    model = _user_model(layout)
    backbone = load_backbone(_pipeline(tmp_path, model))
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 700])
    with torch.no_grad():
        assert torch.allclose(backbone(x, t), model(x, t).sample, atol=1e-6)
    levels = len(model.config.block_out_channels)
    assert backbone.node_names == [f"down.{i}" for i in range(levels)] + ["mid"] + [f"up.{i}" for i in range(levels)]
    # every node's shape agrees with FeatureInfo, and hooks are gone afterwards
    images = torch.rand(3, 1, 16, 16)
    features = FeatureExtractor(backbone, backbone.node_names, [10, 500], early_exit=False)(images)
    for info in backbone.feature_info():
        fmap = features[(info.name, 10)]
        assert fmap.shape == (3, info.channels, 16 // info.stride, 16 // info.stride), info
    # early exit with the same batching (3 images x [10, 500] per forward) is bit for bit; another
    # timestep list changes the rows per forward, hence float32 rounding only (README "Noise")
    early = FeatureExtractor(backbone, ["down.0", "mid"], [10, 500], early_exit=True)(images)
    assert all(torch.equal(early[key], features[key]) for key in early)
    fewer_rows = FeatureExtractor(backbone, ["down.0", "mid"], [10], early_exit=True)(images)
    for key in fewer_rows:
        torch.testing.assert_close(fewer_rows[key], features[key], **BATCHING_TOLERANCE)
    assert all(not m._forward_hooks for m in backbone.unet.modules())


def test_schedule_is_read_and_checked(tmp_path):
    backbone = load_backbone(_pipeline(tmp_path, _user_model(), beta_schedule="squaredcos_cap_v2",
                                       num_train_timesteps=500))
    assert backbone.config.schedule.schedule == "cosine" and backbone.num_timesteps == 500
    reference = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", num_train_timesteps=500)
    assert torch.allclose(backbone.schedule.alphas_cumprod.float(), reference.alphas_cumprod.float(), atol=1e-5)
    assert backbone.config.provenance["source"]["format"] == "diffusers"


def test_model_folder_with_and_without_a_scheduler(tmp_path):
    model = _user_model()
    model.save_pretrained(tmp_path / "unet")
    with pytest.warns(UserWarning, match="no scheduler_config.json"):
        backbone = load_backbone(tmp_path / "unet")
    assert backbone.config.provenance["schedule_source"].startswith("assumed")
    diffusers.DDPMScheduler(beta_end=0.03).save_pretrained(tmp_path / "scheduler")
    assert load_backbone(tmp_path / "unet").config.schedule.beta_end == pytest.approx(0.03)


def test_unsupported_models_and_schedules_fail_clearly(tmp_path):
    with pytest.raises(CheckpointError, match="class conditioning"):
        load_backbone(_pipeline(tmp_path / "a", _user_model(num_class_embeds=3)))
    with pytest.raises(CheckpointError, match="prediction_type"):
        load_backbone(_pipeline(tmp_path / "b", _user_model(), prediction_type="v_prediction"))
    folder = _pipeline(tmp_path / "c", _user_model())
    (folder / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(CheckpointError, match="expected a UNet2DModel"):
        load_backbone(folder)
    (folder / "unet" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no unet/config.json"):
        load_backbone(folder)


def test_a_diffusers_backbone_is_not_saved_as_a_monai_checkpoint(tmp_path):
    backbone = load_backbone(_pipeline(tmp_path, _user_model()))
    with pytest.raises(CheckpointError, match="save_pretrained"):
        save_backbone(backbone, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_or_poisoned_diffusers_weights_name_the_file(tmp_path):
    folder = _pipeline(tmp_path, _user_model())
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[: len(original) // 2])
    with pytest.raises(CheckpointError, match=r"could not read the UNet weights \['diffusion_pytorch_model\.safetensors'\]"):
        load_backbone(folder)
    from safetensors.torch import load_file, save_file

    weights.write_bytes(original)
    state = load_file(str(weights))
    state["conv_in.weight"].view(-1)[0] = float("nan")
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"NaN/Inf values in 1 tensor.*conv_in\.weight"):
        load_backbone(folder)


def test_sample_size_is_recorded_as_the_training_size(tmp_path):
    assert load_backbone(_pipeline(tmp_path, _user_model())).trained_image_size == (16, 16)
