"""FeatureExtractor: shapes against FeatureInfo, determinism, hooks, early exit, batching, noise."""
from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import pytest
import torch

from monai.networks.schedulers import DDPMScheduler

from diffrep import FeatureExtractor, FeatureKey
from diffrep.features import extractor as extractor_module

from .conftest import make_images

# The stated guarantee (README "Noise", FeatureExtractor docstring): identical batching is bit for bit
# on CPU; other batching (batch size, timestep list, batch_timesteps) agrees within this tolerance.
BATCHING_TOLERANCE = dict(atol=1e-5, rtol=1e-5)


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


def test_identical_batching_is_bit_for_bit_whatever_the_nodes_and_early_exit(tiny_backbone):
    """Same seed, images, batch_size, batch_timesteps and timestep list: equal bit for bit."""
    images = make_images(tiny_backbone, n=5)
    reference = FeatureExtractor(tiny_backbone, tiny_backbone.node_names, [10, 500], seed=3, batch_size=2,
                                 early_exit=False)(images)
    for nodes in (["down.0"], ["down.1", "mid"], tiny_backbone.node_names):
        for early_exit in (True, False):
            again = FeatureExtractor(tiny_backbone, nodes, [10, 500], seed=3, batch_size=2, early_exit=early_exit)(images)
            assert set(again) == {FeatureKey(n, t) for n in nodes for t in (10, 500)}
            assert all(torch.equal(again[k], reference[k]) for k in again), (nodes, early_exit)


@pytest.mark.parametrize("other", [
    dict(timesteps=[10, 500], batch_size=1, batch_timesteps=False),  # one row per forward
    dict(timesteps=[10, 500], batch_size=1),  # chunks of one image, two timesteps
    dict(timesteps=[10], batch_size=64),  # another timestep list: fewer rows per forward
    dict(timesteps=[500, 10, 250], batch_size=21, early_exit=True),  # another list and order, early exit
])
def test_other_batching_agrees_within_the_stated_tolerance(tiny_backbone, other):
    images = make_images(tiny_backbone, n=5)
    nodes = tiny_backbone.node_names
    reference = FeatureExtractor(tiny_backbone, nodes, [10, 500], seed=3, batch_size=32)(images)
    other = dict(other)
    features = FeatureExtractor(tiny_backbone, nodes, other.pop("timesteps"), seed=3, **other)(images)
    common = [k for k in features if k in reference]
    assert len(common) == len(nodes) * len({10, 500} & {k.timestep for k in features})
    for key in common:
        torch.testing.assert_close(features[key], reference[key], **BATCHING_TOLERANCE, msg=str(key))


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


def _check_extraction_leaves_unet_output(backbone) -> None:
    images = make_images(backbone)
    t = torch.full((images.shape[0],), 50)
    with torch.no_grad():
        before = backbone(images, t)
        FeatureExtractor(backbone, backbone.node_names, [50], early_exit=False)(images)
        after = backbone(images, t)
    assert before.abs().amax() > 1e-3  # an informative output: zeros would equal zeros whatever happened
    assert torch.equal(before, after)


def _check_last_node_feeds_the_output_head(backbone) -> None:
    """The final up node (captured with every node hooked) through MONAI's ``out`` layer is the U-Net's output."""
    images = make_images(backbone)
    last = backbone.node_names[-1]
    features = FeatureExtractor(backbone, backbone.node_names, [0], noise="none", early_exit=False)(images)
    with torch.no_grad():
        expected = backbone(backbone.to_model_range(images), torch.zeros(images.shape[0], dtype=torch.long))
        via_node = backbone.unet.out(features[FeatureKey(last, 0)])
    assert expected.abs().amax() > 1e-3
    torch.testing.assert_close(via_node, expected, rtol=1e-5, atol=1e-5)


def test_extraction_does_not_change_unet_output(tiny_backbone):
    _check_extraction_leaves_unet_output(tiny_backbone)


