"""Exact -ELBO evaluation of a model on a data split, and the ``src/eval.py`` job around it."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from diffusion_elbo.core import (
    DecoderVariance,
    NoiseSchedule,
    Parametrization,
    ReverseVariance,
    exact_elbo,
    nats_to_bits_per_dim,
    standard_error,
)
from diffusion_elbo.core.elbo import Denoiser
from diffusion_elbo.core.reverse import denoiser_for

log = logging.getLogger(__name__)
CACHE_FORMAT = 2  # of the cached analytic variance tables (<ckpt>.analytic-N.pt)


@dataclass
class ELBOSummary:
    """-ELBO over a set of examples: per-example totals and terms, in nats summed over dims."""

    total: Tensor  # (N,)
    reconstruction: Tensor  # (N,)
    prior: Tensor  # (N,)
    denoising: Tensor  # (N,)
    per_t: Tensor  # (T,) mean over examples of L_t
    num_dims: int
    true_nll: Tensor | None = None  # (N,) where the data density is known

    def metrics(self) -> dict:
        """The metrics.json dictionary: bits/dim with its standard error over examples, terms as losses."""
        d = self.num_dims
        nats_per_dim = self.total / d
        out = {
            "bpd": float(nats_to_bits_per_dim(nats_per_dim.mean())),
            "bpd_se": standard_error(nats_per_dim) / math.log(2.0),
            "nats_per_dim": float(nats_per_dim.mean()),
            "terms_nats_per_dim": {
                "reconstruction": float(self.reconstruction.mean() / d),
                "prior": float(self.prior.mean() / d),
                "denoising": float(self.denoising.mean() / d),
            },
            "per_t_nats_per_dim": [float(v) / d for v in self.per_t],
            "num_examples": int(self.total.numel()),
            "num_dims": d,
        }
        if self.true_nll is not None:
            true_per_dim = self.true_nll / d
            out["true_nll_bpd"] = float(nats_to_bits_per_dim(true_per_dim.mean()))
            out["true_nll_bpd_se"] = standard_error(true_per_dim) / math.log(2.0)
            # paired difference: its SE is much smaller than either SE alone
            out["gap_bpd"] = out["bpd"] - out["true_nll_bpd"]
            out["gap_bpd_se"] = standard_error(nats_per_dim - true_per_dim) / math.log(2.0)
        return out


def evaluate_elbo(
    model: Denoiser,
    schedule: NoiseSchedule,
    batches: Iterable[Tensor],
    *,
    parametrization: Parametrization | str,
    variance: ReverseVariance | str,
    num_bins: int | None,
    generator: torch.Generator,
    decoder_variance: DecoderVariance | str = DecoderVariance.CLIPPED,
    device: torch.device,
    max_batch: int = 512,
    true_nll=None,
    progress=None,
) -> ELBOSummary:
    """Run :func:`~diffusion_elbo.core.exact_elbo` over ``batches`` of x0 (B, *D) and collect the results.

    ``true_nll``: optional callable x0 -> (B,) nats, the data's exact NLL where it is known.
    """
    parts: dict[str, list[Tensor]] = {
        "total": [],
        "reconstruction": [],
        "prior": [],
        "denoising": [],
        "true": [],
    }
    per_t_sum, count, num_dims = None, 0, None
    for x0 in batches:
        x0 = x0.to(device)
        result = exact_elbo(
            model,
            schedule,
            x0,
            parametrization=parametrization,
            variance=variance,
            decoder_variance=decoder_variance,
            num_bins=num_bins,
            max_batch=max_batch,
            generator=generator,
            progress=progress,
        )
        parts["total"].append(result.total.cpu())
        parts["reconstruction"].append(result.reconstruction.cpu())
        parts["prior"].append(result.prior.cpu())
        parts["denoising"].append(result.denoising.cpu())
        if true_nll is not None:
            parts["true"].append(true_nll(x0).double().cpu())
        batch_sum = result.per_t.sum(dim=0).cpu()
        per_t_sum = batch_sum if per_t_sum is None else per_t_sum + batch_sum
        count += x0.shape[0]
        num_dims = result.num_dims
    if count == 0:
        raise ValueError("no examples to evaluate: the data split is empty (check split= and num_examples=)")
    return ELBOSummary(
        total=torch.cat(parts["total"]),
        reconstruction=torch.cat(parts["reconstruction"]),
        prior=torch.cat(parts["prior"]),
        denoising=torch.cat(parts["denoising"]),
        per_t=per_t_sum / count,
        num_dims=num_dims,
        true_nll=torch.cat(parts["true"]) if parts["true"] else None,
    )


def write_metrics(metrics: dict, output_dir: str | Path, name: str = "metrics.json") -> Path:
    """Write ``metrics`` as JSON atomically (a crash never leaves a half-written file)."""
    path = Path(output_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    tmp.replace(path)
    return path


def write_per_example(summary: ELBOSummary, output_dir: str | Path, name: str = "per_example.csv") -> Path:
    """-ELBO of every example in bits/dim, in data order: two evaluations of the same split (other variances,
    checkpoints or models) compare by paired differences, whose standard error is usually well below either
    bpd_se for trained models (the per-example values move together)."""
    path = Path(output_dir) / name
    tmp = path.with_suffix(".csv.tmp")
    bpd = nats_to_bits_per_dim(summary.total / summary.num_dims)
    tmp.write_text("index,bpd\n" + "".join(f"{i},{float(v):.8f}\n" for i, v in enumerate(bpd)))
    tmp.replace(path)
    return path


def paired_difference(a: str | Path, b: str | Path) -> tuple[float, float]:
    """Mean and standard error of per-example bpd(a) - bpd(b) from two ``per_example.csv`` of the same split."""
    import numpy as np

    x, y = (np.loadtxt(p, delimiter=",", skiprows=1)[:, 1] for p in (a, b))
    if x.shape != y.shape:
        raise ValueError(f"{a} and {b} hold {x.size} and {y.size} examples: evaluate the same split to pair them")
    d = x - y
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size))


def run_eval(cfg: DictConfig, output_dir: str | Path) -> dict:
    """The ``src/eval.py`` job: exact bits/dim with its terms and per-t profile, saved to metrics.json."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from diffusion_elbo.builders import build_datamodule, build_model, build_schedule, resolve_device
    from diffusion_elbo.config import validate_config

    validate_config(cfg)
    device = resolve_device(cfg.device)
    generator = torch.Generator(device=device).manual_seed(int(cfg.seed))
    if cfg.ckpt_path is not None:
        from diffusion_elbo.checkpoints import load_for_eval

        loaded = load_for_eval(cfg.ckpt_path, device)
        model, schedule, datamodule = loaded.model, loaded.schedule, loaded.datamodule
        parametrization, trained_variance = loaded.parametrization, loaded.variance.value
        trained_decoder = loaded.decoder_variance
    else:
        schedule = build_schedule(cfg)
        datamodule = build_datamodule(cfg)
        # a model built here has variance outputs only when learned_range is asked for (build_model)
        trained_variance = cfg.variance if cfg.variance == ReverseVariance.LEARNED_RANGE.value else "small"
        model = build_model(cfg)
        parametrization = cfg.parametrization
        trained_decoder = DecoderVariance.CLIPPED.value
    variance = cfg.variance or trained_variance
    variance_name = str(ReverseVariance(variance).value)
    decoder_variance = DecoderVariance(cfg.get("decoder_variance") or trained_decoder).value
    model = denoiser_for(model.to(device).eval(), trained_variance, variance_name)
    schedule = schedule.to(device)
    if variance_name == ReverseVariance.ANALYTIC.value:
        # its own generator: the evaluation's draws are then the same whether the table was cached or estimated
        estimation = torch.Generator(device=device).manual_seed(int(cfg.seed) + 1)
        variance = analytic_table(cfg, model, schedule, datamodule, parametrization, device, estimation)
    datamodule.setup("test" if cfg.split == "test" else "fit")
    dataset = datamodule.split(cfg.split)
    if cfg.num_examples is not None:
        dataset = Subset(dataset, range(min(int(cfg.num_examples), len(dataset))))
    loader = DataLoader(dataset, batch_size=int(cfg.batch_size), shuffle=False)
    true_nll = getattr(datamodule, "true_nll_nats", None)

    total_steps = math.ceil(len(dataset) / int(cfg.batch_size)) * schedule.T
    columns = (TextColumn("eval -ELBO"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True, disable=not _interactive()) as bar:
        task = bar.add_task("eval", total=total_steps)
        last = {"t": 0}

        def progress(t: int, T: int) -> None:
            # exact_elbo reports the last timestep done in each batch; it restarts at 1 every batch
            bar.advance(task, t - last["t"])
            last["t"] = t % T

        summary = evaluate_elbo(
            model,
            schedule,
            (batch[0] for batch in loader),
            parametrization=parametrization,
            variance=variance,
            decoder_variance=decoder_variance,
            num_bins=datamodule.num_bins,
            generator=generator,
            device=device,
            max_batch=int(cfg.max_batch),
            true_nll=true_nll,
            progress=progress,
        )
    metrics = summary.metrics()
    metrics.update(
        {
            "split": cfg.split,
            "schedule": schedule.name,
            "timesteps": schedule.T,
            "parametrization": str(Parametrization(parametrization).value),
            "variance": variance_name,
            "trained_variance": trained_variance,
            # sigma_1^2 of small/large (analytic and learned_range have their own)
            "decoder_variance": decoder_variance,
            "ckpt_path": cfg.ckpt_path,
        }
    )
    if cfg.ckpt_path is not None and _wants_fid(cfg, datamodule):
        metrics.update(_checkpoint_fid(cfg, loaded.module, datamodule, device))
    path = write_metrics(metrics, output_dir)
    write_per_example(summary, output_dir)
    line = f"bpd = {metrics['bpd']:.4f} ± {metrics['bpd_se']:.4f} (reverse variance {variance_name})"
    if "true_nll_bpd" in metrics:
        line += (
            f" (true NLL {metrics['true_nll_bpd']:.4f} bpd, gap {metrics['gap_bpd']:.4f} ± {metrics['gap_bpd_se']:.4f})"
        )
    if "fid" in metrics:
        line += f"; FID ({metrics['fid_features']}, {metrics['fid_num_samples']} samples) = {metrics['fid']:.3f}"
        if metrics.get("fid_classifier_accuracy") is not None:
            line += f" [feature classifier test accuracy {metrics['fid_classifier_accuracy']:.4f}]"
    log.info(line)
    log.info("metrics written to %s", path)
    print(f"metrics: {path}")
    return metrics


def analytic_table(
    cfg: DictConfig, model, schedule, datamodule, parametrization, device, generator, clip_denoised: bool = False
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


def _wants_fid(cfg: DictConfig, datamodule) -> bool:
    fid_cfg = cfg.get("fid")
    if fid_cfg is None or int(fid_cfg.num_samples) < 1 or len(datamodule.data_shape) != 3:
        return False
    if fid_cfg.features == "classifier" and not datamodule.has_labels:
        log.info("FID skipped: %s has no labels for the feature classifier", type(datamodule).__name__)
        return False
    return True


def _checkpoint_fid(cfg: DictConfig, module, datamodule, device: torch.device) -> dict:
    from diffusion_elbo.fid import make_fid
    from diffusion_elbo.lightning.callbacks import compute_fid

    f = cfg.fid
    fid = make_fid(
        datamodule,
        features=f.features,
        cache_dir=f.cache_dir,
        weights_path=f.weights_path,
        classifier_steps=int(f.classifier_steps),
        device=device,
    )
    value = compute_fid(
        module,
        fid,
        int(f.num_samples),
        0,
        1,
        sampler=f.sampler,
        steps=f.steps,
        eta=float(f.eta),
        batch_size=int(f.batch_size),
        seed=int(cfg.seed),
    )
    return {
        "fid": value,
        "fid_features": f.features,
        "fid_num_samples": int(f.num_samples),
        "fid_sampler": f"{f.sampler}-{f.steps or 'T'}",
        "fid_classifier_accuracy": fid.classifier_accuracy,
    }


def _interactive() -> bool:
    import sys

    return sys.stderr.isatty()
