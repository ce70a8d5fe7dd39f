"""Properties of the data modules: splits, value grids, shapes, file parsing and the errors users see.

MNIST, CIFAR-10 and image folders are tested on tiny fake files written to tmp_path: no download.
"""

from __future__ import annotations

import gzip
import inspect
import pickle
import struct
import tarfile
import urllib.error
from pathlib import Path

import hydra.utils
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from diffusion_elbo.data import (
    CIFAR10DataModule,
    DiffusionDataModule,
    DigitsDataModule,
    GaussianDataModule,
    ImageFolderDataModule,
    MNISTDataModule,
    Toy2D,
    Toy2DDataModule,
)
from diffusion_elbo.data import images as image_utils
from diffusion_elbo.data.images import RandomHorizontalFlip, levels_to_unit, split_indices

CONF_DATA = Path(__file__).resolve().parents[1] / "conf" / "data"
MNIST_NAMES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def assert_on_grid(x: torch.Tensor, num_bins: int) -> None:
    """Every value is one of the num_bins levels 2k/(num_bins-1) - 1 in [-1, 1]."""
    assert x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    k = (x.double() + 1.0) * (num_bins - 1) / 2.0
    assert torch.allclose(k, k.round(), atol=1e-4)


def stack_split(dm: DiffusionDataModule, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    items = [dm.split(split)[i] for i in range(len(dm.split(split)))]
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


# ----------------------------------------------------------------------------------------------- helpers


def test_levels_to_unit_maps_ends_to_minus_one_and_one_and_requantizes() -> None:
    levels = torch.tensor([0, 8, 16], dtype=torch.uint8)
    assert levels_to_unit(levels, 16).tolist() == [-1.0, 0.0, 1.0]
    binary = levels_to_unit(torch.tensor([0, 4, 12, 16], dtype=torch.uint8), 16, num_bins=2)
    assert binary.tolist() == [-1.0, -1.0, 1.0, 1.0]
    assert_on_grid(levels_to_unit(torch.arange(256, dtype=torch.uint8), 255, num_bins=5), 5)


def test_stratified_split_is_disjoint_covers_all_and_balances_classes() -> None:
    labels = torch.arange(100) % 4
    train, val, test = split_indices(100, 20, num_test=20, seed=3, labels=labels)
    together = torch.cat([train, val, test])
    assert sorted(together.tolist()) == list(range(100))
    assert torch.bincount(labels[val], minlength=4).tolist() == [5, 5, 5, 5]
    assert torch.bincount(labels[test], minlength=4).tolist() == [5, 5, 5, 5]


def test_the_flip_is_a_function_of_the_read_that_mirrors_half_the_examples() -> None:
    """The coin of a read (example, epoch, the run's seed) and the flip's seed: the same for the same (also after
    pickling, for spawned workers), about half of the examples flipped, and other examples flipped in another epoch,
    under another run seed or another flip seed. A plain index reads as epoch 0 of seed 0."""
    from diffusion_elbo.data.base import EpochIndex

    x = torch.arange(12.0).view(1, 3, 4)
    flip = RandomHorizontalFlip(5)
    clone = pickle.loads(pickle.dumps(flip))

    def coins(f, epoch=0, seed=0):
        return torch.tensor([f.flips(EpochIndex(i, epoch, seed)) for i in range(2000)])

    base = coins(flip)
    assert torch.equal(base, coins(clone)) and torch.equal(base, torch.tensor([flip.flips(i) for i in range(2000)]))
    assert 0.45 < base.float().mean() < 0.55  # fair: 0.5 within 4.5 sd of 2000 coins
    for other in (coins(flip, epoch=1), coins(flip, seed=1), coins(RandomHorizontalFlip(6))):
        assert 0.4 < (base != other).float().mean() < 0.6  # independent coins
    for i in range(8):
        read = EpochIndex(i, 1, 2)
        assert torch.equal(flip(x, read), x.flip(-1) if flip.flips(read) else x)


def test_flipped_training_batches_are_the_same_resumed_mid_epoch_in_workers_and_on_two_processes() -> None:
    """A run's training batches with random flips: after a resume at batch 3 of epoch 1 the loader gives the rest of
    that epoch as the uninterrupted run read it (a generator's flips restarted from its seed there), with two worker
    processes the same batches, and the two ranks of a 2-process run the flips that one process gives the same
    examples in the same epoch; the reads carry the run's seed."""
    from diffusion_elbo.data.base import EpochIndex, EpochSampler

    def module(**kwargs) -> DigitsDataModule:
        dm = DigitsDataModule(seed=0, batch_size=16, **kwargs)
        dm.setup()
        dm.order_seed = 3  # the run's seed (src/train.py sets it)
        return dm

    def epoch_batches(dm: DigitsDataModule, epoch: int, resume_batches: int | None = None) -> list[torch.Tensor]:
        if resume_batches is not None:
            dm.load_state_dict({"train_epoch": epoch, "train_batches": resume_batches})
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return [x for x, _ in loader]

    def sampler(dm: DigitsDataModule, epoch: int, **shard) -> list[EpochIndex]:
        order = EpochSampler(dm.train_set, seed=dm.order_seed, **shard)
        order.set_epoch(epoch)
        return list(order)

    whole, plain = module(random_flip=True), module()
    flip = whole.train_set.flip
    uninterrupted = epoch_batches(whole, 1)
    # the batches are the epoch's examples, each mirrored where its coin says (some are)
    keys = sampler(whole, 1)[:16]
    assert all(isinstance(k, EpochIndex) and (k.epoch, k.seed) == (1, 3) for k in keys)
    expected = [plain.train_set[k.index][0].flip(-1) if flip.flips(k) else plain.train_set[k.index][0] for k in keys]
    assert torch.equal(uninterrupted[0], torch.stack(expected))
    assert 0 < sum(flip.flips(k) for k in keys) < 16
    resumed = epoch_batches(module(random_flip=True), 1, resume_batches=3)
    assert len(resumed) == len(uninterrupted) - 3
    assert all(torch.equal(a, b) for a, b in zip(resumed, uninterrupted[3:], strict=True))
    in_workers = epoch_batches(module(random_flip=True, num_workers=2), 1)
    assert all(torch.equal(a, b) for a, b in zip(in_workers, uninterrupted, strict=True))
    one = {k.index: whole.train_set[k][0] for k in sampler(whole, 1)}  # epoch 1, one process
    for rank in (0, 1):
        shard = sampler(whole, 1, num_replicas=2, rank=rank)
        assert all(torch.equal(whole.train_set[k][0], one[k.index]) for k in shard)
    assert isinstance(sampler(plain, 1)[0], int)  # no flips: plain indices


def test_the_fid_classifier_sees_other_flips_each_pass_and_its_cache_key_says_so(tmp_path: Path) -> None:
    """The feature classifier reads a flipping train split pass by pass (epoch keys), so an image is not shown in one
    fixed orientation; its cache key differs from the unflipped data's (and digits' key, without flips, is the one
    cached before)."""
    from diffusion_elbo.fid import PassKeyed, _dataset_key

    write_fake_cifar(tmp_path)
    plain, flipped = (
        CIFAR10DataModule(root=str(tmp_path), download=False, num_val=5, random_flip=flip, seed=0)
        for flip in (False, True)
    )
    for dm in (plain, flipped):
        dm.setup()
    assert _dataset_key(plain, 0) != _dataset_key(flipped, 0)
    reads = PassKeyed(flipped.train_set)
    first = [reads[i][0] for i in range(len(reads))]
    reads.epoch = 1
    second = [reads[i][0] for i in range(len(reads))]
    assert any(not torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert all(torch.equal(a, b) or torch.equal(a, b.flip(-1)) for a, b in zip(first, second, strict=True))
    assert _dataset_key(DigitsDataModule(seed=0), 0) == "digits-4988b2d41f4c"


# ------------------------------------------------------------------------------------------------ digits


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(seed=0, batch_size=16)
    dm.setup()
    return dm


def test_digits_splits_are_disjoint_and_add_to_1797(digits: DigitsDataModule) -> None:
    sizes = {k: len(digits.split(k)) for k in ("train", "val", "test")}
    assert sizes == {"train": 1437, "val": 180, "test": 180}
    rows = torch.cat([digits.indices[k] for k in ("train", "val", "test")])
    assert sorted(rows.tolist()) == list(range(1797))


def test_digits_same_seed_gives_same_split_and_other_seed_another(digits: DigitsDataModule) -> None:
    again, other = DigitsDataModule(seed=0), DigitsDataModule(seed=1)
    again.setup()
    other.setup()
    for split in ("train", "val", "test"):
        assert torch.equal(again.indices[split], digits.indices[split])
    assert not torch.equal(other.indices["val"], digits.indices["val"])
    assert torch.equal(stack_split(again, "val")[0], stack_split(digits, "val")[0])


def test_digits_values_lie_on_the_17_level_grid_with_labels(digits: DigitsDataModule) -> None:
    x, y = stack_split(digits, "test")
    assert x.shape == (180, 1, 8, 8)
    assert_on_grid(x, 17)
    assert x.min() == -1.0 and x.max() == 1.0
    assert y.dtype == torch.long and set(y.tolist()) == set(range(10))


def test_digits_batches_have_shape_b_1_8_8_and_int64_labels(digits: DigitsDataModule) -> None:
    x0, y = next(iter(digits.train_dataloader()))
    assert x0.shape == (16, 1, 8, 8) and x0.dtype == torch.float32
    assert y.shape == (16,) and y.dtype == torch.long and y.min() >= 0 and y.max() <= 9


def test_digits_num_bins_2_binarizes() -> None:
    dm = DigitsDataModule(num_bins=2)
    dm.setup()
    x, _ = stack_split(dm, "val")
    assert set(x.unique().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize(("kwargs", "message"), [({"image_size": 16}, "image_size 8"), ({"channels": 3}, "channels 1")])
def test_digits_rejects_wrong_image_format_saying_the_right_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DigitsDataModule(**kwargs)


# ------------------------------------------------------------------------------------------------- toy2d


@pytest.mark.parametrize("name", [t.value for t in Toy2D])
def test_toy2d_sets_are_standardised_reproducible_and_seed_dependent(name: str) -> None:
    def make(seed: int) -> Toy2DDataModule:
        dm = Toy2DDataModule(name=name, num_train=2000, num_val=50, num_test=60, seed=seed)
        dm.setup()
        return dm

    a, b, c = make(0), make(0), make(1)
    x = a.train_set.tensors[0]
    assert x.shape == (2000, 2) and len(a.val_set) == 50 and len(a.test_set) == 60
    assert a.num_bins is None and a.data_shape == (2,)
    assert torch.equal(x, b.train_set.tensors[0])
    assert not torch.allclose(x, c.train_set.tensors[0])
    assert x.mean(0).abs().max() < 0.5
    assert x.std(0).min() >= 0.3 and x.std(0).max() <= 3.0


def test_toy2d_bad_name_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="swiss_roll, moons, eight_gaussians, checkerboard, rings"):
        Toy2DDataModule(name="spiral")


def test_toy2d_rejects_dim_other_than_2() -> None:
    with pytest.raises(ValueError, match="dim 2"):
        Toy2DDataModule(dim=3)


# ------------------------------------------------------------------------------------------------- MNIST


def idx_bytes(array: np.ndarray) -> bytes:
    """An unsigned-byte IDX file: 0x0000 08 d, d big-endian int32 sizes, data."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fake_mnist(folder: Path, gz: bool, n_train: int = 20, n_test: int = 10) -> dict[str, np.ndarray]:
    rng = np.random.RandomState(0)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.randint(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte.gz": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte.gz": rng.randint(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte.gz": np.arange(n_test) % 10,
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        raw = idx_bytes(array)
        if gz:
            (folder / name).write_bytes(gzip.compress(raw))
        else:
            (folder / name.removesuffix(".gz")).write_bytes(raw)
    return arrays


@pytest.mark.parametrize(("gz", "layout"), [(True, "."), (False, "."), (True, "MNIST/raw")])
def test_mnist_reads_idx_files_onto_the_256_grid(tmp_path: Path, gz: bool, layout: str) -> None:
    arrays = write_fake_mnist(tmp_path / layout, gz=gz)
    dm = MNISTDataModule(root=str(tmp_path), download=False, num_val=4, seed=0)
    dm.prepare_data()
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (16, 4, 10)
    x, y = stack_split(dm, "test")
    assert x.shape == (10, 1, 28, 28)
    assert_on_grid(x, 256)
    expected = torch.from_numpy(arrays["t10k-images-idx3-ubyte.gz"]).float() * 2.0 / 255.0 - 1.0
    assert torch.allclose(x[:, 0], expected, atol=1e-6)
    assert y.tolist() == arrays["t10k-labels-idx1-ubyte.gz"].tolist()


def test_mnist_image_size_32_pads_with_background(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path, gz=True)
    dm = MNISTDataModule(root=str(tmp_path), download=False, num_val=4, image_size=32)
    assert dm.data_shape == (1, 32, 32)
    dm.setup()
    x, _ = dm.test_set[0]
    assert x.shape == (1, 32, 32)
    assert (x[:, :2] == -1).all() and (x[:, :, -2:] == -1).all()
    with pytest.raises(ValueError, match="image_size 28 or 32"):
        MNISTDataModule(root=str(tmp_path), image_size=64)


def test_mnist_missing_files_without_download_name_the_four_files_and_root(tmp_path: Path) -> None:
    dm = MNISTDataModule(root=str(tmp_path / "nowhere"), download=False)
    for step in (dm.prepare_data, dm.setup):
        with pytest.raises(FileNotFoundError) as info:
            step()
        assert str(tmp_path / "nowhere") in str(info.value)
        assert all(name in str(info.value) for name in MNIST_NAMES)


def test_mnist_failed_download_raises_file_not_found_at_once(tmp_path: Path, monkeypatch) -> None:
    calls = []

    def offline(url: str, path: Path, timeout_s: float = 10.0) -> None:
        calls.append(url)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(image_utils, "download_file", offline)
    dm = MNISTDataModule(root=str(tmp_path), download=True)
    with pytest.raises(FileNotFoundError) as info:
        dm.prepare_data()
    assert calls, "the downloader was never tried"
    assert str(tmp_path) in str(info.value) and all(name in str(info.value) for name in MNIST_NAMES)
    assert "no network" in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["truncate", "magic"])
def test_mnist_corrupt_idx_file_error_names_the_file(tmp_path: Path, damage: str) -> None:
    write_fake_mnist(tmp_path, gz=False)
    bad = tmp_path / "train-images-idx3-ubyte"
    raw = bad.read_bytes()
    bad.write_bytes(raw[:-100] if damage == "truncate" else b"\x12\x34" + raw[2:])
    dm = MNISTDataModule(root=str(tmp_path), download=False, num_val=4)
    with pytest.raises(ValueError, match="train-images-idx3-ubyte"):
        dm.setup()


def test_mnist_truncated_gzip_error_names_the_file(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path, gz=True)
    bad = tmp_path / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:15])
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz"):
        MNISTDataModule(root=str(tmp_path), download=False, num_val=4).setup()


# ---------------------------------------------------------------------------------------------- CIFAR-10


def write_fake_cifar(root: Path, per_batch: int = 10, archive: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.RandomState(1)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    data = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data[name] = rng.randint(0, 256, (per_batch, 3072)).astype(np.uint8)
        batch = {b"data": data[name], b"labels": [i % 10 for i in range(per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    if archive:
        with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
            tar.add(folder, arcname="cifar-10-batches-py")
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()
    return data


def test_cifar10_reads_batches_as_rgb_planes_on_the_256_grid(tmp_path: Path) -> None:
    data = write_fake_cifar(tmp_path)
    dm = CIFAR10DataModule(root=str(tmp_path), download=False, num_val=5, random_flip=False)
    dm.prepare_data()
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (45, 5, 10)
    x, y = stack_split(dm, "test")
    assert x.shape == (10, 3, 32, 32)
    assert_on_grid(x, 256)
    red_plane = torch.from_numpy(data["test_batch"][0, :1024].reshape(32, 32)).float() * 2 / 255 - 1
    assert torch.allclose(x[0, 0], red_plane, atol=1e-6)
    assert y.tolist() == [i % 10 for i in range(10)]


@pytest.mark.parametrize("prepare", [True, False])
def test_cifar10_reads_the_tar_gz_archive(tmp_path: Path, prepare: bool) -> None:
    write_fake_cifar(tmp_path, archive=True)
    dm = CIFAR10DataModule(root=str(tmp_path), download=False, num_val=5)
    if prepare:
        dm.prepare_data()  # extracts
        assert (tmp_path / "cifar-10-batches-py" / "test_batch").is_file()
    dm.setup()  # without prepare_data: read straight from the archive
    assert len(dm.test_set) == 10 and dm.test_set[0][0].shape == (3, 32, 32)


def test_cifar10_random_flip_mirrors_training_images_reproducibly(tmp_path: Path) -> None:
    write_fake_cifar(tmp_path)
    plain, flipped, again = (
        CIFAR10DataModule(root=str(tmp_path), download=False, num_val=5, random_flip=flip, seed=0)
        for flip in (False, True, True)
    )
    for dm in (plain, flipped, again):
        dm.setup()
    n_flipped = 0
    for i in range(len(plain.train_set)):
        x, _ = plain.train_set[i]
        x_aug, _ = flipped.train_set[i]
        assert torch.equal(x_aug, x) or torch.equal(x_aug, x.flip(-1))
        n_flipped += int(torch.equal(x_aug, x.flip(-1)))
        assert torch.equal(again.train_set[i][0], x_aug)
    assert 0 < n_flipped < len(plain.train_set)
    assert torch.equal(flipped.val_set[0][0], plain.val_set[0][0])  # evaluation data is never flipped


def test_cifar10_missing_files_error_says_what_to_put_where(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(image_utils, "download_file", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    for download in (False, True):
        dm = CIFAR10DataModule(root=str(tmp_path), download=download)
        with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz") as info:
            dm.prepare_data()
        assert str(tmp_path) in str(info.value)
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        CIFAR10DataModule(root=str(tmp_path), download=False).setup()


def test_cifar10_corrupt_batch_error_names_the_file(tmp_path: Path) -> None:
    write_fake_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="data_batch_3"):
        CIFAR10DataModule(root=str(tmp_path), download=False, num_val=5).setup()


# ------------------------------------------------------------------------------------------ image folder


def write_images(root: Path) -> None:
    (root / "sub" / "deeper").mkdir(parents=True)
    Image.new("RGB", (40, 20), (10, 200, 30)).save(root / "wide_rgb.png")
    Image.new("L", (16, 30), 77).save(root / "sub" / "tall_grey.PNG")
    Image.new("RGBA", (24, 24), (250, 5, 128, 90)).save(root / "sub" / "deeper" / "alpha.png")
    # 48x16: a white 16x16 square in the middle, black sides that the center crop must cut off
    wide = np.zeros((16, 48, 3), dtype=np.uint8)
    wide[:, 16:32] = 255
    Image.fromarray(wide).save(root / "sub" / "center.bmp")
    Image.new("RGB", (12, 12), (0, 0, 255)).save(root / "blue.jpg", quality=100)
    (root / "notes.txt").write_text("not an image")


def folder_module(root: Path, **kwargs) -> ImageFolderDataModule:
    defaults = {"channels": 3, "image_size": 8, "val_fraction": 0.2, "test_fraction": 0.2, "random_flip": False}
    dm = ImageFolderDataModule(root=str(root), **{**defaults, **kwargs})
    dm.setup()
    return dm


def all_items(dm: ImageFolderDataModule) -> dict[str, torch.Tensor]:
    items = {}
    for split in ("train", "val", "test"):
        dataset = dm.split(split)
        for i, path in enumerate(dataset.paths):
            items[path.name] = dataset[i][0]
    return items


def test_image_folder_finds_images_recursively_and_splits_them(tmp_path: Path) -> None:
    write_images(tmp_path)
    dm = folder_module(tmp_path)
    names = [p.name for split in ("train", "val", "test") for p in dm.split(split).paths]
    assert sorted(names) == sorted(["wide_rgb.png", "tall_grey.PNG", "alpha.png", "center.bmp", "blue.jpg"])
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (3, 1, 1)
    again = folder_module(tmp_path)
    assert again.val_set.paths == dm.val_set.paths


def test_image_folder_resizes_crops_and_converts_onto_the_256_grid(tmp_path: Path) -> None:
    write_images(tmp_path)
    items = all_items(folder_module(tmp_path))
    for x in items.values():
        assert x.shape == (3, 8, 8)
        assert_on_grid(x, 256)
    unit = torch.tensor([10, 200, 30]).float() * 2 / 255 - 1
    assert torch.allclose(items["wide_rgb.png"], unit.view(3, 1, 1).expand(3, 8, 8))
    grey = items["tall_grey.PNG"]  # L -> RGB copies the grey level into all three channels
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    assert torch.allclose(grey, torch.tensor(77 * 2 / 255 - 1))
    assert torch.allclose(items["alpha.png"][:, 0, 0], torch.tensor([250, 5, 128]).float() * 2 / 255 - 1)
    assert items["center.bmp"].mean() > 0.8  # the black sides were cropped away


def test_image_folder_one_channel_converts_to_grey(tmp_path: Path) -> None:
    write_images(tmp_path)
    dm = folder_module(tmp_path, channels=1, image_size=5)
    assert dm.data_shape == (1, 5, 5)
    for x in all_items(dm).values():
        assert x.shape == (1, 5, 5)
        assert_on_grid(x, 256)


def test_image_folder_missing_or_empty_folder_errors_name_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        folder_module(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError) as info:
        folder_module(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(info.value) and ".png" in str(info.value) and ".webp" in str(info.value)


def test_image_folder_corrupt_png_error_names_the_file(tmp_path: Path) -> None:
    write_images(tmp_path)
    (tmp_path / "sub" / "broken.png").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="broken.png"):
        folder_module(tmp_path)


def test_image_folder_truncated_png_fails_when_read_naming_the_file(tmp_path: Path) -> None:
    write_images(tmp_path)
    noise = np.random.RandomState(0).randint(0, 256, (64, 64, 3)).astype(np.uint8)
    Image.fromarray(noise).save(tmp_path / "cut.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:2000])
    dm = folder_module(tmp_path)
    with pytest.raises(ValueError, match="cut.png"):
        all_items(dm)


# --------------------------------------------------------------------------------------- all the modules


def every_module(tmp_path: Path) -> list[DiffusionDataModule]:
    return [
        DigitsDataModule(),
        Toy2DDataModule(),
        GaussianDataModule(dim=3),
        MNISTDataModule(root=str(tmp_path)),
        CIFAR10DataModule(root=str(tmp_path)),
        ImageFolderDataModule(root=str(tmp_path), channels=1, image_size=12),
    ]


def test_data_shape_and_num_bins_are_known_before_setup(tmp_path: Path) -> None:
    shapes = [(dm.data_shape, dm.num_bins, dm.train_set) for dm in every_module(tmp_path)]
    assert shapes == [
        ((1, 8, 8), 17, None),
        ((2,), None, None),
        ((3,), None, None),
        ((1, 28, 28), 256, None),
        ((3, 32, 32), 256, None),
        ((1, 12, 12), 256, None),
    ]


def constructor_parameters(cls) -> dict[str, inspect.Parameter]:
    """Every argument ``cls(...)`` takes: its own, and those it forwards through ``**options`` to its bases."""
    params: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        own = inspect.signature(klass.__init__).parameters
        for name, param in own.items():
            if name != "self" and param.kind is not inspect.Parameter.VAR_KEYWORD:
                params.setdefault(name, param)
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in own.values()):
            break
    return params


@pytest.mark.parametrize("name", ["digits", "toy2d", "gaussian", "mnist", "cifar10", "image_folder"])
def test_yaml_lists_every_constructor_argument_with_its_default(name: str, tmp_path: Path) -> None:
    # data roots interpolate ${paths.data_dir} (conf/paths/default.yaml: data) from the composed config
    root_cfg = OmegaConf.create({"paths": {"data_dir": "data"}, "data": OmegaConf.load(CONF_DATA / f"{name}.yaml")})
    cfg = root_cfg.data
    cls = hydra.utils.get_class(cfg._target_)
    params = constructor_parameters(cls)
    keys = set(cfg.keys()) - {"_target_"}
    assert keys == set(params) - {"self"}
    for key in keys:
        if params[key].default is inspect.Parameter.empty:
            assert OmegaConf.is_missing(cfg, key)  # required: root: ???
        else:
            assert cfg[key] == params[key].default, key
    if name in ("toy2d", "gaussian"):
        assert "dim" in keys
    else:
        assert {"channels", "image_size"} <= keys
    if "root" in keys and OmegaConf.is_missing(cfg, "root"):
        cfg.root = str(tmp_path)
    dm = hydra.utils.instantiate(cfg)
    assert isinstance(dm, cls)
    if "channels" in keys:
        assert dm.data_shape == (cfg.channels, cfg.image_size, cfg.image_size)
    else:
        assert dm.data_shape == (cfg.dim,)
