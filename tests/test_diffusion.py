"""diffrep.diffusion against MONAI's and diffusers' schedulers and against the closed forms it cites."""
from __future__ import annotations

import pytest
import torch

from diffrep.backbones.config import ScheduleConfig
from diffrep.diffusion import DDPMSchedule, ddim_timesteps, make_betas

CONFIGS = [ScheduleConfig(), ScheduleConfig(schedule="scaled_linear_beta", beta_start=5e-4, beta_end=1.2e-2),
           ScheduleConfig(schedule="sigmoid_beta"), ScheduleConfig(schedule="cosine", num_train_timesteps=500)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.schedule)
def test_alpha_bar_matches_monai(config):
    from monai.networks.schedulers import DDPMScheduler

    extra = {} if config.schedule == "cosine" else {"beta_start": config.beta_start, "beta_end": config.beta_end}
    monai = DDPMScheduler(num_train_timesteps=config.num_train_timesteps, schedule=config.schedule, **extra)
    ours = DDPMSchedule.from_config(config)
    assert ours.alphas_cumprod.dtype == torch.float64
    torch.testing.assert_close(ours.alphas_cumprod, monai.alphas_cumprod.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("schedule, diffusers_name", [("linear_beta", "linear"),
                                                      ("scaled_linear_beta", "scaled_linear"),
                                                      ("cosine", "squaredcos_cap_v2")])
def test_alpha_bar_and_noised_image_match_diffusers(schedule, diffusers_name):
    diffusers = pytest.importorskip("diffusers")
    theirs = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=diffusers_name)
    ours = DDPMSchedule.from_config(ScheduleConfig(schedule=schedule))
    # diffusers' cosine is the same formula with s = 0.008 but computed per step; agreement to 1e-6
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod.double(), rtol=1e-4, atol=1e-6)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1, torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    # diffusers keeps alpha-bar in float32 (relative error ~1e-6 near t = T-1, where ours is float64)
    torch.testing.assert_close(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t), rtol=1e-5, atol=1e-5)


def test_inverse_formulas_round_trip_and_score_is_minus_eps_over_sigma():
    sched = DDPMSchedule.from_config(ScheduleConfig())
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64), torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 250, 998])
    x_t = sched.add_noise(x0, eps, t)
    torch.testing.assert_close(sched.predict_x0(x_t, eps, t), x0)
    torch.testing.assert_close(sched.predict_eps(x_t, x0, t), eps)
    sigma = torch.tensor([sched.noise_level(int(s)) for s in t], dtype=torch.float64).view(-1, 1, 1, 1)
    torch.testing.assert_close(sched.score(eps, t), -eps / sigma)
    assert sched.noise_level(-1) == 0.0 and sched.signal_scale(-1) == 1.0


def test_posterior_matches_monai_ddpm_step_and_ddim_matches_monai():
    from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

    sched = DDPMSchedule.from_config(ScheduleConfig())
    g = torch.Generator().manual_seed(2)
    x_t, eps = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 1, 8, 8, generator=g)
    monai = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    for t in (999, 400, 1):
        x0 = sched.predict_x0(x_t, eps, torch.full((2,), t))
        # MONAI's ancestral step = posterior mean + sqrt(fixed_small variance) * randn(generator): rebuild the noise
        step, _ = monai.step(eps, t, x_t, generator=torch.Generator().manual_seed(5))
        z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(5))
        expected = sched.posterior_mean(x_t, x0, t) + sched.posterior_variance(t) ** 0.5 * z
        torch.testing.assert_close(expected, step, rtol=1e-4, atol=1e-4)
        expected_var = (1 - monai.alphas_cumprod[t - 1]) / (1 - monai.alphas_cumprod[t]) * monai.betas[t]
        assert sched.posterior_variance(t) == pytest.approx(float(expected_var), rel=1e-4)
    # without clipping (with it, MONAI recomputes eps from the clipped x0; diffrep keeps the network's eps)
    ddim = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    ddim.set_timesteps(10)
    for t in (int(t) for t in ddim.timesteps):  # MONAI steps t -> t - T // steps (-1 and below: clean data)
        ours, _ = sched.ddim_step(x_t, eps, t, max(t - 100, -1), clip=False)
        theirs, _ = ddim.step(eps, t, x_t)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_ddim_timesteps_and_bad_input():
    assert ddim_timesteps(10, 3) == [10, 5, 0]
    assert ddim_timesteps(4, 5) == [4, 3, 2, 1, 0]
    assert ddim_timesteps(7, 1) == [7]
    with pytest.raises(ValueError, match="steps >= 1"):
        ddim_timesteps(5, 0)
    with pytest.raises(ValueError, match="schedule: expected one of"):
        make_betas("quadratic", 10)
    with pytest.raises(ValueError, match="betas"):
        DDPMSchedule.from_betas(torch.tensor([0.1, 1.5]))
