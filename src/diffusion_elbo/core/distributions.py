"""Gaussian helpers for the ELBO: KL, log-densities, the discretized decoder, unit conversion.

All functions work elementwise on broadcastable tensors and return nats per element; callers sum
or average over data dimensions. ``logvar`` arguments are natural logs of variances.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOG_2PI = math.log(2.0 * math.pi)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) per element, in nats.

    The lecture's univariate formula: log(s2/s1) + (s1^2 + (m1 - m2)^2) / (2 s2^2) - 1/2.
    Arguments broadcast against each other.
    """
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def gaussian_log_prob(x: Tensor, mean: Tensor, logvar: Tensor) -> Tensor:
    """log N(x; mean, exp(logvar)) per element, in nats (a continuous density)."""
    return -0.5 * (LOG_2PI + logvar + (x - mean) ** 2 * torch.exp(-logvar))


def _log1mexp(a: Tensor) -> Tensor:
    """log(1 - exp(a)) for a <= 0, accurate on both sides of -log 2 (Maechler 2012)."""
    return torch.where(a > -math.log(2.0), torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def _log_normal_cdf_diff(upper: Tensor, lower: Tensor) -> Tensor:
    """log(Phi(upper) - Phi(lower)) for upper > lower, exact in both tails.

    In the upper tail both CDFs are close to 1, so use the mirror Phi(-lower) - Phi(-upper) there.
    """
    mirror = lower > 0
    hi = torch.where(mirror, -lower, upper)
    lo = torch.where(mirror, -upper, lower)
    log_hi = torch.special.log_ndtr(hi)
    log_lo = torch.special.log_ndtr(lo)
    return log_hi + _log1mexp(log_lo - log_hi)


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor, num_bins: int) -> Tensor:
    """log P(x) for data quantized to ``num_bins`` = K levels in [-1, 1] under N(mean, exp(log_scale)^2),
    in nats per element (Ho et al. 2020, eq. 13).

    Level k sits at -1 + 2k / (K - 1); its bin is that value +- 1 / (K - 1), and the outer bins extend to
    -inf and +inf so the K probabilities sum to one. The normal CDF is evaluated exactly in log space
    (``torch.special.log_ndtr``), not with the tanh approximation of the DDPM code, so far tails stay finite.

    x: values on the grid, shape broadcastable with ``mean`` and ``log_scale``.
    """
    if num_bins < 2:
        raise ValueError(f"num_bins must be >= 2 for a discretized likelihood; got {num_bins}")
    half_width = 1.0 / (num_bins - 1)
    inv_scale = torch.exp(-log_scale)
    upper = (x - mean + half_width) * inv_scale
    lower = (x - mean - half_width) * inv_scale
    # The first and last bins are half-lines, so their mass is one CDF tail.
    first_bin = x < -1.0 + half_width
    last_bin = x > 1.0 - half_width
    inner = _log_normal_cdf_diff(upper, torch.where(first_bin | last_bin, upper - 1.0, lower))
    return torch.where(
        first_bin,
        torch.special.log_ndtr(upper),
        torch.where(last_bin, torch.special.log_ndtr(-lower), inner),
    )


def quantize(x: Tensor, num_bins: int) -> Tensor:
    """Round values in [-1, 1] to the nearest of ``num_bins`` evenly spaced levels (clamped)."""
    levels = num_bins - 1
    return (torch.round((x.clamp(-1.0, 1.0) + 1.0) * levels / 2.0) * 2.0 / levels) - 1.0


def mean_flat(x: Tensor) -> Tensor:
    """Mean over all non-batch dimensions: (B, *D) -> (B,)."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def sum_flat(x: Tensor) -> Tensor:
    """Sum over all non-batch dimensions: (B, *D) -> (B,)."""
    return x.reshape(x.shape[0], -1).sum(dim=1)


def standard_normal_kl_nats(x0: Tensor, signal_sq: Tensor, log_noise_sq: Tensor) -> Tensor:
    """KL(N(a x0, sigma^2 I) || N(0, I)) summed over dims, (B, *D) -> (B,) nats, for a variance-preserving marginal
    (sigma^2 = 1 - a^2): per dim (a^2 x0^2 - a^2 - log sigma^2) / 2, the lecture's prior-matching term
    KL(q(x_T | x0) || N(0, I)) (VDM's KL(q(z_1 | x) || N(0, I))). ``signal_sq`` a^2 and ``log_noise_sq`` log sigma^2:
    0-dim or (B,), or one per dimension ((1, *D) or (B, *D), a multivariate schedule's), float64, with gradient where
    they have one (a learned schedule's endpoint). The x0-free part -a^2 - log sigma^2 = a^4 / 2 + ... is formed in
    float64, where float32 cancels it to nothing (a^2 is 4e-5 at the end of the linear schedule), and added once per
    example."""
    per_dim = signal_sq.ndim == x0.ndim
    a2 = signal_sq.to(x0.dtype)
    if a2.ndim and not per_dim:
        a2 = a2.view(-1, *([1] * (x0.ndim - 1)))
    constant = -signal_sq - log_noise_sq
    if per_dim:  # summed over the dimensions in float64
        return 0.5 * (sum_flat(a2 * x0**2) + sum_flat(constant).to(x0.dtype))
    return 0.5 * (sum_flat(a2 * x0**2) + constant.to(x0.dtype) * x0[0].numel())


def nats_to_bits_per_dim(nats_per_dim: Tensor | float) -> Tensor | float:
    """Convert nats per dimension to bits per dimension (divide by ln 2)."""
    return nats_per_dim / math.log(2.0)


def bits_per_dim_scale(num_dims: int) -> float:
    """The factor 1 / (D ln 2) that turns nats summed over D dims into bits per dim (one multiplication, for running
    sums and logged batch means; :func:`nats_to_bits_per_dim` for values already per dim)."""
    return 1.0 / (num_dims * math.log(2.0))
