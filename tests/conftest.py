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
    # The slow items (training runs, DDP, multirun, notebooks) first, longest first, then the many fast ones in file
    # order. pytest-xdist's worksteal scheduler gives each worker a contiguous share and an idle worker steals the
    # tail of another's queue, so one worker starts on the slow items while the other runs fast ones beside them and
    # then takes slow items from the end of the queue. Longest first: the 135 s classifier test, last in file order,
    # started 820 s into a 973 s run. (Dealing the sorted items round-robin instead put the multi-process tests side by
    # side on both workers: they took 10-100% longer each, 1170 s in all, though the host also lost 14% of its CPU to
    # steal then.) An item without a recorded time counts as 20 s.
    known = json.loads(DURATIONS.read_text()) if DURATIONS.is_file() else {}

    def slow(item: pytest.Item) -> bool:
        return item.get_closest_marker("slow") is not None or item.path.suffix == ".ipynb"

    items.sort(key=lambda item: (not slow(item), -known.get(item.nodeid, 20.0) if slow(item) else 0.0))


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
