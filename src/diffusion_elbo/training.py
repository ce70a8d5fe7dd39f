"""The ``src/train.py`` job: build everything from the config, fit, write the final metrics."""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf, read_write

from diffusion_elbo.builders import build_callbacks, build_loggers, build_module
from diffusion_elbo.checkpoints import CheckpointError, read_checkpoint
from diffusion_elbo.cli import (
    RunProtected,
    UserError,
    clear_failure,
    rank_failures,
    resume_command,
    run_dir_chosen,
    write_failure,
)
from diffusion_elbo.config import validate_config
from diffusion_elbo.data.base import DiffusionDataModule
from diffusion_elbo.lightning.callbacks import AtomicCheckpointIO, LastCheckpoint, ResumedOptimizerSettings
from diffusion_elbo.lightning.environments import SubmititLocalEnvironment
from diffusion_elbo.records import write_metrics
from diffusion_elbo.resume import check_resume_config
from diffusion_elbo.run_dir import check_output_dir, hold_run_dir

log = logging.getLogger(__name__)


def sweep_group_and_name() -> tuple[str | None, str | None]:
    """In a Hydra multirun, every run shares a W&B group named after the sweep and is named by its overrides."""
    if not HydraConfig.initialized():
        return None, None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None, None
    return sweep_group(hc.job.name, hc.sweep.dir), Path(hc.runtime.output_dir).name  # the job's folder name


def config_choices() -> dict:
    """``{"choices": {"schedule": "cosine", "model": "unet", ...}}``: the option each config group was given (Hydra's
    record), so a dashboard groups runs by the words users typed (the nodes themselves hold ``_target_`` and arguments);
    empty when no Hydra run is active (``train(cfg)`` called directly)."""
    if not HydraConfig.initialized():
        return {}
    choices = HydraConfig.get().runtime.choices
    return {"choices": {str(k): v for k, v in choices.items() if not str(k).startswith("hydra/") and v is not None}}


def sweep_group(job_name: str, sweep_dir: str | Path) -> str:
    """The W&B group of a sweep's runs, e.g. ``train-2026-12-04_14-30-00``: the job's name and the sweep folder's."""
    return f"{job_name}-{Path(sweep_dir).name}"


# the bounds whose W&B summary is the best (lowest) value of the run, not the last one
MIN_SUMMARY_METRICS = ("val/elbo_bpd", "val/denoising_bpd", "val/reconstruction_bpd", "val/fid")


def define_wandb_metrics(trainer: L.Trainer) -> None:
    """W&B's run summary keeps the minimum of the validation bounds and FID (a dashboard's "best" column); every
    metric is plotted against ``trainer/global_step`` (Lightning's WandbLogger defines that step metric)."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and trainer.is_global_zero:
            for key in MIN_SUMMARY_METRICS:
                logger.experiment.define_metric(key, summary="min", step_metric="trainer/global_step")


@contextmanager
def wandb_run_ends_with_the_job(loggers: list) -> Iterator[None]:
    """Finish this process's W&B run when the job ends, however it ends, with the status the process exits with: 0 when
    the job returns or stops on SIGTERM (Lightning's ``SIGTERMException`` is ``SystemExit(None)``; the run resumes
    later), a ``SystemExit``'s own code (Ctrl-C: Lightning exits with 1), 1 for any other exception (W&B then shows the
    run as failed). Lightning's WandbLogger never finishes its run, and a new WandbLogger in the same process reuses a
    run in progress, so without this every job after the first of a multirun (the basic and joblib launchers and
    Optuna run many jobs in one process) wrote into the first job's run, under its name and config."""
    from lightning.pytorch.loggers import WandbLogger

    if not any(isinstance(logger, WandbLogger) for logger in loggers):
        yield
        return
    import wandb

    try:
        yield
    except BaseException as exc:
        if wandb.run is not None:
            code = exc.code if isinstance(exc, SystemExit) else 1
            wandb.run.finish(exit_code=code if isinstance(code, int) else int(code is not None))
        raise
    if wandb.run is not None:
        wandb.run.finish(exit_code=0)


