"""Closed forms for i.i.d. K-level data: each dimension takes the level x_k = 2k / (K - 1) - 1 in [-1, 1] with
probability p_k. The exact NLL is known and the Bayes-optimal denoiser is a posterior over the K levels, so the
discretized decoder and bits/dim on quantized data can be checked against the truth (the Gaussian oracle of
:mod:`core.gaussian_data` checks continuous data only).

With x_t = a x0 + sigma eps (a^2 = alpha_bar_t, sigma^2 = 1 - alpha_bar_t), per dimension
    P(x0 = x_k | x_t) = p_k N(x_t; a x_k, sigma^2) / sum_j p_j N(x_t; a x_j, sigma^2)     (Bayes' rule)
    E[x0 | x_t] = sum_k x_k P(x0 = x_k | x_t).
Shapes: x_t (B, *D); t (B,) in 1..T; probs (K,).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from diffusion_elbo.core.chain import NoiseSchedule

DEFAULT_NUM_BINS = 17  # levels of data=discrete_toy when neither data.probs nor data.num_bins is given


def grid_levels(num_bins: int, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
    """The K levels 2k / (K - 1) - 1, k = 0..K-1, (K,): the grid of :func:`core.distributions.quantize`."""
    return torch.linspace(-1.0, 1.0, num_bins, dtype=dtype, device=device)


def normalized_probs(probs: Sequence[float] | Tensor) -> Tensor:
    """``probs`` as a (K,) float64 distribution: K >= 2 non-negative finite values, scaled to sum to one.
    Raises ValueError naming the problem."""
    p = torch.as_tensor(probs, dtype=torch.float64).flatten()
    if p.numel() < 2 or p.numel() > 256:
        raise ValueError(f"data.probs needs between 2 and 256 level probabilities (K levels); got {p.numel()}")
    if not torch.isfinite(p).all() or (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"data.probs must be finite, non-negative and not all zero; got {p.tolist()[:8]}...")
    return p / p.sum()


def level_index(x0: Tensor, num_bins: int) -> Tensor:
    """The level k of each value of x0 on the K-level grid, a LongTensor of x0's shape."""
    return torch.round((x0.double() + 1.0) * (num_bins - 1) / 2.0).long().clamp(0, num_bins - 1)


def discrete_nll_nats(x0: Tensor, probs: Tensor) -> Tensor:
    """-log P(x0) = -sum_d log p_{k_d} for i.i.d. K-level dims, (B, *D) -> (B,) nats: the data's true NLL."""
    log_p = torch.log(probs.to(x0.device))[level_index(x0, probs.numel())]  # (B, *D)
    return -log_p.reshape(x0.shape[0], -1).sum(dim=1)


def discrete_oracle_x0(schedule: NoiseSchedule, x_t: Tensor, t: Tensor, probs: Tensor) -> Tensor:
    """E[x0 | x_t] for i.i.d. K-level data with level probabilities ``probs`` (K,): the Bayes-optimal (MSE) x0
    prediction, (B, *D) in x_t's dtype. Computed in float64 (softmax over the K levels of each dimension). ``t`` (B,):
    steps (LongTensor) or real times of the schedule's continuous interpolation (float)."""
    a, sigma = schedule.signal_noise(t)  # (B,) float64
    return discrete_posterior_mean(x_t, a, sigma, probs)


def discrete_posterior_mean(x_t: Tensor, a: Tensor, sigma: Tensor, probs: Tensor) -> Tensor:
    """E[x0 | x_t] for i.i.d. K-level data with level probabilities ``probs`` (K,) at x_t = a x0 + sigma eps, with a
    and sigma (B,) the scales at each example's noise level (float64): (B, *D) in x_t's dtype, from a float64 softmax
    over the K levels of each dimension."""
    levels = grid_levels(probs.numel(), device=x_t.device)  # (K,)
    # (B, 1, ..., 1, 1), or (B, *D, 1) for a multivariate schedule's per-dimension scales
    a = a.unsqueeze(-1) if a.ndim == x_t.ndim else a.view(-1, *([1] * x_t.ndim))
    var = sigma.pow(2).view_as(a)
    residual = x_t.double().unsqueeze(-1) - a * levels  # (B, *D, K)
    logits = torch.log(probs.to(x_t.device)) - residual**2 / (2.0 * var)
    posterior = torch.softmax(logits, dim=-1)  # P(x0 = x_k | x_t) per dimension
    return (posterior * levels).sum(dim=-1).to(x_t.dtype)


def entropy_nats(probs: Tensor) -> float:
    """H(p) = -sum_k p_k log p_k, nats per dimension: the expected true NLL per dim."""
    p = probs[probs > 0]
    return float(-(p * torch.log(p)).sum())


def default_probs(num_bins: int) -> Tensor:
    """A fixed bimodal distribution over K levels for ``data=discrete_toy`` without explicit ``data.probs``: most
    mass near -0.7 and +0.6 (like pixel histograms: background and strokes) and a floor of 0.02 / K on every level,
    (K,) float64 normalized."""
    x = grid_levels(num_bins)
    shape = torch.exp(-0.5 * ((x + 0.7) / 0.2) ** 2) + 0.6 * torch.exp(-0.5 * ((x - 0.6) / 0.25) ** 2)
    shape = shape / shape.sum() + 0.02 / num_bins
    return shape / shape.sum()


def resolve_probs(probs: Sequence[float] | Tensor | None, num_bins: int | None) -> Tensor:
    """The level distribution of ``data=discrete_toy``, (K,) float64: ``probs`` normalized (K is their count;
    ``num_bins``, if given, must agree), or without them :func:`default_probs` over ``num_bins`` levels (17 when
    null). Raises ValueError naming the key to change."""
    if probs is not None:
        p = normalized_probs(list(probs))
        if num_bins is not None and int(num_bins) != p.numel():
            raise ValueError(
                f"data.probs has {p.numel()} levels but data.num_bins={num_bins}: K is the number of probabilities, "
                f"so set data.num_bins={p.numel()} or leave it null"
            )
        return p
    k = DEFAULT_NUM_BINS if num_bins is None else int(num_bins)
    if not 2 <= k <= 256:
        raise ValueError(f"data.num_bins must be in 2..256; got {num_bins}")
    return default_probs(k)
