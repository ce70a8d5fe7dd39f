"""The KL-optimal isotropic reverse variance for a given mean predictor (Bao et al. 2022, Analytic-DPM).

For t >= 2, with mu_q - mu_theta = c_t (x0 - x0_hat), c_t = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t), the
expected KL(q(x_{t-1} | x_t, x0) || N(mu_theta, sigma^2 I)) per dim is
    (log(sigma^2 / sigma_q^2) + (sigma_q^2 + c_t^2 e_t) / sigma^2 - 1) / 2,   e_t = E||x0 - x0_hat(x_t, t)||^2 / D,
minimised by sigma_t^2 = sigma_q^2(t) + c_t^2 e_t. At t = 1 a Gaussian density decoder N(x0_hat, sigma^2) has its
optimum at sigma_1^2 = e_1; the discretized decoder of K-level data does not (a few x0_hat far from their level set
e_1, while the bins reward a small sigma for the rest), so there sigma_1 is chosen to minimise the discretized NLL
itself on the same training examples (:func:`discretized_decoder_variance`). Tables have T + 1 entries indexed by t (entry 0 unused) and can be passed as ``variance``
wherever the core takes one.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from diffusion_elbo.core.chain import NoiseSchedule
from diffusion_elbo.core.distributions import discretized_gaussian_log_likelihood
from diffusion_elbo.core.elbo import Denoiser, _terms_at_timesteps
from diffusion_elbo.core.forward import q_sample
from diffusion_elbo.core.gaussian_data import oracle_posterior_variance
from diffusion_elbo.core.parametrization import Parametrization, predict_x0


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


def discretized_decoder_variance(x0: Tensor, x0_hat: Tensor, num_bins: int, candidates: int = 241) -> Tensor:
    """sigma_1^2 that minimises the mean discretized-Gaussian NLL -log P(x0 | N(x0_hat, sigma^2)) (Ho et al. 2020
    eq. 13) over the given values, a float64 scalar. x0 on the K-level grid and x0_hat, any equal shapes.

    A grid over log sigma from 1e-5 to 2 (``candidates`` points), refined once around its best point; the NLL of
    one sigma is a mean over all values, so the search costs ``candidates`` passes over them."""
    x0, x0_hat = x0.double().flatten(), x0_hat.double().flatten()

    def nll(log_sigma: Tensor) -> Tensor:
        return torch.stack(
            [-discretized_gaussian_log_likelihood(x0, x0_hat, s, num_bins).mean() for s in log_sigma]
        )  # (G,)

    grid = torch.linspace(torch.log(torch.tensor(1e-5)), torch.log(torch.tensor(2.0)), candidates, dtype=torch.float64)
    best = int(torch.argmin(nll(grid)))
    step = grid[1] - grid[0]
    fine = torch.linspace(grid[best] - step, grid[best] + step, 41, dtype=torch.float64)
    return torch.exp(2.0 * fine[int(torch.argmin(nll(fine)))])


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
    num_bins: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Monte Carlo estimate of e_t for every t = 1..T from training batches x0 (B, *D) (one x_t draw per example
    and t), and the variance table built from it. Returns (table (T + 1,), e (T + 1,)), both float64.

    ``num_bins``: K-level data, evaluated with the discretized decoder: sigma_1^2 is then the one that minimises
    that decoder's NLL on the same examples at t = 1 (one more x_1 draw each), not e_1.

    ``clip_denoised``: e_t of x0_hat clamped to [-1, 1], the mean that image samplers use. The ELBO is evaluated
    without clipping, so its table is estimated without; for a sampler that clips, the clipped error is the one
    that makes the variance KL-optimal (it is also never above Bao et al.'s bound (b - a)^2 / 4 = 1 for [-1, 1]
    data, which the unclipped error of an eps-predictor exceeds near t = T, where x0_hat = (x_t - s eps_hat) / a
    divides by a small a)."""
    if schedule.multivariate:
        raise ValueError(
            f"variance=analytic estimates one isotropic variance per step; schedule '{schedule.name}' gives each "
            "dimension its own noise level, where that variance is not KL-optimal: use variance=small"
        )
    T = schedule.T
    sums = torch.zeros(T + 1, dtype=torch.float64)
    count = 0
    decoder_pairs: list[tuple[Tensor, Tensor]] = []  # (x0, x0_hat at t = 1) for the discretized decoder's sigma_1
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
        if num_bins is not None:
            t1 = torch.ones(x0.shape[0], dtype=torch.long, device=x0.device)
            x_1 = q_sample(schedule, x0, t=t1, generator=generator)
            x0_hat = predict_x0(Parametrization(parametrization), schedule, x_t=x_1, t=t1, out=model(x_1, t1))
            decoder_pairs.append((x0.cpu(), (x0_hat.clamp(-1.0, 1.0) if clip_denoised else x0_hat).cpu()))
    if count == 0:
        raise ValueError("no training examples to estimate the analytic variance from")
    e = sums / count
    table = variance_from_x0_error(schedule, e)
    if num_bins is not None:
        x0_all, x0_hat_all = (torch.cat(parts) for parts in zip(*decoder_pairs, strict=True))
        table[1] = discretized_decoder_variance(x0_all, x0_hat_all, num_bins)
        table[0] = table[1]
    return table, e
