"""FeatureExtractor: shapes against FeatureInfo, determinism, hooks, early exit, batching, noise."""
from __future__ import annotations

import pytest
import torch

from diffrep import FeatureExtractor, FeatureKey

from .conftest import make_images


def _hook_count(backbone) -> int:
    return sum(len(m._forward_hooks) for m in backbone.unet.modules())


def test_shapes_match_feature_info(tiny_backbone):
    images = make_images(tiny_backbone)
    nodes = tiny_backbone.node_names
    features = FeatureExtractor(tiny_backbone, nodes, [0, 500])(images)
    assert set(features) == {FeatureKey(n, t) for n in nodes for t in (0, 500)}
    spatial = tuple(images.shape[2:])
    for info in tiny_backbone.feature_info():
        for t in (0, 500):
            assert tuple(features[FeatureKey(info.name, t)].shape) == info.shape(images.shape[0], spatial)


def test_same_seed_same_features_bit_for_bit(tiny_backbone):
    images = make_images(tiny_backbone)
    a = FeatureExtractor(tiny_backbone, ["mid"], [100, 300], seed=7)(images)
    b = FeatureExtractor(tiny_backbone, ["mid"], [100, 300], seed=7)(images)
    c = FeatureExtractor(tiny_backbone, ["mid"], [100, 300], seed=8)(images)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[FeatureKey("mid", 300)], c[FeatureKey("mid", 300)])


