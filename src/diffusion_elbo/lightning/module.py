"""The LightningModule: holds the network and the time axis (a T-step chain or a continuous-time log-SNR schedule,
:mod:`diffusion_elbo.core.time_axis`), orchestrates the core, logs."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType, rank_zero_warn
from torch import Tensor, nn

from diffusion_elbo.core import DecoderVariance, NoiseSchedule, Parametrization, ReverseVariance
from diffusion_elbo.core.elbo import ELBOResult
from diffusion_elbo.core.logsnr import LogSNRSchedule
from diffusion_elbo.core.losses import Objective, TrainingSetup
from diffusion_elbo.core.samplers import Chain, DDIMSampler, Sampler
from diffusion_elbo.core.time_axis import (
    VAL_EXAMPLE_SEED,  # noqa: F401  (re-exported: tests and benchmarks read it here)
    StepContext,
    StepLoss,
    make_time_axis,
)
from diffusion_elbo.data.augment import Augmentation
from diffusion_elbo.data.base import IndexedBatch
from diffusion_elbo.lightning.metrics import ELBOMetric, ProfileMetric

# validation's generator for batches without example indices (common random numbers across validations)
VAL_SEED = 12345


class NonFiniteLossError(FloatingPointError):
    """The training loss or one of the ELBO terms became NaN or inf."""


class DiffusionModule(L.LightningModule):
    """A DDPM-family model trained on a loss from :mod:`diffusion_elbo.core.losses`, on a T-step chain or in continuous
    time: what differs between the two is its :attr:`time` axis (:mod:`diffusion_elbo.core.time_axis`).

    Args:
        net: the network ``net(x, c) -> out`` whose output is read through ``parametrization``; c is the chain step
            (a chain) or the noise level gamma scaled onto [0, 1000] over the schedule's reference range (continuous
            time, :data:`~diffusion_elbo.core.time_axis.CONDITIONING_SCALE`).
        schedule: a :class:`~diffusion_elbo.core.chain.NoiseSchedule` to train on a T-step chain (a schedule's view at
            t_i = i / T, e.g. a beta schedule's ``.chain``; its tables are buffers, so they move with the module), or a
            :class:`~diffusion_elbo.core.logsnr.LogSNRSchedule` to train in continuous time (fixed or learned, a beta
            schedule on its window [1 / T, 1]; registered as ``logsnr``, and ``schedule`` is its chain discretized at
            ``eval_timesteps``).
        data_shape: shape of one example; ``num_bins``: K for K-level data, None for continuous data.
        variance: the reverse variance used for the ELBO terms and ancestral sampling: ``small | large`` (fixed) or
            ``learned_range`` (the network outputs twice the data's channels: the mean, then v). Continuous time trains
            the bound with ``small`` (the posterior's variance, q(z_s | z_t, x = x_hat)).
        decoder_variance: sigma_1^2 of the decoder under the fixed variances: ``clipped`` (sigma_q^2(2), the published
            convention) or ``beta`` (beta_1). A continuous-time model's chain has ``beta`` (z_0's own variance).
        objective: the training loss, an object of the ``loss`` config group (:class:`~diffusion_elbo.core.losses.
            Objective`; default L_simple), which also says how t is drawn (``timestep_sampling``).
        timesteps, eval_timesteps, variance_gradient, schedule_lr: a continuous-time schedule's options
            (:class:`~diffusion_elbo.core.time_axis.ContinuousTime`): None for the continuous-time bound or T for the
            T-step one; the T of its chain; whether a learned shape follows the estimator's variance; the learned
            schedule's learning rate.
        optimizer, lr_scheduler: partials finished in :meth:`configure_optimizers` (lr_scheduler may be None).
        val_strata: timesteps per example of the stratified validation ELBO (plus t = 1).
        clip_denoised: clamp x0_hat to [-1, 1] when sampling (image data).
        seed: seeds the module's own generator for t and noise, offset by the DDP rank so ranks draw different
            noise (seed_everything gives every rank the same global seed); its state is saved in checkpoints.
        nonfinite: what a non-finite loss does: ``error`` stops at that step with the step, its timesteps and the
            ELBO term that went non-finite; ``skip`` warns the same and skips the batch. A non-finite gradient
            always stops. Either way the checkpoints already written are kept.
        nonfinite_max_skips: under ``nonfinite=skip``, how many batches in a row may be skipped before training stops
            as with ``error``: a run whose every batch is non-finite does not recover, and would skip to max_steps.
        compile: run the network through ``torch.compile`` (the weights and checkpoints stay those of ``net``).
        channels_last: keep image tensors and conv weights in NHWC layout (faster convolutions on GPUs).
        augmentation: augmentation with conditioning (``augment=geometric``): each training batch is transformed and
            the network told how; validation, evaluation and sampling use the data itself (no labels).
        config: the resolved run config, stored in checkpoints so eval and sample can rebuild the run.
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: NoiseSchedule | LogSNRSchedule,
        *,
        data_shape: Sequence[int],
        num_bins: int | None,
        parametrization: str = Parametrization.EPS.value,
        variance: str = ReverseVariance.SMALL.value,
        decoder_variance: str = DecoderVariance.CLIPPED.value,
        objective: Objective | None = None,
        timesteps: int | None = None,
        eval_timesteps: int = 1000,
        variance_gradient: bool = True,
        schedule_lr: float | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        lr_scheduler: Callable[..., Any] | None = None,
        val_strata: int = 32,
        clip_denoised: bool = True,
        seed: int = 0,
        nonfinite: str = "error",
        nonfinite_max_skips: int = 20,
        compile: bool = False,
        channels_last: bool = False,
        augmentation: Augmentation | None = None,
        config: dict | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            ignore=["net", "schedule", "logsnr", "objective", "optimizer", "lr_scheduler", "augmentation", "config"]
        )
        self.net = net
        self.data_shape = tuple(data_shape)
        self.num_dims = math.prod(self.data_shape)
        self.num_bins = num_bins
        self.parametrization = Parametrization(parametrization)
        self.time = make_time_axis(
            schedule,
            objective=objective,
            parametrization=self.parametrization,
            num_bins=num_bins,
            num_dims=self.num_dims,
            timesteps=timesteps,
            eval_timesteps=eval_timesteps,
            variance_gradient=variance_gradient,
            schedule_lr=schedule_lr,
        )
        for name, module in self.time.modules.items():  # "schedule" (the chain), and "logsnr" in continuous time
            setattr(self, name, module)
        self.objective = self.time.objective
        self.variance = self.time.reverse_variance(ReverseVariance(variance))
        self.decoder_variance = self.time.decoder_variance(DecoderVariance(decoder_variance))
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.val_strata = val_strata
        self.clip_denoised = clip_denoised
        self.seed = seed
        if nonfinite not in ("error", "skip"):
            raise ValueError(f"nonfinite={nonfinite!r} is not an option; choose error or skip")
        self.nonfinite = nonfinite
        if not nonfinite_max_skips >= 1:
            raise ValueError(f"nonfinite_max_skips={nonfinite_max_skips!r} must be >= 1")
        self.nonfinite_max_skips = int(nonfinite_max_skips)
        self._skips_in_a_row = 0  # batches skipped since the last finite one; the same on every rank (they agree)
        self.compile = compile
        self.channels_last = channels_last and len(self.data_shape) == 3
        self._compiled: nn.Module | None = None  # not a submodule: the state dict stays that of ``net``
        self.augmentation = augmentation
        self.config = config
        self._last_t: Tensor | None = None  # the last step's t, for the non-finite gradient's message
        self._skipping = False  # a batch skipped under DDP (nonfinite=skip): its zero gradients are dropped
        self._generator: torch.Generator | None = None
        self._generator_state: Tensor | None = None
        self._torch_rng_state: dict[str, Tensor] | None = None  # from a checkpoint: see on_train_start
        self._rng_before_validation: dict[str, Tensor] | None = None
        self.val_elbo = ELBOMetric(self.num_dims)
        self.val_profile = ProfileMetric(self.time.profile_size(val_strata), self.num_dims)
        self.last_profile: dict[str, Tensor] | None = None  # per-t view of the last validation, for callbacks
        # one example at chain step 1 for the model summary, whose FLOPs column is 0 without it; not under
        # torch.compile, whose first call would compile inside the summary's FLOP counter
        self.example_input_array = (
            None if compile else (torch.zeros(1, *self.data_shape), torch.ones(1, dtype=torch.long))
        )
        # a learned schedule's chain follows its parameters wherever they are loaded from
        self.register_load_state_dict_post_hook(lambda module, keys: module.refresh_schedule())

    @property
    def generator(self) -> torch.Generator:
        """The module's generator on its device: seed + 100003 * rank, restored from a checkpoint if resuming."""
        if self._generator is None or self._generator.device != self.device:
            self._generator = torch.Generator(device=self.device).manual_seed(self.seed + 100_003 * self.global_rank)
            if self._generator_state is not None:
                self._generator.set_state(self._generator_state)
                self._generator_state = None
        return self._generator

    def training_setup(self) -> TrainingSetup:
        """What the objective is asked to train (:meth:`Objective.problems <diffusion_elbo.core.losses.Objective.
        problems>`): this module's schedule and reverse variance."""
        return self.time.training_setup(self.variance)

    def step_context(self, augment_labels: Tensor | None = None) -> StepContext:
        """What the time axis needs of this module for a step: the network, the generator, the step, logging, and how
        the batch was augmented."""
        return StepContext(
            network=self.network,
            augment_labels=augment_labels,
            generator=self.generator,
            device=self.device,
            global_step=self.global_step,
            log=lambda name, value: self.log(name, value, on_step=True, on_epoch=False),
            all_gather=self.all_gather,
        )

    def setup(self, stage: str) -> None:
        if stage == "fit":  # the objective's own rules; the config check asked the same before any work
            self.objective.check(self.training_setup())
        # CPU DDP: each rank's OpenMP threads spin on every core unless split; oversubscribed, a step can run
        # 30x slower. Give each local rank its share of the cores unless the user set OMP_NUM_THREADS.
        trainer = self._trainer
        if (
            trainer is not None
            and trainer.world_size > 1
            and self.device.type == "cpu"
            and "OMP_NUM_THREADS" not in os.environ
        ):
            local = max(1, trainer.world_size // max(1, trainer.num_nodes))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))

    # ----------------------------------------------------------------------------------------- model
    def configure_model(self) -> None:
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        if self.compile and self._compiled is None:
            object.__setattr__(self, "_compiled", torch.compile(self.net))

    def network(self, x: Tensor, c: Tensor, augment_labels: Tensor | None = None) -> Tensor:
        """The network on inputs x and conditioning c (the chain step, or the scaled noise level in continuous time),
        compiled and in channels-last layout when configured; ``augment_labels`` (B, A) for augmented training
        examples (None: the data itself, as everywhere outside the training step)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        net = self._compiled if self._compiled is not None else self.net
        return net(x, c) if augment_labels is None else net(x, c, augment_labels=augment_labels)

    def denoise(self, x_t: Tensor, t: Tensor) -> Tensor:
        """The network as a denoiser of the chain :attr:`schedule`: t (B,) are its steps (1 is the decoder)."""
        return self.time.chain_denoiser(self.network)(x_t, t)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        return self.denoise(x_t, t)

    # -------------------------------------------------------------------------------------- training
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        """One step, whatever the time axis: the loss of :meth:`step_loss`; a non-finite one is skipped or stops the run
        (``nonfinite``) with the message that names its cause; then the work that needs a finite loss, and the logs."""
        x0, labels = batch[0], None
        if self.augmentation is not None:  # the network is told how (augment=...); validation sees the data itself
            x0, labels = self.augmentation(x0, generator=self.generator)
        step = self.step_loss(x0, augment_labels=labels)
        if not self._all_ranks_finite(step.loss):
            message = self._nonfinite_data_message(batch[0]) or step.nonfinite_message()
            if self.nonfinite == "skip":
                return self._skip_batch(message)
            raise NonFiniteLossError(message)
        self._skips_in_a_row = 0
        step.after_finite()
        self.log("train/loss", step.loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
        if self._logging_this_step():
            with torch.no_grad():
                self.log_dict(step.metrics(), on_step=True, on_epoch=False)
        return step.loss

    def step_loss(self, x0: Tensor, augment_labels: Tensor | None = None) -> StepLoss:
        """The training loss of the data ``x0`` (B, *D) on this module's time axis (t and the noise from its generator),
        the network given ``augment_labels`` (B, A) where x0 was augmented."""
        step = self.time.step_loss(
            self.step_context(augment_labels), x0, variance=self.variance, decoder_variance=self.decoder_variance
        )
        self._last_t = step.times
        return step

    def _skip_batch(self, message: str) -> Tensor | None:
        """Skip this batch (``nonfinite=skip``): None in one process (Lightning skips backward and the optimizer step).
        Lightning refuses None under DDP, so there every rank (they agree, :meth:`_all_ranks_finite`) returns a zero
        loss over every parameter, which keeps DDP's gradient all-reduce in step, and :meth:`optimizer_step` drops
        the (zero) gradients before the update, so the optimizer leaves weights and moments alone; the step counter
        still advances. After ``nonfinite_max_skips`` skipped batches in a row, the next non-finite one raises
        instead; every rank counts the same batches (they skip together), so every rank stops at the same step."""
        self._skips_in_a_row += 1
        if self._skips_in_a_row > self.nonfinite_max_skips:
            raise NonFiniteLossError(
                f"{self._skips_in_a_row} batches in a row had a non-finite loss: nonfinite=skip skipped "
                f"nonfinite_max_skips={self.nonfinite_max_skips} of them and stops at global step {self.global_step}, "
                "since training is not recovering (it would skip every batch to trainer.max_steps). The last batch: "
                f"{message} To skip longer runs of batches, raise nonfinite_max_skips."
            )
        rank_zero_warn(message + " Skipping this batch (nonfinite=skip).")
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return None
        self._skipping = True
        return sum((p * 0.0).sum() for p in self.parameters() if p.requires_grad)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        def closure():
            result = optimizer_closure()
            if self._skipping:  # a batch skipped under DDP: no gradients, so Adam(W) updates nothing
                optimizer.zero_grad(set_to_none=True)
                self._skipping = False
            return result

        optimizer.step(closure=closure)

    def _all_ranks_finite(self, loss: Tensor) -> bool:
        """Whether the loss is finite; with ``nonfinite=skip`` under DDP, whether it is finite on every rank. The
        ranks must skip a batch together: a rank that skipped alone would leave the others waiting in the next
        collective (the importance sampler's all_gather, DDP's gradient all-reduce) until the process-group timeout.
        One all_gather of a flag per step, only in that setting."""
        finite = torch.isfinite(loss.detach())
        trainer = self._trainer
        if self.nonfinite == "skip" and trainer is not None and trainer.world_size > 1:
            return bool(self.all_gather(finite.float()).min() > 0)
        return bool(finite)

    def _logging_this_step(self) -> bool:
        # The batch statistics below cost a few small kernels; compute them only on steps that are logged.
        trainer = self._trainer
        return trainer is None or trainer._logger_connector.should_update_logs

    def _nonfinite_data_message(self, x0: Tensor) -> str | None:
        """The message for a batch whose data x0 (B, *D) hold NaN or inf, None for finite data. Called only once the loss
        is non-finite (NaN data always make it so), so finite steps pay nothing; named before any ELBO term, since
        no optimizer setting repairs the data."""
        bad = ~torch.isfinite(x0.detach()).flatten(1).all(dim=1)  # (B,)
        if not bad.any():
            return None
        where = bad.nonzero().flatten().tolist()
        return (
            f"non-finite data at global step {self.global_step}: {len(where)} of the batch's {x0.shape[0]} examples "
            f"(positions {where[:10]}{'...' if len(where) > 10 else ''} in the batch) hold NaN or inf in x0, so the "
            "loss went non-finite. The data are broken, not the training (a lower optimizer.lr will not help): check "
            "the data set's files and its preprocessing (a division by zero in a normalization, a corrupt image); "
            "nonfinite=skip trains on past such batches. Checkpoints already written are kept."
        )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # every trainable parameter: the network's, and a learned noise schedule's
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        # one fused norm and one device sync per step; the per-parameter search only runs after a failure
        if not grads or torch.isfinite(torch.nn.utils.get_total_norm(grads, foreach=True)):
            return
        bad = [name for name, p in self.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        if bad:
            t = sorted(set(self._last_t.tolist()))[:12] if self._last_t is not None else "?"
            raise NonFiniteLossError(
                f"non-finite gradient at global step {self.global_step} in {len(bad)} parameter(s), first {bad[:4]}; "
                f"batch timesteps {t}. Try a lower optimizer.lr or trainer.precision=32-true; checkpoints already "
                "written are kept."
            )

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Lightning's clipping, also for a fused optimizer under bf16-mixed (``trainer=gpu optimizer.fused=true``).

        Lightning refuses to clip for any optimizer that unscales inside its step (fused AdamW) under mixed precision,
        because fp16's GradScaler would leave the gradients scaled at clipping time. bf16-mixed has no scaler: the
        gradients are the true ones, so they are clipped as in 32-bit precision. fp16 keeps Lightning's refusal."""
        plugin = self.trainer.precision_plugin
        if gradient_clip_val and isinstance(plugin, MixedPrecision) and plugin.scaler is None:
            algorithm = GradClipAlgorithmType(gradient_clip_algorithm or GradClipAlgorithmType.NORM)
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val, algorithm)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ------------------------------------------------------------------------------------ validation
    def refresh_schedule(self) -> None:
        """Rebuild the chain from the schedule's current parameters (a learned schedule's, after a step or a load),
        before validation, training and sampling read it. A fixed chain has nothing to rebuild."""
        if self.time.refresh(self.device):
            self.schedule = self.time.chain

    def on_validation_epoch_start(self) -> None:
        self.refresh_schedule()
        # The same draws every validation (common random numbers), so successive numbers compare the models, not
        # the noise. Every example draws its own t in each stratum (stratified_elbo), so val/*_se cover the
        # stratification error; the strata themselves are the same on every rank, so the profile's sums add up.
        self._val_generator = torch.Generator(device=self.device).manual_seed(VAL_SEED + self.global_rank)

    def _val_draws(self, batch) -> dict:
        """Each example's t and noise from its own seed (its index in the val split, an :class:`IndexedBatch`), so the
        validation numbers are the same on 1 or N processes; the module's generator for batches without indices (a
        data module of one's own)."""
        if not isinstance(batch, IndexedBatch):
            return {"generator": self._val_generator}
        return self.time.example_draws(
            batch.index.cpu(), strata=self.val_strata, shape=tuple(batch.x0.shape[1:]), device=batch[0].device
        )

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        """The bound with the network in float32, also under bf16-mixed training (which keeps bf16 for its steps): the
        network's bf16 outputs raised the continuous-time bound of the CIFAR-10 UNet by 0.052 ± 0.001 bits/dim (1.4005
        -> 1.4522 with the same t and noise, benchmarks/gpu/h200.md), errors that the low-noise terms' weights amplify."""
        with torch.autocast(device_type=self.device.type, enabled=False):
            result = self.validation_result(batch)
        self.val_elbo.update(result)
        self.val_profile.update(result)

    def validation_result(self, batch: tuple[Tensor, ...]) -> ELBOResult:
        """The stratified estimate of the bound for the batch's examples (per example, per stratum)."""
        return self.time.validation_result(
            self.step_context(),
            batch[0],
            strata=self.val_strata,
            draws=self._val_draws(batch),
            variance=self.variance,
            decoder_variance=self.decoder_variance,
        )

    def profile_weights(self) -> Tensor:
        """The sizes n_k of the validation profile's entries (in steps of the chain), (K,)."""
        return self.time.profile_weights(self.val_strata)

    def bound_inputs(self) -> dict | None:
        """What :func:`~diffusion_elbo.evaluation.estimators.evaluate_continuous` takes to evaluate this model's own
        continuous-time bound (None for a chain), leaving the module in eval mode with its chain rebuilt from the
        schedule's current parameters."""
        self.eval()
        self.refresh_schedule()
        return self.time.bound_inputs(self.network, self.device)

    def on_validation_epoch_end(self) -> None:
        profile = self.val_profile.compute()
        self.last_profile = {"t_weights": self.profile_weights(), **{k: v.cpu() for k, v in profile.items()}}
        self.val_profile.reset()
        values = self.val_elbo.compute()
        # Already reduced across ranks by the metric's sum states: no sync_dist here.
        self.log("val/elbo_bpd", values.pop("elbo_bpd").float(), prog_bar=True)
        self.log_dict({f"val/{k}": v.float() for k, v in values.items()})
        self.val_elbo.reset()
        extras = self.time.metrics()
        if extras:
            self.log_dict({f"val/{k}": v.detach().float() for k, v in extras.items()})

    # -------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        sampler: Sampler | None = None,
        *,
        generator: torch.Generator | None = None,
        progress: Callable[[int, int], None] | None = None,
        variance: Tensor | str | None = None,
        x_T: Tensor | None = None,
    ) -> Tensor:
        """Draw ``num_samples`` with ``sampler`` (an object of the ``sampler`` config group; default DDIM, 50 steps).

        Without a ``generator`` each DDP rank uses seed + rank, so ranks draw different samples. ``variance``
        overrides the module's reverse variance (a name, or a table such as the analytic one; DDIM takes a table as
        Analytic-DDIM's KL-optimal noise and ignores names). ``x_T`` (num_samples, *data_shape) fixes the starting
        noise (DDIM with eta = 0 is then deterministic)."""
        if generator is None:
            generator = torch.Generator(device=self.device).manual_seed(self.seed + 100_003 * self.global_rank)
        sampler = DDIMSampler() if sampler is None else sampler
        chain = self.sampling_chain(self.variance if variance is None else variance)
        shape = (num_samples, *self.data_shape)
        return sampler.sample(chain, shape, generator=generator, device=self.device, x_T=x_T, progress=progress)

    def sampling_chain(self, variance: Tensor | str | ReverseVariance) -> Chain:
        """The chain a sampler walks: this module's network, schedule and parametrization, with ``variance``."""
        self.refresh_schedule()
        chosen = variance if isinstance(variance, Tensor) else ReverseVariance(variance)
        return Chain(
            denoise=self.denoise,
            schedule=self.schedule,
            parametrization=self.parametrization,
            network_variance=self.variance,
            variance=chosen,
            clip_denoised=self.sampling_clips,
            num_bins=self.num_bins,
        )

    @property
    def sampling_clips(self) -> bool:
        """Whether sampling clamps x0_hat to [-1, 1]: ``clip_denoised`` on image (quantized) data."""
        return self.clip_denoised and self.num_bins is not None

    # ------------------------------------------------------------------------------------ optimizers
    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise ValueError("no optimizer configured: set optimizer=adamw (or another optimizer config)")
        groups = [{"params": list(self.net.parameters())}, *self.time.parameter_groups()]
        optimizer = self.optimizer_factory(params=groups)
        if self.lr_scheduler_factory is None:
            return optimizer
        # Diffusion runs count steps, not epochs: the LR schedule steps every optimizer step.
        scheduler = self.lr_scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["diffusion_elbo_config"] = self.config
        checkpoint["generator_state"] = self.generator.get_state()
        # torch's global generators: dropout draws from them (the module's generator draws t and the noise)
        checkpoint["torch_rng_state"] = self._global_rng_state()
        checkpoint.update(self.time.state_dict())  # the importance sampler's history

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "generator_state" in checkpoint:
            self._generator, self._generator_state = None, checkpoint["generator_state"]
        self._torch_rng_state = checkpoint.get("torch_rng_state")
        self.time.load_state_dict(checkpoint)

    def on_train_start(self) -> None:
        """Restore torch's global generators (dropout) as the checkpoint left them, at the last moment before the
        first training step, so what ran in between (building and loading) draws nothing the steps would see. The
        ranks of a DDP run draw the same dropout stream (one seed for all), so rank 0's state, the one saved, fits
        each."""
        if self._torch_rng_state is not None:
            self._set_global_rng_state(self._torch_rng_state)
            self._torch_rng_state = None
        self.refresh_schedule()

    def on_validation_start(self) -> None:
        self._rng_before_validation = self._global_rng_state()

    def on_validation_end(self) -> None:
        """Put torch's global generators back as they were before this validation (the callbacks' work included):
        the dropout masks of the training steps after it are then those of a run that did not validate here, so a run
        resumed from a checkpoint written just before a validation (which it does not repeat) draws the same ones."""
        if self._rng_before_validation is not None:
            self._set_global_rng_state(self._rng_before_validation)
            self._rng_before_validation = None

    def _global_rng_state(self) -> dict[str, Tensor]:
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _set_global_rng_state(self, state: dict[str, Tensor]) -> None:
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)