# what Lightning's subprocess launcher writes into the launching process's environment
DDP_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


@contextmanager
def ddp_children_run_this_job(output_dir: str) -> Iterator[None]:
    """Under a Hydra multirun, Lightning's DDP launcher starts each rank > 0 as ``python <script> <sys.argv[1:]>
    hydra.run.dir=<HydraConfig run.dir>`` (``_hydra_subprocess_cmd``): the whole sweep again, in the wrong folder.
    For the length of ``fit``, that command is made this job alone: the job's own overrides (``-m`` and the sweep
    dropped) and its own folder; both are restored afterwards, with the environment variables Lightning's launcher
    set and the process group, so the next job starts its processes afresh. A no-op outside a multirun."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        yield
        return
    hydra_cfg = HydraConfig.instance().cfg
    argv, run_dir = sys.argv[:], hydra_cfg.hydra.run.dir
    lightning_env = {key: os.environ.get(key) for key in DDP_LAUNCH_ENV}
    sys.argv = [sys.argv[0], *[str(o) for o in hydra_cfg.hydra.overrides.task]]
    with read_write(hydra_cfg.hydra.run):
        hydra_cfg.hydra.run.dir = str(output_dir)
    try:
        yield
    finally:
        sys.argv = argv
        with read_write(hydra_cfg.hydra.run):
            hydra_cfg.hydra.run.dir = run_dir
        # the next job of the sweep starts its own processes: Lightning would reuse this job's process group, whose
        # other ranks have exited ("Connection closed by peer"), and the LOCAL_RANK its launcher wrote into this
        # process's environment would make it believe the processes are started externally (and wait for them)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key, value in lightning_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, which a scheduler or container may narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def warn_if_flipped_twice(module: L.LightningModule, datamodule: L.LightningDataModule) -> None:
    """A warning when the data are flipped at random (``data.random_flip``) and the augmentation flips with a label
    (``augment.xflip``): the flipped data already hold every image both ways, so the label of the augmentation's flip
    tells the network nothing and that share of the training is spent on no augmentation (EDM turns the dataset's
    flips off when it augments)."""
    augmentation = getattr(module, "augmentation", None)
    if getattr(datamodule, "random_flip", False) and getattr(augmentation, "xflip", False):
        log.warning(
            "data.random_flip=true and augment.xflip=true both mirror the training images: with the data already "
            "flipped at random, the augmentation's flip label carries nothing; set data.random_flip=false (EDM's "
            "choice with augmentation) or augment.xflip=false"
        )


def warn_if_processes_exceed_cores(trainer: L.Trainer) -> None:
    """A warning when ``trainer.devices`` CPU processes outnumber the cores: each then gets less than one core, every
    step waits for the slowest, and the run is slower than on fewer processes (it would otherwise start silently)."""
    from lightning.pytorch.accelerators import CPUAccelerator

    cores = usable_cores()
    if isinstance(trainer.accelerator, CPUAccelerator) and trainer.num_devices > cores and trainer.global_rank == 0:
        log.warning(
            "trainer.devices=%d starts %d training processes on the CPU, and this machine gives this run %d core(s): "
            "they share them, and the run is slower than with trainer.devices=%d or fewer (or a GPU: trainer=gpu)",
            trainer.num_devices,
            trainer.num_devices,
            cores,
            cores,
        )


def check_steps_left(cfg: DictConfig, checkpoint: dict, path: Path) -> None:
    """Refuse a resume from a checkpoint already at ``trainer.max_steps`` (or past ``callbacks.cpu_budget.minutes``):
    nothing is left to train, and the job would overwrite the finished run's train_metrics.json with a near-empty one.
    Training longer is a larger max_steps (or budget)."""
    budget = OmegaConf.select(cfg, "callbacks.cpu_budget.minutes", default=None)
    spent = float(checkpoint.get("callbacks", {}).get("CPUBudget", {}).get("spent_s", 0.0))
    if budget is not None and spent >= 60 * float(budget):
        raise RunProtected(
            f"checkpoint {path} has spent {spent / 60:.2f} CPU-minutes and callbacks.cpu_budget.minutes={budget}: the "
            f"run is finished and nothing is left to train. To train it longer, resume with a larger budget (e.g. "
            f"callbacks.cpu_budget.minutes={2 * float(budget):g}); to evaluate it, `python src/eval.py ckpt_path={path}`."
        )
    max_steps = int(OmegaConf.select(cfg, "trainer.max_steps", default=-1) or -1)
    step = int(checkpoint.get("global_step", 0))
    if max_steps > 0 and step >= max_steps and not OmegaConf.select(cfg, "trainer.fast_dev_run"):
        raise RunProtected(
            f"checkpoint {path} is at step {step} and trainer.max_steps={max_steps}: the run is finished and nothing "
            f"is left to train. To train it longer, resume with a larger trainer.max_steps (e.g. "
            f"trainer.max_steps={2 * step}); to evaluate it, `python src/eval.py ckpt_path={path}`."
        )


def newest_run_with_checkpoint(runs_dir: Path, *, exclude: Path) -> Path | None:
    """The run folder under ``runs_dir`` whose newest checkpoint was written last (the run a user most likely means
    to resume); ``exclude`` is this job's own new folder."""
    newest, newest_time = None, float("-inf")
    for run in sorted(runs_dir.glob("*/")) if runs_dir.is_dir() else []:
        written = [p.stat().st_mtime for p in (run / "checkpoints").glob("*.ckpt")]
        if written and run.resolve() != exclude.resolve() and max(written) > newest_time:
            newest, newest_time = run, max(written)
    return newest


