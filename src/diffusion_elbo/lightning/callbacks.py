"""Callbacks: EMA of the weights, sample grids at validation, atomic checkpoint writing."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar, WeightAveraging
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only

from diffusion_elbo.cli import UserError
from diffusion_elbo.core.posthoc_ema import gamma_from_sigma_rel, power_ema_decay
from diffusion_elbo.core.samplers import AncestralSampler, DDIMSampler, Sampler
from diffusion_elbo.core.time_axis import ContinuousTime
from diffusion_elbo.fid import compute_fid
from diffusion_elbo.progress import ProgressLog, interactive
from diffusion_elbo.visualize import log_image, save_logsnr_plot, save_profile_plot, save_samples, save_schedule_plot

log = logging.getLogger(__name__)


def ema_multi_avg_fn(decay: float | None, warmup: bool = True, gamma: float | None = None):
    """EMA update for all parameters in one fused ``foreach`` lerp. With ``warmup`` the decay after n updates is
    min(decay, (1 + n) / (10 + n)), so early averages are not dominated by the random initial weights
    (the warm-up used by tensorflow's ExponentialMovingAverage with num_updates, and many diffusion codebases).
    With ``gamma``, the power-function EMA instead (EDM2 eq. 118-121): the decay of update t is
    (1 - 1/t)^(gamma + 1) (:func:`~diffusion_elbo.core.posthoc_ema.power_ema_decay`), an average of a fixed width
    relative to the run's length at every step (``decay`` and ``warmup`` unused)."""

    @torch.no_grad()
    def update(ema_params: list[torch.Tensor], params: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = int(num_averaged)  # the updates averaged so far: this is update t = n + 1 (the first copies theta_1)
        if gamma is not None:
            effective = power_ema_decay(n + 1, gamma)
        else:
            effective = min(decay, (1 + n) / (10 + n)) if warmup else decay
        torch._foreach_lerp_(ema_params, params, 1.0 - effective)

    return update


class EMA(WeightAveraging):
    """Exponential moving average of the weights (Ho et al. 2020 use decay 0.9999), on Lightning's
    :class:`WeightAveraging`: validation, sampling and checkpoints' ``state_dict`` use the EMA weights,
    and the raw weights are kept in the checkpoint to resume training.

    The average is one of two kinds, so exactly one of ``decay`` and ``sigma_rel`` is given (the other null):

    - ``decay``: the classic EMA, theta_ema <- decay * theta_ema + (1 - decay) * theta, with ``warmup`` capping the
      decay at (1 + n) / (10 + n) after n updates; that cap holds its width at sigma_rel 0.09 until 9 / (1 - decay)
      updates (9k for 0.999).
    - ``sigma_rel``: EDM2's power-function EMA of that relative width (0.05 to 0.28868; the width post-hoc EMA
      rebuilds, docs/posthoc_ema.md), the same share of the run at every step. The default recipe's, 0.14, was
      chosen post hoc on its 10k-step run (benchmarks/posthoc_ema/default-10k.md).

    Differences from Lightning's ``EMAWeightAveraging``: one fused ``foreach`` update for all parameters, a
    warm-up of the decay, and buffers are not averaged (our buffers are constant schedule tables).
    """

    def __init__(
        self,
        decay: float | None = None,
        warmup: bool = True,
        update_every_n_steps: int = 1,
        start_step: int = 0,
        sigma_rel: float | None = None,
    ) -> None:
        if decay is not None and sigma_rel is not None:
            raise ValueError(
                f"decay={decay} and sigma_rel={sigma_rel} are both set: the EMA is a classic decay or a power-function "
                f"EMA of a relative width, not both; add callbacks.ema.sigma_rel=null to use decay {decay} (or "
                f"callbacks.ema.decay=null to use sigma_rel {sigma_rel})"
            )
        if decay is None and sigma_rel is None:
            raise ValueError(
                "decay=null and sigma_rel=null: the EMA needs one of them, e.g. callbacks.ema.sigma_rel=0.14 (the "
                "default) or callbacks.ema.decay=0.999"
            )
        gamma = None
        if sigma_rel is not None:
            try:
                gamma = gamma_from_sigma_rel(float(sigma_rel))
            except ValueError as error:
                raise ValueError(f"{error}; or null for the classic decay") from None
        elif not 0.0 < decay < 1.0:
            raise ValueError(f"decay={decay} must be in (0, 1)")
        # the update, also for loops without Lightning (benchmarks/run.py): AveragedModel(net, multi_avg_fn=update_fn)
        self.update_fn = ema_multi_avg_fn(decay, warmup, gamma)
        super().__init__(use_buffers=False, multi_avg_fn=self.update_fn)
        self.decay = decay
        self.sigma_rel = None if sigma_rel is None else float(sigma_rel)
        self.update_every_n_steps = update_every_n_steps
        self.start_step = start_step

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx >= self.start_step and step_idx % self.update_every_n_steps == 0


def _draw_samples(callback: SampleGrid | Toy2DMetrics, pl_module: L.LightningModule) -> torch.Tensor:
    """The callback's ``num_samples`` from its sampler settings, from a generator seeded with its ``seed``."""
    generator = torch.Generator(device=pl_module.device).manual_seed(callback.seed)
    return pl_module.sample(callback.num_samples, callback.sampler, generator=generator)


class _EveryNValidations(L.Callback):
    """Acts at every ``every_n_val``-th validation, with the same cadence in a run resumed from a checkpoint.

    With validation every fixed number of training batches (an integer ``trainer.val_check_interval`` and
    ``check_val_every_n_epoch=None``, this project's setting) a validation's index is the number of validation
    intervals behind it, global_step * accumulate_grad_batches // val_check_batch, so it does not depend on when the
    run was resumed: a resume from a checkpoint written just before a validation (Lightning then counts that
    validation as done and skips it) or a run resumed more often than every ``every_n_val`` validations still acts at
    steps k * every_n_val * val_check_interval. Extra validations between those (an early stop, a SIGTERM) share the
    index of the last regular one and do not act again. Otherwise (validation by epochs or by time) validations are
    counted, and the count is kept in checkpoints (the callback's ``state_dict``).
    """

    every_n_val: int

    def __init__(self) -> None:
        self._last_index = 0  # the index of the last validation counted

    def _validation_index(self, trainer: L.Trainer) -> int:
        interval = getattr(trainer, "val_check_batch", None)
        if trainer.check_val_every_n_epoch is None and isinstance(interval, int) and interval > 0:
            return trainer.global_step * trainer.accumulate_grad_batches // interval
        return self._last_index + 1

    def _due(self, trainer: L.Trainer) -> bool:
        """Whether this validation is an ``every_n_val``-th one (and not one already acted on)."""
        index = self._validation_index(trainer)
        if index <= self._last_index:
            return False
        self._last_index = index
        return index % self.every_n_val == 0

    def state_dict(self) -> dict[str, int]:
        return {"validations": self._last_index}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_index = int(state_dict.get("validations", 0))


class SampleGrid(_EveryNValidations):
    """At the end of every ``every_n_val`` validations, draw samples (with the EMA weights: this callback
    must come before :class:`EMA` in the callback list), save a PNG in the run directory and log it."""

    def __init__(
        self,
        num_samples: int = 64,
        sampler: Sampler | None = None,
        *,
        every_n_val: int = 1,
        dirpath: str | None = None,
        seed: int = 0,
    ) -> None:
        self.num_samples = num_samples
        self.sampler = DDIMSampler() if sampler is None else sampler
        super().__init__()
        self.every_n_val = every_n_val
        self.dirpath = dirpath
        self.seed = seed

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.num_samples < 1 or not self._due(trainer):
            return
        self._sample_and_log(trainer, pl_module)

    @rank_zero_only
    def _sample_and_log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        samples = _draw_samples(self, pl_module)
        dirpath = Path(self.dirpath or Path(trainer.default_root_dir) / "samples")
        path = save_samples(
            samples, dirpath / f"step_{trainer.global_step:07d}.png", title=f"step {trainer.global_step}"
        )
        if path is None:
            return
        log_image(trainer, "samples", path)


class ELBOProfile(L.Callback):
    """After each validation: the per-t -ELBO terms and Ho et al.'s rate-distortion curve as a PNG and a CSV in
    ``<run dir>/profiles/``, logged as an image."""

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        profile = getattr(pl_module, "last_profile", None)
        if trainer.sanity_checking or profile is None:
            return
        from diffusion_elbo.lightning.metrics import rate_distortion

        dirpath = Path(self.dirpath or Path(trainer.default_root_dir) / "profiles")
        stem = dirpath / f"step_{trainer.global_step:07d}"
        rd = rate_distortion(
            profile["t"],
            profile["t_weights"],
            term_bpd=profile["term_bpd"],
            x0_mse=profile["x0_mse"],
            prior_bpd=profile["prior_bpd"],
        )
        dirpath.mkdir(parents=True, exist_ok=True)
        with open(stem.with_suffix(".csv"), "w") as f:
            f.write("t,stratum_size,term_bpd,rate_bpd,distortion_rmse\n")
            for row in zip(
                rd["t"].tolist(),
                profile["t_weights"].tolist(),
                profile["term_bpd"].tolist(),
                rd["rate_bpd"].tolist(),
                rd["distortion_rmse"].tolist(),
                strict=True,
            ):
                f.write(",".join(f"{v:.6g}" for v in row) + "\n")
        path = save_profile_plot(profile, stem.with_suffix(".png"), title=f"step {trainer.global_step}")
        log_image(trainer, "elbo_profile", path)
        rows = [
            [float(t), float(term), float(rate), float(dist)]
            for t, term, rate, dist in zip(
                rd["t"].tolist(), profile["term_bpd"].tolist(), rd["rate_bpd"].tolist(), rd["distortion_rmse"].tolist(),
                strict=True,
            )
        ]  # fmt: skip
        _log_profile_tables(trainer, rows)


def _log_profile_tables(trainer: L.Trainer, rows: list[list[float]]) -> None:
    """The per-t profile and the rate-distortion curve as a W&B table with two line plots, under the same keys in
    every run, so a sweep's runs overlay in one panel (W&B only; the PNG and CSV are written for every logger)."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if not isinstance(logger, WandbLogger):
            continue
        import wandb

        table = wandb.Table(columns=["t", "term_bpd", "rate_bpd", "distortion_rmse"], data=rows)
        logger.experiment.log(
            {
                "profile/table": table,
                "profile/term_vs_t": wandb.plot.line(table, "t", "term_bpd", title="L_t (bits/dim) against t"),
                "profile/rate_distortion": wandb.plot.line(
                    table, "rate_bpd", "distortion_rmse", title="distortion (RMSE, 0-255) against rate (bits/dim)"
                ),
                "trainer/global_step": trainer.global_step,
            }
        )


class ScheduleSummary(L.Callback):
    """At the start of training: alpha_bar(t), log SNR(t) and beta_t plotted, and the SNR endpoints logged,
    so a sweep over schedules shows why their bounds differ. A continuous-time schedule (which may be learned) is
    also plotted after every validation, gamma(t) and gamma'(t) on 101 times written to
    ``<run dir>/schedule/step_<N>.csv`` beside the PNG (its endpoints are logged by the module as val/gamma_*)."""

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not isinstance(getattr(pl_module, "time", None), ContinuousTime):
            return
        logsnr = pl_module.time.logsnr
        with torch.no_grad():
            t = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)
            out = torch.func.functional_call(
                logsnr, {k: v.detach().double() for k, v in logsnr.named_parameters()}, (t.to(pl_module.device),)
            )
        gamma, slope = out.gamma.cpu(), out.slope.cpu()  # (101,), or (101, *D) multivariate
        if gamma.ndim > 1:
            gamma, slope = gamma.flatten(1), slope.flatten(1)  # (101, D)
        columns = {"gamma": gamma, "gamma_slope": slope}
        if gamma.ndim > 1:  # one curve per dimension: their mean, and the spread of gamma across them
            columns = {
                "gamma": gamma.mean(1),
                "gamma_slope": slope.mean(1),
                "gamma_lowest": gamma.min(1).values,
                "gamma_highest": gamma.max(1).values,
            }
        stem = Path(trainer.default_root_dir) / "schedule" / f"step_{trainer.global_step:07d}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        with open(stem.with_suffix(".csv"), "w") as f:
            f.write(",".join(["t", *columns]) + "\n")
            for row in zip(t.tolist(), *(c.tolist() for c in columns.values()), strict=True):
                f.write(",".join(f"{v:.8g}" for v in row) + "\n")
        ends = columns["gamma"]
        title = f"{logsnr.name}, step {trainer.global_step}: gamma(0) = {ends[0]:.3f}, gamma(1) = {ends[-1]:.3f}"
        log_image(
            trainer,
            "schedule/plot",
            save_logsnr_plot(t.numpy(), gamma.numpy(), slope=slope.numpy(), path=stem.with_suffix(".png"), title=title),
        )

    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        schedule = pl_module.schedule
        path = save_schedule_plot(schedule, Path(trainer.default_root_dir) / "schedule.png")
        # not "schedule": the key of an image is a section of its own on W&B, where schedule/* scalars are shown
        log_image(trainer, "schedule/plot", path)
        log_snr = schedule.mean_log_snr()  # (T,): averaged over the dimensions of a multivariate schedule
        summary = {
            "schedule/log_snr_1": float(log_snr[0]),
            "schedule/log_snr_T": float(log_snr[-1]),
            "schedule/alpha_bar_T": float(schedule.alpha_bar[-1].mean()),
            "schedule/timesteps": schedule.T,
        }
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            # a property of the run, not a curve: the run's config (every logger), and W&B's summary
            logger.log_hyperparams({"schedule_summary": summary})
            if isinstance(logger, WandbLogger):
                logger.experiment.summary.update(summary)


class FIDMetric(_EveryNValidations):
    """FID every ``every_n_val`` validations on EMA weights (keep it before :class:`EMA` in the list).

    The ``num_samples`` are split across DDP ranks, each sample from its own seed (:func:`~diffusion_elbo.fid.fid_samples`); the metric's
    sum states are gathered, so N GPUs each do 1/N of the work and report the same value. Skipped (with a log line)
    when the data has no labels for the feature classifier or is not images.
    """

    def __init__(
        self,
        num_samples: int = 1000,
        every_n_val: int = 5,
        *,
        features: str = "classifier",
        sampler: Sampler | None = None,
        batch_size: int = 256,
        cache_dir: str = "data/cache",
        weights_path: str | None = None,
        seed: int = 0,
        classifier_steps: int = 3000,
    ) -> None:
        self.num_samples = num_samples
        self.every_n_val = every_n_val
        self.classifier_steps = classifier_steps
        self.features = features
        self.sampler = DDIMSampler() if sampler is None else sampler
        self.batch_size = batch_size
        self.cache_dir = cache_dir
        self.weights_path = weights_path
        super().__init__()
        self.seed = seed
        self.fid = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from diffusion_elbo.fid import make_fid

        datamodule = trainer.datamodule
        if self.num_samples < 1 or len(datamodule.data_shape) != 3:
            return
        if self.features == "classifier" and not getattr(datamodule, "has_labels", True):
            log.info("FID skipped: %s has no labels for the feature classifier", type(datamodule).__name__)
            return
        # rank 0 trains and caches the classifier and reference statistics; the others then load them
        kwargs = {
            "features": self.features,
            "cache_dir": self.cache_dir,
            "weights_path": self.weights_path,
            "classifier_steps": self.classifier_steps,
            "device": pl_module.device,
        }
        if trainer.is_global_zero:
            self.fid = make_fid(datamodule, **kwargs)
        trainer.strategy.barrier("fid_cache")
        if not trainer.is_global_zero:
            self.fid = make_fid(datamodule, rank=trainer.global_rank, **kwargs)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.fid is None or trainer.sanity_checking or not self._due(trainer):
            return
        value = compute_fid(
            pl_module,
            self.fid,
            num_samples=self.num_samples,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            sampler=self.sampler,
            batch_size=self.batch_size,
            seed=self.seed,
        )
        pl_module.log("val/fid", value)
        if self.fid.classifier_accuracy is not None:
            pl_module.log("val/fid_classifier_accuracy", self.fid.classifier_accuracy)


class Toy2DMetrics(L.Callback):
    """For 2-D data after each validation: energy distance and sliced Wasserstein-2 between samples and the
    validation split, each with its standard error, and a scatter of samples over data (EMA weights: keep it
    before :class:`EMA` in the list)."""

    def __init__(
        self,
        num_samples: int = 2000,
        sampler: Sampler | None = None,
        seed: int = 0,
    ) -> None:
        self.num_samples, self.seed = num_samples, seed
        self.sampler = AncestralSampler() if sampler is None else sampler

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or tuple(pl_module.data_shape) != (2,) or self.num_samples < 20:
            return
        from diffusion_elbo.sample_metrics import energy_distance_with_se, sliced_wasserstein_with_se
        from diffusion_elbo.visualize import save_scatter

        samples = _draw_samples(self, pl_module).cpu()
        val = torch.stack(
            [trainer.datamodule.val_set[i][0] for i in range(min(len(trainer.datamodule.val_set), self.num_samples))]
        )
        ed, ed_se = energy_distance_with_se(samples, val)
        sw, sw_se = sliced_wasserstein_with_se(samples, val, generator=torch.Generator().manual_seed(self.seed))
        pl_module.log_dict(
            {
                "val/energy_distance": ed,
                "val/energy_distance_se": ed_se,
                "val/sliced_w2": sw,
                "val/sliced_w2_se": sw_se,
            },
            rank_zero_only=True,
        )
        if trainer.is_global_zero:
            path = save_scatter(
                samples,
                Path(trainer.default_root_dir) / "samples" / f"scatter_{trainer.global_step:07d}.png",
                reference=val,
                title=f"step {trainer.global_step}: energy distance {ed:.4f} ± {ed_se:.4f}",
            )
            log_image(trainer, "samples_vs_data", path)


class StopOnSignal(L.Callback):
    """SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C) stop training at the next optimizer-step boundary, at
    the same step on every process, so ``last.ckpt`` holds that step and the job exits within a step.

    A scheduler (SLURM, Kubernetes) sends SIGTERM to every process of a job, and Ctrl-C sends SIGINT to the whole
    process group. Lightning's own handling runs a collective inside the SIGTERM handler and raises SIGINT's
    KeyboardInterrupt wherever each rank happens to be, so under DDP the ranks entered the checkpoint save (itself a
    collective) at different points and could hang until the process group's timeout. Here the handler only records
    the signal; at the start of each optimizer step every rank takes part in one reduction ("did any process get
    a signal?") and, if so, all raise together: ``SIGTERMException`` for SIGTERM (exit status 0, Lightning's
    convention) and ``KeyboardInterrupt`` for SIGINT (status 1), whose ``on_exception`` hooks (:class:`LastCheckpoint`)
    save at that step. A second Ctrl-C stops at once. A signal ignored when training starts (SIGINT of a background
    job) stays ignored. The handlers are installed for the training loop only and restored after it."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None  # the first signal this process got
        self._previous: dict[int, Any] = {}
        self._checked_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.received, self._checked_step = None, -1
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self.SIGNALS:
            current = signal.getsignal(signum)
            if current is signal.SIG_IGN:
                continue
            self._previous[signum] = current
            signal.signal(signum, self._record)

    def _record(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signum
            log.warning(
                "%s received: training stops at the next step on every process, with last.ckpt at that step%s",
                signal.Signals(signum).name,
                " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else "",
            )
        elif signum == signal.SIGINT:  # a second Ctrl-C: at once (Lightning then ignores further ones while saving)
            self._restore()
            raise KeyboardInterrupt

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._checked_step:  # inside a step's gradient accumulation
            return
        self._checked_step = trainer.global_step
        # 0: no signal, 1: SIGTERM, 2: SIGINT; under DDP the largest over the ranks, one reduction per step, so every
        # rank stops at this step if any got a signal (a rank that got none stops like the one that did)
        code = {None: 0, signal.SIGTERM: 1, signal.SIGINT: 2}[self.received]
        if trainer.world_size > 1:
            reduced = trainer.strategy.reduce(
                torch.tensor([code], device=trainer.strategy.root_device), reduce_op="max"
            )
            code = int(reduced.item())
        if code == 0:
            return
        signum = signal.SIGINT if code == 2 else signal.SIGTERM
        self._restore()
        log.info("stopping at step %d on %s", trainer.global_step, signal.Signals(signum).name)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        raise SIGTERMException

    def _restore(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.received is not None:
            log.warning("%s arrived after the last step: the run finished", signal.Signals(self.received).name)
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()


class CPUBudget(L.Callback):
    """The CPU time that training steps have cost, logged as ``train/cpu_minutes``, and, with ``minutes`` set, a stop
    once it reaches that budget: a CPU run's length in CPU-minutes. Unlike wall time (``trainer.max_time``) it does not
    count time spent waiting for the CPU; it is not free of load all the same: work on the same cores (SMT siblings,
    shared caches) slows each CPU-second, so budgets compare only when measured alike, best on a machine alone.

    Counted: each process's CPU time (all its threads, :func:`time.process_time`) from the start to the end of every
    training batch (forward, backward, optimizer, and every callback's per-batch work: the callback runs last),
    summed over the DDP processes; validation, sampling and checkpoint writing are not. The stop comes after an
    optimizer step, never inside gradient accumulation. The count rides in checkpoints, so a resumed run goes on from it. Every process stops after the
    same step (the sum is reduced each step). On a GPU it counts the host's CPU time only: use ``trainer.max_time``."""

    def __init__(self, minutes: float | None = None) -> None:
        if minutes is not None and not float(minutes) > 0:
            raise ValueError(
                f"callbacks.cpu_budget.minutes={minutes!r} must be > 0 (CPU-minutes), or null for no budget"
            )
        self.minutes = None if minutes is None else float(minutes)
        self.spent_s = 0.0  # the CPU seconds of training steps so far, over every process
        self._pending_s = 0.0  # this process's, since the last optimizer step (gradient accumulation's micro-batches)
        self._started: float | None = None
        self._step_at_start = -1

    @property
    def exhausted(self) -> bool:
        """Whether the budget is spent (the run then ends as finished, as at max_steps)."""
        return self.minutes is not None and self.spent_s >= 60 * self.minutes

    def state_dict(self) -> dict[str, float]:
        return {"spent_s": self.spent_s}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.spent_s = float(state_dict["spent_s"])

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._started, self._step_at_start = time.process_time(), trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._started is None:
            return
        self._pending_s += time.process_time() - self._started
        self._started = None
        if trainer.global_step == self._step_at_start:  # a micro-batch of gradient accumulation: no step yet
            return
        step_s, self._pending_s = self._pending_s, 0.0
        if trainer.world_size > 1:  # every process adds the same total, so all stop after the same step
            total = torch.tensor([step_s], dtype=torch.float64, device=trainer.strategy.root_device)
            step_s = float(trainer.strategy.reduce(total, reduce_op="sum"))
        self.spent_s += step_s
        pl_module.log("train/cpu_minutes", self.spent_s / 60, on_step=True, on_epoch=False)
        if self.exhausted and not trainer.should_stop:
            log.info("CPU budget of %g CPU-minutes reached at step %d: training stops", self.minutes,
                     trainer.global_step)  # fmt: skip
            trainer.should_stop = True


class LastCheckpoint(L.Callback):
    """``last.ckpt`` at the final completed step, however the run ends, so no ending loses the steps since the last
    periodic checkpoint (ModelCheckpoint writes only every ``every_n_train_steps``):

    - ``trainer.max_steps`` or ``trainer.max_time`` reached: at the end of fit, unless that step was just saved;
    - SIGTERM (what SLURM and most schedulers send before preemption): :class:`StopOnSignal` stops every process at
      the next step boundary with a ``SIGTERMException``, the checkpoint is written and the job exits cleanly
      (status 0);
    - Ctrl-C (SIGINT, ``KeyboardInterrupt``) and any other exception: written before the run stops, with the step
      counter of the last completed optimizer step. Under several processes only for SIGTERM and SIGINT, which every
      rank receives: saving is a collective, and an error on one rank would leave the others waiting.
    """

    def __init__(self, dirpath: str, resume_hint: str = "ckpt_path=last") -> None:
        self.dirpath = dirpath
        self.resume_hint = resume_hint  # what the log says to run next; src/train.py sets the full command

    def _save(self, trainer: L.Trainer, why: str, *, stopped: bool = True) -> None:
        path = Path(self.dirpath) / "last.ckpt"
        trainer.save_checkpoint(path)
        for cb in trainer.checkpoint_callbacks:  # so ModelCheckpoint knows last.ckpt is current
            if isinstance(cb, ModelCheckpoint) and cb.save_last:
                cb.last_model_path = str(path)
        if not trainer.is_global_zero:  # saving is a collective; one line per run says so
            return
        if stopped:  # a run cut short: say how to go on
            log.warning("%s: saved %s at step %d; resume with: %s", why, path, trainer.global_step, self.resume_hint)
        else:
            log.info("%s: saved %s at step %d", why, path, trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        saved = {getattr(cb, "_last_global_step_saved", None) for cb in trainer.checkpoint_callbacks}
        if trainer.global_step > 0 and trainer.global_step not in saved:
            cut_short = trainer.max_steps < 0 or trainer.global_step < trainer.max_steps  # max_time, not max_steps
            spent = any(isinstance(cb, CPUBudget) and cb.exhausted for cb in trainer.callbacks)
            why = "run ended at its CPU budget" if spent else "run ended between checkpoints"
            self._save(trainer, why, stopped=cut_short and not spent)  # a finished budget is no run cut short

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(exception, SIGTERMException):
            self._save(trainer, "SIGTERM")
        elif isinstance(exception, KeyboardInterrupt):
            self._save(trainer, "interrupted (SIGINT)")
        elif isinstance(exception, CheckpointDiskFullError):
            return  # the disk is full: another write would fail too, and the last complete checkpoint is kept
        elif trainer.world_size == 1 and trainer.global_step > 0:
            self._save(trainer, f"stopped by {type(exception).__name__}")


class ResumedOptimizerSettings(L.Callback):
    """A resumed run trains with the optimizer settings of its config (``lr``, ``weight_decay``, ``betas``, ``eps``),
    not those of the checkpoint. Lightning builds the optimizer from the config, then loads the checkpoint's optimizer
    and LR-scheduler state over it, so ``ckpt_path=... optimizer.lr=1e-5`` went on at the old rate while the new
    checkpoints recorded 1e-5. The configured values are read at ``on_fit_start`` (before that restore) and set back
    at ``on_train_start`` (after it), with a log line for each change. A new ``lr`` is the LR schedule's new peak (its
    ``base_lrs`` and the group's ``initial_lr``): the current rate is scaled by new / old, so a warm-up or decay goes
    on from the restored step towards the new peak. A no-op when nothing changed (and in a run started afresh)."""

    SETTINGS = ("lr", "weight_decay", "betas", "eps")

    def __init__(self) -> None:
        self._configured: list[list[dict[str, Any]]] = []  # per optimizer, per param group

    @staticmethod
    def _peak_lrs(trainer: L.Trainer, index: int, optimizer: torch.optim.Optimizer) -> list[float]:
        """The groups' base learning rates: the scheduler's ``base_lrs`` (a scheduler has already scaled ``lr``)."""
        for config in trainer.lr_scheduler_configs:
            if config.scheduler.optimizer is optimizer and hasattr(config.scheduler, "base_lrs"):
                return [float(lr) for lr in config.scheduler.base_lrs]
        return [float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups]

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._configured = []
        for i, optimizer in enumerate(trainer.optimizers):
            peaks = self._peak_lrs(trainer, i, optimizer)
            self._configured.append(
                [
                    {**{k: group[k] for k in self.SETTINGS if k in group}, "lr": peak}
                    for group, peak in zip(optimizer.param_groups, peaks, strict=True)
                ]
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for i, (optimizer, configured) in enumerate(zip(trainer.optimizers, self._configured, strict=True)):
            schedulers = [c.scheduler for c in trainer.lr_scheduler_configs if c.scheduler.optimizer is optimizer]
            restored_peaks = self._peak_lrs(trainer, i, optimizer)
            for j, (group, wanted) in enumerate(zip(optimizer.param_groups, configured, strict=True)):
                where = "" if (i, j) == (0, 0) else f" (optimizer {i}, param group {j})"
                for key, value in wanted.items():
                    old = restored_peaks[j] if key == "lr" else group.get(key)
                    if key != "lr" and isinstance(old, (list, tuple)):
                        old, value = tuple(old), tuple(value)
                    if old == value:
                        continue
                    if key == "lr":
                        group["lr"] = group["lr"] * value / old if old else value
                        group["initial_lr"] = value
                        for scheduler in schedulers:
                            if hasattr(scheduler, "base_lrs"):
                                scheduler.base_lrs[j] = value
                            if hasattr(scheduler, "_last_lr"):
                                scheduler._last_lr[j] = group["lr"]
                    else:
                        group[key] = value
                    if trainer.is_global_zero:
                        log.info("resume: optimizer.%s%s %s -> %s applied", key, where, _shown(old), _shown(value))


def _shown(value: Any) -> str:
    return str(list(value)) if isinstance(value, tuple) else str(value)


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar with its main bar over the whole run in optimizer steps (``trainer.max_steps``), with the
    rate and the time left, instead of Lightning's per-epoch bar (``Epoch 2/-2 ... 6/11``: an epoch of digits is 11
    batches, and a diffusion run counts steps). Where the output is not a terminal the bars are off and the log gets
    a line every ``log_every_s`` seconds instead: ``train: 200/10000 steps (2.0%), elapsed 1:04, ETA 52:20, loss ...``.
    The rate is measured from the step the run started at, validation included."""

    def __init__(self, refresh_rate: int = 1, log_every_s: float = 60.0, interactive: bool | None = None) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.log_every_s = log_every_s
        self.interactive = interactive
        self.lines: ProgressLog | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tty = interactive() if self.interactive is None else self.interactive
        if not tty:
            self.disable()  # tqdm in a log file is one line of carriage returns
        super().on_train_start(trainer, pl_module)
        total = trainer.max_steps if trainer.max_steps > 0 else None
        bar = self.train_progress_bar
        bar.reset(total=total)
        bar.initial = bar.n = trainer.global_step  # a resumed run: the rate counts this run's steps
        bar.set_description("train")
        if not tty and trainer.is_global_zero and total is not None:
            self.lines = ProgressLog("train", total, "steps", every_s=self.log_every_s, enabled=True)
            self.lines.restart(trainer.global_step)

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        pass  # one bar for the whole run: not reset at each pass over the data

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        metrics = self.get_metrics(trainer, pl_module)
        if self.is_enabled and (step % self.refresh_rate == 0 or step == self.train_progress_bar.total):
            self.train_progress_bar.n = step
            self.train_progress_bar.set_postfix(metrics)  # refreshes the bar
        if self.lines is not None:
            shown = {k: v for k, v in metrics.items() if k != "v_num"}
            self.lines.update(step, ", ".join(f"{k} {v}" for k, v in shown.items()))


class LossJournal(L.Callback):
    """``loss_curve.csv`` in the run directory: the training loss of every optimizer step, exactly once. On resume the
    steps the interrupted run logged after its last checkpoint are dropped before the run goes on, so the curve has
    neither gaps nor repeats however often the run was killed. With ``trainer.accumulate_grad_batches=k`` a step's
    row is the mean loss of its k batches (the loss whose gradient the step applied), written when the step is taken.

    Kept beside the loggers' files because it is written under every logger (``logger=none`` too) and survives
    resumes without repeated rows, which CSVLogger's ``metrics.csv`` does not."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._batch_losses: list[float] = []  # the full losses of the batches since the last optimizer step
        self._steps_done = 0

    @rank_zero_only
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        keep = []
        if self.path.is_file():
            lines = self.path.read_text().splitlines()[1:]
            keep = [line for line in lines if line and int(line.split(",")[0]) < trainer.global_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("step,loss\n" + "".join(f"{line}\n" for line in keep))
        tmp.replace(self.path)
        self._batch_losses, self._steps_done = [], trainer.global_step

    @rank_zero_only
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:  # None: a skipped batch
            # Lightning hands the hooks the loss divided by accumulate_grad_batches, the share each batch's gradient has
            self._batch_losses.append(float(loss) * trainer.accumulate_grad_batches)
        if trainer.global_step == self._steps_done:  # still accumulating: no optimizer step after this batch
            return
        self._steps_done = trainer.global_step
        if not self._batch_losses:
            return
        step_loss = sum(self._batch_losses) / len(self._batch_losses)
        self._batch_losses = []
        with open(self.path, "a") as f:
            f.write(f"{trainer.global_step - 1},{step_loss:.8g}\n")
            f.flush()


# errnos of a write that found no room: the disk (ENOSPC) or the user's quota (EDQUOT) is full
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class CheckpointDiskFullError(UserError):
    """A checkpoint could not be written because its file system is full; the previous checkpoint is kept."""


def disk_full_cause(exc: BaseException) -> OSError | None:
    """The ``OSError`` (ENOSPC or EDQUOT) behind ``exc``, or None. ``torch.save`` into a file object swallows the
    write's ``OSError`` and raises ``RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos ...``
    when it next checks its position; the ``OSError`` survives only as that error's ``__context__``."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file, fsyncs it, then renames it over the target: a crash
    mid-write leaves the previous checkpoint intact (rename is atomic on POSIX file systems). A full disk ends the
    run with :class:`CheckpointDiskFullError`, naming the file and the fix; the temporary file is removed and the
    previous checkpoint of that name is left as it was."""

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
        except (OSError, RuntimeError) as exc:
            if disk_full_cause(exc) is None:
                raise
            tmp.unlink(missing_ok=True)  # before measuring what is free: the partial file held some of it
            raise CheckpointDiskFullError(disk_full_message(path)) from exc
        finally:
            if tmp.exists():
                tmp.unlink()
        return None


def disk_full_message(path: Path) -> str:
    """What to do when ``path`` (a checkpoint) could not be written for lack of space."""
    try:
        free = f" ({shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free there now)"
    except OSError:
        free = ""
    kept = f"the previous {path.name} is kept as it was" if path.exists() else f"no {path.name} was written"
    return (
        f"no space left on device writing the checkpoint {path}{free}: {kept}, and training stopped. Free space on "
        f"that file system (old runs under outputs/, data/cache), or move the run folder {path.parent.parent} to a "
        "disk with room and resume it there (hydra.run.dir=<new folder> ckpt_path=last); new runs can be put "
        "elsewhere with paths.log_dir=<folder on a bigger disk>."
    )
