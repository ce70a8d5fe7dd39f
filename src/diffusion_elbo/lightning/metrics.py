"""torchmetrics wrapper of per-example -ELBO values: sum states, so DDP reduces them exactly."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric

from diffusion_elbo.core import ELBOResult


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
        for name in ("total", "total_sq", "reconstruction", "prior", "denoising"):
            self.add_state(name, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, result: ELBOResult) -> None:
        total = result.total.double()
        self.total += total.sum()
        self.total_sq += (total**2).sum()
        self.reconstruction += result.reconstruction.double().sum()
        self.prior += result.prior.double().sum()
        self.denoising += result.denoising.double().sum()
        self.count += total.numel()

    def compute(self) -> dict[str, Tensor]:
        n, to_bpd = self.count, 1.0 / (self.num_dims * math.log(2.0))
        mean = self.total / n
        var = (self.total_sq / n - mean**2).clamp(min=0) * n / (n - 1).clamp(min=1)
        return {
            "elbo_bpd": mean * to_bpd,
            "elbo_bpd_se": (var / n).sqrt() * to_bpd,
            "reconstruction_bpd": self.reconstruction / n * to_bpd,
            "prior_bpd": self.prior / n * to_bpd,
            "denoising_bpd": self.denoising / n * to_bpd,
        }