def check_resume_folder(output_dir: str | Path, ckpt_path: str | None) -> None:
    """``ckpt_path=last`` resumes the run in this job's folder. Refuse it where the folder is new (no
    ``hydra.run.dir`` given): the run would start from scratch somewhere else. Say which folder to add, with the
    exact command for the newest run that has a checkpoint."""
    out = Path(output_dir)
    if ckpt_path != "last" or run_dir_chosen() or list((out / "checkpoints").glob("*.ckpt")):
        return
    newest = newest_run_with_checkpoint(out.parent, exclude=out)
    if newest is None:
        example = "e.g. `python src/train.py ckpt_path=last hydra.run.dir=outputs/train/runs/<run>`"
    else:
        overrides_file = newest / ".hydra" / "overrides.yaml"
        overrides = [str(o) for o in OmegaConf.load(overrides_file)] if overrides_file.is_file() else []
        example = f"for the newest run with a checkpoint: `{resume_command(newest, overrides)}`"
    raise UserError(
        "ckpt_path=last resumes the run in the folder named by hydra.run.dir, and none was given: this command would "
        f"start from scratch in the new folder {out}. Add hydra.run.dir=<the run's folder> (and the overrides the run "
        f"was started with, in its .hydra/overrides.yaml), {example}"
    )


