"""Per-image negative log-likelihood of a DDPM noise predictor, two ways, in nats or bits per dimension.

- :func:`vlb_nll`: the variational bound of the discrete DDPM (Ho et al. 2020, eq. 5): the prior term
  KL(q(x_{T-1} | x_0) || N(0, I)), one KL term per reverse step with the fixed-small variance, and the
  decoder -log p(x_0 | x_1) (Gaussian for continuous data, discretised Gaussian for 8-bit data, eq. 13).
  One noise draw per timestep, so T network calls per image; an upper bound on the NLL in expectation.
- :func:`ode_nll`: the probability-flow ODE of the VP-SDE that the discrete linear schedule discretises
  (Song et al. 2021, "Score-Based Generative Modeling through SDEs", sec. 4.3 and app. D.2):
  beta(t) = beta_min + t (beta_max - beta_min) on t in (0, 1], beta_min = T beta_start, beta_max = T beta_end,
  the network queried at timestep t (T - 1). log p_0(x) = log p_1(x_1) + int_eps^1 div f(x_t, t) dt, the
  divergence by Hutchinson's estimator (Gaussian probes; or exactly, for small images), integrated by
  scipy's adaptive solver with the tolerances given.

``eps_fn(x_t, timesteps)`` is the noise predictor in model range (a Backbone, or a closed-form denoiser
in tests); images are in model range [-1, 1]. :func:`bits_per_dim` turns nats into bits per dimension,
with the 8-bit dequantisation offset when the data were integers.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence, Union

import numpy as np
import torch

from .diffusion import DDPMSchedule

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# One generator for the whole batch, or one per image (row i draws from generator i only, so that an
# image's noise and probes do not depend on the batch it came in).
Generators = Union[torch.Generator, Sequence[torch.Generator]]


def _randn(shape: tuple[int, ...], generator: Generators, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal draws of ``shape`` (N, ...): from one generator, or row i from ``generator[i]``."""
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, dtype=dtype)
    if len(generator) != shape[0]:
        raise ValueError(f"generator: expected one generator or one per image ({shape[0]}), got {len(generator)}")
    return torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=dtype) for g in generator])


def _gaussian_kl(mean_q: torch.Tensor, mean_p: torch.Tensor, var_q: float, var_p: float) -> torch.Tensor:
    """Per-image KL(N(mean_q, var_q) || N(mean_p, var_p)) summed over every dimension (nats)."""
    d = mean_q[0].numel()
    per_dim = 0.5 * (math.log(var_p / var_q) + var_q / var_p - 1.0) * d
    return per_dim + ((mean_q - mean_p) ** 2).flatten(1).sum(1) / (2.0 * var_p)


