"""What every data module of the framework provides on top of a LightningDataModule.

Batches are tuples ``(x0, y)``: x0 (B, *data_shape) float32 (images in [-1, 1], quantized to
``num_bins`` levels), y (B,) int64 labels (-1 where the data has none). Validation batches add a third entry, each
example's index in the split, so its noise can come from its own seed (the same numbers on 1 or N processes).
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset


class IndexedDataset(Dataset):
    """``dataset``'s items with their index appended: (x0, y, index)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        return (*self.dataset[index], index)


class ShardSampler(DistributedSampler):
    """Rank r of W reads examples r, r + W, r + 2W, ... in order: every example once over all ranks, with no padding
    (DistributedSampler repeats examples to even out the shards, which changes a mean over them). A subclass of
    DistributedSampler, so Lightning uses it as it is."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.indices = list(range(rank, len(dataset), num_replicas))  # type: ignore[arg-type]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class DiffusionDataModule(L.LightningDataModule):
    """Base class: subclasses fill ``train_set``, ``val_set``, ``test_set`` in :meth:`setup`.

    Attributes the rest of the framework reads:
    - ``data_shape``: shape of one example, e.g. (1, 8, 8) or (2,)
    - ``num_bins``: K for data quantized to K levels in [-1, 1] (the discretized decoder is used and
      bits/dim are honest), or None for continuous data (the ELBO is a density bound)
    - ``has_labels``: whether batches carry class labels
    """

    data_shape: tuple[int, ...]
    num_bins: int | None = None
    has_labels: bool = False  # class labels y >= 0 (needed by the FID feature classifier)

    def __init__(
        self,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_examples: int | None = 512,
    ) -> None:
        super().__init__()
        if val_examples is not None and val_examples < 1:
            raise ValueError(f"data.val_examples must be >= 1 or null (the whole split); got {val_examples}")
        self.val_examples = val_examples
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1; got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0; got {num_workers}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    @property
    def num_dims(self) -> int:
        return int(torch.tensor(self.data_shape).prod())

    def _loader(self, dataset: Dataset | None, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not created the {split} split")
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=shuffle and len(dataset) >= batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, "train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """The first ``val_examples`` examples of the val split (all ranks together), with their indices, sharded
        over DDP ranks without padding: validation numbers do not depend on the number of processes."""
        if self.val_set is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not created the val split")
        dataset: Dataset = self.val_set
        if self.val_examples is not None and self.val_examples < len(dataset):  # type: ignore[arg-type]
            dataset = Subset(dataset, range(self.val_examples))
        dataset = IndexedDataset(dataset)
        trainer = getattr(self, "trainer", None)  # set when attached to a Trainer
        sampler = None
        if trainer is not None and trainer.world_size > 1:
            sampler = ShardSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank)
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, "test", self.eval_batch_size, shuffle=False)

    def split(self, split: str) -> Dataset:
        """The dataset of ``split`` (train, val or test), after :meth:`setup`."""
        dataset = {"train": self.train_set, "val": self.val_set, "test": self.test_set}.get(split)
        if dataset is None:
            raise ValueError(f"unknown or empty split '{split}'; use train, val or test (after setup())")
        return dataset


class GeneratedDataModule(DiffusionDataModule):
    """Data drawn from a known distribution (Gaussian, discrete levels, 2-D toys): the train, val and test splits are
    ``num_train``, ``num_val`` and ``num_test`` independent draws, in that order, of one generator seeded with
    ``seed``; examples are (dim,) vectors without labels. Subclasses set ``data_shape`` and implement :meth:`sample`."""

    def __init__(
        self,
        num_train: int = 10_000,
        num_val: int = 1_000,
        num_test: int = 1_000,
        seed: int = 0,
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_examples: int | None = 1024,  # cheap examples: validation reads more of them
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, val_examples)
        if min(num_train, num_val, num_test) < 1:
            raise ValueError(
                f"data.num_train, num_val and num_test must be >= 1; got {num_train}, {num_val}, {num_test}"
            )
        self.sizes = {"train": int(num_train), "val": int(num_val), "test": int(num_test)}
        self.seed = int(seed)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """n examples (n, *data_shape) float32 drawn with ``generator``."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        generator = torch.Generator().manual_seed(self.seed)
        splits = {name: self.sample(n, generator) for name, n in self.sizes.items()}  # train, val, test in order
        self.train_set, self.val_set, self.test_set = (unlabelled(splits[k]) for k in ("train", "val", "test"))


def unlabelled(x: Tensor) -> TensorDataset:
    """A dataset of (x0, -1) pairs."""
    return TensorDataset(x, torch.full((x.shape[0],), -1, dtype=torch.long))


def split_sizes(total: int, fractions: Sequence[float]) -> list[int]:
    """Integer sizes for a split by fractions that add up to ``total``."""
    sizes = [int(total * f) for f in fractions[:-1]]
    return [*sizes, total - sum(sizes)]