def find_resume_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step in ``checkpoint_dir`` (``last.ckpt`` normally; never a post-hoc
    EMA's ``posthoc_*.ckpt``): a file cut off by a crash is skipped with a warning, and temporary files of
    interrupted writes are removed."""
    for stale in checkpoint_dir.glob(".*.tmp-*"):
        log.warning("removing %s, left by a checkpoint write that was interrupted", stale)
        stale.unlink(missing_ok=True)
    best, best_step = None, -1
    for path in sorted(checkpoint_dir.glob("*.ckpt")):
        if path.name.startswith("posthoc_"):  # an EMA rebuilt by src/posthoc_ema.py: averaged weights, not the run's
            continue
        try:
            step = int(read_checkpoint(path).get("global_step", -1))
        except CheckpointError as exc:
            log.warning("skipping %s: %s", path, exc)
            continue
        if step > best_step or (step == best_step and path.name == "last.ckpt"):
            best, best_step = path, step
    return best


def check_checkpoint_fits(
    module: L.LightningModule, ckpt_path: str | None, output_dir: str | Path, *, cfg: DictConfig
) -> str | None:
    """Resolve ``last``; check the checkpoint's config allows this job's (:func:`check_resume_config`: the same model,
    noise process and data), that steps are left to train and that its tensors fit the configured
    model, naming the keys that do not."""
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        path = find_resume_checkpoint(Path(output_dir) / "checkpoints")
        if path is None:
            log.warning(
                "ckpt_path=last but %s/checkpoints has no complete checkpoint: starting from scratch", output_dir
            )
            return None
        log.info("resuming from %s", path)
    else:
        path = Path(ckpt_path)
    checkpoint = read_checkpoint(path)
    check_resume_config(checkpoint["diffusion_elbo_config"], module.config, path=path)
    check_steps_left(cfg, checkpoint, path)
    state = checkpoint["state_dict"]
    own = module.state_dict()
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if mismatched or missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} was written by a model of another shape than model={module.net.__class__.__name__} "
            f"as configured: mismatched {mismatched[:6]}, missing {missing[:6]}, unexpected {unexpected[:6]}. "
            "Resume with the same model/data config as the run that wrote it (see its .hydra/config.yaml)."
        )
    return str(path)


# what a collective raises when another process of the run is gone (gloo, NCCL)
PEER_DIED_MARKERS = ("Connection closed by peer", "remote worker", "NCCL communicator")


class PeerDiedError(UserError):
    """This process of a DDP run stopped because another one died; the message names that one's error if it left a
    record (``failure.rank<r>.json``)."""


def peer_died_message(
    trainer: L.Trainer, exc: BaseException, output_dir: str | Path, *, since: float, wait_s: float = 10.0
) -> str:
    """Why a DDP run stopped, for the process that saw another die: the other ranks' own errors, read from the
    failure records they wrote (``rank 1 failed at step 4: NonFiniteLossError: ...``), first, so failure.json, the
    log and the sweep report show the real cause; a rank killed outright (SIGKILL, out of memory) leaves none."""
    records = [r for r in rank_failures(output_dir, since=since, wait_s=wait_s, skip_errors=(PeerDiedError.__name__,))
               if r.get("rank") != trainer.global_rank]  # fmt: skip
    resume = f"the checkpoints are intact: resume with `{resume_command(output_dir)}`."
    if not records:
        return (
            f"another process of this {trainer.world_size}-process run died near step {trainer.global_step}, so "
            f"the run was stopped ({str(exc).splitlines()[0][:200]}). It left no failure record (killed outright: "
            f"SIGKILL, out of memory?); its own log above says why. {resume}"
        )
    causes = "; ".join(
        f"rank {r.get('rank')} failed at step {r.get('step')}: {r.get('error')}: "
        f"{(str(r.get('message') or '').splitlines() or [''])[0][:1000]} (traceback in {r['file']})"
        for r in records
    )
    return f"{causes}. Another process of this {trainer.world_size}-process run died, so the run was stopped; {resume}"


def train(cfg: DictConfig, output_dir: str) -> dict[str, float | str]:
    """Train the configured model; returns the last logged metrics (also saved to train_metrics.json)."""
    validate_config(cfg)
    check_resume_folder(output_dir, cfg.ckpt_path)
    with hold_run_dir(output_dir):  # one job per run folder, until this one ends
        return _train(cfg, output_dir)


def _train(cfg: DictConfig, output_dir: str) -> dict[str, float | str]:
    check_output_dir(output_dir, cfg.ckpt_path)
    L.seed_everything(int(cfg.seed), workers=True)
    if OmegaConf.select(cfg, "matmul_precision"):
        torch.set_float32_matmul_precision(cfg.matmul_precision)

    module, datamodule = build_module(cfg)
    warn_if_flipped_twice(module, datamodule)
    ckpt_path = check_checkpoint_fits(module, cfg.ckpt_path, output_dir, cfg=cfg)
    callbacks = build_callbacks(cfg)
    if ckpt_path is not None:  # this job's optimizer settings over those Lightning restores from the checkpoint
        callbacks.append(ResumedOptimizerSettings())
    for callback in callbacks:  # the command its log line gives after a Ctrl-C, SIGTERM or crash
        if isinstance(callback, LastCheckpoint):
            callback.resume_hint = resume_command(output_dir)
    group, name = sweep_group_and_name()
    loggers = build_loggers(cfg, output_dir, group=group, name=name)
    with wandb_run_ends_with_the_job(loggers):
        return _fit(
            cfg,
            output_dir,
            module=module,
            datamodule=datamodule,
            ckpt_path=ckpt_path,
            callbacks=callbacks,
            loggers=loggers,
        )


def _fit(
    cfg: DictConfig, output_dir: str, *, module, datamodule, ckpt_path: str | None, callbacks: list, loggers: list
) -> dict[str, float | str]:
    """Fit ``module`` with the Trainer of ``cfg.trainer``; returns the last logged metrics (and writes
    train_metrics.json)."""
    if not loggers or OmegaConf.select(cfg, "trainer.fast_dev_run"):
        # LearningRateMonitor refuses a Trainer without a logger (logger=none; fast_dev_run turns loggers off)
        dropped = [c for c in callbacks if isinstance(c, LearningRateMonitor)]
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
        if dropped:
            log.info(
                "no logger: the learning-rate monitor is off (train_metrics.json and loss_curve.csv still written)"
            )
    plugins = [instantiate(cfg.checkpoint_io) if OmegaConf.select(cfg, "checkpoint_io") else AtomicCheckpointIO()]
    if SubmititLocalEnvironment.detect():  # submitit_local started one process per task: they are the ranks
        plugins.append(SubmititLocalEnvironment())
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, default_root_dir=output_dir, plugins=plugins
    )
    warn_if_processes_exceed_cores(trainer)
    hyperparameters = {**OmegaConf.to_container(cfg, resolve=True), **config_choices()}
    for logger in trainer.loggers:  # the resolved config and the option of each group, once per run
        logger.log_hyperparams(hyperparameters)
    define_wandb_metrics(trainer)

    log.info(
        "training %s (%.2fM parameters) on %s: loss=%s, parametrization=%s, reverse variance=%s (the val/ ELBO "
        "terms and ancestral samples use it)",
        type(module.net).__name__,
        sum(p.numel() for p in module.net.parameters()) / 1e6,
        type(datamodule).__name__,
        module.objective.name,
        module.parametrization.value,
        module.variance.value,
    )
    log.info("job %s: process %d of %d starts", Path(output_dir).name, trainer.global_rank, trainer.world_size)
    started = time.time()  # the other ranks' failure records of this attempt are newer
    try:
        with ddp_children_run_this_job(output_dir), warnings.catch_warnings():
            if isinstance(datamodule, DiffusionDataModule):  # its training order resumes mid-epoch (EpochSampler)
                warnings.filterwarnings("ignore", "You're resuming from a checkpoint that ended before the epoch")
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except Exception as exc:
        if trainer.world_size > 1 and trainer.global_rank > 0:
            # this rank's own record, with its step: rank 0 reads it when it sees this process stop, and names it
            write_failure(output_dir, exc, rank=trainer.global_rank, step=trainer.global_step)
        peer_died = isinstance(exc, RuntimeError) and any(m in str(exc) for m in PEER_DIED_MARKERS)
        if trainer.world_size > 1 and peer_died:
            raise PeerDiedError(peer_died_message(trainer, exc, output_dir, since=started)) from exc
        raise

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    metrics["global_step"] = trainer.global_step
    metrics["variance"] = module.variance.value  # which reverse variance the val/ numbers are under
    if trainer.is_global_zero:
        path = write_metrics(metrics, output_dir, "train_metrics.json")
        log.info("final metrics written to %s", path)
        clear_failure(output_dir)  # a resumed run that finished is no longer the attempt that failed
        best = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else None
        if best:
            log.info("last checkpoint: %s", best)
    return metrics
