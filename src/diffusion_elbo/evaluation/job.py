"""The ``src/eval.py`` job: the likelihoods a config asks for (the exact -ELBO, the probability-flow ODE, a
continuous-time model's own bound), FID for image checkpoints, then metrics.json, per_example.csv, the console
summary and the checkpoint's W&B run."""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import Subset

from diffusion_elbo.analytic import analytic_table
from diffusion_elbo.core import DecoderVariance, Parametrization, ReverseVariance, standard_error
from diffusion_elbo.core.reverse import denoiser_for, mean_denoiser
from diffusion_elbo.evaluation.estimators import EvalRun, EvalSubject
from diffusion_elbo.evaluation.runner import barrier, launch_processes, rank_world
from diffusion_elbo.records import write_metrics, write_per_example

log = logging.getLogger(__name__)


@dataclass
class _Evaluated:
    """The eval job's subject (:class:`EvalSubject`, what the estimators see) with its data and its checkpoint."""

    subject: EvalSubject
    datamodule: object
    dataset: object
    loaded: object = None  # the checkpoint (checkpoints.load_for_eval), None for a model built from the config


def _subject(cfg: DictConfig, device: torch.device) -> _Evaluated:
    from diffusion_elbo.builders import build_datamodule, build_model, build_schedule, is_continuous
    from diffusion_elbo.core.time_axis import CHAIN_DECODER_VARIANCE

    loaded = None
    if cfg.ckpt_path is not None:
        from diffusion_elbo.checkpoints import load_for_eval

        loaded = load_for_eval(cfg.ckpt_path, device)
        network, schedule, datamodule = loaded.model, loaded.schedule, loaded.datamodule
        parametrization, trained_variance = loaded.parametrization, loaded.variance.value
        trained_decoder = loaded.decoder_variance
    else:
        schedule = build_schedule(cfg)
        datamodule = build_datamodule(cfg)
        # a model built here has variance outputs only when learned_range is asked for (build_model)
        trained_variance = cfg.variance if cfg.variance == ReverseVariance.LEARNED_RANGE.value else "small"
        network = build_model(cfg, schedule=schedule)  # an oracle's chain: the one the bound is evaluated on
        parametrization = cfg.parametrization
        trained_decoder = (CHAIN_DECODER_VARIANCE if is_continuous(cfg) else DecoderVariance.CLIPPED).value
    variance = str(ReverseVariance(cfg.variance or trained_variance).value)
    network = network.to(device).eval()
    datamodule.setup("test" if cfg.split == "test" else "fit")
    dataset = datamodule.split(cfg.split)
    if cfg.num_examples is not None:
        dataset = Subset(dataset, range(min(int(cfg.num_examples), len(dataset))))
    subject = EvalSubject(
        network=network,
        model=denoiser_for(network, trained_variance, variance),
        mean_model=mean_denoiser(network, trained_variance),
        schedule=schedule.to(device),
        parametrization=parametrization,
        trained_variance=trained_variance,
        variance=variance,
        decoder_variance=DecoderVariance(cfg.get("decoder_variance") or trained_decoder).value,
        num_bins=datamodule.num_bins,
    )
    evaluated = _Evaluated(subject=subject, datamodule=datamodule, dataset=dataset, loaded=loaded)
    subject.continuous_bound = _continuous_bound_inputs(cfg, evaluated, device)
    subject.variance_table = lambda: _analytic_variance(cfg, evaluated, device)
    return evaluated


def run_eval(cfg: DictConfig, output_dir: str | Path) -> dict:
    """The ``src/eval.py`` job: each estimator of ``likelihood`` (the exact bits/dim with its terms and per-t profile, a
    continuous-time model's own bound, the probability-flow ODE's likelihood, or one's own) on the same examples, their
    paired differences, FID for image checkpoints, saved to metrics.json and per_example.csv. Under
    ``trainer.devices=N`` every estimator is sharded over the N processes."""
    from diffusion_elbo.builders import build_estimators, resolve_device
    from diffusion_elbo.cli import likelihood_name
    from diffusion_elbo.config import validate_config

    validate_config(cfg)
    fabric = launch_processes(cfg)
    device = fabric.device if fabric is not None else resolve_device(cfg.device)
    e = _subject(cfg, device)
    s = e.subject
    run = EvalRun(
        seed=int(cfg.seed),
        device=device,
        batch_size=int(cfg.batch_size),
        max_batch=int(cfg.max_batch),
        true_nll=getattr(e.datamodule, "true_nll_nats", None),
        progress_every_s=_progress_every_s(cfg),
    )
    metrics: dict = {}
    columns: dict[str, Tensor] = {}  # per-example bits/dim, in data order
    for estimator in build_estimators(cfg).values():
        estimate = estimator.evaluate(s, e.dataset, run)
        if estimate is not None:
            metrics.update(estimate.metrics)
            columns.update(estimate.columns)
    if rank_world()[0] != 0:  # the other ranks' examples are in rank 0's results; it alone writes them
        return metrics
    metrics.update(_paired_differences(columns))
    metrics.update(
        {
            "likelihood": likelihood_name(OmegaConf.select(cfg, "likelihood")),
            "split": cfg.split,
            "schedule": s.schedule.name,
            "timesteps": s.schedule.T,
            "parametrization": str(Parametrization(s.parametrization).value),
            "variance": s.variance,
            "trained_variance": s.trained_variance,
            # sigma_1^2 of small/large (analytic and learned_range have their own)
            "decoder_variance": s.decoder_variance,
            "ckpt_path": cfg.ckpt_path,
        }
    )
    if e.loaded is not None and _wants_fid(cfg, e.datamodule):
        metrics.update(_checkpoint_fid(cfg, e.loaded.module, e.datamodule, device, e.loaded.config))
    path = write_metrics(metrics, output_dir)
    write_per_example(columns, output_dir)
    if e.loaded is not None and OmegaConf.select(cfg, "wandb.enabled", default=False):
        _log_to_training_run(cfg, e.loaded.config, metrics)
    log.info(_summary_line(metrics))
    log.info("metrics written to %s", path)
    print(f"metrics: {path}")
    return metrics


