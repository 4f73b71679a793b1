"""diffrep.diffusion against MONAI's and diffusers' schedulers and against the closed forms it cites."""
from __future__ import annotations

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from diffrep.backbones.config import ScheduleConfig
from diffrep.diffusion import DDPMSchedule, ddim_timesteps, make_betas

from .conftest import make_backbone

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


def test_ddim_step_matches_monai():
    bb = make_backbone("2d-2level")  # its schedule: MONAI's default linear_beta, T = 1000
    sched = DDIMScheduler(num_train_timesteps=1000, schedule="linear_beta", clip_sample=True)
    sched.set_timesteps(10)  # MONAI's stride = 1000 // 10 = 100
    g = torch.Generator().manual_seed(0)
    x_t, eps = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 1, 8, 8, generator=g)
    for t, t_prev in [(500, 400), (999, 899), (50, -1)]:
        ref_prev, ref_x0 = sched.step(eps, t, x_t)
        ours_prev, ours_x0 = bb.schedule.ddim_step(x_t, eps, t, t_prev, clip=True)
        torch.testing.assert_close(ours_prev, ref_prev, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours_x0, ref_x0, atol=1e-5, rtol=1e-5)


def test_ddpm_posterior_matches_monai():
    bb = make_backbone("2d-2level")  # its schedule: MONAI's default linear_beta, T = 1000
    sched = DDPMScheduler(num_train_timesteps=1000, schedule="linear_beta", clip_sample=True)
    g = torch.Generator().manual_seed(1)
    x_t, eps = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 1, 8, 8, generator=g)
    ac, sc = bb.schedule.alphas_cumprod, bb.schedule
    for t in (0, 1, 250, 999):
        # near t = 0, 1 - abar_t is tiny: MONAI's float32 betas and our float64 betas (implied by
        # alphas_cumprod) differ by float32 rounding (~2e-4 relative), hence a looser tolerance there.
        tol = dict(atol=1e-5, rtol=1e-5) if t >= 250 else dict(atol=5e-4, rtol=5e-4)
        tt = torch.full((2,), t)
        x0 = sc.predict_x0(x_t, eps, tt).clamp(-1, 1)
        mean = sc.posterior_mean(x_t, x0, t)
        torch.testing.assert_close(mean, sched._get_mean(t, x0, x_t), **tol)
        if t > 0:
            assert sc.posterior_variance(t) == pytest.approx(float(sched._get_variance(t)), rel=tol["rtol"])
        # the full MONAI step = our mean + sqrt(fixed_small variance) * the same Gaussian draw
        ref, _ = sched.step(eps, t, x_t, generator=torch.Generator().manual_seed(7))
        z = torch.randn(eps.shape, generator=torch.Generator().manual_seed(7))
        ours = mean + (sc.posterior_variance(t) ** 0.5 * z if t > 0 else 0)
        torch.testing.assert_close(ours, ref, **tol)
        # without clipping the posterior mean is Ho et al.'s eq. 11
        abar, abar_prev = float(ac[t]), float(ac[t - 1]) if t > 0 else 1.0
        alpha = abar / abar_prev
        eq11 = (x_t - (1 - alpha) / (1 - abar) ** 0.5 * eps) / alpha ** 0.5
        torch.testing.assert_close(sc.posterior_mean(x_t, sc.predict_x0(x_t, eps, tt), t), eq11, atol=1e-4, rtol=1e-4)




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


def test_ddim_sampling_with_the_exact_denoiser_returns_the_known_image():
    """If the network predicts the exact noise w.r.t. a known image c, every DDIM step's x0 is c, so the
    sample is c (in the data range), whatever the number of steps; bad step counts are refused."""
    from diffrep.sampling import ddim_sample

    bb = make_backbone("2d-2level")
    clean = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(4)) * 1.6 - 0.8  # model range
    sched = bb.schedule

    def exact(x_t, timesteps, *args, **kwargs):
        return sched.predict_eps(x_t, clean.expand_as(x_t), timesteps)

    bb.unet.forward = exact
    for steps in (1, 7, 50):
        sample = ddim_sample(bb, 2, (8, 8), num_inference_steps=steps, seed=0)
        torch.testing.assert_close(sample, bb.to_data_range(clean).expand(2, -1, -1, -1), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="num_inference_steps"):
        ddim_sample(bb, 1, (8, 8), num_inference_steps=0)


def test_ve_ladder_and_noised_image_match_diffusers_score_sde_ve():
    diffusers = pytest.importorskip("diffusers")
    from diffrep.diffusion import VESchedule

    theirs = diffusers.ScoreSdeVeScheduler(num_train_timesteps=2000, sigma_min=0.01, sigma_max=50.0)
    ours = VESchedule.geometric(0.01, 50.0, 2000)
    torch.testing.assert_close(ours.sigmas, theirs.discrete_sigmas.double(), rtol=1e-6, atol=1e-6)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(3, 1, 4, 4, generator=g) * 2 - 1, torch.randn(3, 1, 4, 4, generator=g)
    t = torch.tensor([0, 700, 1999])
    torch.testing.assert_close(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t), rtol=1e-6, atol=1e-5)
    x_t = ours.add_noise(x0, noise, t)
    torch.testing.assert_close(ours.predict_x0(x_t, noise, t), x0, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ours.eps_from_score(ours.score(noise, t), t), noise)


def test_processes_compare_at_the_same_noise_to_signal_ratio():
    from diffrep.diffusion import VESchedule, nearest_timestep

    vp = DDPMSchedule.from_config(ScheduleConfig())
    ve = VESchedule.geometric(0.01, 50.0, 1000)
    for t in (50, 250, 600):
        i = nearest_timestep(ve, vp.noise_to_signal(t))
        assert ve.noise_to_signal(i) == pytest.approx(vp.noise_to_signal(t), rel=0.01)
    assert nearest_timestep(vp, vp.noise_to_signal(321)) == 321
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        VESchedule.geometric(1.0, 0.5, 10)
