"""The noise processes in one place: schedules in float64 and every formula that uses them.

Discrete-time, variance-preserving diffusion (Ho et al. 2020, "Denoising Diffusion Probabilistic
Models"): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps for timesteps t = 0..T-1 (0 = least noise, as
MONAI and diffusers count), with abar_t = prod_{s <= t} (1 - beta_s). By convention abar_{-1} = 1:
"timestep -1" is clean data, the target of the last reverse step.

The beta schedules are MONAI's (``linear_beta``, ``scaled_linear_beta``, ``sigmoid_beta``, ``cosine``,
the last from Nichol & Dhariwal 2021), evaluated in float64 so that alpha-bar near t = T-1 (about 4e-5
for the linear schedule) keeps its precision; tests check them against MONAI's and diffusers'
schedulers. Feature extraction, the anomaly scorers, sampling and training all noise and denoise
through a :class:`DDPMSchedule`.

:class:`VESchedule` is the variance-exploding process of noise-conditioned score networks (NCSN, Song &
Ermon 2019; the discrete VE-SDE of Song et al. 2021): x_i = x_0 + sigma_i eps on a geometric ladder of
sigma levels, index 0 = least noise, as diffusers' ``ScoreSdeVeScheduler`` builds it. Both processes
report ``noise_to_signal(t)`` = sigma / scale, the quantity on which models of different processes can be
compared at the same noise level.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

SCHEDULES = ("linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine")


def make_betas(schedule: str, num_train_timesteps: int, beta_start: float = 1e-4, beta_end: float = 2e-2) -> torch.Tensor:
    """The float64 betas of a named MONAI schedule (cosine: Nichol & Dhariwal 2021, eq. 17, s = 0.008,
    betas clipped at 0.999)."""
    n = int(num_train_timesteps)
    if schedule == "linear_beta":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    if schedule == "scaled_linear_beta":
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=torch.float64) ** 2
    if schedule == "sigmoid_beta":
        return torch.sigmoid(torch.linspace(-6.0, 6.0, n, dtype=torch.float64)) * (beta_end - beta_start) + beta_start
    if schedule == "cosine":
        s = 8e-3
        x = torch.linspace(0, n, n + 1, dtype=torch.float64)
        abar = torch.cos((x / n + s) / (1 + s) * math.pi * 0.5) ** 2
        abar = abar / abar[0]
        return torch.clip(1.0 - abar[1:] / abar[:-1], 0.0, 0.999)
    raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")


def _view(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample scalars shaped to broadcast over ``like`` (N, C, ...), in its dtype and device."""
    return values.to(device=like.device, dtype=like.dtype).view((-1,) + (1,) * (like.ndim - 1))


