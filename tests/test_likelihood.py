"""Likelihoods where the answer is known: Gaussian data, whose ideal denoiser is linear and closed-form."""
from __future__ import annotations

import math

import pytest
import torch

from diffrep.backbones.config import ScheduleConfig
from diffrep.diffusion import DDPMSchedule
from diffrep.likelihood import bits_per_dim, ode_nll, vlb_nll, vp_sde

from .conftest import make_backbone

CONFIG = ScheduleConfig()
SCHEDULE = DDPMSchedule.from_config(CONFIG)
SDE = vp_sde(CONFIG)
MEAN, STD = 0.0, 0.5  # data ~ N(MEAN, STD^2) per pixel, in model range


def _ideal_eps(x_t: torch.Tensor, abar: torch.Tensor | float) -> torch.Tensor:
    """E[eps | x_t] for Gaussian data: x_t ~ N(sqrt(abar) m, abar s^2 + 1 - abar)."""
    sigma2 = 1 - abar
    return sigma2 ** 0.5 * (x_t - abar ** 0.5 * MEAN) / (abar * STD ** 2 + sigma2)


def discrete_eps(x_t, timesteps):
    return _ideal_eps(x_t, SCHEDULE.alphas_cumprod[timesteps.long()].to(x_t.dtype).view(-1, 1, 1, 1))


def continuous_eps(x_t, labels):
    beta_min, beta_max, T = SDE
    t = float(labels[0]) / (T - 1)
    return _ideal_eps(x_t, math.exp(-(beta_min * t + 0.5 * (beta_max - beta_min) * t * t)))


def _data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    x0 = MEAN + STD * torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x0, -torch.distributions.Normal(MEAN, STD).log_prob(x0).flatten(1).sum(1)


@pytest.mark.parametrize("tol", [1e-4, 1e-6])
def test_ode_likelihood_of_the_ideal_denoiser_is_the_exact_gaussian_density(tol):
    x0, exact = _data(4)
    out = ode_nll(continuous_eps, SDE, x0, generator=torch.Generator().manual_seed(0), trace="exact", rtol=tol, atol=tol)
    assert (out["nll"] - exact).abs().max() < 10 * tol + 2e-4  # solver tolerance + the N(0, I) prior at t = 1
    assert int(out["network_calls"]) > 0


def test_hutchinson_trace_is_unbiased():
    x0, _ = _data(2)
    exact_trace = ode_nll(continuous_eps, SDE, x0, generator=torch.Generator().manual_seed(0), trace="exact")["nll"]
    runs = torch.stack([ode_nll(continuous_eps, SDE, x0, generator=torch.Generator().manual_seed(k), probes=1)["nll"]
                        for k in range(24)])
    assert runs.std(0).min() > 0  # the estimator is random
    standard_error = runs.std(0) / math.sqrt(len(runs))
    assert ((runs.mean(0) - exact_trace).abs() < 4 * standard_error).all()


def test_variational_bound_lies_above_the_exact_nll():
    x0, exact = _data(48, seed=1)
    gaps = torch.stack([vlb_nll(discrete_eps, SCHEDULE, x0, torch.Generator().manual_seed(k))["nll"] - exact
                        for k in range(6)]).flatten()
    assert gaps.mean() > 5 * gaps.std() / math.sqrt(len(gaps))  # above, by more than its Monte Carlo error
    parts = vlb_nll(discrete_eps, SCHEDULE, x0[:2], torch.Generator().manual_seed(0), decoder="discretised")
    assert all(torch.isfinite(parts[k]).all() for k in ("nll", "prior", "steps", "decoder"))
    torch.testing.assert_close(parts["nll"], parts["prior"] + parts["steps"] + parts["decoder"])


def test_a_real_backbone_runs_both_estimators():
    backbone = make_backbone("2d-2level")
    x0 = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    ode = ode_nll(backbone, vp_sde(backbone.config.schedule), x0, generator=torch.Generator().manual_seed(0),
                  rtol=1e-3, atol=1e-3)
    short = DDPMSchedule.from_betas(torch.linspace(1e-4, 0.2, 20))
    vlb = vlb_nll(backbone, short, x0, torch.Generator().manual_seed(0))
    assert torch.isfinite(ode["nll"]).all() and torch.isfinite(vlb["nll"]).all()


def test_bits_per_dim_and_bad_input():
    assert float(bits_per_dim(torch.tensor(4 * math.log(2.0)), dims=4, eight_bit=False)) == pytest.approx(1.0)
    assert float(bits_per_dim(torch.tensor(4 * math.log(2.0)), dims=4)) == pytest.approx(8.0)
    with pytest.raises(ValueError, match="linear schedule"):
        vp_sde(ScheduleConfig(schedule="cosine"))
    with pytest.raises(ValueError, match="trace"):
        ode_nll(continuous_eps, SDE, _data(1)[0], generator=torch.Generator(), trace="approx")
    with pytest.raises(ValueError, match="decoder"):
        vlb_nll(discrete_eps, SCHEDULE, _data(1)[0], torch.Generator(), decoder="logistic")
