"""The reverse step p_theta(x_{t-1} | x_t) = N(mu_theta(x_t, t), sigma_t^2 I) with a fixed variance.

mu_theta is the posterior mean of q(x_{t-1} | x_t, x_0) with x_0 replaced by the model's x0_hat
(Ho et al. 2020 eq. 11, written for any parametrization). Shapes: x_t, out (B, *D); t (B,) in 1..T.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from diffusion_elbo.core.forward import q_posterior_mean_variance
from diffusion_elbo.core.parametrization import Parametrization, predict_x0
from diffusion_elbo.core.schedules import NoiseSchedule


class ReverseVariance(str, Enum):
    """Fixed reverse variances of Ho et al. 2020 (Sec. 3.2). Any other variance, e.g. the KL-optimal one of
    Bao et al. 2022 (:mod:`core.analytic`), is passed as a table sigma_t^2 for t = 0..T."""

    SMALL = "small"  # sigma_t^2 = sigma_q^2(t), the posterior variance: optimal for deterministic x0
    LARGE = "large"  # sigma_t^2 = beta_t: optimal for x0 ~ N(0, I)
    ANALYTIC = "analytic"  # KL-optimal for the trained mean (Bao et al. 2022): estimated, then passed as a table


VarianceSpec = ReverseVariance | str | Tensor  # a named fixed variance, or a table sigma_t^2 for t = 0..T


def reverse_variance_table(schedule: NoiseSchedule, variance: VarianceSpec) -> Tensor:
    """sigma_t^2 for t = 0..T, shape (T + 1,) float64 (entry 0 unused).

    At t = 1 (the decoder p(x_0 | x_1)) both fixed choices use beta_1: sigma_q^2(1) is 0. A tensor is taken as
    the table itself (e.g. an analytic variance estimated for a trained model).
    """
    if isinstance(variance, Tensor):
        if variance.shape != (schedule.T + 1,) or not (variance[1:] > 0).all():
            raise ValueError(f"a variance table must have T + 1 = {schedule.T + 1} entries, positive for t >= 1")
        return variance.to(schedule.betas.device, torch.float64)
    kind = ReverseVariance(variance)
    if kind is ReverseVariance.ANALYTIC:
        raise ValueError(
            "variance=analytic is estimated for a trained mean predictor: build its table with "
            "core.analytic.analytic_variance_table (src/eval.py does this) and pass the table as the variance"
        )
    table = schedule.posterior_variance.clone() if kind is ReverseVariance.SMALL else schedule.betas.clone()
    table[1] = schedule.betas[1]
    table[0] = schedule.betas[1]  # never used; kept positive so log() stays finite
    return table


@dataclass
class ReverseStep:
    """Moments of p_theta(x_{t-1} | x_t): ``mean`` (B, *D), ``logvar`` (B, 1, ..., 1), and ``x0_hat``."""

    mean: Tensor
    logvar: Tensor
    x0_hat: Tensor


def p_mean_variance(
    schedule: NoiseSchedule,
    out: Tensor,
    x_t: Tensor,
    t: Tensor,
    parametrization: Parametrization | str,
    variance: VarianceSpec,
    clip_denoised: bool = False,
) -> ReverseStep:
    """mu_theta and sigma_t^2 of p_theta(x_{t-1} | x_t) from the network output ``out``.

    ``clip_denoised`` clamps x0_hat to [-1, 1] (image data) before forming the mean; the ELBO is
    evaluated without clipping so it stays a bound on the model that was trained.
    """
    x0_hat = predict_x0(Parametrization(parametrization), schedule, x_t, t, out)
    if clip_denoised:
        x0_hat = x0_hat.clamp(-1.0, 1.0)
    mean, _ = q_posterior_mean_variance(schedule, x0_hat, x_t, t)
    var = reverse_variance_table(schedule, variance).to(x_t.device)[t]  # (B,)
    logvar = torch.log(var).to(x_t.dtype).view(-1, *([1] * (x_t.ndim - 1)))
    return ReverseStep(mean=mean, logvar=logvar, x0_hat=x0_hat)
