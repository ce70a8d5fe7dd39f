"""Exact -ELBO evaluation of a model on a data split, and the ``src/eval.py`` job around it."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
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
from diffusion_elbo.core.elbo import Denoiser, example_generator
from diffusion_elbo.core.ode import Likelihood, dequantization_start_time
from diffusion_elbo.core.reverse import denoiser_for, mean_denoiser
from diffusion_elbo.progress import ProgressLog, interactive

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
    dataset,
    *,
    parametrization: Parametrization | str,
    variance: ReverseVariance | str,
    num_bins: int | None,
    seed: int,
    decoder_variance: DecoderVariance | str = DecoderVariance.CLIPPED,
    device: torch.device,
    batch_size: int = 256,
    max_batch: int = 512,
    true_nll=None,
    progress=None,
) -> ELBOSummary:
    """Run :func:`~diffusion_elbo.core.exact_elbo` over every example of ``dataset`` (items (x0, y, ...)) and collect
    the results, in the dataset's order.

    Each example draws its noise from its own generator (:func:`example_generator` of ``seed`` and its index), so the
    numbers do not depend on ``batch_size`` or on the number of processes: under torch.distributed the examples are
    sharded over the ranks without padding (rank r takes r, r + W, ...) and the per-example results gathered.
    ``true_nll``: optional callable x0 -> (B,) nats, the data's exact NLL where it is known.
    """
    rank, world = _rank_world()
    indices = list(range(rank, len(dataset), world))
    rows: dict[int, Tensor] = {}  # index -> (total, reconstruction, prior, denoising[, true]) float64
    per_t_sum, num_dims = None, None
    for start in range(0, len(indices), int(batch_size)):
        chunk = indices[start : start + int(batch_size)]
        x0 = torch.stack([dataset[i][0] for i in chunk]).to(device)
        result = exact_elbo(
            model,
            schedule,
            x0,
            parametrization=parametrization,
            variance=variance,
            decoder_variance=decoder_variance,
            num_bins=num_bins,
            max_batch=max_batch,
            generators=[example_generator(seed, i) for i in chunk],
            progress=progress,
        )
        columns = [result.total, result.reconstruction, result.prior, result.denoising]
        if true_nll is not None:
            columns.append(true_nll(x0))
        values = torch.stack([c.double().cpu() for c in columns], dim=1)  # (b, 4 or 5)
        rows.update({i: values[j] for j, i in enumerate(chunk)})
        batch_sum = result.per_t.sum(dim=0).double().cpu()
        per_t_sum = batch_sum if per_t_sum is None else per_t_sum + batch_sum
        num_dims = result.num_dims
    if world > 1:
        rows, per_t_sum, num_dims = _gather_elbo(rows, per_t_sum, num_dims)
    if not rows:
        raise ValueError("no examples to evaluate: the data split is empty (check split= and num_examples=)")
    table = torch.stack([rows[i] for i in sorted(rows)])  # (N, 4 or 5), in the dataset's order
    return ELBOSummary(
        total=table[:, 0],
        reconstruction=table[:, 1],
        prior=table[:, 2],
        denoising=table[:, 3],
        per_t=per_t_sum / table.shape[0],
        num_dims=num_dims,
        true_nll=table[:, 4] if table.shape[1] > 4 else None,
    )


def _gather_elbo(rows: dict, per_t_sum: Tensor | None, num_dims):
    """Every rank's per-example rows and per-t sums, merged on every rank (all_gather_object, once)."""
    import torch.distributed as dist

    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (rows, per_t_sum, num_dims))
    merged, total, dims = {}, None, None
    for r, p, d in parts:
        merged.update(r)
        if p is not None:
            total = p if total is None else total + p
        dims = d if d is not None else dims
    return merged, total, dims


