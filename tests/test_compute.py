"""Autocast precision and channels-last layout (diffrep.compute): equal to the default within the stated tolerances."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from diffrep import FeatureExtractor, load_backbone
from diffrep.compute import ComputeOptions
from diffrep.features.io import extract_to_file
from diffrep.training import train

from .conftest import make_backbone, make_images
from .test_training import tiny_recipe


@pytest.mark.parametrize("name", ["2d-3level-attn", "3d-2level"])
def test_channels_last_features_equal_the_default_within_float32_rounding(name: str) -> None:
    reference, converted = make_backbone(name), make_backbone(name)
    images = make_images(reference, n=3)
    nodes = reference.node_names
    expected = FeatureExtractor(reference, nodes, [10, 500])(images)
    extractor = FeatureExtractor(converted, nodes, [10, 500], compute=ComputeOptions(channels_last=True))
    layout = torch.channels_last if converted.spatial_dims == 2 else torch.channels_last_3d
    convs = [m.weight for m in converted.unet.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))
             and m.weight.shape[1] > 1 and m.weight.shape[2] > 1]
    assert convs and all(w.is_contiguous(memory_format=layout) for w in convs)  # the option did something
    got = extractor(images)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-5)


def test_bfloat16_autocast_stays_within_the_stated_tolerance_of_float32() -> None:
    """diffrep.compute states: every element within 0.08 std of its feature, mean |difference| under 0.01 std."""
    backbone = load_backbone("fmnist-ddpm")
    images = torch.rand((4, 1, 28, 28), generator=torch.Generator().manual_seed(0))
    nodes, steps = backbone.node_names, [10, 250, 900]
    reference = FeatureExtractor(backbone, nodes, steps)(images)
    mixed = FeatureExtractor(backbone, nodes, steps, compute=ComputeOptions(autocast="bfloat16"))(images)
    differs = False
    for key, value in reference.items():
        assert mixed[key].dtype == torch.float32
        gap = (mixed[key] - value).abs() / value.std()
        assert float(gap.max()) <= 0.08 and float(gap.mean()) <= 0.01, (key, float(gap.max()), float(gap.mean()))
        differs |= not torch.equal(mixed[key], value)
    assert differs, "autocast changed nothing: it was not applied"


@pytest.mark.parametrize("kwargs, match", [
    ({"autocast": "fp8"}, r"autocast: expected None or one of \['bfloat16', 'float16'\], got 'fp8'"),
    ({"channels_last": "yes"}, r"channels_last: expected True or False, got 'yes'"),
])
def test_invalid_options_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ComputeOptions(**kwargs)


def test_float16_autocast_needs_cuda() -> None:
    with pytest.raises(ValueError, match=r"autocast 'float16': expected a CUDA device, got 'cpu'"):
        FeatureExtractor(make_backbone(), ["mid"], [10], compute=ComputeOptions(autocast="float16"))


def test_extract_to_file_records_non_default_options_in_the_header(tmp_path) -> None:
    backbone = make_backbone()
    images = make_images(backbone, n=4)
    options = ComputeOptions(autocast="bfloat16", channels_last=True)
    out = extract_to_file(backbone, images, ["mid"], [10], tmp_path / "f.safetensors", batch_size=2, compute=options)
    with safe_open(str(out), "pt") as handle:
        header = json.loads(handle.metadata()["diffrep"])
    assert header["compute"] == {"autocast": "bfloat16", "channels_last": True}
    plain = extract_to_file(make_backbone(), images, ["mid"], [10], tmp_path / "g.safetensors", batch_size=2)
    with safe_open(str(plain), "pt") as handle:
        assert "compute" not in json.loads(handle.metadata()["diffrep"])  # default files are unchanged


def test_training_with_bfloat16_and_channels_last_records_them(tmp_path) -> None:
    export = train(tiny_recipe(max_steps=2), tmp_path / "run", progress=False,
                   compute=ComputeOptions(autocast="bfloat16", channels_last=True), device="cpu")
    hardware = load_backbone(export).config.provenance["hardware"]
    assert hardware == {"device": "cpu", "autocast": "bfloat16", "channels_last": True}
    with pytest.raises(ValueError, match=r"training supports 'bfloat16' only"):
        train(tiny_recipe(max_steps=2), tmp_path / "other", progress=False, compute=ComputeOptions(autocast="float16"))
