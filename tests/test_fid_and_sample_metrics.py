"""Classifier FID (identical ~ 0, shifted > 0, same on 1 and 2 DDP ranks), Inception FID where available,
and the 2-D sample metrics."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from diffusion_elbo.data import DigitsDataModule
from diffusion_elbo.fid import load_or_train_classifier, make_fid, split_fid, train_classifier
from diffusion_elbo.sample_metrics import energy_distance_with_se, sliced_wasserstein_with_se

STEPS = 300  # a quick classifier for the property tests; the default (3000 steps) is checked below


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fid_cache")


@pytest.fixture(scope="module")
def digits():
    dm = DigitsDataModule()
    dm.setup("fit")
    dm.setup("test")
    return dm


def train_images(dm) -> torch.Tensor:
    return torch.stack([dm.train_set[i][0] for i in range(len(dm.train_set))])


def test_identical_sets_give_near_zero_and_shifted_sets_more(cache_dir, digits):
    fid = make_fid(digits, cache_dir=cache_dir, classifier_steps=STEPS)
    x = train_images(digits)
    fid.update(x)
    same = fid.compute()
    fid.reset_fake()
    fid.update((x + 0.5).clamp(-1, 1))
    shifted = fid.compute()
    assert abs(same) < 1e-3
    assert shifted > 1.0 and shifted > 1000 * abs(same)


def test_the_train_test_floor_is_symmetric_and_a_split_against_itself_is_zero(tmp_path, digits):
    # the real-data floor of issue 33: the train split against the test split's statistics. The Frechet distance is
    # symmetric, so it equals the test split against the train split's, each reference from its own cache file
    against_test = make_fid(digits, cache_dir=tmp_path, classifier_steps=STEPS, reference_split="test")
    against_train = make_fid(digits, cache_dir=tmp_path, classifier_steps=STEPS)
    floor = split_fid(against_test, digits, "train")
    assert floor > 0.05  # 180 test digits are not the 1,437 training digits
    assert split_fid(against_train, digits, "test") == pytest.approx(floor, rel=1e-3)
    assert abs(split_fid(against_test, digits, "test")) < 1e-3
    assert sorted(p.name.endswith("-test.pt") for p in tmp_path.glob("reference-*")) == [False, True]


def test_reference_statistics_and_classifier_are_cached(cache_dir, digits):
    make_fid(digits, cache_dir=cache_dir, classifier_steps=STEPS)
    # loading from the cache leaves the caller's RNG alone, as training the classifier does: a training run's losses
    # must not depend on whether its FID callback is on (loading built a randomly initialised classifier first)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    make_fid(digits, cache_dir=cache_dir, classifier_steps=STEPS)
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)
    names = sorted(p.name.split("-")[0] for p in cache_dir.iterdir())
    assert names == ["classifier", "reference"]
    again = load_or_train_classifier(digits, cache_dir, steps=STEPS)  # loads, does not retrain
    assert again.path.parent == cache_dir and 0 <= again.test_accuracy <= 1


def test_classifier_weights_depend_on_its_seed_only_not_the_callers_rng_or_threads(digits):
    """The cached classifier is what every FID is measured with, so its weights must be a function of its seed alone:
    not of the caller's RNG state (the head's dropout drew from it) or the CPU thread count (float sums). The caller's
    RNG state and thread count come back unchanged."""
    threads = torch.get_num_threads()

    def weights(caller_seed: int, num_threads: int, seed: int = 0) -> list[torch.Tensor]:
        torch.manual_seed(caller_seed)
        torch.set_num_threads(num_threads)
        state = torch.get_rng_state()
        model, _ = train_classifier(digits, seed=seed, steps=40)
        assert torch.equal(torch.get_rng_state(), state) and torch.get_num_threads() == num_threads
        return [t.detach().clone() for t in model.state_dict().values()]

    try:
        reference = weights(caller_seed=0, num_threads=1)
        for other in (weights(caller_seed=123, num_threads=1), weights(caller_seed=7, num_threads=2)):
            assert all(torch.equal(a, b) for a, b in zip(reference, other, strict=True))
        assert not all(torch.equal(a, b) for a, b in zip(reference, weights(0, 1, seed=1), strict=True))
    finally:
        torch.set_num_threads(threads)


def _worker(rank: int, init_file: str, cache_dir: str, fake: torch.Tensor, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    fid = make_fid(DigitsDataModule(), cache_dir=cache_dir, classifier_steps=STEPS, rank=rank)
    fid.update(fake[:500] if rank == 0 else fake[500:])  # uneven shards
    value = fid.compute()
    if rank == 0:
        torch.save(value, out)
    dist.barrier()  # every rank done before any tears gloo down
    dist.destroy_process_group()


def test_same_samples_on_one_and_two_ranks_give_the_same_fid(cache_dir, digits, tmp_path):
    fid = make_fid(digits, cache_dir=cache_dir, classifier_steps=STEPS)
    # more samples than the 128 features, so the covariance (and its square root) is well conditioned
    x = train_images(digits)
    fake = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    fid.update(fake)
    single = fid.compute()
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(cache_dir), fake, str(tmp_path / "out.pt")), nprocs=2)
    assert torch.load(tmp_path / "out.pt") == pytest.approx(single, rel=1e-5)


@pytest.mark.slow
def test_default_digits_classifier_is_accurate(tmp_path, digits):
    trained = load_or_train_classifier(digits, tmp_path)
    assert trained.test_accuracy > 0.97


@pytest.mark.skipif(
    importlib.util.find_spec("torch_fidelity") is None,
    reason="torch-fidelity not installed (GPU extra: pip install .[fid])",
)
def test_inception_fid_builds_from_a_weights_file(tmp_path):
    from diffusion_elbo.fid import inception_fid_metric

    with pytest.raises(FileNotFoundError, match="fid.weights_path"):
        inception_fid_metric(str(tmp_path / "missing.pth"))


def test_inception_fid_without_torch_fidelity_says_how_to_install(monkeypatch):
    import builtins

    from diffusion_elbo.fid import inception_fid_metric

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "torch_fidelity":
            raise ImportError("No module named 'torch_fidelity'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"pip install \.\[fid\]"):
        inception_fid_metric()


def test_two_d_metrics_are_near_zero_for_the_same_law_and_grow_with_a_shift():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2000, 2, generator=g), torch.randn(2000, 2, generator=g)
    ed_same, ed_se = energy_distance_with_se(a, b)
    ed_shift, _ = energy_distance_with_se(a, b + 1.0)
    sw_same, sw_se = sliced_wasserstein_with_se(a, b, generator=g)
    sw_shift, _ = sliced_wasserstein_with_se(a, b + 1.0, generator=g)
    assert ed_se > 0 and sw_se > 0
    assert abs(ed_same) < 4 * ed_se + 0.02 and ed_shift > 10 * abs(ed_same) + 0.2
    assert sw_same < 0.05 and sw_shift == pytest.approx(1.0, abs=0.1)  # E[(u.s)^2] = |s|^2 / D = 1 for s = (1, 1)


def test_energy_distance_is_unbiased_for_equal_laws():
    g = torch.Generator().manual_seed(1)
    values = torch.tensor(
        [
            energy_distance_with_se(torch.randn(400, 2, generator=g), torch.randn(400, 2, generator=g))[0]
            for _ in range(20)
        ]
    )
    assert abs(values.mean()) < 3 * values.std() / 20**0.5  # centred on zero, not biased upwards


def test_fid_sample_set_is_the_same_on_1_2_and_3_processes(tmp_path):
    """Every FID sample starts from its own x_T (its index's seed), so the ranks' shares of a DDIM (eta = 0) sample
    set together are the single-process set, sample for sample."""
    from diffusion_elbo.builders import build_module
    from diffusion_elbo.core.samplers import DDIMSampler
    from diffusion_elbo.fid import fid_samples
    from tests.helpers import compose_train

    torch.manual_seed(0)
    module, _ = build_module(compose_train(tmp_path, ["model.model_channels=16", "schedule.timesteps=50"]))
    with torch.no_grad():
        for p in module.net.conv_out.parameters():  # a network whose output is not zero, so samples differ
            p.normal_(0, 0.05)
    options = {"sampler": DDIMSampler(steps=5), "batch_size": 3, "seed": 7}
    sets = {}
    for world in (1, 2, 3):
        found = {}
        for rank in range(world):
            for indices, samples in fid_samples(module, 10, rank, world, **options):
                found.update({int(i): s for i, s in zip(indices, samples, strict=True)})
        assert sorted(found) == list(range(10))
        sets[world] = torch.stack([found[i] for i in range(10)])
    # equal up to float32 rounding of differently composed batches
    torch.testing.assert_close(sets[2], sets[1], rtol=0, atol=1e-4)
    torch.testing.assert_close(sets[3], sets[1], rtol=0, atol=1e-4)
    assert (sets[1][0] - sets[1][1]).abs().max() > 1e-3  # different samples, not one repeated
    other = torch.cat([s for _, s in fid_samples(module, 10, 0, 1, **{**options, "seed": 8})])
    assert (other - sets[1]).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # another seed: other x_T for every sample
