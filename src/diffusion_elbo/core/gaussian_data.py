"""Closed forms for isotropic Gaussian data x0 ~ N(m, s^2 I): the exact log-likelihood, the
Bayes-optimal denoiser E[x0 | x_t], and the expected ELBO terms under that denoiser.

They give the framework a model whose true NLL is known, so the ELBO machinery can be checked
against exact numbers. With x_t = a x0 + sigma eps (a^2 = alpha_bar_t, sigma^2 = 1 - alpha_bar_t),
x0 | x_t is Gaussian with (standard conjugate-Gaussian algebra)
    E[x0 | x_t]   = m + a s^2 / (a^2 s^2 + sigma^2) (x_t - a m)
    Var[x0 | x_t] = s^2 sigma^2 / (a^2 s^2 + sigma^2).
All "per dim" quantities are in nats for one data dimension; shapes are (T,) over t = 1..T.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from diffusion_elbo.core.chain import NoiseSchedule
from diffusion_elbo.core.distributions import LOG_2PI
from diffusion_elbo.core.reverse import DecoderVariance, ReverseVariance, VarianceSpec, reverse_variance_table


def gaussian_nll_nats(x0: Tensor, mean: float, std: float) -> Tensor:
    """-log N(x0; m, s^2 I) summed over dims, (B, *D) -> (B,) nats: the data's true NLL."""
    z = (x0 - mean) / std
    per_dim = 0.5 * (LOG_2PI + 2.0 * math.log(std) + z**2)
    return per_dim.reshape(x0.shape[0], -1).sum(dim=1)


def posterior_mean(x_t: Tensor, signal: Tensor, noise: Tensor, *, mean: float, std: float) -> Tensor:
    """E[x0 | x_t] = m + a s^2 / (a^2 s^2 + sigma^2) (x_t - a m) for x0 ~ N(m, s^2 I) and x_t = a x0 + sigma eps: the
    Bayes-optimal (MSE) x0 prediction, (B, *D) like ``x_t``. ``signal`` a and ``noise`` sigma: (B,) float64, combined
    in float64 before one cast to x_t's dtype. The one formula behind every Gaussian oracle (chain steps, real times,
    log-SNR levels)."""
    gain = signal * std**2 / (signal**2 * std**2 + noise**2)
    # mean + gain (x_t - a m) = gain x_t + m (1 - gain a)
    return NoiseSchedule.broadcast(gain, x_t) * x_t + NoiseSchedule.broadcast(mean * (1.0 - gain * signal), x_t)


def oracle_x0(schedule: NoiseSchedule, x_t: Tensor, *, t: Tensor, mean: float, std: float) -> Tensor:
    """E[x0 | x_t] (:func:`posterior_mean`) at ``t`` (B,): steps (LongTensor) or real times of the schedule's
    continuous interpolation (float)."""
    return posterior_mean(x_t, *schedule.signal_noise(t), mean=mean, std=std)


def flow_image(x_T: Tensor, signal: float, noise: float, *, mean: float, std: float) -> Tensor:
    """Where the probability-flow ODE with the exact posterior mean takes x_T (at signal a_T, noise sigma_T): the flow
    of Gaussian data is affine, x0 = m + s (x_T - a_T m) / sqrt(a_T^2 s^2 + sigma_T^2) (it maps the marginal
    N(a_T m, a_T^2 s^2 + sigma_T^2) onto N(m, s^2) monotonically per dim). (N, *D) like ``x_T``: the reference a
    deterministic sampler's discretization error is measured against."""
    return mean + std * (x_T - signal * mean) / math.sqrt(signal**2 * std**2 + noise**2)


def _one_noise_level(schedule: NoiseSchedule) -> None:
    if schedule.multivariate:
        raise ValueError(
            f"the Gaussian oracle's closed forms take one noise level per step; schedule '{schedule.name}' has one per "
            "dimension (its bound is tested against the oracle in continuous time, tests/test_multivariate.py)"
        )


