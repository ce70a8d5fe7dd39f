"""MNIST (LeCun et al. 1998) read from its IDX files with numpy: 60k train + 10k test 28x28 grey images.

IDX format (http://yann.lecun.com/exdb/mnist/): a big-endian header of two zero bytes, a type byte
(0x08 = unsigned byte), the number of dimensions d, then d big-endian int32 sizes, then the data in
row-major order. Images are idx3 (N, 28, 28), labels idx1 (N,).
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from diffusion_elbo.data import images as image_utils
from diffusion_elbo.data.images import LevelImageDataModule, split_indices

MNIST_FILES = {  # name -> MD5 of the .gz published on the mirrors (the same checksums torchvision uses)
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
IDX_UBYTE = 0x08


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a uint8 array of the shape its header states.

    Raises ValueError naming the file when the magic number is wrong or the data is truncated.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
        raise ValueError(
            f"{path} is not a readable (gzipped) IDX file ({error}); delete it and download it again"
        ) from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != IDX_UBYTE or not 1 <= raw[3] <= 4:
        raise ValueError(
            f"{path} is not an unsigned-byte IDX file: its first 4 bytes are {raw[:4].hex()}, expected "
            f"00000801 (labels) or 00000803 (images); delete it and download it again"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path} is truncated inside its IDX header; delete it and download it again")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise ValueError(
            f"{path} is truncated or corrupt: its header promises shape {shape} ({expected} bytes of data) "
            f"but it holds {len(raw) - header}; delete it and download it again"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def find_mnist_file(root: Path, name: str) -> Path | None:
    """``name`` (.gz) or its unzipped twin in ``root`` or ``root/MNIST/raw`` (torchvision's layout)."""
    for folder in (root, root / "MNIST" / "raw"):
        for candidate in (name, name.removesuffix(".gz")):
            if (folder / candidate).is_file():
                return folder / candidate
    return None


def missing_mnist_message(root: Path, missing: list[str], download: bool, reason: str = "") -> str:
    lacks = "has no MNIST files" if len(missing) == len(MNIST_FILES) else f"lacks {', '.join(missing)}"
    how = "run with a network so they download" if download else "set data.download=true and run with a network"
    return (
        f"data.root={root} {lacks}; put {', '.join(MNIST_FILES)} there (gzipped or not; "
        f"{root / 'MNIST' / 'raw'} works too) from http://yann.lecun.com/exdb/mnist/ or a mirror such as "
        f"{MNIST_MIRRORS[0]}, or {how}" + (f". Download failed: {reason}" if reason else "")
    )


class MNISTDataModule(LevelImageDataModule):
    """x0 (B, 1, 28, 28) on the 256-level grid k/255 * 2 - 1 (or padded to 32x32), y (B,) the digit.

    Splits: test is the official 10k t10k set; val is ``num_val`` training images picked by a seeded
    shuffle stratified by digit (numpy RandomState(seed): the same on every machine); train is the rest.
    ``image_size=32`` pads 2 background pixels (level 0) on each side, the layout of the original
    LeNet input, for models that need a power of two.
    """

    num_bins = 256
    dataset, allowed_channels, allowed_sizes = "mnist", (1,), (28, 32)

    def __init__(
        self,
        root: str = "data/mnist",
        download: bool = True,
        *,
        num_val: int = 5000,
        num_bins: int = 256,
        channels: int = 1,
        image_size: int = 28,
        **options,
    ) -> None:
        """``options``: random_flip, seed, batch_size, eval_batch_size, num_workers (:class:`LevelImageDataModule`)."""
        super().__init__(num_bins=num_bins, channels=channels, image_size=image_size, **options)
        if num_val < 1:
            raise ValueError(f"data.num_val must be >= 1; got {num_val}")
        self.root = Path(root).expanduser()
        self.download = bool(download)
        self.num_val = int(num_val)

    def _missing(self) -> list[str]:
        return [name for name in MNIST_FILES if find_mnist_file(self.root, name) is None]

    def prepare_data(self) -> None:
        """Download the missing IDX files into ``root`` (rank 0 only), or fail at once saying what to do."""
        missing = self._missing()
        if not missing:
            return
        if not self.download:
            raise FileNotFoundError(missing_mnist_message(self.root, missing, self.download))
        for name in missing:
            try:
                image_utils.fetch(name, MNIST_MIRRORS, dest_dir=self.root, md5=MNIST_FILES[name])
            except OSError as error:
                raise FileNotFoundError(missing_mnist_message(self.root, missing, self.download, str(error))) from error

    def _load(self, images_name: str, labels_name: str) -> tuple[Tensor, Tensor]:
        images_path = find_mnist_file(self.root, images_name)
        labels_path = find_mnist_file(self.root, labels_name)
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise ValueError(f"{images_path} holds images of shape {images.shape[1:]}; MNIST has (28, 28)")
        if labels.shape != (images.shape[0],):
            raise ValueError(
                f"{labels_path} holds {labels.shape} labels for the {images.shape[0]} images of {images_path}"
            )
        x = torch.from_numpy(images.copy()).unsqueeze(1)  # (N, 1, 28, 28) uint8
        if self.image_size == 32:
            x = torch.nn.functional.pad(x, (2, 2, 2, 2), value=0)  # (N, 1, 32, 32)
        return x, torch.from_numpy(labels.astype(np.int64))

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        missing = self._missing()
        if missing:
            raise FileNotFoundError(
                missing_mnist_message(self.root, missing, self.download)
                + " (with data.download=true, prepare_data() downloads them; the Trainer calls it before setup())"
            )
        train_x, train_y = self._load("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
        test_x, test_y = self._load("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
        train, val, _ = split_indices(len(train_x), self.num_val, num_test=0, seed=self.seed, labels=train_y)
        self.set_splits(255, (train_x[train], train_y[train]), (train_x[val], train_y[val]), (test_x, test_y))
