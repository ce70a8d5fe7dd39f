"""Shared fixtures: core tests run in float64 with fixed generators."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    # Under pytest-xdist (`make test` runs `-n 2`) each worker is its own process: split the cores between workers so
    # that their torch threads, and those of the training subprocesses they start, do not oversubscribe the machine.
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers is not None and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // int(workers))
        os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by subprocesses
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The slow tests (training runs, DDP, multirun) and the notebooks first, the many fast ones after: under
    # pytest-xdist the fast ones then fill the gaps at the end, instead of one long test starting last and running
    # alone (the suite's wall time on 2 workers is about the larger of half the total and the longest tail).
    # The notebooks lead (notebook 03 is among the longest items, and as the slow group's last items they were started
    # late, running alone at the end of a CI run). Tried on this machine, 2026-12-05: this order 973 s; the slow items
    # longest first 1215 s; all items longest first, dealt round-robin to the workers, 1170 s (the multi-process tests
    # then ran side by side on both workers). The two slower runs had some other load on the host, but not 25% more.
    def notebook(item: pytest.Item) -> bool:
        return item.path.suffix == ".ipynb"

    def slow(item: pytest.Item) -> bool:
        return item.get_closest_marker("slow") is not None or notebook(item)

    items.sort(key=lambda item: (not slow(item), not notebook(item)))  # stable: file order within each group


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch: pytest.MonkeyPatch) -> None:
    # No test may reach the network or a W&B account.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """last.ckpt of one short digits run (the FAST settings with a small UNet, SMALL_UNET, schedule.timesteps=50, 6
    steps), trained once per test process in-process, for tests that need a checkpoint to evaluate or sample and do
    not test training itself (sharding, caching, the CLIs: nothing that depends on the network's size). Copy it
    (:func:`copy_of_checkpoint`) before writing anything next to it."""
    from diffusion_elbo.training import train
    from tests.helpers import SMALL_UNET, compose_train

    run_dir = tmp_path_factory.mktemp("trained_checkpoint") / "run"
    train(compose_train(run_dir, [*SMALL_UNET, "schedule.timesteps=50"]), str(run_dir))
    return run_dir / "checkpoints" / "last.ckpt"
