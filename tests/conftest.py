"""Shared fixtures: core tests run in float64 with fixed generators."""

from __future__ import annotations

import json
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


# Each item's seconds on 2 cores under `make test` (tests/durations.py refreshes them); only the order depends on them
DURATIONS = Path(__file__).with_name("durations.json")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Longest first, dealt round-robin to the workers. pytest-xdist's worksteal scheduler gives each of W workers a
    # contiguous 1/W of the list and an idle worker steals the tail of another's queue, so worker k's share is every
    # W-th item of the sorted list: each starts on a long item at once, and what is stolen at the end is short. With
    # the slow items merely first (in file order), one worker got them all and the 135 s classifier test started
    # after 820 s of a 973 s run. An item without a recorded time counts as 20 s if slow (or a notebook), else 0.
    known = json.loads(DURATIONS.read_text()) if DURATIONS.is_file() else {}

    def seconds(item: pytest.Item) -> float:
        slow = item.get_closest_marker("slow") is not None or item.path.suffix == ".ipynb"
        return known.get(item.nodeid, 20.0 if slow else 0.0)

    ordered = sorted(items, key=seconds, reverse=True)  # stable: file order among equals
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    items[:] = [item for k in range(workers) for item in ordered[k::workers]]


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
