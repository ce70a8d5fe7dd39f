"""Helpers shared by the image data modules: integer grey levels -> [-1, 1], flips, splits, downloads.

Every image data module stores its pixels as integer levels k in {0, ..., L} (uint8) and maps them
to x = 2k/L - 1, the K = L + 1 level grid in [-1, 1] that the discretized Gaussian decoder of Ho et
al. 2020 (Sec. 3.3) assumes. When ``num_bins`` differs from the natural K of the data, the values
are rounded to the ``num_bins``-level grid with :func:`diffusion_elbo.core.distributions.quantize`,
so a batch always lies exactly on the grid the model's bits/dim are computed for.
"""

from __future__ import annotations

import hashlib
import shutil
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from diffusion_elbo.core.distributions import quantize
from diffusion_elbo.data.base import DiffusionDataModule, EpochIndex, as_epoch_index


def levels_to_unit(levels: Tensor, max_level: int, num_bins: int | None = None) -> Tensor:
    """Integer levels k in {0..max_level} -> float32 x = 2k/max_level - 1 in [-1, 1], same shape.

    With ``num_bins`` other than ``max_level + 1`` the result is re-rounded to the ``num_bins``-level
    grid x = 2j/(num_bins - 1) - 1 (e.g. num_bins=2 binarizes).
    """
    if max_level < 1:
        raise ValueError(f"max_level must be >= 1; got {max_level}")
    x = levels.to(torch.float32) * (2.0 / max_level) - 1.0
    if num_bins is not None and num_bins != max_level + 1:
        x = quantize(x, num_bins)
    return x


def check_num_bins(num_bins: int, dataset: str) -> int:
    """Validate ``data.num_bins`` (K >= 2 levels)."""
    if int(num_bins) < 2:
        raise ValueError(
            f"data={dataset}: data.num_bins is the number of grey levels K and must be >= 2; got {num_bins}"
        )
    return int(num_bins)


def check_image_format(
    dataset: str, channels: int, *, image_size: int, allowed_channels: Sequence[int], allowed_sizes: Sequence[int]
) -> None:
    """Raise ValueError when ``channels``/``image_size`` do not match what ``dataset`` provides."""
    if channels not in allowed_channels:
        expected = " or ".join(str(c) for c in allowed_channels)
        raise ValueError(f"data={dataset} has channels {expected}; got data.channels={channels}")
    if image_size not in allowed_sizes:
        expected = " or ".join(str(s) for s in allowed_sizes)
        raise ValueError(f"data={dataset} has image_size {expected}; got data.image_size={image_size}")


def seeded_permutation(n: int, seed: int) -> np.ndarray:
    """A permutation of range(n) that depends only on ``seed``: the same split on every machine.

    numpy's legacy RandomState is used on purpose: its stream is frozen across numpy versions and
    platforms (NEP 19), which torch.randperm does not promise. It is a local object: no global state.
    """
    return np.random.RandomState(seed).permutation(n)


