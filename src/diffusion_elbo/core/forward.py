"""The forward (noising) process q and its posterior, for any schedule.

Shapes: x0, x_t, noise are (B, *D); t is a LongTensor (B,) with values in 1..T (see schedules.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffusion_elbo.core.chain import NoiseSchedule


def q_mean_variance(schedule: NoiseSchedule, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Moments of q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) (lecture; Ho et al. 2020 eq. 4).

    Returns mean (B, *D) and variance (B, 1, ..., 1).
    """
    mean = schedule.gather("sqrt_alpha_bar", t, x0) * x0  # coefficients (B, 1, ..., 1), float64 until cast
    return mean, schedule.gather("sqrt_one_minus_alpha_bar", t, x0) ** 2


def q_sample(
    schedule: NoiseSchedule,
    x0: Tensor,
    *,
    t: Tensor,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw x_t ~ q(x_t | x_0) in one step by reparametrisation: sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.

    ``noise`` (B, *D) is eps ~ N(0, I); drawn from ``generator`` when not given.
    """
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return schedule.gather("sqrt_alpha_bar", t, x0) * x0 + schedule.gather("sqrt_one_minus_alpha_bar", t, x0) * noise


def q_step_sample(
    schedule: NoiseSchedule,
    x_prev: Tensor,
    *,
    t: Tensor,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One forward step x_t ~ q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t I) (lecture, sec. 4)."""
    if noise is None:
        noise = torch.randn(x_prev.shape, generator=generator, device=x_prev.device, dtype=x_prev.dtype)
    return schedule.gather("sqrt_alphas", t, x_prev) * x_prev + schedule.gather("sqrt_betas", t, x_prev) * noise


def q_posterior_mean_variance(schedule: NoiseSchedule, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Moments of q(x_{t-1} | x_t, x_0) = N(mu_q, sigma_q^2(t) I) (lecture; Ho et al. 2020 eq. 6-7):

    mu_q = (sqrt(alpha_t)(1 - alpha_bar_{t-1}) x_t + sqrt(alpha_bar_{t-1})(1 - alpha_t) x_0) / (1 - alpha_bar_t),
    sigma_q^2(t) = (1 - alpha_t)(1 - alpha_bar_{t-1}) / (1 - alpha_bar_t).

    Returns mean (B, *D) and variance (B, 1, ..., 1); at t = 1 the mean is x_0 and the variance 0.
    """
    mean = (
        schedule.gather("posterior_mean_coef_x0", t, x0) * x0 + schedule.gather("posterior_mean_coef_xt", t, x_t) * x_t
    )
    return mean, schedule.gather("posterior_variance", t, x0)
