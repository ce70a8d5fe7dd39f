"""The KL-optimal isotropic reverse variance for a given mean predictor (Bao et al. 2022, Analytic-DPM).

For t >= 2, with mu_q - mu_theta = c_t (x0 - x0_hat), c_t = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t), the
expected KL(q(x_{t-1} | x_t, x0) || N(mu_theta, sigma^2 I)) per dim is
    (log(sigma^2 / sigma_q^2) + (sigma_q^2 + c_t^2 e_t) / sigma^2 - 1) / 2,   e_t = E||x0 - x0_hat(x_t, t)||^2 / D,
minimised by sigma_t^2 = sigma_q^2(t) + c_t^2 e_t. At t = 1 (a Gaussian decoder N(x0_hat, sigma^2)) the optimum is
sigma_1^2 = e_1. Tables have T + 1 entries indexed by t (entry 0 unused) and can be passed as ``variance``
wherever the core takes one.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from diffusion_elbo.core.elbo import Denoiser, _terms_at_timesteps
from diffusion_elbo.core.gaussian_data import oracle_posterior_variance
from diffusion_elbo.core.parametrization import Parametrization
from diffusion_elbo.core.schedules import NoiseSchedule


def variance_from_x0_error(schedule: NoiseSchedule, x0_mse: Tensor, floor: float = 1e-12) -> Tensor:
    """sigma_t^2 = sigma_q^2(t) + c_t^2 e_t for t >= 2 and e_1 at t = 1, from e_t = E||x0 - x0_hat||^2 / D,
    (T + 1,) float64 with e_t at index t. ``floor`` keeps the decoder variance positive for a perfect predictor."""
    e = x0_mse.to(schedule.betas.device, torch.float64)
    table = schedule.posterior_variance + schedule.posterior_mean_coef_x0**2 * e
    table[1] = e[1].clamp(min=floor)
    table[0] = table[1]  # unused; kept positive
    return table


def x0_error_from_variance(schedule: NoiseSchedule, table: Tensor) -> Tensor:
    """Invert :func:`variance_from_x0_error`: e_t = (sigma_t^2 - sigma_q^2(t)) / c_t^2 for t >= 2, e_1 = sigma_1^2."""
    e = (table.to(torch.float64) - schedule.posterior_variance) / schedule.posterior_mean_coef_x0.clamp(min=1e-300) ** 2
    e[1] = table[1]
    e[0] = 0.0
    return e.clamp(min=0.0)


def respaced_variance_table(schedule: NoiseSchedule, table: Tensor, sub: NoiseSchedule, kept: Tensor) -> Tensor:
    """The analytic table of a respaced chain ``sub`` over the original timesteps ``kept`` (steps + 1,): the x0
    error e_t does not depend on the chain, so it is read off the full table and re-weighted with sub's c and
    sigma_q^2 (Bao et al. 2022 use the same e_t for every trajectory)."""
    e = x0_error_from_variance(schedule, table).to(kept.device)[kept]
    return variance_from_x0_error(sub, e)


def oracle_analytic_variance_table(schedule: NoiseSchedule, std: float) -> Tensor:
    """The analytic variance of the Bayes-optimal denoiser for x0 ~ N(m, s^2 I): e_t = Var[x0 | x_t] exactly.
    With it the reverse kernels are the true q(x_{t-1} | x_t), so -ELBO exceeds the NLL only by
    KL(q(x_T) || N(0, I))."""
    return variance_from_x0_error(schedule, oracle_posterior_variance(schedule, std))


@torch.no_grad()
def analytic_variance_table(
    model: Denoiser,
    schedule: NoiseSchedule,
    batches: Iterable[Tensor],
    *,
    parametrization: Parametrization | str,
    max_batch: int = 512,
    generator: torch.Generator | None = None,
    clip_denoised: bool = False,
) -> tuple[Tensor, Tensor]:
    """Monte Carlo estimate of e_t for every t = 1..T from training batches x0 (B, *D) (one x_t draw per example
    and t), and the variance table built from it. Returns (table (T + 1,), e (T + 1,)), both float64.

    ``clip_denoised``: e_t of x0_hat clamped to [-1, 1], the mean that image samplers use. The ELBO is evaluated
    without clipping, so its table is estimated without; for a sampler that clips, the clipped error is the one
    that makes the variance KL-optimal (it is also never above Bao et al.'s bound (b - a)^2 / 4 = 1 for [-1, 1]
    data, which the unclipped error of an eps-predictor exceeds near t = T, where x0_hat = (x_t - s eps_hat) / a
    divides by a small a)."""
    T = schedule.T
    sums = torch.zeros(T + 1, dtype=torch.float64)
    count = 0
    for x0 in batches:
        _, x0_mse = _terms_at_timesteps(
            model,
            schedule,
            x0,
            torch.arange(1, T + 1, device=x0.device),
            parametrization=parametrization,
            variance="small",
            num_bins=None,
            max_batch=max_batch,
            generator=generator,
            with_x0_mse=True,
            clip_x0=clip_denoised,
        )  # (B, T): the loop over chunks of (t, example) rows is the exact evaluator's
        sums[1:] += x0_mse.sum(dim=0).cpu()
        count += x0.shape[0]
    if count == 0:
        raise ValueError("no training examples to estimate the analytic variance from")
    e = sums / count
    return variance_from_x0_error(schedule, e), e
