"""x0 ~ N(mean, std^2 I) in ``dim`` dimensions: continuous data whose exact NLL is known."""

from __future__ import annotations

import torch
from torch import Tensor

from diffusion_elbo.core.gaussian_data import gaussian_nll_nats
from diffusion_elbo.data.base import DiffusionDataModule, unlabelled


class GaussianDataModule(DiffusionDataModule):
    """Samples drawn once from a seeded generator; the splits are independent draws."""

    num_bins = None

    def __init__(
        self,
        mean: float = 0.0,
        std: float = 1.0,
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
        if std <= 0:
            raise ValueError(f"data.std must be > 0; got {std}")
        if dim < 1:
            raise ValueError(f"data.dim must be >= 1; got {dim}")
        if min(num_train, num_val, num_test) < 1:
            raise ValueError(
                f"data.num_train, num_val and num_test must be >= 1; got {num_train}, {num_val}, {num_test}"
            )
        self.mean, self.std, self.dim = float(mean), float(std), int(dim)
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.seed = seed
        self.data_shape = (self.dim,)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        generator = torch.Generator().manual_seed(self.seed)
        splits = {
            name: self.mean + self.std * torch.randn(n, self.dim, generator=generator) for name, n in self.sizes.items()
        }
        self.train_set, self.val_set, self.test_set = (unlabelled(splits[k]) for k in ("train", "val", "test"))

    def true_nll_nats(self, x0: Tensor) -> Tensor:
        """The exact -log p(x0) under the data distribution, (B,) nats summed over dims."""
        return gaussian_nll_nats(x0.double(), self.mean, self.std)