def _continuous_bound_inputs(cfg: DictConfig, e: _Evaluated, device: torch.device) -> dict | None:
    """The inputs of :func:`evaluate_continuous` where the subject has a continuous-time bound: a continuous-time
    checkpoint (its network, learned or fixed log-SNR schedule and T), or a closed-form oracle built from the config on
    a continuous-time schedule (``x0_at_log_snr``); None otherwise."""
    from diffusion_elbo.builders import build_logsnr, is_continuous
    from diffusion_elbo.models.oracle import ClosedFormOracle

    if e.loaded is not None:
        module = e.loaded.module
        return module.to(device).bound_inputs()
    if not (is_continuous(cfg) and isinstance(e.subject.network, ClosedFormOracle)):
        return None
    schedule = build_logsnr(cfg)
    eval_timesteps = int(OmegaConf.select(cfg, "schedule.eval_timesteps", default=1000))
    return {
        "denoiser": e.subject.network.x0_at_log_snr,
        "logsnr": schedule.window().to(device),
        "parametrization": Parametrization.X0,
        "num_bins": e.datamodule.num_bins,
        "timesteps": OmegaConf.select(cfg, "schedule.timesteps"),
        "chain_timesteps": schedule.discretize(eval_timesteps).T - 1,  # the chain steps the window spans
    }


def _analytic_variance(cfg: DictConfig, e: _Evaluated, device: torch.device) -> Tensor:
    """The analytic reverse variance's table (estimated by rank 0 and cached next to the checkpoint; the other ranks
    read the cache)."""
    s = e.subject
    # its own generator: the evaluation's draws are then the same whether the table was cached or estimated
    estimation = torch.Generator(device=device).manual_seed(int(cfg.seed) + 1)

    def table() -> Tensor:
        return analytic_table(
            cfg,
            s.model,
            schedule=s.schedule,
            datamodule=e.datamodule,
            parametrization=s.parametrization,
            device=device,
            generator=estimation,
        )

    rank = rank_world()[0]
    estimated = table() if rank == 0 else None  # rank 0 estimates and writes the cache
    barrier()
    return estimated if rank == 0 else table()  # the others read it


def _paired_differences(columns: dict[str, Tensor]) -> dict:
    """Per-example differences of two likelihoods of the same examples, with their standard errors (paired: far
    smaller than either SE): the chain's T-step bound minus a continuous model's own, the bound minus the ODE's
    -log-likelihood (how far the bound sits above the model's own likelihood), and the bound minus any other
    estimator's column (``elbo_minus_<name>_bpd`` for a column ``<name>_bpd``)."""
    pairs = [("chain_minus_continuous", "bpd", "continuous_bpd"), ("elbo_minus_ode", "bpd", "ode_bpd")]
    known = {"bpd", "continuous_bpd", "ode_bpd"}
    pairs += [(f"elbo_minus_{c.removesuffix('_bpd')}", "bpd", c) for c in columns if c not in known]
    out = {}
    for name, a, b in pairs:
        if a in columns and b in columns:
            diff = columns[a] - columns[b]
            out[f"{name}_bpd"] = float(diff.mean())
            out[f"{name}_bpd_se"] = standard_error(diff)
    return out


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


