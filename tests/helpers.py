"""Helpers shared by the training and CLI tests."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = str(REPO_ROOT / "conf")

# Small and fast: a few steps, tiny validation, few samples; no W&B unless a test asks for it.
FAST = [
    "trainer.accelerator=cpu",
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "callbacks.sample_grid.num_samples=4",
    "callbacks.sample_grid.steps=5",
    "callbacks.model_checkpoint.every_n_train_steps=3",
    "callbacks.fid.num_samples=0",
    "callbacks.toy2d_metrics.num_samples=200",
    "callbacks.toy2d_metrics.steps=5",
    "val_strata=4",
    "logger=csv",
]


def compose_train(output_dir: Path, overrides: list[str] = ()) -> DictConfig:
    """The train config as `python src/train.py <FAST> <overrides>` would compose it, writing to output_dir."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*FAST, *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def run_cli(
    script: str, *args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run src/<script> in a subprocess, as a user would (``env`` adds environment variables)."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "src" / script), *args],
        cwd=cwd or REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_fake_mnist(root: Path, n_train: int = 64, n_test: int = 32, seed: int = 0) -> None:
    """Tiny MNIST in the IDX format (gzipped), with blob-like digits so training has signal."""
    rng = np.random.RandomState(seed)
    root.mkdir(parents=True, exist_ok=True)

    def images(n: int) -> bytes:
        data = (rng.rand(n, 28, 28) > 0.8).astype(np.uint8) * 255
        return (
            np.array([0, 0, 8, 3], dtype=np.uint8).tobytes()
            + np.array([n, 28, 28], dtype=">i4").tobytes()
            + data.tobytes()
        )

    def labels(n: int) -> bytes:
        return (
            np.array([0, 0, 8, 1], dtype=np.uint8).tobytes()
            + np.array([n], dtype=">i4").tobytes()
            + rng.randint(0, 10, n).astype(np.uint8).tobytes()
        )

    for name, payload in [
        ("train-images-idx3-ubyte.gz", images(n_train)),
        ("train-labels-idx1-ubyte.gz", labels(n_train)),
        ("t10k-images-idx3-ubyte.gz", images(n_test)),
        ("t10k-labels-idx1-ubyte.gz", labels(n_test)),
    ]:
        with gzip.open(root / name, "wb") as f:
            f.write(payload)


def copy_of_checkpoint(ckpt: Path, run_dir: Path) -> Path:
    """A copy of ``ckpt`` as ``<run_dir>/checkpoints/last.ckpt`` (a run folder of its own, so caches, evals and samples
    written next to it stay this test's)."""
    import shutil

    target = run_dir / "checkpoints" / "last.ckpt"
    target.parent.mkdir(parents=True)
    shutil.copy2(ckpt, target)
    return target