@dataclass(frozen=True, eq=False)
class DDPMSchedule:
    """A discrete variance-preserving noise process: alpha-bar per timestep and the formulas built on it.

    Build it with :meth:`from_config` (a checkpoint's ``ScheduleConfig``) or :meth:`from_betas`.
    Tensor-valued methods take ``timesteps`` as an integer tensor of shape (N,) and work in the dtype
    of their image argument; scalar methods take a Python int, where -1 means clean data.
    """

    alphas_cumprod: torch.Tensor  # float64, (T,)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> "DDPMSchedule":
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) == 0 or bool(((betas <= 0) | (betas >= 1)).any()):
            raise ValueError(f"betas: expected a non-empty 1-D tensor with values in (0, 1), got {betas}")
        return cls(torch.cumprod(1.0 - betas, dim=0))

    @classmethod
    def from_config(cls, config: Any) -> "DDPMSchedule":
        """From a ``ScheduleConfig`` (or anything with ``schedule``, ``num_train_timesteps``, ``beta_start``
        and ``beta_end``)."""
        return cls.from_betas(make_betas(config.schedule, config.num_train_timesteps, config.beta_start,
                                         config.beta_end))

    @property
    def num_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    # ------------------------------------------------------------------ scalars
    def alpha_bar(self, t: int) -> float:
        """abar_t as a Python float; abar_{-1} = 1 (clean data)."""
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def noise_level(self, t: int) -> float:
        """sqrt(1 - abar_t): the standard deviation of the noise in x_t, comparable across schedules."""
        return math.sqrt(1.0 - self.alpha_bar(t))

    def signal_scale(self, t: int) -> float:
        """sqrt(abar_t): the factor on x_0 in x_t."""
        return math.sqrt(self.alpha_bar(t))

    def noise_to_signal(self, t: int) -> float:
        """sigma / scale = sqrt((1 - abar_t) / abar_t): comparable across VP and VE processes."""
        return self.noise_level(t) / self.signal_scale(t)

    def posterior_variance(self, t: int) -> float:
        """The fixed-small variance beta~_t = (1 - abar_{t-1}) / (1 - abar_t) * beta_t of q(x_{t-1} | x_t, x_0)
        (Ho et al. 2020, eq. 7)."""
        abar_t, abar_prev = self.alpha_bar(t), self.alpha_bar(t - 1)
        return (1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev)

    # ------------------------------------------------------------------ tensors
    def _abar(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return _view(self.alphas_cumprod[timesteps.to("cpu").long()], like)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0): sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Ho et al. 2020, eq. 4)."""
        abar = self._abar(timesteps, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def predict_x0(self, x_t: torch.Tensor, eps: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The x_0 implied by a noise prediction: (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (eq. 15)."""
        abar = self._abar(timesteps, x_t)
        return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()

    def predict_eps(self, x_t: torch.Tensor, x0: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The noise implied by an x_0 estimate (eq. 4 solved for eps)."""
        abar = self._abar(timesteps, x_t)
        return (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()

    def score(self, eps: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The score grad log p(x_t) implied by a noise prediction: -eps / sqrt(1 - abar_t) (Song et al. 2021)."""
        return -eps / (1 - self._abar(timesteps, eps)).sqrt()

    # ------------------------------------------------------------------ reverse steps (scalar t)
    def posterior_mean(self, x_t: torch.Tensor, x0: torch.Tensor, t: int) -> torch.Tensor:
        """Mean of q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eq. 7); with x_0 from eq. 15 this is eq. 11."""
        abar_t, abar_prev = self.alpha_bar(t), self.alpha_bar(t - 1)
        alpha_t = abar_t / abar_prev
        beta_t = 1.0 - alpha_t
        return (abar_prev ** 0.5 * beta_t / (1.0 - abar_t)) * x0 + (alpha_t ** 0.5 * (1.0 - abar_prev) / (1.0 - abar_t)) * x_t

    def ddim_step(self, x_t: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int,
                  clip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """One deterministic DDIM step t -> t_prev (Song et al. 2021, eq. 12, eta = 0); t_prev = -1 is clean data.

        Returns ``(x_prev, x0)`` with x0 clipped to [-1, 1] if ``clip``. The step keeps the network's eps
        (MONAI's and diffusers' DDIM recompute eps from the clipped x0; without clipping they agree).
        """
        abar_t, abar_prev = self.alpha_bar(t), self.alpha_bar(t_prev)
        x0 = (x_t - (1.0 - abar_t) ** 0.5 * eps) / abar_t ** 0.5
        if clip:
            x0 = x0.clamp(-1.0, 1.0)
        return abar_prev ** 0.5 * x0 + (1.0 - abar_prev) ** 0.5 * eps, x0


def ddim_timesteps(start: int, steps: int) -> list[int]:
    """``steps`` timesteps evenly spaced from ``start`` down to 0, rounded half to even (distinct for
    steps <= start + 1)."""
    if steps < 1 or start < 0:
        raise ValueError(f"ddim_timesteps: expected start >= 0 and steps >= 1, got start={start}, steps={steps}")
    return [int(t) for t in np.linspace(start, 0, steps).round().astype(int)]


@dataclass(frozen=True, eq=False)
class VESchedule:
    """A discrete variance-exploding process: x_i = x_0 + sigma_i eps, sigma_i geometric from sigma_min
    (i = 0) to sigma_max (i = N-1). A network of this process predicts the score; ``eps_from_score`` and
    ``score`` convert between the score and the noise."""

    sigmas: torch.Tensor  # float64, (N,), increasing

    @classmethod
    def geometric(cls, sigma_min: float, sigma_max: float, num_levels: int) -> "VESchedule":
        """The NCSN ladder exp(linspace(log sigma_min, log sigma_max, N)) (diffusers' ``discrete_sigmas``)."""
        if not 0 < sigma_min < sigma_max or num_levels < 2:
            raise ValueError(f"VESchedule: expected 0 < sigma_min < sigma_max and num_levels >= 2, got "
                             f"sigma_min={sigma_min}, sigma_max={sigma_max}, num_levels={num_levels}")
        return cls(torch.exp(torch.linspace(math.log(sigma_min), math.log(sigma_max), int(num_levels),
                                            dtype=torch.float64)))

    @property
    def num_timesteps(self) -> int:
        return len(self.sigmas)

    def noise_level(self, t: int) -> float:
        """sigma_t, the standard deviation of the noise in x_t (0 for t = -1, clean data)."""
        return 0.0 if t < 0 else float(self.sigmas[t])

    def signal_scale(self, t: int) -> float:
        return 1.0

    def noise_to_signal(self, t: int) -> float:
        return self.noise_level(t)

    def _sigma(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return _view(self.sigmas[timesteps.to("cpu").long()], like)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = x_0 + sigma_t eps (Song & Ermon 2019)."""
        return x0 + self._sigma(timesteps, x0) * noise

    def predict_x0(self, x_t: torch.Tensor, eps: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_0 = x_t - sigma_t eps (Tweedie's formula with eps = -sigma_t score)."""
        return x_t - self._sigma(timesteps, x_t) * eps

    def predict_eps(self, x_t: torch.Tensor, x0: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return (x_t - x0) / self._sigma(timesteps, x_t)

    def score(self, eps: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """grad log p(x_t) = -eps / sigma_t."""
        return -eps / self._sigma(timesteps, eps)

    def eps_from_score(self, score: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The noise a score network's output implies: eps = -sigma_t score."""
        return -self._sigma(timesteps, score) * score


def nearest_timestep(process: Any, noise_to_signal: float) -> int:
    """The timestep of ``process`` (VP or VE) whose sigma / scale is closest to ``noise_to_signal`` (in log
    space): where to read two models of different processes at the same noise level."""
    ratios = torch.tensor([process.noise_to_signal(t) for t in range(process.num_timesteps)], dtype=torch.float64)
    return int((ratios.log() - math.log(noise_to_signal)).abs().argmin())
