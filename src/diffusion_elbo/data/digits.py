"""scikit-learn's bundled 8x8 handwritten digits: the framework's default dataset (no download, 1797 images).

The images come from the UCI "Optical Recognition of Handwritten Digits" set (Alpaydin & Kaynak 1998),
shipped with scikit-learn as ``sklearn.datasets.load_digits``: each pixel counts the "on" pixels of a
4x4 block of a 32x32 bitmap, so it is an integer grey level in 0..16, i.e. K = 17 levels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffusion_elbo.data.images import LevelImageDataModule, split_indices

NUM_DIGITS = 1797
MAX_LEVEL = 16


class DigitsDataModule(LevelImageDataModule):
    """x0 (B, 1, 8, 8) on the 17-level grid k/16 * 2 - 1, y (B,) the digit 0..9.

    Split: a seeded random shuffle (numpy RandomState(seed), identical on every machine) puts
    ``num_val`` images in val, ``num_test`` in test and the rest in train: 1437 / 180 / 180 by default.
    The split is stratified by digit, so val and test hold each digit about equally often (17-19 times).
    """

    dataset, allowed_channels, allowed_sizes = "digits", (1,), (8,)

    def __init__(
        self,
        num_val: int = 180,
        num_test: int = 180,
        *,
        num_bins: int = MAX_LEVEL + 1,
        channels: int = 1,
        image_size: int = 8,
        **options,
    ) -> None:
        """``options``: random_flip, seed, batch_size, eval_batch_size, num_workers (:class:`LevelImageDataModule`)."""
        super().__init__(num_bins=num_bins, channels=channels, image_size=image_size, **options)
        if num_val < 1 or num_test < 1 or num_val + num_test >= NUM_DIGITS:
            raise ValueError(
                f"data.num_val and data.num_test must be >= 1 and add to less than {NUM_DIGITS}; "
                f"got {num_val} and {num_test}"
            )
        self.num_val, self.num_test = int(num_val), int(num_test)
        self.indices: dict[str, Tensor] = {}  # split -> rows of load_digits(), filled by setup()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits  # deferred: sklearn is slow to import

        bunch = load_digits()
        images = torch.from_numpy(bunch.images.round()).to(torch.uint8).view(-1, 1, 8, 8)  # (1797, 1, 8, 8)
        labels = torch.from_numpy(bunch.target).to(torch.long)  # (1797,)
        train, val, test = split_indices(
            len(images), self.num_val, num_test=self.num_test, seed=self.seed, labels=labels
        )
        self.indices = {"train": train, "val": val, "test": test}
        self.set_splits(MAX_LEVEL, *((images[i], labels[i]) for i in (train, val, test)))
