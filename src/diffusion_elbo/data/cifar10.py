"""CIFAR-10 (Krizhevsky 2009) from its "python version" batches: 50k train + 10k test 32x32 RGB images.

Format (https://www.cs.toronto.edu/~kriz/cifar.html): ``cifar-10-batches-py/data_batch_1..5`` and
``test_batch`` are pickled dicts with b"data", a (N, 3072) uint8 array whose rows hold the 1024 red,
then 1024 green, then 1024 blue values of one image in row-major order, and b"labels", N ints in 0..9.
The batches are pickles, so only point ``data.root`` at files from a source you trust.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor

from diffusion_elbo.data import images as image_utils
from diffusion_elbo.data.images import LevelImageDataModule, split_indices

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_URLS = ("https://www.cs.toronto.edu/~kriz/",)
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"


def read_cifar_batch(stream: BinaryIO, name: str) -> tuple[Tensor, Tensor]:
    """One pickled batch -> images (N, 3, 32, 32) uint8 and labels (N,) int64; errors name the file."""
    try:
        batch = pickle.load(stream, encoding="bytes")
    except Exception as error:  # UnpicklingError, EOFError, ValueError...: all mean a bad file
        raise ValueError(
            f"{name} is not a readable CIFAR-10 batch ({error!r}); delete it and download again"
        ) from error
    if not isinstance(batch, dict):
        raise ValueError(f"{name} holds a {type(batch).__name__}, not a CIFAR-10 batch dict")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{name} has no b'data' and b'labels' entries; it is not a CIFAR-10 python batch")
    data = np.asarray(data)
    labels = np.asarray(labels, dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (data.shape[0],):
        raise ValueError(
            f"{name} holds data {data.dtype} {data.shape} and {labels.shape} labels; CIFAR-10 batches hold "
            f"uint8 (N, 3072) and (N,)"
        )
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())  # (N, 3072) -> (N, 3, 32, 32): R, G, B planes
    return images, torch.from_numpy(labels)


def safe_extract(archive: tarfile.TarFile, dest: Path) -> None:
    """Extract regular files and folders only, refusing paths that escape ``dest``."""
    if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4: the standard library's own checks
        archive.extractall(dest, filter="data")
        return
    dest = dest.resolve()
    members = []
    for member in archive.getmembers():
        target = (dest / member.name).resolve()
        if not (member.isfile() or member.isdir()) or not target.is_relative_to(dest):
            raise ValueError(f"refusing to extract {member.name!r}: not a plain file inside {dest}")
        members.append(member)
    archive.extractall(dest, members=members)


def missing_cifar_message(root: Path, download: bool, reason: str = "") -> str:
    how = "run with a network so it downloads" if download else "set data.download=true and run with a network"
    return (
        f"data.root={root} has no CIFAR-10 files; put {CIFAR10_ARCHIVE} there (from "
        f"https://www.cs.toronto.edu/~kriz/cifar.html), or its extracted folder {CIFAR10_FOLDER}/ with "
        f"{', '.join(TRAIN_BATCHES)} and {TEST_BATCH}, or {how}" + (f". Download failed: {reason}" if reason else "")
    )


class CIFAR10DataModule(LevelImageDataModule):
    """x0 (B, 3, 32, 32) on the 256-level grid k/255 * 2 - 1, y (B,) the class 0..9.

    Splits: test is the official 10k ``test_batch``; val is ``num_val`` training images picked by a
    seeded shuffle stratified by class (numpy RandomState(seed)); train is the rest. Training images
    are flipped left-right at random by default, as Ho et al. 2020 (Appendix B) do for CIFAR-10.
    """

    num_bins = 256
    dataset, allowed_channels, allowed_sizes = "cifar10", (3,), (32,)

    def __init__(
        self,
        root: str = "data/cifar10",
        download: bool = True,
        *,
        num_val: int = 5000,
        num_bins: int = 256,
        channels: int = 3,
        image_size: int = 32,
        random_flip: bool = True,
        **options,
    ) -> None:
        """``options``: seed, batch_size, eval_batch_size, num_workers (:class:`LevelImageDataModule`)."""
        super().__init__(
            num_bins=num_bins, channels=channels, image_size=image_size, random_flip=random_flip, **options
        )
        if num_val < 1:
            raise ValueError(f"data.num_val must be >= 1; got {num_val}")
        self.root = Path(root).expanduser()
        self.download = bool(download)
        self.num_val = int(num_val)

    @property
    def folder(self) -> Path:
        return self.root / CIFAR10_FOLDER

    @property
    def archive(self) -> Path:
        return self.root / CIFAR10_ARCHIVE

    def _has_folder(self) -> bool:
        return all((self.folder / name).is_file() for name in (*TRAIN_BATCHES, TEST_BATCH))

    def prepare_data(self) -> None:
        """Download the archive if needed and extract it into ``root`` (rank 0 only)."""
        if self._has_folder():
            return
        if not self.archive.is_file():
            if not self.download:
                raise FileNotFoundError(missing_cifar_message(self.root, self.download))
            try:
                image_utils.fetch(CIFAR10_ARCHIVE, CIFAR10_URLS, dest_dir=self.root, md5=CIFAR10_ARCHIVE_MD5)
            except OSError as error:
                raise FileNotFoundError(missing_cifar_message(self.root, self.download, str(error))) from error
        try:
            with tarfile.open(self.archive, "r:gz") as archive:
                safe_extract(archive, self.root)
        except (tarfile.TarError, OSError, EOFError) as error:
            raise ValueError(
                f"{self.archive} is not a readable .tar.gz ({error}); delete it and download it again"
            ) from error

    def _read_batches(self) -> dict[str, tuple[Tensor, Tensor]]:
        names = (*TRAIN_BATCHES, TEST_BATCH)
        if self._has_folder():
            batches = {}
            for name in names:
                with (self.folder / name).open("rb") as stream:
                    batches[name] = read_cifar_batch(stream, str(self.folder / name))
            return batches
        if self.archive.is_file():  # not extracted (prepare_data not run): read straight from the archive
            try:
                with tarfile.open(self.archive, "r:gz") as archive:
                    members = {Path(m.name).name: m for m in archive.getmembers() if m.isfile()}
                    lacking = [name for name in names if name not in members]
                    if lacking:
                        raise ValueError(f"{self.archive} lacks {', '.join(lacking)}; it is not the CIFAR-10 archive")
                    return {
                        name: read_cifar_batch(
                            io.BytesIO(archive.extractfile(members[name]).read()), f"{self.archive}:{name}"
                        )
                        for name in names
                    }
            except (tarfile.TarError, OSError, EOFError) as error:
                raise ValueError(
                    f"{self.archive} is not a readable .tar.gz ({error}); delete it and download it again"
                ) from error
        raise FileNotFoundError(
            missing_cifar_message(self.root, self.download)
            + " (with data.download=true, prepare_data() downloads it; the Trainer calls it before setup())"
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        batches = self._read_batches()
        train_x = torch.cat([batches[name][0] for name in TRAIN_BATCHES])  # (50000, 3, 32, 32) uint8
        train_y = torch.cat([batches[name][1] for name in TRAIN_BATCHES])  # (50000,)
        test_x, test_y = batches[TEST_BATCH]
        train, val, _ = split_indices(len(train_x), self.num_val, num_test=0, seed=self.seed, labels=train_y)
        self.set_splits(255, (train_x[train], train_y[train]), (train_x[val], train_y[val]), (test_x, test_y))
