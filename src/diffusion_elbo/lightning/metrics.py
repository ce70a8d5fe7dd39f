"""torchmetrics wrapper of per-example -ELBO values: sum states, so DDP reduces them exactly."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from diffusion_elbo.core import ELBOResult
from diffusion_elbo.core.distributions import bits_per_dim_scale


class ELBOMetric(Metric):
    """Accumulates per-example -ELBO and its terms (nats summed over dims) and reports bits/dim.

    States are sums (and a sum of squares for the standard error), reduced with ``sum`` across ranks,
    so the result over N examples split unevenly across GPUs equals the single-process value
    (not a mean of per-rank means).
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, num_dims: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_dims = num_dims
        for name in ("total", "reconstruction", "prior", "denoising"):
            self.add_state(name, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{name}_sq", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, result: ELBOResult) -> None:
        for name, values in (
            ("total", result.total),
            ("reconstruction", result.reconstruction),
            ("prior", result.prior),
            ("denoising", result.denoising),
        ):
            values = values.double()
            setattr(self, name, getattr(self, name) + values.sum())
            setattr(self, f"{name}_sq", getattr(self, f"{name}_sq") + (values**2).sum())
        self.count += result.total.numel()

    def compute(self) -> dict[str, Tensor]:
        n, to_bpd = self.count, bits_per_dim_scale(self.num_dims)
        out = {}
        for name, key in (
            ("total", "elbo"),
            ("reconstruction", "reconstruction"),
            ("prior", "prior"),
            ("denoising", "denoising"),
        ):
            mean = getattr(self, name) / n
            var = (getattr(self, f"{name}_sq") / n - mean**2).clamp(min=0) * n / (n - 1).clamp(min=1)
            out[f"{key}_bpd"] = mean * to_bpd
            out[f"{key}_bpd_se"] = (var / n).sqrt() * to_bpd  # standard error over examples
        return out


class ProfileMetric(Metric):
    """Per-stratum means of L_t, of the x0 reconstruction error and of the t drawn, over a validation pass of a
    stratified estimate (every example draws its own t in each of the K strata; the strata are the same on every
    rank, so the sum states add up across DDP). The mean L_t of a stratum is an unbiased estimate of the stratum's
    average term; strata of width one (the smallest t) are single timesteps."""

    full_state_update = False

    def __init__(self, num_points: int, num_dims: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_dims = num_dims
        self.add_state("term_sum", default=torch.zeros(num_points, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("x0_mse_sum", default=torch.zeros(num_points, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("t_sum", default=torch.zeros(num_points, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("prior_sum", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, result: ELBOResult) -> None:
        # per_t holds n_k L_{t_k}; divide the stratum size back out to get L_{t_k} itself
        self.term_sum += (result.per_t / result.t_weights.double()).sum(dim=0)
        self.x0_mse_sum += result.x0_mse.sum(dim=0)
        self.t_sum += result.t_values.double().expand_as(result.per_t).sum(dim=0)
        self.prior_sum += result.prior.double().sum()
        self.count += result.per_t.shape[0]

    def compute(self) -> dict[str, Tensor]:
        to_bpd = bits_per_dim_scale(self.num_dims)
        return {
            "t": self.t_sum / self.count,  # (K,) mean t drawn in each stratum
            "term_bpd": self.term_sum / self.count * to_bpd,  # (K,) L_t in bits/dim
            "x0_mse": self.x0_mse_sum / self.count,  # (K,) per dim, data in [-1, 1]
            "prior_bpd": self.prior_sum / self.count * to_bpd,
        }


def rate_distortion(
    t_values: Tensor, t_weights: Tensor, *, term_bpd: Tensor, x0_mse: Tensor, prior_bpd: Tensor
) -> dict[str, Tensor]:
    """Ho et al. 2020's progressive-coding view (Fig. 5): the distortion at t is the RMSE of x0_hat(x_t) on the 0..255
    scale, and the rate is what it costs to send x_T, ..., x_t: the prior term plus L_s for s = t + 1..T (L_s sends
    x_{s-1}; L_t itself sends x_{t-1} and is not paid yet).

    Strata k = 0..K-1 partition 1..T in order, stratum k holding ``t_weights[k]`` = n_k timesteps up to
    top_k = n_0 + ... + n_k; ``t_values[k]`` is the (mean) t at which its distortion was measured and ``term_bpd[k]``
    its mean L_t. The rate at t_k is prior + sum_{j > k} n_j L_j + (top_k - t_k) L_k: exact for strata of width one
    (top_k = t_k), and the stratum's own terms above t_k taken at its mean inside wider ones."""
    sizes = t_weights.double()
    above = (term_bpd * sizes).flip(0).cumsum(0).flip(0) - term_bpd * sizes  # sum over strata j > k
    top = sizes.cumsum(0)
    within = (top - t_values.double()).clamp(min=0) * term_bpd
    return {"t": t_values, "rate_bpd": prior_bpd + above + within, "distortion_rmse": x0_mse.sqrt() * 127.5}
