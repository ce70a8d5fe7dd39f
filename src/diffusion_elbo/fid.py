"""FID with torchmetrics' FrechetInceptionDistance, on two kinds of features:

- ``classifier``: the penultimate layer of a small CNN trained by the project on the dataset's training
  split (the usual practice for digits and MNIST; works offline). It is trained once with a fixed seed (its
  dropout masks included, and on CPU with one thread, so the same torch build gives the same weights on any CPU
  machine), cached on disk with its test accuracy, and that accuracy is reported wherever its FID is.
- ``inception``: the standard Inception-v3 pool features via torch-fidelity (``pip install .[fid]``, needs
  torchvision: GPU machines only). Weights come from ``weights_path`` when given, else the library's download.

Reference statistics of the real data (the metric's sum states) are computed once and cached next to the
classifier. The metric's states are sums reduced across DDP ranks, so samples can be split over ranks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from diffusion_elbo.core.samplers import Sampler
from diffusion_elbo.data.base import DiffusionDataModule, EpochIndex
from diffusion_elbo.models.classifier import FeatureClassifier

log = logging.getLogger(__name__)

CLASSIFIER_VERSION = 3  # bump when the architecture or its training changes: invalidates caches


@dataclass
class TrainedClassifier:
    model: FeatureClassifier
    test_accuracy: float
    path: Path


def _dataset_key(datamodule: DiffusionDataModule, seed: int, steps: int = 3000) -> str:
    """A cache key for the dataset and its split: class name, shape, levels, sizes, split seed."""
    datamodule.setup("fit")
    datamodule.setup("test")
    parts = {
        "data": type(datamodule).__name__,
        "shape": list(datamodule.data_shape),
        "num_bins": datamodule.num_bins,
        "sizes": [len(datamodule.split(s)) for s in ("train", "val", "test")],
        "split_seed": getattr(datamodule, "seed", None),
        "classifier_seed": seed,
        "classifier_steps": steps,
        "version": CLASSIFIER_VERSION,
    }
    if getattr(datamodule.split("train"), "epoch_keyed", False):  # flipped data, other flips each pass (2026-12-06)
        parts["flips"] = "per pass"
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]
    return f"{parts['data'].removesuffix('DataModule').lower()}-{digest}"


class PassKeyed(Dataset):
    """A training split with random flips read as epoch ``epoch`` of training reads it
    (:class:`~diffusion_elbo.data.base.EpochIndex` keys), so that the classifier sees other flips on each pass (a plain
    index reads one fixed flip of each image)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset, self.epoch = dataset, 0

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        return self.dataset[EpochIndex(int(index), self.epoch)]


def _labels(dataset) -> Tensor:
    loader = DataLoader(dataset, batch_size=1024)
    return torch.cat([y for _, y in loader])


