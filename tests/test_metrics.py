"""The validation ELBO metric reduces sum states across DDP ranks: uneven shards give the global value."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from diffusion_elbo.core import ELBOResult
from diffusion_elbo.lightning.metrics import ELBOMetric

NUM_DIMS = 4


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
    assert (out["reconstruction_bpd"] + out["prior_bpd"] + out["denoising_bpd"]).item() == pytest.approx(
        out["elbo_bpd"].item()
    )


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
