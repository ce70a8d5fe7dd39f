"""The ``src/train.py`` job: build everything from the config, fit, write the final metrics."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffusion_elbo.builders import build_callbacks, build_loggers, build_module
from diffusion_elbo.config import validate_config
from diffusion_elbo.evaluation import write_metrics
from diffusion_elbo.lightning.callbacks import AtomicCheckpointIO

log = logging.getLogger(__name__)


def sweep_group_and_name() -> tuple[str | None, str | None]:
    """In a Hydra multirun, every run shares a W&B group named after the sweep and is named by its overrides."""
    if not HydraConfig.initialized():
        return None, None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None, None
    group = f"{hc.job.name}-{Path(hc.sweep.dir).name}"
    return group, Path(hc.runtime.output_dir).name  # the sweep subdirectory: its swept overrides


def train(cfg: DictConfig, output_dir: str) -> dict[str, float]:
    """Train the configured model; returns the last logged metrics (also saved to train_metrics.json)."""
    validate_config(cfg)
    L.seed_everything(int(cfg.seed), workers=True)
    if OmegaConf.select(cfg, "matmul_precision"):
        torch.set_float32_matmul_precision(cfg.matmul_precision)

    module, datamodule = build_module(cfg)
    callbacks = build_callbacks(cfg)
    group, name = sweep_group_and_name()
    loggers = build_loggers(cfg, output_dir, group=group, name=name)
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        default_root_dir=output_dir,
        plugins=[AtomicCheckpointIO()],
    )
    for logger in trainer.loggers:  # the resolved config, once per run
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    log.info(
        "training %s (%.2fM parameters) on %s",
        type(module.net).__name__,
        sum(p.numel() for p in module.net.parameters()) / 1e6,
        type(datamodule).__name__,
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    metrics["global_step"] = trainer.global_step
    if trainer.is_global_zero:
        path = write_metrics(metrics, output_dir, "train_metrics.json")
        log.info("final metrics written to %s", path)
        best = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else None
        if best:
            log.info("last checkpoint: %s", best)
    return metrics
