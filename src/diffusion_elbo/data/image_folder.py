"""Any folder of images (searched recursively), resized and center-cropped to ``image_size`` squares.

Images are decoded lazily, one per item, so a folder of any size costs only its list of paths in
memory; a DataLoader with ``num_workers > 0`` decodes in parallel. :meth:`ImageFolderDataModule.setup`
opens the header of every file once (a few kB each) so an unreadable file fails at setup, naming it,
instead of hours into training; a file whose header is fine but whose data is truncated still fails
when it is first read, with an error that names it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from diffusion_elbo.data.base import DiffusionDataModule, EpochIndex, as_epoch_index
from diffusion_elbo.data.images import (
    RandomHorizontalFlip,
    check_num_bins,
    flip_for,
    levels_to_unit,
    split_indices,
)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
PIL_MODES = {1: "L", 3: "RGB"}


def find_images(root: Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Image files under ``root`` (recursive, extension case-insensitive), sorted by relative path.

    Sorting by the POSIX relative path makes the list, and so the seeded split, the same on every
    machine whatever order the file system lists entries in.
    """
    suffixes = {e.lower() for e in extensions}
    found = [p for p in root.rglob("*") if p.suffix.lower() in suffixes and p.is_file()]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """Resize so the short side is ``image_size``, then center-crop: (image_size, image_size[, C]) uint8.

    As improved-diffusion's ``image_datasets.center_crop_arr`` (Nichol & Dhariwal 2021): halve with a
    BOX filter while the image is at least twice too large (cheap, alias-free), then BICUBIC to size.
    """
    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.Resampling.BOX)
    scale = image_size / min(*image.size)
    new_size = tuple(max(image_size, round(s * scale)) for s in image.size)
    image = image.resize(new_size, resample=Image.Resampling.BICUBIC)
    arr = np.asarray(image)  # (H, W) or (H, W, C)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


class WrongImageModeError(ValueError):
    """An image whose pixel format cannot be turned into 8-bit levels without losing data."""


def load_image(path: Path, channels: int, image_size: int) -> Tensor:
    """One image file -> (channels, image_size, image_size) uint8 levels; errors name the file.

    Conversion to "L" or "RGB" drops any alpha channel (transparent pixels keep their stored colour).
    """
    try:
        with Image.open(path) as image:
            if image.mode in HIGH_DEPTH_MODES:
                raise WrongImageModeError(
                    f"image {path} has mode {image.mode} (16-bit or floating-point pixels), which this 8-bit "
                    "pipeline would clip; convert it to 8 bits first (e.g. with Pillow: "
                    "Image.fromarray((np.asarray(im) / 257).astype('uint8'))) or remove it from data.root"
                )
            image = image.convert(PIL_MODES[channels])
            arr = center_crop_arr(image, image_size)
    except WrongImageModeError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise ValueError(f"cannot read image {path} ({error}); delete or replace the file") from error
    x = torch.from_numpy(np.array(arr))  # a writable, contiguous copy of the crop
    return x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)  # (H, W[, C]) -> (C, H, W)


class ImageFileDataset(Dataset):
    """(x0, -1) pairs decoded on access: x0 (C, image_size, image_size) float32 on the num_bins grid."""

    def __init__(
        self,
        paths: Sequence[Path],
        channels: int,
        *,
        image_size: int,
        num_bins: int,
        flip: RandomHorizontalFlip | None = None,
    ) -> None:
        self.paths = list(paths)
        self.channels, self.image_size, self.num_bins = channels, image_size, num_bins
        self.flip = flip

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def epoch_keyed(self) -> bool:
        """Whether the training order should key examples by (index, epoch, seed) (:class:`EpochIndex`): with flips."""
        return self.flip is not None

    def __getitem__(self, key: int | EpochIndex) -> tuple[Tensor, Tensor]:
        levels = load_image(self.paths[as_epoch_index(key).index], self.channels, self.image_size)
        x0 = levels_to_unit(levels, 255, self.num_bins)
        if self.flip is not None:
            x0 = self.flip(x0, key)
        return x0, torch.tensor(-1, dtype=torch.long)


class ImageFolderDataModule(DiffusionDataModule):
    """x0 (B, channels, image_size, image_size) on the 256-level grid, y = -1, from a folder of images.

    Split: the sorted file list is shuffled with numpy RandomState(seed) and round(n * val_fraction)
    files (at least 1 when the fraction is > 0) go to val, as many for test, the rest to train.
    """

    num_bins = 256

    def __init__(
        self,
        root: str,
        channels: int = 3,
        *,
        image_size: int = 64,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        num_bins: int = 256,
        random_flip: bool = True,
        seed: int = 0,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_examples: int | None = 512,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, val_examples)
        if channels not in PIL_MODES:
            raise ValueError(f"data=image_folder supports channels 1 (grey) or 3 (RGB); got data.channels={channels}")
        if image_size < 1:
            raise ValueError(f"data.image_size must be >= 1; got {image_size}")
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(
                f"data.val_fraction and data.test_fraction must lie in [0, 1) and add to less than 1; "
                f"got {val_fraction} and {test_fraction}"
            )
        self.root = Path(root).expanduser()
        self.channels, self.image_size = int(channels), int(image_size)
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.num_bins = check_num_bins(num_bins, "image_folder")
        self.random_flip = bool(random_flip)
        self.seed = int(seed)
        self.data_shape = (self.channels, self.image_size, self.image_size)

    def _count(self, n: int, fraction: float) -> int:
        return max(1, round(n * fraction)) if fraction > 0 else 0

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"data.root={self.root} does not exist or is not a folder; point it at a folder of images"
            )
        paths = find_images(self.root)
        if not paths:
            raise FileNotFoundError(
                f"data.root={self.root} holds no images (searched recursively for "
                f"{', '.join(IMAGE_EXTENSIONS)}, any case); point data.root at a folder that has some"
            )
        for path in paths:  # headers only: catches non-images early without decoding every pixel
            try:
                with Image.open(path):
                    pass
            except (UnidentifiedImageError, OSError) as error:
                raise ValueError(f"cannot read image {path} ({error}); delete or replace the file") from error
        num_val, num_test = self._count(len(paths), self.val_fraction), self._count(len(paths), self.test_fraction)
        if num_val + num_test >= len(paths):
            raise ValueError(
                f"data.root={self.root} has only {len(paths)} images: too few for val_fraction={self.val_fraction} "
                f"and test_fraction={self.test_fraction} to leave a training split; add images or lower them"
            )
        train, val, test = split_indices(len(paths), num_val, num_test=num_test, seed=self.seed)
        flip = flip_for(self.random_flip, self.seed)

        def subset(indices: Tensor, flip: RandomHorizontalFlip | None = None) -> ImageFileDataset:
            return ImageFileDataset(
                [paths[i] for i in indices.tolist()],
                self.channels,
                image_size=self.image_size,
                num_bins=self.num_bins,
                flip=flip,
            )

        self.train_set, self.val_set, self.test_set = subset(train, flip), subset(val), subset(test)