def _discretised_gaussian_nll(x0: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """-log P(x0) of 8-bit data (256 bins on [-1, 1]) under N(mean, std^2) (Ho et al. 2020, eq. 13), per image."""
    normal = torch.distributions.Normal(mean, std)
    upper = torch.where(x0 > 0.999, torch.ones_like(x0), normal.cdf(x0 + 1.0 / 255))
    lower = torch.where(x0 < -0.999, torch.zeros_like(x0), normal.cdf(x0 - 1.0 / 255))
    return -(upper - lower).clamp_min(1e-12).log().flatten(1).sum(1)


@torch.no_grad()
def vlb_nll(eps_fn: EpsFn, schedule: DDPMSchedule, x0: torch.Tensor, generator: Generators,
            decoder: str = "gaussian", batch_timesteps: int = 50) -> dict[str, torch.Tensor]:
    """The variational bound on -log p(x0) per image (nats), with its parts: ``prior``, ``steps`` (the
    sum of the reverse-step KL terms) and ``decoder``. ``decoder``: "gaussian" (continuous data) or
    "discretised" (8-bit data). One seeded noise draw per timestep and image (``generator``: one, or one per
    image)."""
    if decoder not in ("gaussian", "discretised"):
        raise ValueError(f"decoder: expected 'gaussian' or 'discretised', got {decoder!r}")
    n, T = x0.shape[0], schedule.num_timesteps
    abar_last = schedule.alpha_bar(T - 1)
    prior = _gaussian_kl(math.sqrt(abar_last) * x0, torch.zeros_like(x0), 1.0 - abar_last, 1.0)
    steps = torch.zeros(n, dtype=x0.dtype)
    decoder_nll = torch.zeros(n, dtype=x0.dtype)
    for start in range(0, T, batch_timesteps):
        for t in range(start, min(start + batch_timesteps, T)):
            noise = _randn(tuple(x0.shape), generator, x0.dtype)
            ts = torch.full((n,), t, dtype=torch.long)
            x_t = schedule.add_noise(x0, noise, ts)
            x0_hat = schedule.predict_x0(x_t, eps_fn(x_t, ts).to(x0.dtype), ts)
            if t == 0:  # decoder p(x0 | x1), variance beta_1 (Ho et al.'s sigma_1^2 = beta_1)
                mean, var = x0_hat, 1.0 - schedule.alpha_bar(0)
                decoder_nll = (_discretised_gaussian_nll(x0, mean, math.sqrt(var)) if decoder == "discretised"
                               else -torch.distributions.Normal(mean, math.sqrt(var)).log_prob(x0).flatten(1).sum(1))
            else:
                var = schedule.posterior_variance(t)
                steps += _gaussian_kl(schedule.posterior_mean(x_t, x0, t), schedule.posterior_mean(x_t, x0_hat, t),
                                      var, var)
    return {"nll": prior + steps + decoder_nll, "prior": prior, "steps": steps, "decoder": decoder_nll}


def vp_sde(schedule_config) -> tuple[float, float, int]:
    """(beta_min, beta_max, T) of the VP-SDE a discrete linear schedule discretises (Song et al. 2021, app. B)."""
    if schedule_config.schedule != "linear_beta":
        raise ValueError(f"ode_nll: the probability-flow ODE needs the linear schedule's continuous limit, got "
                         f"schedule {schedule_config.schedule!r}; use vlb_nll for other schedules")
    T = int(schedule_config.num_train_timesteps)
    return T * schedule_config.beta_start, T * schedule_config.beta_end, T


def ode_nll(eps_fn: EpsFn, sde: tuple[float, float, int], x0: torch.Tensor, *, generator: Generators,
            rtol: float = 1e-5, atol: float = 1e-5, eps: float = 1e-5, probes: int = 1,
            trace: str = "hutchinson") -> dict[str, torch.Tensor]:
    """-log p(x0) per image (nats) from the probability-flow ODE of a VP-SDE, with the number of network
    evaluations. ``trace``: "hutchinson" (``probes`` Gaussian probe vectors, fixed for the whole solve)
    or "exact" (one vector-Jacobian product per dimension: small images only). ``generator``: one, or one
    per image (image i's probes then come from ``generator[i]`` alone)."""
    from scipy.integrate import solve_ivp

    if trace not in ("hutchinson", "exact"):
        raise ValueError(f"trace: expected 'hutchinson' or 'exact', got {trace!r}")
    beta_min, beta_max, T = sde
    shape, n = x0.shape, x0.shape[0]
    d = x0[0].numel()
    probe_vectors = None
    if trace == "hutchinson" and isinstance(generator, torch.Generator):
        probe_vectors = torch.randn((probes, *shape), generator=generator, dtype=torch.float64)
    elif trace == "hutchinson":  # per image: (n, probes, ...) -> (probes, n, ...)
        probe_vectors = _randn((n, probes, *shape[1:]), generator, torch.float64).transpose(0, 1)
    calls = {"n": 0}

    def drift(x: torch.Tensor, t: float) -> torch.Tensor:
        beta = beta_min + t * (beta_max - beta_min)
        sigma = math.sqrt(-math.expm1(-(beta_min * t + 0.5 * (beta_max - beta_min) * t * t)))
        labels = torch.full((n,), t * (T - 1), dtype=torch.float64)
        calls["n"] += 1
        eps_hat = eps_fn(x.float(), labels.float()).double()
        return -0.5 * beta * (x - eps_hat / sigma)

    def rhs(t: float, state: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(state[: n * d]).view(shape).clone().requires_grad_(True)
        with torch.enable_grad():
            f = drift(x, t)
            if trace == "hutchinson":
                div = sum((torch.autograd.grad(f, x, v, retain_graph=True)[0] * v).flatten(1).sum(1)
                          for v in probe_vectors) / probes
            else:
                basis = torch.eye(d, dtype=torch.float64)
                div = sum(torch.autograd.grad(f, x, basis[i].expand(n, d).reshape(shape), retain_graph=True)[0]
                          .flatten(1)[:, i] for i in range(d))
        return np.concatenate([f.detach().flatten().numpy(), div.detach().numpy()])

    state = np.concatenate([x0.double().flatten().numpy(), np.zeros(n)])
    solution = solve_ivp(rhs, (eps, 1.0), state, rtol=rtol, atol=atol, method="RK45")
    if not solution.success:
        raise RuntimeError(f"ode_nll: the ODE solver failed: {solution.message}")
    final = solution.y[:, -1]
    x1 = torch.from_numpy(final[: n * d]).view(n, d)
    prior = -0.5 * (x1 ** 2).sum(1) - 0.5 * d * math.log(2 * math.pi)
    nll = -(prior + torch.from_numpy(final[n * d:]))
    return {"nll": nll, "network_calls": torch.tensor(calls["n"])}


def bits_per_dim(nll_nats: torch.Tensor, dims: int, eight_bit: bool = True) -> torch.Tensor:
    """Nats per image to bits per dimension; ``eight_bit``: the data were 256-level integers mapped to
    [-1, 1] and uniformly dequantised, so the bin width 2/256 adds log2(128) = 7 bits."""
    bpd = nll_nats / (dims * math.log(2.0))
    return bpd + 7.0 if eight_bit else bpd