@torch.no_grad()
def accuracy(model: nn.Module, dataset, device: torch.device, batch_size: int = 512) -> float:
    model.eval()
    correct = total = 0
    for x, y in DataLoader(dataset, batch_size=batch_size):
        correct += int((model(x.to(device)).argmax(1) == y.to(device)).sum())
        total += y.numel()
    return correct / max(total, 1)


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device):
    """On CPU, one intra-op thread for the block: float sums then do not depend on the machine's thread count, so the
    classifier (and every FID computed with it) is bit-identical across CPU machines with the same torch build."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_classifier(
    datamodule: DiffusionDataModule,
    *,
    seed: int = 0,
    steps: int = 3000,
    batch_size: int = 64,
    lr: float = 1e-3,
    device: torch.device | str = "cpu",
) -> tuple[FeatureClassifier, float]:
    """Train the feature classifier on the train split (Adam with cosine decay over ``steps``, fixed seed);
    returns it and its test accuracy. 3000 steps: ~136 epochs of digits (99% test accuracy), 3 of MNIST."""
    device = torch.device(device)
    datamodule.setup("fit")
    datamodule.setup("test")
    # The whole run under its own seed: the initial weights, the head's dropout masks (which otherwise drew from the
    # caller's RNG, so the cached classifier depended on what ran before it) and the loaders' base seeds; the caller's
    # RNG state is restored after
    forked = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked), _one_cpu_thread(device):
        torch.manual_seed(seed)
        train_set = datamodule.split("train")
        labels = _labels(train_set)
        if (labels < 0).any():
            raise ValueError(
                f"{type(datamodule).__name__} has no class labels, so fid.features=classifier cannot be trained on "
                "it; use fid.features=inception for images, or the 2-D sample metrics for toy data"
            )
        model = FeatureClassifier(datamodule.data_shape[0], int(labels.max()) + 1).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        generator = torch.Generator().manual_seed(seed)
        reads = PassKeyed(train_set) if getattr(train_set, "epoch_keyed", False) else train_set
        loader = DataLoader(reads, batch_size=batch_size, shuffle=True, generator=generator, drop_last=True)
        step = passes = 0
        model.train()
        while step < steps:
            if isinstance(reads, PassKeyed):  # random flips: each pass its own
                reads.epoch = passes
            passes += 1
            for x, y in loader:
                loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                step += 1
                if step == steps:
                    break
        return model.eval(), accuracy(model, datamodule.split("test"), device)


def load_or_train_classifier(
    datamodule: DiffusionDataModule,
    cache_dir: str | Path,
    *,
    seed: int = 0,
    steps: int = 3000,
    device: torch.device | str = "cpu",
) -> TrainedClassifier:
    """The cached classifier for this dataset and split, trained and saved (atomically) the first time."""
    path = Path(cache_dir) / f"classifier-{_dataset_key(datamodule, seed, steps)}.pt"
    if path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = FeatureClassifier(state["in_channels"], state["num_classes"])
        model.load_state_dict(state["state_dict"])
        return TrainedClassifier(model.to(device).eval(), float(state["test_accuracy"]), path)
    log.info("training the FID feature classifier for %s (cached at %s)", type(datamodule).__name__, path)
    model, acc = train_classifier(datamodule, seed=seed, steps=steps, device=device)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(
        {
            "state_dict": model.state_dict(),
            "in_channels": model.in_channels,
            "num_classes": model.num_classes,
            "test_accuracy": acc,
        },
        tmp,
    )
    tmp.replace(path)
    log.info("feature classifier test accuracy: %.4f", acc)
    return TrainedClassifier(model, acc, path)


class ClassifierFeatures(nn.Module):
    """torchmetrics feature extractor: images in [0, 1] (``normalize=True``) -> penultimate features."""

    def __init__(self, classifier: FeatureClassifier) -> None:
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.num_features

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier.features(images.float() * 2.0 - 1.0)


def inception_fid_metric(weights_path: str | None = None):
    """The standard Inception-v3 FID (2048 features) through torch-fidelity; a clear error where it is missing."""
    try:
        import torch_fidelity  # noqa: F401
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError as exc:
        raise ImportError(
            "fid.features=inception needs torch-fidelity and torchvision: `pip install .[fid]` on a GPU machine "
            "(they do not install with the CPU torch build). Use fid.features=classifier instead here."
        ) from exc
    if weights_path is not None and not Path(weights_path).is_file():
        raise FileNotFoundError(
            f"fid.weights_path={weights_path} does not exist: download pt_inception-2015-12-05-6726825d.pth "
            "(torch-fidelity's Inception weights) on a machine with internet and copy it there"
        )
    try:
        return FrechetInceptionDistance(
            feature=2048, normalize=True, reset_real_features=False, feature_extractor_weights_path=weights_path
        )
    except Exception as exc:  # a failed download surfaces here
        raise RuntimeError(
            f"could not load the Inception weights ({exc}); without internet, download "
            "pt_inception-2015-12-05-6726825d.pth elsewhere and pass fid.weights_path=/path/to/it"
        ) from exc


def classifier_fid_metric(classifier: FeatureClassifier, data_shape: tuple[int, ...]):
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(
        feature=ClassifierFeatures(classifier),
        normalize=True,
        reset_real_features=False,
        input_img_size=tuple(data_shape),
    )


def to_unit(x: Tensor) -> Tensor:
    """Images in [-1, 1] -> [0, 1], what the metric takes with ``normalize=True``; 1-channel -> 3 for Inception."""
    return ((x.clamp(-1, 1) + 1) / 2).float()


REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


@dataclass
class FIDSetup:
    """The metric, which features it uses, and the classifier's test accuracy (reported with its FID)."""

    metric: object
    features: str
    classifier_accuracy: float | None

    def update(self, images: Tensor, real: bool = False) -> None:
        """Add images in [-1, 1], (B, C, H, W), as real or generated."""
        x = to_unit(images.to(self.metric.device))
        if self.features == "inception" and x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)  # Inception takes RGB
        self.metric.update(x, real=real)

    def compute(self) -> float:
        return float(self.metric.compute())

    def reset_fake(self) -> None:
        self.metric.reset()  # reset_real_features=False keeps the reference statistics


def load_or_compute_reference(
    fid: FIDSetup, datamodule: DiffusionDataModule, *, cache_path: Path, split: str = "train", batch_size: int = 512
) -> None:
    """Fill the metric's real-data states from ``cache_path``, computing them from ``split`` the first time."""
    metric = fid.metric
    if cache_path.is_file():
        states = torch.load(cache_path, map_location=metric.device, weights_only=True)
        for name in REAL_STATES:
            getattr(metric, name).copy_(states[name])
        return
    datamodule.setup("fit")
    datamodule.setup("test")
    for x, _ in DataLoader(datamodule.split(split), batch_size=batch_size):
        fid.update(x, real=True)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_path.with_name(f".{cache_path.name}.tmp-{os.getpid()}")
    torch.save({name: getattr(metric, name).detach().cpu() for name in REAL_STATES}, tmp)
    tmp.replace(cache_path)


