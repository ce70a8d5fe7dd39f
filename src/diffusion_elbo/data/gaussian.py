"""x0 ~ N(mean, std^2 I) in ``dim`` dimensions: continuous data whose exact NLL is known."""

from __future__ import annotations

import torch
from torch import Tensor

from diffusion_elbo.core.gaussian_data import gaussian_nll_nats
from diffusion_elbo.data.base import GeneratedDataModule


class GaussianDataModule(GeneratedDataModule):
    """Samples drawn once from a seeded generator; the splits are independent draws."""

    num_bins = None

    def __init__(self, mean: float = 0.0, std: float = 1.0, dim: int = 16, **options) -> None:
        """``options``: num_train, num_val, num_test, seed, batch_size, eval_batch_size, num_workers
        (:class:`~diffusion_elbo.data.base.GeneratedDataModule`)."""
        super().__init__(**options)
        if std <= 0:
            raise ValueError(f"data.std must be > 0; got {std}")
        if dim < 1:
            raise ValueError(f"data.dim must be >= 1; got {dim}")
        self.mean, self.std, self.dim = float(mean), float(std), int(dim)
        self.data_shape = (self.dim,)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        return self.mean + self.std * torch.randn(n, self.dim, generator=generator)

    def true_nll_nats(self, x0: Tensor) -> Tensor:
        """The exact -log p(x0) under the data distribution, (B,) nats summed over dims."""
        return gaussian_nll_nats(x0.double(), self.mean, self.std)