def test_captured_last_node_feeds_the_output_head(tiny_backbone):
    _check_last_node_feeds_the_output_head(tiny_backbone)


@contextmanager
def _hooks_that_change_activations(modules, stop_after=None, leak=False):
    """A broken capture_nodes: its hooks return out * 3 + 1 (and with ``leak``, are never removed)."""
    captured, handles = {}, []

    def hook(name):
        def change(_module, _inputs, output):
            captured[name] = output * 3 + 1
            return captured[name]

        return change

    for name, module in modules.items():
        handles.append(module.register_forward_hook(hook(name)))
    try:
        yield captured
    finally:
        if not leak:
            for handle in handles:
                handle.remove()


def test_the_two_checks_catch_hooks_that_change_activations(tiny_backbone, monkeypatch):
    """Both checks fail when the extractor's hooks change what flows through the U-Net."""
    monkeypatch.setattr(extractor_module, "capture_nodes", _hooks_that_change_activations)
    with pytest.raises(AssertionError):
        _check_last_node_feeds_the_output_head(tiny_backbone)
    monkeypatch.setattr(extractor_module, "capture_nodes", partial(_hooks_that_change_activations, leak=True))
    with pytest.raises(AssertionError):
        _check_extraction_leaves_unet_output(tiny_backbone)


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


@pytest.mark.parametrize("batch_timesteps", [True, False])
def test_batch_size_counts_images_per_chunk_whatever_the_timesteps(tiny_backbone, monkeypatch, batch_timesteps):
    """batch_size is images per chunk: 5 images, batch_size 2 and 3 timesteps make chunks of 2, 2, 1 images;
    a forward holds a chunk's images x all timesteps (batched) or x one timestep (separate)."""
    images = make_images(tiny_backbone, n=5)
    extractor = FeatureExtractor(tiny_backbone, ["mid"], [10, 250, 500], batch_size=2, batch_timesteps=batch_timesteps)
    assert list(extractor.chunks(5)) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    rows, original = [], FeatureExtractor._forward
    monkeypatch.setattr(FeatureExtractor, "_forward", lambda self, x_t, t: rows.append(x_t.shape[0]) or original(self, x_t, t))
    features = extractor(images)
    assert rows == ([6, 6, 3] if batch_timesteps else [2, 2, 2, 2, 2, 2, 1, 1, 1])
    assert [index for index, _ in extractor.iter_batches(images)] == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert features[FeatureKey("mid", 10)].shape[0] == 5


def test_batched_timesteps_and_batch_size_agree_with_reference(backbone_2d):
    images = make_images(backbone_2d, n=5)
    nodes = ["down.1", "up.1"]
    batched = FeatureExtractor(backbone_2d, nodes, [5, 250, 750], batch_size=21)(images)
    separate = FeatureExtractor(backbone_2d, nodes, [5, 250, 750], batch_timesteps=False, batch_size=2)(images)
    for key in batched:
        torch.testing.assert_close(batched[key], separate[key], **BATCHING_TOLERANCE)


def test_shared_noise_matches_manual_reference(backbone_2d):
    """x_t = sqrt(abar) x0 + sqrt(1-abar) eps with the seeded draw, computed by hand and by MONAI."""
    images = make_images(backbone_2d, n=2)
    t = 300
    features = FeatureExtractor(backbone_2d, ["mid"], [t], seed=3)(images)
    eps = torch.randn((1, 16, 16), generator=torch.Generator().manual_seed(3))
    x0 = images * 2 - 1
    monai = DDPMScheduler(num_train_timesteps=1000, schedule="linear_beta")
    abar = monai.alphas_cumprod[t].double()
    x_t = (abar.sqrt() * x0.double() + (1 - abar).sqrt() * eps.double()).float()
    monai_x_t = monai.add_noise(x0, eps.expand_as(x0), torch.tensor([t, t]))
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
    abar = DDPMScheduler(num_train_timesteps=1000, schedule="linear_beta").alphas_cumprod
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