@dataclass
class ODESummary:
    """-log p(x) of the probability-flow ODE over a set of examples (:func:`evaluate_ode`)."""

    nll: Tensor  # (N,) nats summed over dims, in data order; for K-level data the dequantization bound on -log P(x0)
    num_dims: int
    nfe: list[int]  # function evaluations of each solve (one batch each)
    seconds: float  # wall time of the solves (this process)
    t_start: float
    dequantization: str  # "uniform" or "truncated_normal" for K-level data, "none" for continuous data
    true_nll: Tensor | None = None  # (N,) where the data density is known

    def metrics(self) -> dict:
        """The ``ode_*`` keys of metrics.json: bits/dim with its standard error over examples, NFE and time."""
        nats_per_dim = self.nll / self.num_dims
        n = int(self.nll.numel())
        out = {
            "ode_bpd": float(nats_to_bits_per_dim(nats_per_dim.mean())),
            "ode_bpd_se": standard_error(nats_per_dim) / math.log(2.0),
            "ode_nfe": sum(self.nfe) / len(self.nfe),  # per solve (a batch of examples shares the solver's steps)
            "ode_nfe_max": max(self.nfe),
            "ode_seconds": self.seconds,
            "ode_seconds_per_example": self.seconds / n,
            "ode_t_start": self.t_start,
            # K-level data: E_q[-log p(y) + log q(y | x0)], an upper bound on the discrete NLL (Theis et al. 2016)
            "ode_dequantization": self.dequantization,
            "ode_num_examples": n,
        }
        if self.true_nll is not None:
            true_per_dim = self.true_nll / self.num_dims
            out["ode_gap_bpd"] = out["ode_bpd"] - float(nats_to_bits_per_dim(true_per_dim.mean()))
            out["ode_gap_bpd_se"] = standard_error(nats_per_dim - true_per_dim) / math.log(2.0)
        return out


def evaluate_ode(
    model: Denoiser,
    schedule: NoiseSchedule,
    dataset,
    *,
    parametrization: Parametrization | str,
    num_bins: int | None,
    seed: int,
    device: torch.device,
    batch_size: int = 256,
    t_start: float | None = None,
    divergence: str = "hutchinson",
    probes: int = 1,
    dequantization_samples: int = 1,
    dequantization: str = "uniform",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    true_nll=None,
    progress=None,
) -> ODESummary:
    """-log p(x0) of the probability-flow ODE (:func:`~diffusion_elbo.core.ode.ode_nll_nats`) for every example of
    ``dataset`` (items (x0, y)).

    K-level data is dequantized (``dequantization``: uniform or truncated_normal, :func:`~diffusion_elbo.core.ode.
    dequantize`), ``dequantization_samples`` draws per example averaged, and reported as the bound
    E_q[-log p(y) + log q(y | x0)] on -log P(x0). Probes and dequantization noise come from each example's own
    generator (:func:`example_generator`). Under torch.distributed the examples are sharded over the ranks without
    padding (rank r takes r, r + W, ...), each rank runs the plain model (no DDP wrapper: nothing to synchronize inside
    the solver, so ranks with different step counts cannot hang), and the per-example results are gathered.
    ``progress(examples_done, nfe)``: called after each solve (examples of all ranks, estimated from this one's).
    """
    import time

    from diffusion_elbo.core.ode import Dequantization, dequantize, ode_nll_nats, rademacher

    rank, world = _rank_world()
    indices = list(range(rank, len(dataset), world))
    if t_start is None:
        t_start = dequantization_start_time(schedule, num_bins, minimum=min(1.0, schedule.T / 2))
    samples = int(dequantization_samples) if num_bins is not None else 1
    dequantization = Dequantization(dequantization)
    a0, sigma0 = schedule.signal_noise(torch.tensor([float(t_start)], dtype=torch.float64, device=device))
    noise_scale = float(sigma0 / a0)  # truncated_normal: the forward noise at t0, in data units
    per_row = max(1, int(batch_size) // samples)  # examples per solve: batch_size rows in all
    results, nfe, seconds, dims, trues = {}, [], 0.0, None, {}
    for start in range(0, len(indices), per_row):
        chunk = indices[start : start + per_row]
        x0 = torch.stack([dataset[i][0] for i in chunk]).to(device)  # (b, *D)
        shape = tuple(x0.shape[1:])
        noise_u, noise_v = [], []
        for i in chunk:
            g = example_generator(seed, i)
            noise_u.append(torch.rand((samples, *shape), generator=g, dtype=torch.float64))
            noise_v.append(rademacher((samples, int(probes), *shape), g))
        x = x0.repeat_interleave(samples, dim=0)  # (b S, *D): example-major, S samples each
        log_q = torch.zeros(x.shape[0], dtype=torch.float64, device=device)
        if num_bins is not None:
            x, log_q = dequantize(x, num_bins, torch.cat(noise_u).to(device), dequantization, noise_scale)
        began = time.perf_counter()
        result = ode_nll_nats(
            model,
            schedule,
            x,
            parametrization=parametrization,
            t_start=t_start,
            divergence=divergence,
            probes=torch.cat(noise_v).to(device),
            rtol=rtol,
            atol=atol,
            method=method,
        )
        seconds += time.perf_counter() - began
        dims = x0[0].numel()
        # -log P(x0) <= E_q[-log p(y) + log q(y | x0)], the expectation over the S samples
        nll = (result.nll + log_q).view(len(chunk), samples).mean(dim=1).cpu()  # (b,)
        nfe.append(result.nfe)
        if progress is not None:
            progress(min(len(dataset), (start + len(chunk)) * world), result.nfe)
        for j, i in enumerate(chunk):
            results[i] = nll[j]
        if true_nll is not None:
            for j, value in enumerate(true_nll(x0).double().cpu()):
                trues[chunk[j]] = value
    if world > 1:
        results, trues, nfe, seconds, dims = _gather_ode(results, trues, nfe, seconds, dims)
    if not results:
        raise ValueError("no examples to evaluate: the data split is empty (check split= and num_examples=)")
    order = sorted(results)
    return ODESummary(
        nll=torch.stack([results[i] for i in order]).double(),
        num_dims=dims,
        nfe=nfe,
        seconds=seconds,
        t_start=float(t_start),
        dequantization=dequantization.value if num_bins is not None else "none",
        true_nll=torch.stack([trues[i] for i in order]) if trues else None,
    )


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_ode(results: dict, trues: dict, nfe: list, seconds: float, dims):
    """Every rank's per-example results, merged on every rank (all_gather_object: small, once per evaluation)."""
    import torch.distributed as dist

    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (results, trues, nfe, seconds, dims))
    merged, merged_true, all_nfe, total_seconds, num_dims = {}, {}, [], 0.0, None
    for r, tr, n, sec, d in parts:
        merged.update(r)
        merged_true.update(tr)
        all_nfe.extend(n)
        total_seconds = max(total_seconds, sec)  # the ranks run side by side: the evaluation takes the slowest
        num_dims = d if d is not None else num_dims
    return merged, merged_true, all_nfe, total_seconds, num_dims


