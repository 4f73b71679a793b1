"""Anomaly scorers on tiny U-Nets: shapes, determinism, update rules against MONAI, NFE, post-processing."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError

from diffrep.anomaly import (AnomalyScorer, DAEScorer, brain_augment, FeatureDistanceScorer, MultiLevelScorer, ReconstructionScorer,
                             image_scores, postprocess_maps)
from diffrep.errors import as_float_images
from tests.conftest import make_backbone, make_images


class StubScorer(AnomalyScorer):
    """raw map = scale * image^2: a known map for testing the base class and the ensemble."""

    def __init__(self, scale: float = 1.0, erode: int = 0, median: int = 0, top_fraction: float = 0.01,
                 batch_size: int = 2) -> None:
        self.scale, self.erode, self.median, self.top_fraction, self.batch_size = scale, erode, median, top_fraction, batch_size

    unet_calls_per_image = 1

    def _check_images(self, images):
        return as_float_images(images, in_channels=1, spatial_dims=2)

    def _raw_maps(self, images):
        return self.scale * images[:, 0] ** 2


def _count_rows(backbone):
    """Forward pre-hook counting U-Net input rows (images x timesteps) across calls."""
    count = {"rows": 0}
    handle = backbone.unet.register_forward_pre_hook(lambda _m, args: count.__setitem__("rows", count["rows"] + args[0].shape[0]))
    return count, handle


def _exact_denoiser(backbone, clean_model_range):
    """Make the backbone predict the exact noise of x_t w.r.t. a known clean image: x0_hat == clean."""
    ac = backbone.schedule.alphas_cumprod

    def forward(x_t, timesteps, *args, **kwargs):
        abar = ac[timesteps].float().view(-1, 1, 1, 1)
        return (x_t - abar.sqrt() * clean_model_range) / (1 - abar).sqrt()

    backbone.unet.forward = forward
    return backbone


def live_backbone(name: str = "2d-2level", seed: int = 0):
    """A tiny backbone whose zero-initialised convolutions (MONAI's output conv, resnet conv2) get small
    random weights, so that eps_theta != 0 and the reverse modes really differ."""
    bb = make_backbone(name, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in bb.unet.parameters():
            if p.ndim > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return bb


@pytest.fixture(scope="module")
def bb():
    return live_backbone()


@pytest.mark.parametrize("reverse", ["x0", "ddim", "ddpm"])
def test_reconstruction_shapes_determinism_and_batching(bb, reverse):
    x = make_images(bb, n=3, size=16)
    kw = dict(timestep=6, reverse=reverse, ddim_steps=3)
    a = ReconstructionScorer(bb, seed=3, batch_size=3, **kw).score(x)
    b = ReconstructionScorer(bb, seed=3, batch_size=1, **kw).score(x)
    c = ReconstructionScorer(bb, seed=4, batch_size=3, **kw).score(x)
    assert a.maps.shape == (3, 16, 16) and a.scores.shape == (3,) and a.maps.dtype == np.float32
    np.testing.assert_allclose(a.maps, b.maps, atol=1e-5)  # an image's map does not depend on its batch
    assert not np.allclose(a.maps, c.maps)
    np.testing.assert_array_equal(a.maps, ReconstructionScorer(bb, seed=3, batch_size=3, **kw).score(x).maps)


def test_reverse_modes_differ_and_ddim_one_step_is_x0(bb):
    x = make_images(bb, n=2, size=16)
    maps = {r: ReconstructionScorer(bb, timestep=6, reverse=r, ddim_steps=3).score(x).maps for r in ("x0", "ddim", "ddpm")}
    assert not np.allclose(maps["x0"], maps["ddim"]) and not np.allclose(maps["ddim"], maps["ddpm"])
    one = ReconstructionScorer(bb, timestep=6, reverse="ddim", ddim_steps=1).score(x).maps
    np.testing.assert_allclose(one, maps["x0"], atol=1e-5)


@pytest.mark.parametrize("reverse", ["x0", "ddim", "ddpm"])
def test_simplex_noise_runs_and_is_deterministic(bb, reverse):
    x = make_images(bb, n=2, size=16)
    kw = dict(timestep=3, reverse=reverse, ddim_steps=2, noise_type="simplex",
              noise_type_options={"octaves": 2, "frequency": 8.0})
    a, b = ReconstructionScorer(bb, **kw).score(x), ReconstructionScorer(bb, **kw).score(x)
    np.testing.assert_array_equal(a.maps, b.maps)
    assert not np.allclose(a.maps, ReconstructionScorer(bb, **{**kw, "noise_type": "gaussian"}).score(x).maps)


@pytest.mark.parametrize("reverse", ["x0", "ddim", "ddpm"])
@pytest.mark.parametrize("residual", ["l1", "l2"])
def test_exact_denoiser_finds_the_corruption(reverse, residual):
    bb = make_backbone("2d-2level")
    clean = make_images(bb, n=2, size=16, seed=5)
    _exact_denoiser(bb, bb.to_model_range(clean))
    corrupted = clean.clone()
    corrupted[:, :, 4:8, 4:8] = 1.0
    result = ReconstructionScorer(bb, timestep=8, reverse=reverse, ddim_steps=4, residual=residual,
                                  top_fraction=1.0).score(corrupted)
    diff = (corrupted - clean)[:, 0].numpy()
    expected = np.abs(diff) if residual == "l1" else diff ** 2
    np.testing.assert_allclose(result.maps, expected, atol=1e-4)
    np.testing.assert_allclose(result.scores, expected.reshape(2, -1).mean(1), atol=1e-5)


@pytest.mark.parametrize("reverse,expected", [("x0", 1), ("ddim", 3), ("ddpm", 5)])
def test_unet_calls_counted_by_hook(bb, reverse, expected):
    x = make_images(bb, n=2, size=16)
    scorer = ReconstructionScorer(bb, timestep=4, reverse=reverse, ddim_steps=3)
    count, handle = _count_rows(bb)
    try:
        scorer.score(x)
    finally:
        handle.remove()
    assert scorer.unet_calls_per_image == expected == count["rows"] // 2


@pytest.mark.parametrize("kwargs,valid", [({"reverse": "ddjm"}, "ddpm"), ({"noise_type": "perlin"}, "simplex"),
                                          ({"residual": "l3"}, "l1")])
def test_unknown_names_list_valid_values(bb, kwargs, valid):
    with pytest.raises(ValueError, match=valid):
        ReconstructionScorer(bb, **kwargs).score(make_images(bb, n=1, size=16))


def test_bad_settings(bb):
    x = make_images(bb, n=1, size=16)
    with pytest.raises(ValueError, match="ddim_steps"):
        ReconstructionScorer(bb, timestep=3, reverse="ddim", ddim_steps=5).score(x)
    with pytest.raises(ValueError, match="timesteps"):
        ReconstructionScorer(bb, timestep=1000).score(x)
    with pytest.raises(ValueError, match=r"\(2, 1, 16, 16\).*\(2, 8, 8\)"):
        ReconstructionScorer(bb, timestep=3).score(make_images(bb, n=2, size=16), masks=np.ones((2, 8, 8), bool))


def test_postprocess_and_image_scores():
    maps = np.zeros((2, 12, 12), np.float32)
    maps[0, 6, 6] = 5.0  # a lone spike: removed by the median filter
    maps[1, 3:9, 3:9] = 2.0  # a blob: survives it
    masks = np.zeros((2, 12, 12), bool)
    masks[:, 1:11, 1:11] = True
    out, eroded = postprocess_maps(maps, masks, erode=1, median=3)
    assert eroded.sum() == 2 * 64 and out[0].max() == 0.0 and out[1, 5, 5] == 2.0
    one, _ = postprocess_maps(maps[1:], masks[1:], erode=1, median=3)
    np.testing.assert_array_equal(one[0], out[1])  # vectorised: images do not mix
    scores = image_scores(out, eroded, top_fraction=0.25)
    assert scores[0] == 0.0 and scores[1] == pytest.approx(2.0)
    assert image_scores(np.arange(100, dtype=np.float32).reshape(1, 10, 10), None, 0.1)[0] == pytest.approx(94.5)
    with pytest.raises(ValueError, match="top_fraction"):
        image_scores(out, None, 0.0)


def test_multilevel_normalisation_removes_scale():
    x = make_images(make_backbone(), n=4, size=16, seed=2)
    masks = np.ones((4, 16, 16), bool)
    masks[:, :2] = False
    equal = MultiLevelScorer(scorers=[StubScorer(1.0), StubScorer(1.0)], top_fraction=1.0).fit(x, masks)
    skewed = MultiLevelScorer(scorers=[StubScorer(1.0), StubScorer(100.0)], top_fraction=1.0).fit(x, masks)
    a, b = equal.score(x, masks), skewed.score(x, masks)
    np.testing.assert_allclose(a.maps, b.maps, rtol=1e-4)
    raw = (x[:, 0] ** 2).numpy()
    assert skewed.level_mean_[1] == pytest.approx(100 * raw[masks].mean(), rel=1e-4)
    np.testing.assert_allclose(a.maps, raw / raw[masks].std() * masks, rtol=1e-4, atol=1e-6)  # mean_l(r_l / sd_l)
    assert (b.maps >= 0).all() and (b.maps[~masks] == 0).all()
    maxed = MultiLevelScorer(scorers=[StubScorer(1.0), StubScorer(100.0)], combine="max").fit(x, masks).score(x, masks)
    assert (maxed.maps >= 0).all()
    with pytest.raises(NotFittedError):
        MultiLevelScorer(scorers=[StubScorer()]).score(x)
    with pytest.raises(ValueError, match="mean"):
        MultiLevelScorer(scorers=[StubScorer()], combine="median").fit(x)


def test_multilevel_reconstruction_levels(bb):
    x = make_images(bb, n=2, size=16)
    scorer = MultiLevelScorer(bb, timesteps=(2, 5), scorer_params={"reverse": "x0"}).fit(x)
    count, handle = _count_rows(bb)
    try:
        result = scorer.score(x)
    finally:
        handle.remove()
    assert result.maps.shape == (2, 16, 16) and scorer.unet_calls_per_image == 2 == count["rows"] // 2
    assert len(scorer.members_) == 2 and scorer.members_[1].timestep == 5


@pytest.mark.parametrize("pca", [None, 6])
def test_feature_distance_knn(bb, pca):
    x = make_images(bb, n=3, size=16, seed=9)
    scorer = FeatureDistanceScorer(bb, ["down.0", "up.1"], [10], k=1, max_pixels=10_000, pca_components=pca).fit(x)
    patched = x[:1].clone()
    patched[:, :, 5:11, 5:11] = 1.0
    result = scorer.score(torch.cat([x[:1], patched]))
    assert result.maps.shape == (2, 16, 16) and result.scores.shape == (2,)
    inside = result.maps[1, 5:11, 5:11].mean()
    assert result.maps[0].max() < 1e-2 * inside  # a training image is in the memory bank: distance ~0
    outside = np.ones((16, 16), bool)
    outside[3:13, 3:13] = False
    assert inside > 2 * result.maps[1][outside].mean()
    assert scorer.unet_calls_per_image == 1


def test_feature_distance_gaussian_and_budget(bb):
    x = make_images(bb, n=6, size=16, seed=11)
    scorer = FeatureDistanceScorer(bb, ["up.1"], [5, 20], method="gaussian", gaussian_size=4, pca_components=4,
                                   max_pixels=200).fit(x)
    patched = x[:1].clone()
    patched[:, :, 4:12, 4:12] = 1.0
    result = scorer.score(torch.cat([x[:1], patched]))
    assert result.maps.shape == (2, 16, 16) and np.isfinite(result.maps).all()
    assert result.maps[1, 4:12, 4:12].mean() > result.maps[0, 4:12, 4:12].mean()
    assert scorer.gaussian_precision_.shape == (16, 4, 4) and scorer.unet_calls_per_image == 2
    knn = FeatureDistanceScorer(bb, ["up.1"], [5], max_pixels=100).fit(x)
    assert len(knn.memory_bank_) == 100
    with pytest.raises(NotFittedError):
        FeatureDistanceScorer(bb, ["up.1"], [5]).score(x)
    with pytest.raises(ValueError, match="knn"):
        FeatureDistanceScorer(bb, ["up.1"], [5], method="svm").fit(x)


def test_dae_trains_and_round_trips(tmp_path):
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    centres = torch.rand(8, 2, generator=g) - 0.5
    x = torch.exp(-((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2) / 0.3)[:, None]
    kw = dict(channels=(8, 16), strides=(2,), num_res_units=1, progress=False)
    dae = DAEScorer(**kw, steps=40, train_batch_size=4, lr=3e-3, seed=0).fit(x)
    losses = dae.loss_history_
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert DAEScorer(**kw, steps=3, train_batch_size=4, lr=3e-3, seed=0).fit(x).loss_history_ == losses[:3]
    result = dae.score(x[:3])
    assert result.maps.shape == (3, 16, 16) and dae.unet_calls_per_image == 1
    loaded = DAEScorer.load(dae.save(tmp_path / "dae"))
    np.testing.assert_array_equal(loaded.score(x[:3]).maps, result.maps)
    assert loaded.training_["steps"] == 40
    seen = []
    DAEScorer(**kw, steps=2, train_batch_size=2, augment=lambda i, m, s: (seen.append(s) or (i.flip(-1), m))).fit(x)
    assert len(seen) == 2
    masks = torch.ones_like(x)
    masks[:, :, :2] = 0
    DAEScorer(**kw, steps=1, train_batch_size=2, augment=brain_augment(prob=1.0)).fit(x, masks)
    with pytest.raises(NotFittedError):
        DAEScorer(**kw).score(x)


def test_multilevel_raw_maps_equal_unprocessed_score():
    from diffrep.anomaly import MultiLevelScorer

    backbone = live_backbone()
    images = make_images(backbone, n=2)
    scorer = MultiLevelScorer(backbone, timesteps=(100, 300), normalise=None)
    np.testing.assert_allclose(scorer.raw_maps(images), scorer.score(images).maps, rtol=1e-6)


def test_noise_is_a_policy_in_the_words_of_the_extractor():
    """``noise`` is a policy everywhere: a scorer's "shared" is one draw for every image (as the extractor's),
    "ensemble(k)" averages k of them; "per_image" is the scorers' own, and the extractor refuses it."""
    from diffrep.features import FeatureExtractor

    backbone = make_backbone("2d-2level")
    a, b = make_images(backbone, n=2, size=16)
    shared = ReconstructionScorer(backbone, timestep=6, noise="shared")
    np.testing.assert_allclose(shared.reconstruct(torch.stack([a, b]))[1], shared.reconstruct(b[None])[0], atol=1e-6)
    np.testing.assert_array_equal(shared.reconstruct(a[None]),
                                  ReconstructionScorer(backbone, timestep=6, noise="ensemble(1)").reconstruct(a[None]))
    two = ReconstructionScorer(backbone, timestep=6, noise="ensemble(2)")
    assert two.unet_calls_per_image == 2 and not np.allclose(two.reconstruct(a[None]), shared.reconstruct(a[None]))
    with pytest.raises(ValueError, match=r"noise: expected 'shared', 'ensemble\(k\)' or 'none' \(k >= 1\), got 'per_image'"):
        FeatureExtractor(backbone, ["mid"], [5], noise="per_image")
    with pytest.raises(ValueError, match=r"noise: expected 'per_image', .*got 'none'"):
        ReconstructionScorer(backbone, noise="none").score(a[None])


def test_per_image_noise_depends_only_on_the_image():
    from diffrep.anomaly.reconstruction import ReconstructionScorer, image_seed

    backbone = live_backbone()
    a, b = make_images(backbone, n=2)
    assert image_seed(0, a) == image_seed(0, a.clone()) != image_seed(0, b)
    assert image_seed(0, a) != image_seed(1, a)
    scorer = ReconstructionScorer(backbone, timestep=300, reverse="x0", seed=0)
    pair = scorer.reconstruct(torch.stack([a, b]))
    alone = scorer.reconstruct(torch.stack([b, a]))
    np.testing.assert_allclose(pair[0], alone[1], rtol=1e-5, atol=1e-6)
    shared = ReconstructionScorer(backbone, timestep=300, reverse="x0", seed=0, noise="shared")
    assert not np.allclose(shared.reconstruct(torch.stack([a, b]))[1], pair[1])