def make_fid(
    datamodule: DiffusionDataModule,
    *,
    features: str = "classifier",
    cache_dir: str | Path,
    weights_path: str | None = None,
    seed: int = 0,
    classifier_steps: int = 3000,
    device: torch.device | str = "cpu",
    rank: int = 0,
    reference_split: str = "train",
) -> FIDSetup:
    """An FID metric with the real-data statistics of ``reference_split`` (the train split by default) already in it.

    Under DDP pass the global ``rank``: the metric sums its states over ranks when it computes, so only
    rank 0 keeps the reference statistics (each rank holding them would count the real data N times).

    The caller's RNG state comes back unchanged (loading a cached classifier builds a randomly initialised one
    first), so turning FID on or off in a training run does not change its losses."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if features == "classifier":
            trained = load_or_train_classifier(datamodule, cache_dir, seed=seed, steps=classifier_steps, device=device)
            metric = classifier_fid_metric(trained.model, datamodule.data_shape).to(device)
            reference = trained.path.with_name(trained.path.stem.replace("classifier-", "reference-") + ".pt")
            if reference_split != "train":  # (the train split's file keeps its name: existing caches stay valid)
                reference = reference.with_name(f"{reference.stem}-{reference_split}.pt")
            accuracy_value = trained.test_accuracy
        elif features == "inception":
            metric = inception_fid_metric(weights_path).to(device)
            suffix = "" if reference_split == "train" else f"-{reference_split}"
            reference = Path(cache_dir) / f"reference-inception-{_dataset_key(datamodule, 0)}{suffix}.pt"
            accuracy_value = None
        else:
            raise ValueError(f"fid.features={features!r} is not an option; choose classifier or inception")
        fid = FIDSetup(metric=metric, features=features, classifier_accuracy=accuracy_value)
        load_or_compute_reference(fid, datamodule, cache_path=reference, split=reference_split)
        if rank != 0:
            for name in REAL_STATES:
                getattr(metric, name).zero_()
        return fid


def split_fid(fid: FIDSetup, datamodule: DiffusionDataModule, split: str, batch_size: int = 512) -> float:
    """The FID of a data split's own images against the metric's reference: the real-data floor. With the test split as
    the reference and the train split here, it is what a model's samples (as many as the train split has, against the
    same reference) would score if they were fresh draws as good as the training digits themselves. One process: the
    whole split goes into this metric (under DDP call it on rank 0 with a metric built for rank 0)."""
    datamodule.setup("fit")
    datamodule.setup("test")
    fid.reset_fake()
    for x, _ in DataLoader(datamodule.split(split), batch_size=batch_size):
        fid.update(x)
    return fid.compute()


def compute_fid(
    module,
    fid,
    *,
    num_samples: int,
    rank: int,
    world_size: int,
    sampler: Sampler,
    batch_size: int,
    seed: int,
    progress=None,
    variance: Tensor | str | None = None,
) -> float:
    """Sample this rank's share of ``num_samples`` with ``sampler`` into the metric and return the gathered FID;
    ``variance`` overrides the module's reverse variance (:meth:`DiffusionModule.sample`)."""
    fid.reset_fake()
    for _, samples in fid_samples(
        module, num_samples, rank, world_size, sampler=sampler, batch_size=batch_size, seed=seed, progress=progress,
        variance=variance,
    ):  # fmt: skip
        fid.update(samples)
    return fid.compute()


def fid_samples(
    module,
    num_samples: int,
    rank: int,
    world_size: int,
    *,
    sampler: Sampler,
    batch_size: int,
    seed: int,
    **sample_options,
) -> Iterator[tuple[Tensor, Tensor]]:
    """This rank's share of the FID sample set, in batches (indices (n,), samples (n, *D)): samples rank, rank + W,
    ..., each starting from its own x_T (:func:`~diffusion_elbo.core.elbo.example_generator` of its index), so under
    DDIM with eta = 0 (the default) the set of samples is the same on any number of processes. Stochastic samplers
    draw their later noise from a generator of seed + rank."""
    from diffusion_elbo.core.elbo import example_generator

    indices = torch.arange(rank, num_samples, world_size)
    generator = torch.Generator(device=module.device).manual_seed(seed + 100_003 * rank)
    shape = tuple(module.data_shape)
    for start in range(0, indices.numel(), batch_size):
        chunk = indices[start : start + batch_size]
        x_T = torch.stack([torch.randn(shape, generator=example_generator(seed, int(i))) for i in chunk])
        samples = module.sample(
            chunk.numel(), sampler, generator=generator, x_T=x_T.to(module.device), **sample_options
        )
        yield chunk, samples