def marginal_prior_kl(schedule: NoiseSchedule, mean: float, std: float) -> float:
    """KL(q(x_T) || N(0, 1)) per dim for Gaussian data: q(x_T) = N(sqrt(alpha_bar_T) m, alpha_bar_T s^2 + 1 - alpha_bar_T).
    With the true reverse kernels, -ELBO exceeds the NLL by exactly this (in expectation over the data)."""
    _one_noise_level(schedule)
    ab = float(schedule.alpha_bar[-1])
    var, mu = ab * std**2 + 1.0 - ab, math.sqrt(ab) * mean
    return 0.5 * (var + mu**2 - 1.0 - math.log(var))


def oracle_posterior_variance(schedule: NoiseSchedule, std: float) -> Tensor:
    """Var[x0 | x_t] per dim for t = 0..T, (T + 1,) float64 (0 at t = 0)."""
    ab = schedule.alpha_bar
    return std**2 * (1.0 - ab) / (ab * std**2 + (1.0 - ab))


@dataclass
class OracleTerms:
    """Expected -ELBO terms per dim under the oracle, averaged over the data distribution (nats)."""

    reconstruction: float
    prior: float
    per_t: Tensor  # (T,) float64: per_t[0] is the reconstruction, per_t[t-1] = E[L_t] for t >= 2
    true_nll: float

    @property
    def denoising(self) -> float:
        return float(self.per_t[1:].sum())

    @property
    def total(self) -> float:
        return self.reconstruction + self.prior + self.denoising


def oracle_expected_terms(
    schedule: NoiseSchedule,
    mean: float,
    *,
    std: float,
    variance: VarianceSpec = ReverseVariance.SMALL,
    decoder_variance: DecoderVariance | str = DecoderVariance.CLIPPED,
) -> OracleTerms:
    """E_{x0}[-ELBO terms] per dim for continuous Gaussian data and the oracle denoiser.

    - prior: E KL(N(a_T x0, 1 - alpha_bar_T) || N(0, 1)) = (alpha_bar_T (m^2 + s^2 - 1) - log(1 - alpha_bar_T)) / 2
    - t >= 2: mu_q - mu_theta = c_t (x0 - x0_hat) with c_t = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t), so
      E KL = (log(sigma_t^2 / sigma_q^2) + sigma_q^2 / sigma_t^2 - 1 + c_t^2 V_t / sigma_t^2) / 2, V_t = Var[x0 | x_t]
    - reconstruction: E[-log N(x0; x0_hat(x_1), sigma_1^2)] = (log(2 pi sigma_1^2) + V_1 / sigma_1^2) / 2 (sigma_1^2 of the fixed
      variances set by ``decoder_variance``)
    - true NLL: (log(2 pi s^2) + 1) / 2
    """
    _one_noise_level(schedule)
    T = schedule.T
    ab_T = float(schedule.alpha_bar[T])
    prior = 0.5 * (ab_T * (mean**2 + std**2 - 1.0) - math.log1p(-ab_T))
    v = oracle_posterior_variance(schedule, std)  # (T + 1,)
    var_p = reverse_variance_table(schedule, variance, decoder_variance)  # (T + 1,)
    var_q = schedule.posterior_variance
    c = schedule.posterior_mean_coef_x0
    per_t = torch.empty(T, dtype=torch.float64)
    var1 = float(var_p[1])  # the decoder's variance
    per_t[0] = 0.5 * (math.log(2 * math.pi * var1) + float(v[1]) / var1)
    if T > 1:
        s = slice(2, T + 1)
        per_t[1:] = 0.5 * (torch.log(var_p[s] / var_q[s]) + var_q[s] / var_p[s] - 1.0 + c[s] ** 2 * v[s] / var_p[s])
    return OracleTerms(
        reconstruction=float(per_t[0]),
        prior=prior,
        per_t=per_t,
        true_nll=0.5 * (math.log(2 * math.pi * std**2) + 1.0),
    )