def finite_or_null(value):
    """``value`` with every NaN and infinity (in nested dicts and lists too) replaced by None, so that it is strict
    JSON: Python's ``json`` would write bare ``NaN``, which other readers (``jq``, JavaScript, pandas' strict mode)
    refuse."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_null(v) for v in value]
    return value


def write_metrics(metrics: dict, output_dir: str | Path, name: str = "metrics.json") -> Path:
    """Write ``metrics`` as strict JSON (a non-finite value as null) atomically (a crash never leaves a half-written
    file)."""
    path = Path(output_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(finite_or_null(metrics), indent=2, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def write_per_example(columns: dict[str, Tensor], output_dir: str | Path, name: str = "per_example.csv") -> Path:
    """Per-example values in bits/dim, in data order, one column each (``bpd``: -ELBO; ``ode_bpd``: the ODE's
    -log-likelihood): two evaluations of the same split (other variances, checkpoints, models or likelihoods) compare by
    paired differences, whose standard error is usually well below either bpd_se (the per-example values move
    together). ``columns``: name -> (N,) bits/dim."""
    path = Path(output_dir) / name
    tmp = path.with_suffix(".csv.tmp")
    names = list(columns)
    values = [columns[c].tolist() for c in names]
    rows = "".join(f"{i}," + ",".join(f"{v[i]:.8f}" for v in values) + "\n" for i in range(len(values[0])))
    tmp.write_text("index," + ",".join(names) + "\n" + rows)
    tmp.replace(path)
    return path


def paired_difference(
    a: str | Path, b: str | Path, column_a: str = "bpd", column_b: str | None = None
) -> tuple[float, float]:
    """Mean and standard error of per-example ``column_a``(a) - ``column_b``(b) (bits/dim; ``column_b`` defaults to
    ``column_a``) from two ``per_example.csv`` of the same split (a and b may be the same file)."""
    import numpy as np

    def read(path, column):
        table = np.genfromtxt(path, delimiter=",", names=True)
        if column not in table.dtype.names:
            raise ValueError(f"{path} has no column {column!r}; it has {', '.join(table.dtype.names)}")
        return np.atleast_1d(table[column])

    x, y = read(a, column_a), read(b, column_b or column_a)
    if x.shape != y.shape:
        raise ValueError(f"{a} and {b} hold {x.size} and {y.size} examples: evaluate the same split to pair them")
    d = x - y
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size))


def run_eval(cfg: DictConfig, output_dir: str | Path) -> dict:
    """The ``src/eval.py`` job: exact bits/dim with its terms and per-t profile (``likelihood=elbo``), the probability-flow
    ODE's likelihood (``ode``) or both, saved to metrics.json and per_example.csv."""
    from diffusion_elbo.builders import build_datamodule, build_model, build_schedule, resolve_device
    from diffusion_elbo.config import validate_config

    validate_config(cfg)
    fabric = _launch_processes(cfg)
    device = fabric.device if fabric is not None else resolve_device(cfg.device)
    rank, _ = _rank_world()
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
    likelihood = Likelihood(cfg.get("likelihood") or Likelihood.ELBO.value)
    network = model.to(device).eval()
    model = denoiser_for(network, trained_variance, variance_name)
    schedule = schedule.to(device)
    datamodule.setup("test" if cfg.split == "test" else "fit")
    dataset = datamodule.split(cfg.split)
    if cfg.num_examples is not None:
        dataset = Subset(dataset, range(min(int(cfg.num_examples), len(dataset))))
    true_nll = getattr(datamodule, "true_nll_nats", None)
    metrics: dict = {}
    columns: dict[str, Tensor] = {}
    if likelihood is not Likelihood.ODE:
        if variance_name == ReverseVariance.ANALYTIC.value:
            # its own generator: the evaluation's draws are then the same whether the table was cached or estimated
            estimation = torch.Generator(device=device).manual_seed(int(cfg.seed) + 1)
            if rank == 0:  # estimated (and cached next to the checkpoint) once; the other ranks read the cache
                variance = analytic_table(cfg, model, schedule, datamodule, parametrization, device, estimation)
            _barrier()
            if rank != 0:
                variance = analytic_table(cfg, model, schedule, datamodule, parametrization, device, estimation)
        summary = _run_elbo(
            cfg,
            model,
            schedule,
            dataset,
            datamodule,
            parametrization,
            variance,
            decoder_variance,
            device,
            true_nll,
        )
        metrics.update(summary.metrics())
        columns["bpd"] = nats_to_bits_per_dim(summary.total / summary.num_dims)
    if likelihood is not Likelihood.ELBO:
        ode = _run_ode(
            cfg,
            mean_denoiser(network, trained_variance),
            schedule,
            dataset,
            datamodule,
            parametrization,
            device,
            true_nll,
        )
        metrics.update(ode.metrics())
        columns["ode_bpd"] = nats_to_bits_per_dim(ode.nll / ode.num_dims)
    if rank != 0:  # the other ranks' examples are in rank 0's results; it alone writes them
        return metrics
    if cfg.ckpt_path is not None and hasattr(loaded.module, "logsnr") and likelihood is not Likelihood.ODE:
        # a continuous-time model: its own bound (T -> infinity, or its training T) beside the chain's exact T-step one
        continuous = evaluate_continuous(
            loaded.module,
            dataset,
            strata=int(OmegaConf.select(cfg, "continuous_strata", default=64)),
            seed=int(cfg.seed),
            device=device,
            batch_size=int(cfg.batch_size),
            max_batch=int(cfg.max_batch),
        )
        metrics["continuous"] = continuous.metrics()
        metrics["continuous"]["timesteps"] = loaded.module.timesteps  # null: the continuous-time bound
        columns["continuous_bpd"] = nats_to_bits_per_dim(continuous.total / continuous.num_dims)
        if "bpd" in columns:  # the chain's T-step bound minus the continuous one, paired per example
            diff = columns["bpd"] - columns["continuous_bpd"]
            metrics["chain_minus_continuous_bpd"] = float(diff.mean())
            metrics["chain_minus_continuous_bpd_se"] = standard_error(diff)
    if likelihood is Likelihood.BOTH:
        # -ELBO - (-log p_ODE) per example: how far the bound sits above the model's own likelihood, paired
        diff = columns["bpd"] - columns["ode_bpd"]
        metrics["elbo_minus_ode_bpd"] = float(diff.mean())
        metrics["elbo_minus_ode_bpd_se"] = standard_error(diff)
    metrics.update(
        {
            "likelihood": likelihood.value,
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
        metrics.update(_checkpoint_fid(cfg, loaded.module, datamodule, device, loaded.config))
    path = write_metrics(metrics, output_dir)
    write_per_example(columns, output_dir)
    if cfg.ckpt_path is not None and OmegaConf.select(cfg, "wandb.enabled", default=False):
        _log_to_training_run(cfg, loaded.config, metrics)
    log.info(_summary_line(metrics))
    log.info("metrics written to %s", path)
    print(f"metrics: {path}")
    return metrics


def _launch_processes(cfg: DictConfig):
    """``trainer.devices=N`` (N > 1, or a list): N processes on ``trainer.accelerator`` (cpu: gloo, gpu: NCCL), started
    by Lightning Fabric as training starts them (rank > 0 runs this script again); the examples are then sharded over
    them without padding and the per-example results gathered, so the numbers are those of one process. None for one
    process."""
    devices = OmegaConf.select(cfg, "trainer.devices", default=1)
    if devices in (1, "1", None):
        return None
    from lightning.fabric import Fabric

    accelerator = OmegaConf.select(cfg, "trainer.accelerator", default="auto")
    num_nodes = int(OmegaConf.select(cfg, "trainer.num_nodes", default=1) or 1)
    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy="ddp")
    fabric.launch()
    return fabric


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def evaluate_continuous(
    module, dataset, *, strata: int, seed: int, device: torch.device, batch_size: int = 256, max_batch: int = 512
) -> ELBOSummary:
    """The continuous model's own bound (:func:`~diffusion_elbo.core.vdm.stratified_continuous_elbo`, ``strata``
    times per example) over ``dataset``; every example draws its times and noise from its own generator
    (:func:`example_generator`), so the numbers do not depend on the batching."""
    from diffusion_elbo.core.vdm import continuous_example_draws, stratified_continuous_elbo

    module = module.to(device).eval()
    module.refresh_schedule()
    module._note_precision()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    parts: dict[str, list[Tensor]] = {"total": [], "reconstruction": [], "prior": [], "denoising": []}
    per_t_sum, count, index = None, 0, 0
    for batch in loader:
        x0 = batch[0].to(device).float()
        indices = torch.arange(index, index + x0.shape[0])
        u, eps = continuous_example_draws(indices, seed, strata, tuple(x0.shape[1:]))  # (B, K), (B, K, *D)
        result = stratified_continuous_elbo(
            module._network_float32,
            module.logsnr,
            x0,
            parametrization=module.parametrization,
            num_bins=module.num_bins,
            strata=strata,
            u=u.to(device),
            eps=eps.to(device),
            timesteps=module.timesteps,
            chain_timesteps=module.eval_timesteps,
            max_batch=max_batch,
        )
        for key, values in (
            ("total", result.total),
            ("reconstruction", result.reconstruction),
            ("prior", result.prior),
            ("denoising", result.denoising),
        ):
            parts[key].append(values.double().cpu())
        batch_sum = result.per_t.sum(dim=0).cpu()
        per_t_sum = batch_sum if per_t_sum is None else per_t_sum + batch_sum
        count += x0.shape[0]
        index += x0.shape[0]
    if count == 0:
        raise ValueError("no examples to evaluate: the data split is empty (check split= and num_examples=)")
    return ELBOSummary(
        total=torch.cat(parts["total"]),
        reconstruction=torch.cat(parts["reconstruction"]),
        prior=torch.cat(parts["prior"]),
        denoising=torch.cat(parts["denoising"]),
        per_t=per_t_sum / count,
        num_dims=result.num_dims,
    )


def _training_run_group_and_name(run_dir: Path, train_cfg: dict) -> tuple[str | None, str | None]:
    """The W&B group and name the training run in ``run_dir`` was given, so the eval's records of the resumed run say
    the same: ``logger.wandb.group``/``name`` when set, else for a job of a sweep (its ``.hydra/hydra.yaml`` says
    MULTIRUN) the sweep's group and the job's folder name, as :func:`~diffusion_elbo.training.sweep_group_and_name`
    gave them; None (the run's own) otherwise."""
    from diffusion_elbo.training import sweep_group

    wandb_cfg = OmegaConf.select(OmegaConf.create(train_cfg), "logger.wandb") or {}
    group, name = wandb_cfg.get("group"), wandb_cfg.get("name")
    hydra_yaml = run_dir / ".hydra" / "hydra.yaml"
    if hydra_yaml.is_file():
        hydra_cfg = OmegaConf.load(hydra_yaml).hydra
        if str(hydra_cfg.mode) == "MULTIRUN":  # the job's folder sits directly in the sweep's (hydra.sweep.subdir)
            group = group or sweep_group(hydra_cfg.job.name, run_dir.parent)
            name = name or run_dir.name
    return group, name


def _log_to_training_run(cfg: DictConfig, train_cfg: dict, metrics: dict) -> None:
    """The eval's scalars as ``test/<key>`` in the summary of the checkpoint's own W&B run (same id, resumed), so a
    dashboard shows them beside the run's training curves. Nothing is logged for a run trained without W&B."""
    from diffusion_elbo.builders import resolve_wandb_mode

    run_dir = Path(cfg.ckpt_path).resolve().parent.parent
    id_file = run_dir / "wandb_run_id.txt"
    if not id_file.is_file():
        log.info("no W&B run to add the eval to (%s has no wandb_run_id.txt)", run_dir)
        return
    import wandb

    project = OmegaConf.select(OmegaConf.create(train_cfg), "logger.wandb.project") or "diffusion-elbo"
    group, name = _training_run_group_and_name(run_dir, train_cfg)
    if wandb.run is not None:  # e.g. a notebook that trained in this process: its run ends before the eval's resumes
        wandb.finish()
    run = wandb.init(
        id=id_file.read_text().strip(),
        resume="allow",
        project=project,
        group=group,
        name=name,
        dir=str(run_dir),
        mode=resolve_wandb_mode(cfg.wandb.mode),
    )
    try:
        scalars = {f"test/{k}": v for k, v in metrics.items() if isinstance(v, int | float | str) and k != "ckpt_path"}
        run.summary.update({**scalars, "test/ckpt": Path(cfg.ckpt_path).name})
    finally:
        run.finish()


def _run_elbo(
    cfg, model, schedule, dataset, datamodule, parametrization, variance, decoder_variance, device, true_nll
) -> ELBOSummary:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    _, world = _rank_world()
    total_steps = math.ceil(len(dataset) / world / int(cfg.batch_size)) * schedule.T
    columns = (TextColumn("eval -ELBO"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    lines = ProgressLog("eval -ELBO", total_steps, "timesteps x batches", every_s=_progress_every_s(cfg))
    with Progress(*columns, transient=True, disable=not interactive()) as bar:
        task = bar.add_task("eval", total=total_steps)
        last = {"t": 0, "done": 0}

        def progress(t: int, T: int) -> None:
            # exact_elbo reports the last timestep done in each batch; it restarts at 1 every batch
            bar.advance(task, t - last["t"])
            last["done"] += t - last["t"]
            last["t"] = t % T
            batches = last["done"] // T
            examples = min(len(dataset), batches * int(cfg.batch_size) * world)
            lines.update(last["done"], f"{examples}/{len(dataset)} examples done, t {t}/{T} of this batch")

        return evaluate_elbo(
            model,
            schedule,
            dataset,
            parametrization=parametrization,
            variance=variance,
            decoder_variance=decoder_variance,
            num_bins=datamodule.num_bins,
            seed=int(cfg.seed),
            device=device,
            batch_size=int(cfg.batch_size),
            max_batch=int(cfg.max_batch),
            true_nll=true_nll,
            progress=progress,
        )


def _run_ode(cfg, model, schedule, dataset, datamodule, parametrization, device, true_nll) -> ODESummary:
    o = cfg.ode
    log.info(
        "probability-flow ODE likelihood of %d examples (%s, rtol %g, atol %g, %s divergence%s)",
        len(dataset),
        o.method,
        float(o.rtol),
        float(o.atol),
        o.divergence,
        f", {int(o.probes)} probe(s)" if o.divergence == "hutchinson" else "",
    )
    lines = ProgressLog("ODE likelihood", len(dataset), "examples", every_s=_progress_every_s(cfg))
    return evaluate_ode(
        model,
        schedule,
        dataset,
        progress=lambda done, nfe: lines.update(done, f"{nfe} NFE in the last solve"),
        parametrization=parametrization,
        num_bins=datamodule.num_bins,
        seed=int(cfg.seed),
        device=device,
        batch_size=int(o.batch_size or cfg.batch_size),
        t_start=None if o.t_start is None else float(o.t_start),
        divergence=o.divergence,
        probes=int(o.probes),
        dequantization_samples=int(o.dequantization_samples),
        dequantization=o.get("dequantization") or "uniform",
        rtol=float(o.rtol),
        atol=float(o.atol),
        method=o.method,
        true_nll=true_nll,
    )


def _summary_line(metrics: dict) -> str:
    parts = []
    if "bpd" in metrics:
        line = f"bpd = {metrics['bpd']:.4f} ± {metrics['bpd_se']:.4f} (-ELBO, reverse variance {metrics['variance']})"
        if "true_nll_bpd" in metrics:
            line += f" (true NLL {metrics['true_nll_bpd']:.4f} bpd, gap {metrics['gap_bpd']:.4f} ± {metrics['gap_bpd_se']:.4f})"
        parts.append(line)
    if "ode_bpd" in metrics:
        bound = ", a dequantization bound" if metrics["ode_dequantization"] != "none" else ""
        line = (
            f"ODE bpd = {metrics['ode_bpd']:.4f} ± {metrics['ode_bpd_se']:.4f} (probability-flow likelihood{bound}; "
            f"{metrics['ode_nfe']:.0f} NFE per solve, {metrics['ode_seconds_per_example']:.3f} s per example)"
        )
        if "ode_gap_bpd" in metrics:
            line += f" (minus true NLL: {metrics['ode_gap_bpd']:.4f} ± {metrics['ode_gap_bpd_se']:.4f})"
        parts.append(line)
    if "continuous" in metrics:
        c = metrics["continuous"]
        kind = "continuous-time" if c["timesteps"] is None else f"{c['timesteps']}-step"
        parts.append(f"{kind} bound = {c['bpd']:.4f} ± {c['bpd_se']:.4f} bpd (the model's own estimator)")
    if "elbo_minus_ode_bpd" in metrics:
        parts.append(f"-ELBO - ODE NLL = {metrics['elbo_minus_ode_bpd']:.4f} ± {metrics['elbo_minus_ode_bpd_se']:.4f}")
    if "fid" in metrics:
        line = f"FID ({metrics['fid_features']}, {metrics['fid_num_samples']} samples) = {metrics['fid']:.3f}"
        if metrics.get("fid_classifier_accuracy") is not None:
            line += f" [feature classifier test accuracy {metrics['fid_classifier_accuracy']:.4f}]"
        parts.append(line)
    return "; ".join(parts)


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


def _checkpoint_fid(cfg: DictConfig, module, datamodule, device: torch.device, train_config: dict) -> dict:
    from diffusion_elbo.checkpoints import sampler_spacing
    from diffusion_elbo.fid import make_fid
    from diffusion_elbo.lightning.callbacks import compute_fid

    f = cfg.fid
    spacing = sampler_spacing(OmegaConf.select(f, "spacing", default=None), train_config)
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
        spacing=spacing,
        batch_size=int(f.batch_size),
        seed=int(cfg.seed),
    )
    return {
        "fid": value,
        "fid_features": f.features,
        "fid_num_samples": int(f.num_samples),
        # the grid is named only where it is not DDIM's evenly spaced timesteps, so earlier records stay comparable
        "fid_sampler": f"{f.sampler}-{f.steps or 'T'}" + ("" if spacing == "time" else f"-{spacing}"),
        "fid_classifier_accuracy": fid.classifier_accuracy,
    }


def _progress_every_s(cfg: DictConfig) -> float:
    """Seconds between progress lines in the log when the output is not a terminal (``progress_every_s``)."""
    every_s = OmegaConf.select(cfg, "progress_every_s", default=None)
    return 30.0 if every_s is None else float(every_s)
