"""What every data module of the framework provides on top of a LightningDataModule.

Batches are tuples ``(x0, y)``: x0 (B, *data_shape) float32 (images in [-1, 1], quantized to
``num_bins`` levels), y (B,) int64 labels (-1 where the data has none). Validation batches are :class:`IndexedBatch`
``(x0, y, index)``, with each example's index in the split, so its noise can come from its own seed (the same numbers
on 1 or N processes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset


class IndexedBatch(NamedTuple):
    """An example (or, collated, a batch) with its position in its split: x0 (B, *data_shape), y (B,) int64, index (B,)
    int64. Validation reads it to draw each example's noise from its own seed."""

    x0: Tensor
    y: Tensor
    index: Tensor


class IndexedDataset(Dataset):
    """``dataset``'s items with their index appended: :class:`IndexedBatch` (x0, y, index)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> IndexedBatch:
        x0, y = self.dataset[index][:2]
        return IndexedBatch(x0, y, index)


class EpochIndex(NamedTuple):
    """A training example's key as :class:`EpochSampler` gives it to a dataset that asks for it (``epoch_keyed``):
    its index, the epoch it is read in and the seed of the training order (the run's ``seed``), so a random
    augmentation can be a function of the three alone."""

    index: int
    epoch: int = 0
    seed: int = 0


def as_epoch_index(key: int | EpochIndex) -> EpochIndex:
    """A dataset key as an :class:`EpochIndex`; a plain index (read outside the training order) is epoch 0 of seed 0."""
    return key if isinstance(key, EpochIndex) else EpochIndex(int(key))


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


class EpochSampler(DistributedSampler):
    """The training order, resumable mid-epoch: epoch e is ``torch.randperm`` of a generator seeded with seed + e
    (DistributedSampler's recipe, which Lightning itself uses under DDP), split over W ranks (rank r reads every W-th
    example; the last ones repeat to even the shards). It draws nothing from torch's global generator, so the order
    depends on the seed and the epoch alone. :meth:`resume_at` makes the next pass over that epoch start after the
    examples already trained on, so a run resumed from a checkpoint reads the rest of the epoch in the order the
    uninterrupted run would have. A DistributedSampler, so Lightning uses it as it is (and calls ``set_epoch``).

    A dataset with a true ``epoch_keyed`` attribute (one with random flips) gets :class:`EpochIndex` keys instead of
    indices: its augmentation is then a function of (index, epoch, seed), the same in a resumed run, in any worker and
    on any number of processes."""

    def __init__(self, dataset: Dataset, *, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self._resume: tuple[int, int] | None = None  # (epoch, examples of this rank's shard to skip)

    def resume_at(self, epoch: int, skip: int) -> None:
        """Start at ``epoch``, after the first ``skip`` examples of this rank's shard of it (once)."""
        self.set_epoch(epoch)
        self._resume = (epoch, skip)

    def __iter__(self):
        indices = list(super().__iter__())  # this rank's shard of epoch self.epoch's permutation
        if self._resume is not None:
            epoch, skip = self._resume
            self._resume = None
            if epoch == self.epoch:  # Lightning moved on to the next epoch otherwise (the saved one had ended)
                indices = indices[skip:]
        if getattr(self.dataset, "epoch_keyed", False):
            return iter([EpochIndex(i, self.epoch, self.seed) for i in indices])
        return iter(indices)


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
        # the seed of the training order (EpochSampler): src/train.py sets the run's seed
        self.order_seed = 0
        self._resume_at: tuple[int, int] | None = None  # (epoch, batches) from a checkpoint: see load_state_dict

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
            generator=_own_generator(),
        )

    def train_dataloader(self) -> DataLoader:
        """Batches of the train split in the :class:`EpochSampler` order of ``order_seed``, sharded over DDP ranks; in
        a run resumed from a checkpoint, the first pass continues the saved epoch after the batches already trained
        on."""
        if self.train_set is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not created the train split")
        trainer = getattr(self, "trainer", None)  # set when attached to a Trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = EpochSampler(self.train_set, num_replicas=replicas, rank=rank, seed=self.order_seed)
        if self._resume_at is not None:
            epoch, batches = self._resume_at
            sampler.resume_at(epoch, batches * self.batch_size)
            self._resume_at = None
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=len(sampler) >= self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=_own_generator(),
        )

    def state_dict(self) -> dict[str, int]:
        """Where the training order is, for checkpoints (Lightning saves it): the epoch and how many of its batches
        were trained on, from the fit loop's own counters, so that on resume this data module skips exactly the
        batches Lightning counts as done. A checkpoint written after the epoch's last batch points at the next."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return {}
        epochs = trainer.fit_loop.epoch_progress.current  # processed: the epochs ended (the index of the next)
        epoch, batches = epochs.processed, 0
        if epochs.started > epochs.processed:  # within an epoch: the batches of it trained on so far
            batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
            if batches >= trainer.num_training_batches:  # its last: the next epoch starts afresh
                epoch, batches = epoch + 1, 0
        return {"train_epoch": int(epoch), "train_batches": int(batches)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the training order where a checkpoint left it (checkpoints without it start a new epoch 0 order)."""
        if "train_epoch" in state_dict:
            self._resume_at = (int(state_dict["train_epoch"]), int(state_dict["train_batches"]))

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
            generator=_own_generator(),
        )

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, "test", self.eval_batch_size, shuffle=False)

    def split(self, split: str) -> Dataset:
        """The dataset of ``split`` (train, val or test), after :meth:`setup`."""
        dataset = {"train": self.train_set, "val": self.val_set, "test": self.test_set}.get(split)
        if dataset is None:
            raise ValueError(f"unknown or empty split '{split}'; use train, val or test (after setup())")
        return dataset


def _own_generator() -> torch.Generator:
    """A DataLoader's generator: each pass draws its workers' base seed from it, and without one from torch's global
    generator, which dropout uses; a validation then shifted the dropout masks of the training steps after it, and a
    run resumed from a checkpoint (which restores the global generator) would not repeat them."""
    return torch.Generator().manual_seed(0)


class GeneratedDataModule(DiffusionDataModule):
    """Data drawn from a known distribution (Gaussian, discrete levels, 2-D toys): the train, val and test splits are
    ``num_train``, ``num_val`` and ``num_test`` independent draws, in that order, of one generator seeded with
    ``seed``; examples are (dim,) vectors without labels. Subclasses set ``data_shape`` and implement :meth:`sample`."""

    def __init__(
        self,
        num_train: int = 10_000,
        num_val: int = 1_000,
        *,
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
