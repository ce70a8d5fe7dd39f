"""``dim`` i.i.d. dimensions on the K-level grid, each level drawn with probability p_k: quantized data whose
exact NLL is known (:mod:`diffusion_elbo.core.discrete_data`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from diffusion_elbo.core.discrete_data import discrete_nll_nats, grid_levels, resolve_probs
from diffusion_elbo.data.base import DiffusionDataModule, unlabelled


class DiscreteToyDataModule(DiffusionDataModule):
    """x0 (B, dim) with values on the K-level grid 2k / (K - 1) - 1. K is the length of ``probs`` (normalized if it
    does not sum to one); without ``probs``, ``num_bins`` levels (17 when null) with a fixed bimodal distribution
    (:func:`~diffusion_elbo.core.discrete_data.resolve_probs`). The splits are independent seeded draws."""

    def __init__(
        self,
        probs: Sequence[float] | None = None,
        num_bins: int | None = None,
        dim: int = 16,
        num_train: int = 10_000,
        num_val: int = 1_000,
        num_test: int = 1_000,
        seed: int = 0,
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers)
        self.probs = resolve_probs(probs, num_bins)
        if dim < 1:
            raise ValueError(f"data.dim must be >= 1; got {dim}")
        if min(num_train, num_val, num_test) < 1:
            raise ValueError(
                f"data.num_train, num_val and num_test must be >= 1; got {num_train}, {num_val}, {num_test}"
            )
        self.num_bins = self.probs.numel()
        self.dim = int(dim)
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.seed = seed
        self.data_shape = (self.dim,)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        generator = torch.Generator().manual_seed(self.seed)
        levels = grid_levels(self.num_bins, dtype=torch.float32)
        splits = {}
        for name, n in self.sizes.items():
            k = torch.multinomial(self.probs, n * self.dim, replacement=True, generator=generator)
            splits[name] = levels[k].view(n, self.dim)
        self.train_set, self.val_set, self.test_set = (unlabelled(splits[k]) for k in ("train", "val", "test"))

    def true_nll_nats(self, x0: Tensor) -> Tensor:
        """The exact -log P(x0) under the data distribution, (B,) nats summed over dims."""
        return discrete_nll_nats(x0, self.probs)
