"""Callbacks: EMA of the weights, sample grids at validation, atomic checkpoint writing."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only

from diffusion_elbo.visualize import save_samples

log = logging.getLogger(__name__)


def ema_multi_avg_fn(decay: float, warmup: bool = True):
    """EMA update for all parameters in one fused ``foreach`` lerp. With ``warmup`` the decay after n updates is
    min(decay, (1 + n) / (10 + n)), so early averages are not dominated by the random initial weights
    (the warm-up used by tensorflow's ExponentialMovingAverage with num_updates, and many diffusion codebases)."""

    @torch.no_grad()
    def update(ema_params: list[torch.Tensor], params: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = int(num_averaged)
        effective = min(decay, (1 + n) / (10 + n)) if warmup else decay
        torch._foreach_lerp_(ema_params, params, 1.0 - effective)

    return update


class EMA(WeightAveraging):
    """Exponential moving average of the weights (Ho et al. 2020 use decay 0.9999), on Lightning's
    :class:`WeightAveraging`: validation, sampling and checkpoints' ``state_dict`` use the EMA weights,
    and the raw weights are kept in the checkpoint to resume training.

    Differences from Lightning's ``EMAWeightAveraging``: one fused ``foreach`` update for all parameters, a
    warm-up of the decay, and buffers are not averaged (our buffers are constant schedule tables).
    """

    def __init__(
        self, decay: float = 0.999, warmup: bool = True, update_every_n_steps: int = 1, start_step: int = 0
    ) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"callbacks.ema.decay must be in (0, 1); got {decay}")
        super().__init__(use_buffers=False, multi_avg_fn=ema_multi_avg_fn(decay, warmup))
        self.decay = decay
        self.update_every_n_steps = update_every_n_steps
        self.start_step = start_step

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx >= self.start_step and step_idx % self.update_every_n_steps == 0


class SampleGrid(L.Callback):
    """At the end of every ``every_n_val`` validations, draw samples (with the EMA weights: this callback
    must come before :class:`EMA` in the callback list), save a PNG in the run directory and log it."""

    def __init__(
        self,
        num_samples: int = 64,
        sampler: str = "ddim",
        steps: int | None = 50,
        eta: float = 0.0,
        every_n_val: int = 1,
        dirpath: str | None = None,
        seed: int = 0,
    ) -> None:
        self.num_samples = num_samples
        self.sampler = sampler
        self.steps = steps
        self.eta = eta
        self.every_n_val = every_n_val
        self.dirpath = dirpath
        self.seed = seed
        self._count = 0

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.num_samples < 1:
            return
        self._count += 1
        if self._count % self.every_n_val:
            return
        self._sample_and_log(trainer, pl_module)

    @rank_zero_only
    def _sample_and_log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        samples = pl_module.sample(
            self.num_samples, sampler=self.sampler, steps=self.steps, eta=self.eta, generator=generator
        )
        dirpath = Path(self.dirpath or Path(trainer.default_root_dir) / "samples")
        path = save_samples(
            samples, dirpath / f"step_{trainer.global_step:07d}.png", title=f"step {trainer.global_step}"
        )
        if path is None:
            return
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):  # W&B
                logger.log_image(key="samples", images=[str(path)], step=trainer.global_step)
            elif hasattr(logger.experiment, "add_image"):  # TensorBoard
                import numpy as np
                from PIL import Image

                array = np.asarray(Image.open(path).convert("RGB"))
                logger.experiment.add_image("samples", array, trainer.global_step, dataformats="HWC")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file, fsyncs it, then renames it over the target: a crash
    mid-write leaves the previous checkpoint intact (rename is atomic on POSIX file systems)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if "://" in str(path) and not str(path).startswith("file://"):  # remote storage: no rename there
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return None
