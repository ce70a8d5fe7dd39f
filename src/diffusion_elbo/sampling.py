"""The ``src/sample.py`` job: draw samples from a trained checkpoint into a PNG grid and an .npz."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from diffusion_elbo.builders import build_sampler, resolve_device
from diffusion_elbo.checkpoints import LoadedRun, load_for_eval
from diffusion_elbo.config import validate_config
from diffusion_elbo.progress import ProgressLog, interactive
from diffusion_elbo.visualize import save_samples

log = logging.getLogger(__name__)


def sampling_analytic_table(cfg: DictConfig, run: LoadedRun, device: torch.device) -> torch.Tensor:
    """The analytic variance table for sampling a loaded run: e_t of its mean (a learned-range network contributes
    its mean half) with x0_hat clamped as its sampler clamps it, read from the checkpoint's cache or estimated from
    ``analytic.num_examples`` training examples. The estimate has its own generator (seed + 1), so the samples are
    the same whether the table was cached or estimated. ``cfg`` needs ckpt_path, seed, analytic.num_examples,
    batch_size and max_batch."""
    from diffusion_elbo.analytic import analytic_table
    from diffusion_elbo.core.reverse import mean_denoiser

    estimation = torch.Generator(device=device).manual_seed(int(cfg.seed) + 1)
    mean_model = mean_denoiser(run.model, run.variance)
    return analytic_table(
        cfg,
        mean_model,
        schedule=run.schedule,
        datamodule=run.datamodule,
        parametrization=run.parametrization,
        device=device,
        generator=estimation,
        clip_denoised=run.module.sampling_clips,
    )


def run_sample(cfg: DictConfig, output_dir: str) -> Path:
    validate_config(cfg)
    device = resolve_device(cfg.device)
    run = load_for_eval(cfg.ckpt_path, device)
    module = run.module
    generator = torch.Generator(device=device).manual_seed(int(cfg.seed))
    variance_name = cfg.variance or run.variance.value
    variance = variance_name
    if variance_name == "analytic":
        variance = sampling_analytic_table(cfg, run, device)
    sampler = build_sampler(cfg.sampler, run.config)
    spacing = sampler.spacing.value
    batches, remaining = [], int(cfg.num_samples)
    num_batches = math.ceil(remaining / int(cfg.batch_size))
    steps_per_batch = sampler.steps or run.schedule.T

    from rich.progress import Progress

    total = num_batches * steps_per_batch
    lines = ProgressLog(
        f"sampling ({sampler.name})",
        total,
        "steps x batches",
        every_s=float(OmegaConf.select(cfg, "progress_every_s", default=30.0)),
    )

    def progress(step: int, steps: int) -> None:
        bar.advance(task, 1)
        done = (len(batches) * steps_per_batch) + step
        lines.update(done, f"{sum(len(b) for b in batches)}/{cfg.num_samples} samples done, step {step}/{steps}")

    with Progress(transient=True, disable=not interactive()) as bar:
        task = bar.add_task(f"sampling ({sampler.name}, {steps_per_batch} steps)", total=total)
        while remaining > 0:
            n = min(remaining, int(cfg.batch_size))
            batches.append(module.sample(n, sampler, generator=generator, progress=progress, variance=variance).cpu())
            remaining -= n
    samples = torch.cat(batches)
    out = Path(output_dir)
    npz = out / "samples.npz"
    np.savez_compressed(
        npz,
        samples=samples.numpy(),
        sampler=sampler.name,
        steps=steps_per_batch,
        spacing=spacing,
        variance=variance_name,
        ckpt_path=str(cfg.ckpt_path),
        global_step=run.global_step,
    )
    png = save_samples(
        samples[: int(cfg.grid_size)],
        out / "samples.png",
        title=f"{sampler.name}, {steps_per_batch} steps ({spacing}), variance={variance_name}",
    )
    log.info(
        "wrote %d samples (%s, %d steps spaced in %s, variance=%s) to %s%s",
        samples.shape[0],
        sampler.name,
        steps_per_batch,
        spacing,
        variance_name,
        npz,
        f" and {png}" if png else "",
    )
    print(f"samples: {npz}")
    return npz