def test_hooks_removed_after_call_and_after_exception(tiny_backbone, monkeypatch):
    images = make_images(tiny_backbone)
    assert _hook_count(tiny_backbone) == 0
    FeatureExtractor(tiny_backbone, tiny_backbone.node_names, [10])(images)
    assert _hook_count(tiny_backbone) == 0

    def broken_forward(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(tiny_backbone.unet, "forward", broken_forward)
    with pytest.raises(RuntimeError, match="boom"):
        FeatureExtractor(tiny_backbone, ["mid"], [10])(images)
    assert _hook_count(tiny_backbone) == 0


def test_extraction_does_not_change_unet_output(tiny_backbone):
    images = make_images(tiny_backbone)
    t = torch.full((images.shape[0],), 50)
    with torch.no_grad():
        before = tiny_backbone(images, t)
        FeatureExtractor(tiny_backbone, tiny_backbone.node_names, [50], early_exit=False)(images)
        after = tiny_backbone(images, t)
    assert torch.equal(before, after)


def test_captured_last_node_feeds_the_output_head(backbone_2d):
    """Reference check: the final up node through MONAI's ``out`` layer equals the U-Net's output."""
    images = make_images(backbone_2d)
    last = backbone_2d.node_names[-1]
    features = FeatureExtractor(backbone_2d, [last], [0], noise="none")(images)
    with torch.no_grad():
        expected = backbone_2d(backbone_2d.to_model_range(images), torch.zeros(images.shape[0], dtype=torch.long))
        via_node = backbone_2d.unet.out(features[FeatureKey(last, 0)])
    torch.testing.assert_close(via_node, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("nodes", [["down.0"], ["down.1", "mid"], ["mid"]])
def test_early_exit_equals_full_forward(tiny_backbone, nodes):
    nodes = [n for n in nodes if n in tiny_backbone.node_names]
    images = make_images(tiny_backbone)
    early = FeatureExtractor(tiny_backbone, nodes, [20, 400], early_exit=True)(images)
    full = FeatureExtractor(tiny_backbone, nodes, [20, 400], early_exit=False)(images)
    assert all(torch.equal(early[k], full[k]) for k in full)


def test_early_exit_skips_the_decoder(backbone_2d):
    calls = []
    handle = backbone_2d.unet.up_blocks[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        FeatureExtractor(backbone_2d, ["down.0", "down.1"], [10])(make_images(backbone_2d))
    finally:
        handle.remove()
    assert calls == []


def test_batched_timesteps_and_batch_size_agree_with_reference(backbone_2d):
    images = make_images(backbone_2d, n=5)
    nodes = ["down.1", "up.1"]
    batched = FeatureExtractor(backbone_2d, nodes, [5, 250, 750], batch_size=64)(images)
    separate = FeatureExtractor(backbone_2d, nodes, [5, 250, 750], batch_timesteps=False, batch_size=2)(images)
    for key in batched:
        torch.testing.assert_close(batched[key], separate[key], rtol=1e-4, atol=1e-5)


def test_shared_noise_matches_manual_reference(backbone_2d):
    """x_t = sqrt(abar) x0 + sqrt(1-abar) eps with the seeded draw, computed by hand and by MONAI."""
    images = make_images(backbone_2d, n=2)
    t = 300
    features = FeatureExtractor(backbone_2d, ["mid"], [t], seed=3)(images)
    eps = torch.randn((1, 16, 16), generator=torch.Generator().manual_seed(3))
    x0 = images * 2 - 1
    abar = backbone_2d.scheduler.alphas_cumprod[t].double()
    x_t = (abar.sqrt() * x0.double() + (1 - abar).sqrt() * eps.double()).float()
    monai_x_t = backbone_2d.scheduler.add_noise(x0, eps.expand_as(x0), torch.tensor([t, t]))
    torch.testing.assert_close(x_t, monai_x_t, rtol=1e-5, atol=1e-5)
    captured = {}
    handle = backbone_2d.unet.middle_block.register_forward_hook(lambda m, i, o: captured.setdefault("mid", o))
    with torch.no_grad():
        backbone_2d(x_t, torch.tensor([t, t]))
    handle.remove()
    torch.testing.assert_close(features[FeatureKey("mid", t)], captured["mid"], rtol=1e-4, atol=1e-5)


def test_ensemble_is_mean_of_seeded_draws(backbone_2d):
    images = make_images(backbone_2d, n=2)
    ens = FeatureExtractor(backbone_2d, ["up.0"], [200], noise="ensemble(3)", seed=10)(images)
    singles = [FeatureExtractor(backbone_2d, ["up.0"], [200], seed=10 + k)(images) for k in range(3)]
    key = FeatureKey("up.0", 200)
    torch.testing.assert_close(ens[key], sum(s[key] for s in singles) / 3, rtol=1e-5, atol=1e-6)


def test_noise_none_feeds_clean_images_and_records_noise_level(backbone_2d):
    images = make_images(backbone_2d, n=2)
    a = FeatureExtractor(backbone_2d, ["mid"], [0], noise="none", seed=1)(images)
    b = FeatureExtractor(backbone_2d, ["mid"], [0], noise="none", seed=2)(images)
    assert torch.equal(a[FeatureKey("mid", 0)], b[FeatureKey("mid", 0)])
    levels = FeatureExtractor(backbone_2d, ["mid"], [0, 999])(images).noise_levels
    abar = backbone_2d.scheduler.alphas_cumprod
    assert levels[999] == pytest.approx(float((1 - abar[999]).sqrt()), rel=1e-6)
    assert 0 < levels[0] < 0.02 < levels[999] <= 1.0


def test_features_are_fp16_when_asked(backbone_2d):
    features = FeatureExtractor(backbone_2d, ["mid"], [10], dtype=torch.float16)(make_images(backbone_2d))
    assert features[FeatureKey("mid", 10)].dtype == torch.float16



def test_non_finite_features_are_refused_naming_node_and_timestep(backbone_2d):
    images = make_images(backbone_2d)
    with torch.no_grad():  # a NaN weight injected in a live module, after loading
        backbone_2d.unet.middle_block.resnet_1.conv1.conv.weight.view(-1)[0] = float("nan")
    FeatureExtractor(backbone_2d, ["down.0"], [10])(images)  # nodes before the NaN stay finite
    with pytest.raises(ValueError, match=r"node 'mid' at timestep 10 has \d+ NaN/Inf value"):
        FeatureExtractor(backbone_2d, ["down.0", "mid"], [10, 20])(images)