def resume_training_wandb_run(run_dir: Path, train_cfg: dict, mode: str):
    """The W&B run of the training run in ``run_dir`` (its ``wandb_run_id.txt``), resumed in its project, group and
    name, so what a later job adds shows beside the run's training curves; None for a run trained without W&B. The
    caller finishes it."""
    from diffusion_elbo.builders import resolve_wandb_mode

    id_file = Path(run_dir) / "wandb_run_id.txt"
    if not id_file.is_file():
        log.info("no W&B run to add to (%s has no wandb_run_id.txt)", run_dir)
        return None
    import wandb

    logger = OmegaConf.create(train_cfg)
    project = OmegaConf.select(logger, "logger.wandb.project") or "diffusion-elbo"
    group, name = _training_run_group_and_name(Path(run_dir), train_cfg)
    if wandb.run is not None:  # e.g. a notebook that trained in this process: its run ends before this one resumes
        wandb.finish()
    return wandb.init(
        id=id_file.read_text().strip(),
        resume="allow",
        entity=OmegaConf.select(logger, "logger.wandb.entity", default=None),  # the run's own team, where it had one
        project=project,
        group=group,
        name=name,
        dir=str(run_dir),
        mode=resolve_wandb_mode(mode),
    )


def _log_to_training_run(cfg: DictConfig, train_cfg: dict, metrics: dict) -> None:
    """The eval's scalars as ``test/<key>`` in the summary of the checkpoint's own W&B run (same id, resumed), so a
    dashboard shows them beside the run's training curves. Nothing is logged for a run trained without W&B."""
    run = resume_training_wandb_run(Path(cfg.ckpt_path).resolve().parent.parent, train_cfg, cfg.wandb.mode)
    if run is None:
        return
    try:
        scalars = {f"test/{k}": v for k, v in metrics.items() if isinstance(v, int | float | str) and k != "ckpt_path"}
        run.summary.update({**scalars, "test/ckpt": Path(cfg.ckpt_path).name})
    finally:
        run.finish()


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
    for key in _other_estimates(metrics):
        parts.append(f"{key.removesuffix('_bpd')} = {metrics[key]:.4f} ± {metrics[key + '_se']:.4f} bpd")
    if "fid" in metrics:
        line = f"FID ({metrics['fid_features']}, {metrics['fid_num_samples']} samples) = {metrics['fid']:.3f}"
        if "fid_sd" in metrics:
            line += f" ± {metrics['fid_sd']:.3f} (sd over {len(metrics['fids'])} sampling seeds)"
        if metrics.get("fid_classifier_accuracy") is not None:
            line += f" [feature classifier test accuracy {metrics['fid_classifier_accuracy']:.4f}]"
        parts.append(line)
    return "; ".join(parts)


def _other_estimates(metrics: dict) -> list[str]:
    """The ``<name>_bpd`` keys (with ``<name>_bpd_se``) of estimators other than the built-in ones and their pairs."""
    shown = ("bpd", "ode_bpd", "true_nll_bpd", "gap_bpd", "ode_gap_bpd")
    return [k for k in metrics if k.endswith("_bpd") and f"{k}_se" in metrics and k not in shown and "_minus_" not in k]


def _wants_fid(cfg: DictConfig, datamodule) -> bool:
    fid_cfg = cfg.get("fid")
    if fid_cfg is None or int(fid_cfg.num_samples) < 1 or len(datamodule.data_shape) != 3:
        return False
    if fid_cfg.features == "classifier" and not datamodule.has_labels:
        log.info("FID skipped: %s has no labels for the feature classifier", type(datamodule).__name__)
        return False
    return True


def _checkpoint_fid(cfg: DictConfig, module, datamodule, device: torch.device, train_config: dict) -> dict:
    from diffusion_elbo.builders import build_sampler
    from diffusion_elbo.fid import compute_fid, make_fid

    f = cfg.fid
    sampler = build_sampler(f.sampler, train_config)
    fid = make_fid(
        datamodule,
        features=f.features,
        cache_dir=f.cache_dir,
        weights_path=f.weights_path,
        classifier_steps=int(f.classifier_steps),
        device=device,
    )
    seeds = [int(cfg.seed) + k for k in range(int(OmegaConf.select(f, "seeds", default=1) or 1))]
    values = [
        compute_fid(
            module,
            fid,
            num_samples=int(f.num_samples),
            rank=0,
            world_size=1,
            sampler=sampler,
            batch_size=int(f.batch_size),
            seed=seed,
        )
        for seed in seeds
    ]
    spread = {}
    if len(values) > 1:  # the sampling noise of the FID: each seed's own x_T for every sample
        spread = {"fid_sd": statistics.stdev(values), "fids": values, "fid_seeds": seeds}
    return {
        "fid": statistics.mean(values),
        **spread,
        "fid_features": f.features,
        "fid_num_samples": int(f.num_samples),
        # the grid is named only where it is not DDIM's evenly spaced timesteps, so earlier records stay comparable
        "fid_sampler": sampler.label,
        "fid_classifier_accuracy": fid.classifier_accuracy,
    }


def _progress_every_s(cfg: DictConfig) -> float:
    """Seconds between progress lines in the log when the output is not a terminal (``progress_every_s``)."""
    every_s = OmegaConf.select(cfg, "progress_every_s", default=None)
    return 30.0 if every_s is None else float(every_s)
