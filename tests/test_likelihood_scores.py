"""Likelihood OOD scorers: raw NLL, the complexity-corrected NLL (Serra et al. 2020) and the typicality
test (Nalisnick et al. 2019), on tiny U-Nets and on Gaussian data whose ideal denoiser is known."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from diffrep.anomaly import LikelihoodScorer, ReconstructionScorer, TypicalityScorer
from diffrep.anomaly.complexity import png_bits_per_dim, to_uint8
from diffrep.backbones import Backbone, BackboneConfig
from diffrep.backbones.config import ScheduleConfig

from .conftest import TINY_CONFIGS, informative_init_

SHORT = ScheduleConfig(num_train_timesteps=20, beta_start=1e-3, beta_end=0.3)  # VLB in 20 calls


def tiny(schedule: ScheduleConfig = SHORT, seed: int = 0) -> Backbone:
    torch.manual_seed(seed)
    backbone = Backbone(BackboneConfig(unet=TINY_CONFIGS["2d-2level"], schedule=schedule))
    informative_init_(backbone.unet)
    return backbone


def images(n: int = 4, size: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.rand((n, 1, size, size), generator=torch.Generator().manual_seed(seed))


class IdealGaussian(Backbone):
    """A backbone whose noise predictor is the ideal denoiser of i.i.d. N(0, std^2) pixels in model range:
    E[eps | x_t] = sqrt(1 - abar) x_t / (abar std^2 + 1 - abar); discrete abar for integer timesteps
    (the VLB), the VP-SDE's continuous abar for the ODE's float labels t (T - 1)."""

    def __init__(self, std: float) -> None:
        super().__init__(BackboneConfig(unet=TINY_CONFIGS["2d-2level"]))
        self.std = std

    def __call__(self, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if timesteps.is_floating_point():
            cfg, T = self.config.schedule, self.num_timesteps
            s = timesteps.double() / (T - 1)
            beta_min, beta_max = T * cfg.beta_start, T * cfg.beta_end
            abar = torch.exp(-(beta_min * s + 0.5 * (beta_max - beta_min) * s * s))
        else:
            abar = self.schedule.alphas_cumprod[timesteps.long()]
        abar = abar.to(x_t.dtype).view(-1, 1, 1, 1)
        return (1 - abar).sqrt() * x_t / (abar * self.std ** 2 + 1 - abar)


def gaussian_images(n: int, std: float, seed: int, size: int = 4) -> torch.Tensor:
    """Data-range images whose model-range pixels are N(0, std^2) (clipped to [-1, 1])."""
    y = std * torch.randn((n, 1, size, size), generator=torch.Generator().manual_seed(seed))
    return ((y.clamp(-1, 1) + 1) / 2).float()


# ------------------------------------------------------------------------- complexity correction
def _png_bits_per_dim_by_hand(x: torch.Tensor) -> np.ndarray:
    lengths = []
    for image in x:
        codes = np.clip(np.rint(image[0].numpy().astype(np.float64) * 255), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(codes, mode="L").save(buffer, format="PNG", compress_level=9)
        lengths.append(8 * len(buffer.getvalue()) / codes.size)
    return np.array(lengths)


@pytest.mark.parametrize("method", ["vlb", "ode"])
def test_the_corrected_score_is_the_nll_minus_the_png_length_computed_independently(method):
    x = images()
    x[0] = torch.linspace(0.2, 0.8, 8).view(1, 1, 8)  # a smooth image: a short PNG
    scorer = LikelihoodScorer(tiny(), method=method, rtol=1e-3, atol=1e-3, correction="png")
    table = scorer.nll_table(x)
    by_hand = _png_bits_per_dim_by_hand(x)
    np.testing.assert_array_equal(table["png_bits_per_dim"], by_hand)
    assert by_hand[0] < by_hand[1:].min()
    np.testing.assert_array_equal(table["corrected_bits_per_dim"], table["nll_bits_per_dim"] - by_hand)
    np.testing.assert_array_equal(scorer.score(x).scores, table["corrected_bits_per_dim"])  # same seed, same batch
    if method == "vlb":
        raw = LikelihoodScorer(tiny(), method=method).score(x).scores
        np.testing.assert_array_equal(raw, table["nll_bits_per_dim"])


def test_png_length_of_rgb_and_bad_input():
    rgb = np.random.default_rng(0).integers(0, 256, (2, 3, 8, 8), dtype=np.uint8)
    assert png_bits_per_dim(rgb).shape == (2,) and (png_bits_per_dim(rgb) > 8).all()  # noise does not compress
    assert to_uint8(np.array([-0.1, 0.0, 0.5, 1.0, 1.2])).tolist() == [0, 0, 128, 255, 255]
    with pytest.raises(ValueError, match=r"C = 1 or 3, got shape \(2, 8, 8\)"):
        png_bits_per_dim(rgb[:, :2])
    with pytest.raises(TypeError, match="expected uint8"):
        png_bits_per_dim(rgb.astype(np.float32))


# ------------------------------------------------------------------------------ seeds and batches
@pytest.mark.parametrize("method", ["vlb", "ode"])
def test_scores_are_seeded_and_an_image_keeps_its_draws_in_any_batch(method):
    x = images(4)
    settings = dict(method=method, rtol=1e-3, atol=1e-3)
    first = LikelihoodScorer(tiny(), seed=3, batch_size=4, **settings).nll_table(x)["nll_bits_per_dim"]
    again = LikelihoodScorer(tiny(), seed=3, batch_size=4, **settings).nll_table(x)["nll_bits_per_dim"]
    other = LikelihoodScorer(tiny(), seed=4, batch_size=4, **settings).nll_table(x)["nll_bits_per_dim"]
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other, rtol=0, atol=1e-9)
    alone = LikelihoodScorer(tiny(), seed=3, batch_size=1, **settings).nll_table(x.flip(0))["nll_bits_per_dim"][::-1]
    # VLB: the same draws, float rounding only; ODE: the same probes, the solver's steps differ within tolerance
    if method == "vlb":
        np.testing.assert_allclose(alone, first, rtol=0, atol=1e-5)
    else:
        np.testing.assert_allclose(alone, first, rtol=10 * settings["rtol"])


def test_costs_in_unet_calls():
    x = images(3)
    vlb = LikelihoodScorer(tiny())
    assert vlb.unet_calls_per_image == 20 and (vlb.nll_table(x)["unet_calls"] == 20).all()
    ode = LikelihoodScorer(tiny(), method="ode", rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="ODE's cost is adaptive"):
        _ = ode.unet_calls_per_image
    calls = ode.nll_table(x)["unet_calls"]
    assert (calls == calls[0]).all() and calls[0] > 5 and ode.unet_calls_per_image == calls[0]


def test_maps_hold_the_image_score_and_masks_shape_only_the_maps():
    x = images(2)
    masks = np.ones((2, 8, 8), bool)
    masks[:, :3] = False
    scorer = LikelihoodScorer(tiny())
    plain, masked = scorer.score(x), scorer.score(x, masks)
    np.testing.assert_array_equal(plain.scores, masked.scores)
    np.testing.assert_array_equal(plain.maps, np.broadcast_to(plain.scores[:, None, None], (2, 8, 8)).astype(np.float32))
    np.testing.assert_array_equal(masked.maps, plain.maps * masks)
    np.testing.assert_array_equal(scorer.raw_maps(x), plain.maps)


def test_settings_are_checked_naming_the_expected_value():
    bb = tiny()
    cases = [(dict(method="flow"), r"method: expected one of \['vlb', 'ode'\], got 'flow'"),
             (dict(correction="jpeg"), r"correction: expected one of \['none', 'png'\]"),
             (dict(rtol=-1e-5), r"rtol: expected a finite number > 0, got -1e-05"),
             (dict(atol=float("nan")), r"atol: expected a finite number > 0, got nan"),
             (dict(hutchinson=0), r"hutchinson: expected an integer >= 1, got 0"),
             (dict(trace="approx"), r"trace: expected one of \['hutchinson', 'exact'\]"),
             (dict(seed=-1), r"seed: expected an integer >= 0, got -1")]
    for params, match in cases:
        with pytest.raises(ValueError, match=match):
            LikelihoodScorer(bb, **params).fit(images(1))
    cosine = tiny(ScheduleConfig(schedule="cosine"))
    with pytest.raises(ValueError, match="linear schedule"):
        LikelihoodScorer(cosine, method="ode").score(images(1))
    with pytest.raises(ValueError, match=r"expected 1 channel\(s\) in dim 1, got 3"):
        LikelihoodScorer(bb).score(torch.rand(1, 3, 8, 8))


# ------------------------------------------------------------------------------ the Gaussian toy
def test_the_ode_scorer_of_the_ideal_denoiser_gives_the_exact_density_in_bits_per_dim():
    std = 0.3
    x = gaussian_images(6, std, seed=0)
    y = x.double() * 2 - 1
    exact = -torch.distributions.Normal(0.0, std).log_prob(y).flatten(1).sum(1) / (16 * math.log(2))
    ode = LikelihoodScorer(IdealGaussian(std), method="ode", eight_bit=False, trace="exact", rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ode.nll_table(x)["nll_bits_per_dim"], exact.numpy(), rtol=0, atol=1e-4)
    bound = LikelihoodScorer(IdealGaussian(std), method="vlb", eight_bit=False).nll_table(x)["nll_bits_per_dim"]
    assert bound.mean() > exact.numpy().mean()  # the variational bound lies above


def test_typicality_flags_ood_batches_whose_likelihood_is_higher_than_in_distribution():
    """Data N(0, 0.3^2); OOD N(0, 0.15^2) sits at the mode, so its NLL is *lower*: a one-sided test on
    the raw NLL calls it more normal, the two-sided typicality test flags it."""
    model = IdealGaussian(0.3)
    nll = LikelihoodScorer(model, method="ode", trace="exact", rtol=1e-4, atol=1e-4, batch_size=200)
    test = TypicalityScorer(nll, group_size=10, bootstraps=2000, alpha=0.05).fit(gaussian_images(200, 0.3, seed=1))
    inside, outside = gaussian_images(200, 0.3, seed=2), gaussian_images(200, 0.15, seed=3)
    assert nll.score_images(outside).mean() < nll.score_images(inside).mean()
    flagged_in = test.test_groups(inside)["out_of_distribution"].mean()
    flagged_out = test.test_groups(outside)["out_of_distribution"].mean()
    assert flagged_in <= 0.25 and flagged_out >= 0.9, (flagged_in, flagged_out)
    per_image = test.score(outside).scores
    np.testing.assert_allclose(per_image, np.abs(nll.score_images(outside) - test.mean_))


def test_typicality_threshold_is_the_bootstrap_quantile_and_bad_input_is_refused():
    scores = np.arange(20, dtype=np.float64)
    test = TypicalityScorer(LikelihoodScorer(tiny()), group_size=4, bootstraps=500, alpha=0.1, seed=7).fit_scores(scores)
    rng = np.random.default_rng(7)
    draws = rng.integers(0, 20, size=(500, 4))
    assert test.mean_ == 9.5 and test.threshold_ == np.quantile(np.abs(scores[draws].mean(1) - 9.5), 0.9)
    np.testing.assert_array_equal(test.statistics([9.5, 9.5, 9.5, 9.5, 0, 0, 0, 0]), [0.0, 9.5])
    with pytest.raises(ValueError, match="expected a non-zero multiple of group_size = 4 images, got 6"):
        test.statistics(np.zeros(6))
    with pytest.raises(ValueError, match=r"alpha: expected a number in \(0, 1\), got 1.5"):
        TypicalityScorer(LikelihoodScorer(tiny()), alpha=1.5).fit_scores(scores)
    with pytest.raises(TypeError, match="scorer: expected an AnomalyScorer"):
        TypicalityScorer(None).fit_scores(scores)
    with pytest.raises(ValueError, match=r"expected >= 2 finite in-distribution image scores"):
        TypicalityScorer(LikelihoodScorer(tiny())).fit_scores([1.0, float("nan")])


def test_typicality_wraps_any_scorer():
    bb = tiny()
    x = images(4)
    test = TypicalityScorer(ReconstructionScorer(bb, 5, reverse="x0", top_fraction=1.0), group_size=2).fit(x)
    assert test.unet_calls_per_image == 1 and test.test_groups(x)["statistic"].shape == (2,)
