"""Training losses as weightings of one per-timestep error.

Every loss here is w(t) * ||x0_hat - x0||^2 (mean over dims) for some weight w of the signal-to-noise
ratio SNR(t) = alpha_bar_t / (1 - alpha_bar_t) (Kingma et al. 2021, sec. 5), computed in the network's
own parametrization p with ||x0_hat - x0||^2 = c_p(t) ||p_hat - p||^2 so no conversion amplifies error:

=================  =========================================  =====================================
loss               w(t) on ||x0_hat - x0||^2 per dim          source
=================  =========================================  =====================================
``elbo``           the true ELBO terms (see core.elbo); for   Ho et al. 2020 eq. 5, the lecture
                   t >= 2 and ``small``: (SNR(t-1) - SNR(t))/2
``simple``         SNR(t)            (= unweighted eps-MSE)   Ho et al. 2020 eq. 14 (L_simple)
``x0_mse``         1                 (unweighted x0-MSE)      the lecture's x0 regression, no weight
``x0_mse_weighted`` (SNR(t-1) - SNR(t)) / 2 for t >= 2;       the lecture's weighted x0 form
                   1 / (2 beta_1) at t = 1 (continuous decoder)
``v_mse``          SNR(t) + 1        (= unweighted v-MSE)     Salimans & Ho 2022
``hybrid``         a mean loss above + lambda L_vlb, where    Nichol & Dhariwal 2021 sec. 3.1
                   L_vlb trains only a learned variance
=================  =========================================  =====================================
"""

from __future__ import annotations

import math
from enum import Enum

import torch
from torch import Tensor

from diffusion_elbo.core.parametrization import Parametrization, x0_error_scale
from diffusion_elbo.core.schedules import NoiseSchedule


class LossType(str, Enum):
    ELBO = "elbo"
    SIMPLE = "simple"
    X0_MSE = "x0_mse"
    X0_MSE_WEIGHTED = "x0_mse_weighted"
    V_MSE = "v_mse"
    HYBRID = "hybrid"


MSE_LOSSES = (LossType.SIMPLE, LossType.X0_MSE, LossType.X0_MSE_WEIGHTED, LossType.V_MSE)


def x0_weight(loss: LossType | str, schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """w(t) multiplying ||x0_hat - x0||^2 (mean over dims) for an MSE loss, (B,) float64."""
    kind = LossType(loss)
    snr = schedule.gather("snr", t)  # (B,)
    if kind is LossType.SIMPLE:
        return snr
    if kind is LossType.X0_MSE:
        return torch.ones_like(snr)
    if kind is LossType.V_MSE:
        return snr + 1.0
    if kind is LossType.X0_MSE_WEIGHTED:
        snr_prev = schedule.gather("snr", (t - 1).clamp(min=1))
        decoder = 1.0 / (2.0 * schedule.gather("betas", torch.ones_like(t)))
        return torch.where(t == 1, decoder, 0.5 * (snr_prev - snr))
    raise ValueError(f"loss '{kind.value}' is not an MSE weighting; it is evaluated by core.elbo")


def hybrid_vlb_weight(vlb_weight: float, num_dims: int) -> float:
    """The factor that turns the sampled ELBO term L_t / p(t) (nats summed over D dims) into lambda L_vlb of
    Nichol & Dhariwal (2021, eq. 16, sec. 3.1) with L_vlb in bits per dim: lambda / (D ln 2).

    Their code adds ``vb * T / 1000`` to the MSE, ``vb`` being L_t in bits/dim at one uniform t; that is
    lambda L_vlb = lambda T L_t at lambda = 0.001 (L_vlb = sum_t L_t, estimated by T L_t), which is why 0.001
    means the same at any T. For uniform t, L_t / p(t) = T L_t already carries the T, so no further T/1000 here."""
    return vlb_weight / (num_dims * math.log(2.0))


def weighted_mse(
    loss: LossType | str,
    parametrization: Parametrization | str,
    schedule: NoiseSchedule,
    t: Tensor,
    out: Tensor,
    target: Tensor,
) -> Tensor:
    """Per-example loss (B,): w(t) c_p(t) mean_dims((out - target)^2) with ``target`` the true value of the
    parametrization (eps, x0 or v) and c_p the factor that turns its squared error into x0's."""
    weight = (x0_weight(loss, schedule, t) * x0_error_scale(parametrization, schedule, t)).to(out.dtype)
    return weight * (out - target).pow(2).reshape(out.shape[0], -1).mean(dim=1)
