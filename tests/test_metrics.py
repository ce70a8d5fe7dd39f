"""The validation ELBO metric reduces sum states across DDP ranks: uneven shards give the global value."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from diffusion_elbo.core import ELBOResult, make_schedule
from diffusion_elbo.core.elbo import num_stratified_timesteps, stratified_elbo, stratified_timesteps
from diffusion_elbo.core.gaussian_data import oracle_expected_terms, oracle_posterior_variance
from diffusion_elbo.lightning.metrics import ELBOMetric, ProfileMetric, rate_distortion
from diffusion_elbo.models import GaussianOracle

NUM_DIMS = 4
MEAN, STD, DIM = 0.5, 0.8, 16


def make_result(total: torch.Tensor) -> ELBOResult:
    n = total.numel()
    return ELBOResult(
        reconstruction=0.1 * total, prior=0.2 * total, denoising=0.7 * total, per_t=torch.zeros(n, 1), num_dims=NUM_DIMS
    )


VALUES = torch.tensor([1.0, 2.0, 3.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0, 16.0], dtype=torch.float64)
SPLIT = 3  # rank 0 gets 3 examples, rank 1 gets 7: a mean of means would be wrong


def _worker(rank: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    metric = ELBOMetric(NUM_DIMS)
    shard = VALUES[:SPLIT] if rank == 0 else VALUES[SPLIT:]
    metric.update(make_result(shard))
    result = {k: float(v) for k, v in metric.compute().items()}
    if rank == 0:
        torch.save(result, out_file)
    dist.destroy_process_group()


def test_single_process_values_are_mean_and_standard_error_in_bits_per_dim():
    metric = ELBOMetric(NUM_DIMS)
    metric.update(make_result(VALUES[:SPLIT]))
    metric.update(make_result(VALUES[SPLIT:]))
    out = metric.compute()
    to_bpd = 1 / (NUM_DIMS * math.log(2))
    assert out["elbo_bpd"].item() == pytest.approx(VALUES.mean().item() * to_bpd)
    assert out["elbo_bpd_se"].item() == pytest.approx(VALUES.std().item() / math.sqrt(10) * to_bpd)
    assert out["prior_bpd_se"].item() == pytest.approx(0.2 * VALUES.std().item() / math.sqrt(10) * to_bpd)


def test_two_rank_reduction_equals_the_single_process_value(tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out_file = str(tmp_path / "result.pt")
    mp.spawn(_worker, args=(str(tmp_path / "init"), out_file), nprocs=2, join=True)
    ddp = torch.load(out_file)
    single = ELBOMetric(NUM_DIMS)
    single.update(make_result(VALUES))
    for key, value in single.compute().items():
        assert ddp[key] == pytest.approx(value.item(), rel=1e-12)
    mean_of_means = (VALUES[:SPLIT].mean() + VALUES[SPLIT:].mean()) / 2 / (NUM_DIMS * math.log(2))
    assert ddp["elbo_bpd"] != pytest.approx(mean_of_means.item(), rel=1e-3)


def _oracle_validation(seed: int, name: str = "linear", T: int = 1000, strata: int = 32, n: int = 256, shared=False):
    """One validation pass of the stratified ELBO on Gaussian data with the Bayes-optimal denoiser, reduced by the
    metric the module logs: (val/elbo_bpd, val/elbo_bpd_se, the closed-form expected value)."""
    g = torch.Generator().manual_seed(seed)
    s = make_schedule(name, T)
    x0 = MEAN + STD * torch.randn(n, DIM, generator=g, dtype=torch.float64)
    timesteps = stratified_timesteps(T, strata, g) if shared else None
    r = stratified_elbo(
        GaussianOracle(s, MEAN, STD), s, x0, parametrization="eps", strata=strata, generator=g, timesteps=timesteps
    )
    metric = ELBOMetric(DIM)
    metric.update(r)
    out = metric.compute()
    return (
        float(out["elbo_bpd"]),
        float(out["elbo_bpd_se"]),
        oracle_expected_terms(s, MEAN, std=STD).total / math.log(2),
    )


def test_validation_standard_error_covers_the_stratification_error():
    """Over 50 seeds (data and draws), the closed-form -ELBO lies within 2 reported SE in about 95% of validations,
    at the default val_strata=32. Each example draws its own timesteps: with one draw shared by all examples (the
    old validation) the SE missed the stratification error and covered 31/50 here, 2-4/50 with 8 strata."""
    z = torch.tensor([(est - exact) / se for est, se, exact in map(_oracle_validation, range(50))])
    covered = int((z.abs() < 2).sum())
    assert covered >= 44, f"only {covered}/50 validations within 2 SE"
    assert 0.7 < z.std().item() < 1.35  # the SE is the spread of the estimate, neither too small nor too large
    shared = torch.tensor(
        [(e - x) / s for e, s, x in (_oracle_validation(k, strata=8, n=1000, shared=True) for k in range(10))]
    )
    assert shared.abs().max() > 3  # the old estimator is visibly overconfident: the check can fail


def test_rate_distortion_matches_the_exact_profile_on_the_oracle():
    """Ho et al.'s rate at t (bits/dim to send x_T..x_t: prior + sum of L_s over s > t) and distortion (x0_hat's
    RMSE at x_t) from a stratified validation pass against the closed-form expected L_t and Var[x0 | x_t] of the
    oracle. Strata of width one are single timesteps: there the rate must exclude L_t itself (counting it was off by
    one step), and the distortion is that of exactly that t."""
    import numpy as np

    T, strata = 100, 32
    s = make_schedule("linear", T)
    g = torch.Generator().manual_seed(0)
    x0 = MEAN + STD * torch.randn(4000, 4, generator=g, dtype=torch.float64)
    r = stratified_elbo(GaussianOracle(s, MEAN, STD), s, x0, parametrization="eps", strata=strata, generator=g)
    metric = ProfileMetric(num_stratified_timesteps(T, strata), 4)
    metric.update(r)
    profile = metric.compute()
    _, sizes = stratified_timesteps(T, strata)
    rd = rate_distortion(
        profile["t"], sizes, term_bpd=profile["term_bpd"], x0_mse=profile["x0_mse"], prior_bpd=profile["prior_bpd"]
    )

    closed = oracle_expected_terms(s, MEAN, std=STD)
    per_t = closed.per_t / math.log(2)  # per_t[s - 1] = E[L_s] in bits/dim
    exact_rate = torch.tensor([closed.prior / math.log(2) + float(per_t[t:].sum()) for t in range(T + 1)])
    t = profile["t"]
    expected = torch.from_numpy(np.interp(t.numpy(), np.arange(T + 1), exact_rate.numpy()))
    assert (rd["rate_bpd"] - expected).abs().max() < 0.03
    single = sizes == 1  # t = 1..8 here
    assert int(single.sum()) >= 8
    at = t[single].round().long()
    assert (rd["rate_bpd"][single] - exact_rate[at]).abs().max() < 0.02
    assert (profile["term_bpd"][single].abs() > 0.1).all()  # so counting L_t in the rate would fail the check above
    var = oracle_posterior_variance(s, STD)[at]
    torch.testing.assert_close(rd["distortion_rmse"][single], var.sqrt() * 127.5, rtol=0.03, atol=0)
