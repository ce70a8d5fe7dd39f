"""``dim`` i.i.d. dimensions on the K-level grid, each level drawn with probability p_k: quantized data whose
exact NLL is known (:mod:`diffusion_elbo.core.discrete_data`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from diffusion_elbo.core.discrete_data import discrete_nll_nats, grid_levels, resolve_probs
from diffusion_elbo.data.base import GeneratedDataModule


class DiscreteToyDataModule(GeneratedDataModule):
    """x0 (B, dim) with values on the K-level grid 2k / (K - 1) - 1. K is the length of ``probs`` (normalized if it
    does not sum to one); without ``probs``, ``num_bins`` levels (17 when null) with a fixed bimodal distribution
    (:func:`~diffusion_elbo.core.discrete_data.resolve_probs`). The splits are independent seeded draws."""

    def __init__(
        self, probs: Sequence[float] | None = None, num_bins: int | None = None, dim: int = 16, **options
    ) -> None:
        """``options``: num_train, num_val, num_test, seed, batch_size, eval_batch_size, num_workers
        (:class:`~diffusion_elbo.data.base.GeneratedDataModule`)."""
        super().__init__(**options)
        self.probs = resolve_probs(probs, num_bins)
        if dim < 1:
            raise ValueError(f"data.dim must be >= 1; got {dim}")
        self.num_bins = self.probs.numel()
        self.dim = int(dim)
        self.data_shape = (self.dim,)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        k = torch.multinomial(self.probs, n * self.dim, replacement=True, generator=generator)  # level indices
        return grid_levels(self.num_bins, dtype=torch.float32)[k].view(n, self.dim)

    def true_nll_nats(self, x0: Tensor) -> Tensor:
        """The exact -log P(x0) under the data distribution, (B,) nats summed over dims."""
        return discrete_nll_nats(x0, self.probs)