def split_indices(
    n: int, num_val: int, *, num_test: int, seed: int, labels: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Disjoint sorted (train, val, test) int64 index tensors covering range(n): a seeded random split.

    With ``labels`` (n,) the split is stratified: after a seeded shuffle, each example is keyed by its
    relative rank (r + 1/2) / n_c within its class c and the examples are taken in key order, so
    every class enters val and test in proportion to its size (up to one example).
    """
    if num_val < 0 or num_test < 0 or num_val + num_test >= n:
        raise ValueError(
            f"cannot split {n} examples into num_val={num_val}, num_test={num_test} and a non-empty train "
            f"split; choose data.num_val + data.num_test < {n}"
        )
    perm = seeded_permutation(n, seed)
    if labels is not None:
        shuffled = labels.numpy()[perm]  # (n,) labels in shuffled order
        key = np.empty(n, dtype=np.float64)
        for c in np.unique(shuffled):
            members = np.flatnonzero(shuffled == c)
            key[members] = (np.arange(len(members)) + 0.5) / len(members)
        perm = perm[np.argsort(key, kind="stable")]
    val, test, train = perm[:num_val], perm[num_val : num_val + num_test], perm[num_val + num_test :]
    return tuple(torch.from_numpy(np.sort(part)).to(torch.long) for part in (train, val, test))


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One step of SplitMix64 (Steele et al. 2014): a 64-bit integer -> a well-mixed 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class RandomHorizontalFlip:
    """Flip (..., W) tensors left-right with probability 1/2 (the CIFAR-10 augmentation of Ho et al. 2020).

    The coin of a read (:class:`~diffusion_elbo.data.base.EpochIndex`: example, epoch, the run's seed) is a hash of
    those and this flip's own seed (SplitMix64's top bit): no generator state, so the flips are the same in a run
    resumed mid-epoch, in any DataLoader worker and on any number of DDP processes, and differ between epochs and
    between runs of other seeds (a generator's coins followed the order of the reads: a resumed run drew the start of
    the stream again, and each worker its own stream). A plain index reads as epoch 0 of seed 0."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def flips(self, key: int | EpochIndex) -> bool:
        read = as_epoch_index(key)
        h = _splitmix64(self.seed & _MASK64)
        for part in (read.seed, read.epoch, read.index):
            h = _splitmix64(h ^ (int(part) & _MASK64))
        return bool(h >> 63)

    def __call__(self, x: Tensor, key: int | EpochIndex) -> Tensor:
        return x.flip(-1) if self.flips(key) else x


class LevelImageDataset(Dataset):
    """Images held as integer levels in memory, served as (x0, y) with x0 float32 (C, H, W) in [-1, 1].

    images: (N, C, H, W) uint8 levels in {0..max_level}; labels: (N,) int64 (-1 for none). Keeping
    uint8 costs a quarter of float32 memory (CIFAR-10 train: 150 MB instead of 600 MB); the
    conversion per item is one multiply-add.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor | None,
        *,
        max_level: int,
        num_bins: int,
        flip: RandomHorizontalFlip | None = None,
    ) -> None:
        if images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W); got shape {tuple(images.shape)}")
        if labels is None:
            labels = torch.full((images.shape[0],), -1, dtype=torch.long)
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must be ({images.shape[0]},); got shape {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.to(torch.long)
        self.max_level = max_level
        self.num_bins = num_bins
        self.flip = flip

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def epoch_keyed(self) -> bool:
        """Whether the training order should key examples by (index, epoch, seed) (:class:`EpochIndex`): with flips."""
        return self.flip is not None

    def __getitem__(self, key: int | EpochIndex) -> tuple[Tensor, Tensor]:
        index = as_epoch_index(key).index
        x0 = levels_to_unit(self.images[index], self.max_level, self.num_bins)  # (C, H, W)
        if self.flip is not None:
            x0 = self.flip(x0, key)
        return x0, self.labels[index]


def flip_for(random_flip: bool, seed: int) -> RandomHorizontalFlip | None:
    """The training-split flip of a data module, its coins keyed by ``data.seed``, or None."""
    # seed + 1: coins distinct from the draws of the split, so the two are not coupled
    return RandomHorizontalFlip(seed + 1) if random_flip else None


def download_file(url: str, path: Path, timeout_s: float = 10.0) -> None:
    """Download ``url`` to ``path`` through a temporary ``.part`` file, so a failure leaves no partial file.

    Raises whatever urllib raises (URLError, TimeoutError, OSError) when the network is unreachable.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, partial.open("wb") as out:
            shutil.copyfileobj(response, out)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


def md5_of(path: Path) -> str:
    """Hex MD5 of a file: the checksums published for MNIST and CIFAR-10 are MD5 (integrity, not security)."""
    digest = hashlib.md5()
    with Path(path).open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(name: str, urls: Sequence[str], *, dest_dir: Path, md5: str | None = None, timeout_s: float = 10.0) -> Path:
    """Download ``name`` into ``dest_dir`` from the first of ``urls`` (mirror prefixes) that works.

    The MD5 is checked when given; a mismatching file is deleted. Raises OSError naming every
    mirror tried and why it failed.
    """
    path = Path(dest_dir) / name
    failures = []
    for base in urls:
        url = base.rstrip("/") + "/" + name
        try:
            download_file(url, path, timeout_s)
        except Exception as error:  # URLError, TimeoutError, HTTP errors, SSL errors: try the next mirror
            failures.append(f"{url}: {error}")
            continue
        if md5 is not None and md5_of(path) != md5:
            path.unlink(missing_ok=True)
            failures.append(f"{url}: MD5 mismatch (expected {md5})")
            continue
        return path
    raise OSError("could not download " + name + " (" + "; ".join(failures) + ")")


class LevelImageDataModule(DiffusionDataModule):
    """Base of the labelled image sets stored as integer grey levels (digits, MNIST, CIFAR-10): checks the image
    format and ``num_bins`` against what the set allows (the class attributes ``dataset``, ``allowed_channels``,
    ``allowed_sizes``), and builds the three :class:`LevelImageDataset` splits (flips on train only).
    Subclasses load levels and labels in :meth:`setup` and call :meth:`set_splits`.

    Args: ``num_bins`` grey levels K; ``channels``, ``image_size``; ``random_flip`` left-right flips of training
    images; ``seed`` of the split and the flips; ``batch_size``, ``eval_batch_size``, ``num_workers`` of the loaders.
    """

    has_labels = True
    dataset: str
    allowed_channels: tuple[int, ...]
    allowed_sizes: tuple[int, ...]

    def __init__(
        self,
        *,
        num_bins: int,
        channels: int,
        image_size: int,
        random_flip: bool = False,
        seed: int = 0,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_examples: int | None = 512,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, val_examples)
        check_image_format(
            self.dataset,
            channels,
            image_size=image_size,
            allowed_channels=self.allowed_channels,
            allowed_sizes=self.allowed_sizes,
        )
        self.num_bins = check_num_bins(num_bins, self.dataset)
        self.channels, self.image_size = int(channels), int(image_size)
        self.random_flip = bool(random_flip)
        self.seed = int(seed)
        self.data_shape = (self.channels, self.image_size, self.image_size)

    def set_splits(
        self, max_level: int, train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor]
    ) -> None:
        """The datasets from (levels (N, C, H, W) uint8, labels (N,)) of each split."""
        flip = flip_for(self.random_flip, self.seed)
        self.train_set = LevelImageDataset(*train, max_level=max_level, num_bins=self.num_bins, flip=flip)
        self.val_set = LevelImageDataset(*val, max_level=max_level, num_bins=self.num_bins)
        self.test_set = LevelImageDataset(*test, max_level=max_level, num_bins=self.num_bins)
