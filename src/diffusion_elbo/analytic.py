"""The analytic reverse variance of a model (Bao et al. 2022), for eval and sample: the closed form for the Gaussian
oracle; for a checkpoint a Monte Carlo estimate over training examples, cached next to the checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.data import DataLoader, Subset

log = logging.getLogger(__name__)
CACHE_FORMAT = 2  # of the cached analytic variance tables (<ckpt>.analytic-N.pt)


def analytic_table(
    cfg: DictConfig, model, *, schedule, datamodule, parametrization, device, generator, clip_denoised: bool = False
) -> Tensor:
    """The analytic variance table: closed form for the Gaussian oracle; for a checkpoint a Monte Carlo estimate
    over ``analytic.num_examples`` training examples, cached next to the checkpoint. ``clip_denoised``: for a
    sampler that clamps x0_hat to [-1, 1], estimated from the clamped x0_hat (cached separately)."""
    from diffusion_elbo.core.analytic import analytic_variance_table, oracle_analytic_variance_table
    from diffusion_elbo.models import GaussianOracle

    if isinstance(model, GaussianOracle):
        return oracle_analytic_variance_table(schedule, model.std)
    n = int(cfg.analytic.num_examples)
    suffix = "-clipped" if clip_denoised else ""
    cache = Path(f"{cfg.ckpt_path}.analytic-{n}{suffix}.pt") if cfg.ckpt_path is not None else None
    if cache is not None and cache.is_file():
        cached = torch.load(cache, map_location=device, weights_only=True)
        # format 2: sigma_1^2 of quantized data fitted to the discretized decoder (format 1 used e_1): re-estimate
        if cached.get("format") == CACHE_FORMAT:
            return cached["table"].to(device)
        log.info("re-estimating the analytic variance: %s predates the discretized decoder's sigma_1", cache.name)
    datamodule.setup("fit")
    train = Subset(datamodule.split("train"), range(min(n, len(datamodule.split("train")))))
    batches = (x.to(device) for x, _ in DataLoader(train, batch_size=int(cfg.batch_size)))
    log.info(
        "estimating the analytic variance from %d training examples (all %d timesteps%s)",
        len(train),
        schedule.T,
        ", x0_hat clamped to [-1, 1] as the sampler does" if clip_denoised else "",
    )
    table, e = analytic_variance_table(
        model,
        schedule,
        batches,
        parametrization=parametrization,
        max_batch=int(cfg.max_batch),
        generator=generator,
        clip_denoised=clip_denoised,
        num_bins=datamodule.num_bins,
    )
    if cache is not None:
        tmp = cache.with_name(cache.name + ".tmp")
        record = {"table": table.cpu(), "x0_mse": e.cpu(), "num_examples": len(train), "format": CACHE_FORMAT}
        torch.save(record, tmp)
        tmp.replace(cache)
    return table.to(device)
