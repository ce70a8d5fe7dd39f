"""The time axis of a diffusion model: what differs between a T-step chain and a continuous-time log-SNR schedule.

One LightningModule (:class:`~diffusion_elbo.lightning.module.DiffusionModule`) trains, validates and samples every
model; it asks a :class:`TimeAxis` for the things that depend on how time is drawn and what the network is told:

- :class:`ChainTime`: a :class:`~diffusion_elbo.core.chain.NoiseSchedule` of T steps (Ho et al. 2020). t is an
  integer in 1..T drawn by the objective's timestep sampler; the network sees t; the bound is the chain's ELBO.
- :class:`ContinuousTime`: a :class:`~diffusion_elbo.core.logsnr.LogSNRSchedule` gamma(t) on t in [0, 1], fixed or
  learned (Kingma et al. 2021). t is real; the network sees the noise level gamma; the bound is the continuous-time
  one (or its T-step form). Its :attr:`chain` is the schedule discretized at ``eval_timesteps`` steps, so samplers,
  the exact evaluator and the ODE read it as they read any chain.

Both give the same things: the chain samplers walk (:attr:`TimeAxis.chain`), the denoiser on that chain's steps, one
training step's loss (:class:`StepLoss`), one validation batch's stratified bound (an
:class:`~diffusion_elbo.core.elbo.ELBOResult`), the profile's strata, the schedule's own metrics and parameters.
What they need of the module (its network, generator, step, logging) comes in a :class:`StepContext`. Pure torch.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from diffusion_elbo.core.chain import NoiseSchedule
from diffusion_elbo.core.distributions import bits_per_dim_scale, sum_flat
from diffusion_elbo.core.elbo import (
    ELBOResult,
    num_stratified_timesteps,
    per_example_draws,
    prior_kl_nats,
    stratified_elbo,
    stratified_timesteps,
    term_from_output,
)
from diffusion_elbo.core.forward import q_sample
from diffusion_elbo.core.logsnr import CosineLogSNR, LogSNRSchedule, alpha_sigma
from diffusion_elbo.core.losses import ELBOLoss, EpsMSE, Objective, TrainingBatch, TrainingSetup
from diffusion_elbo.core.parametrization import Parametrization
from diffusion_elbo.core.reverse import DecoderVariance, ReverseVariance
from diffusion_elbo.core.timesteps import (
    ImportanceSampler,
    TimestepSampling,
    low_discrepancy_uniform,
    make_timestep_sampler,
)
from diffusion_elbo.core.vdm import (
    ContinuousTerms,
    chain_denoiser,
    continuous_example_draws,
    continuous_terms,
    eps_from_output,
    route_bound_gradient,
    route_variance_gradient,
    sigmoid_weighting,
    step_times,
    stratified_continuous_elbo,
    v_weight,
)

# The network's noise-level input in continuous time: gamma mapped from the schedule's reference range onto [0, 1000],
# the range of the chain models' timestep input, so the same sinusoidal embedding and UNet serve both.
CONDITIONING_SCALE = 1000.0

# The decoder variance of a continuous-time model's discretized chain (its exact T-step bound, sampling, the ODE):
# sigma_0^2 = beta_1 of the chain, the variance of z_0 given x in continuous time.
CHAIN_DECODER_VARIANCE = DecoderVariance.BETA

# the base seed of validation's per-example draws: 0 keeps the draws behind every recorded val number (before base
# seeds reached example_generator, each acted as 0); val and test examples are different data, so sharing it is harmless
VAL_EXAMPLE_SEED = 0

Network = Callable[[Tensor, Tensor], Tensor]


@dataclass
class StepContext:
    """What a time axis needs of the module that holds it, for one step.

    ``network(x, c)``: the network on inputs x (B, *D) and its conditioning c (B,) (the chain step, or the noise
    level scaled by :data:`CONDITIONING_SCALE`), under the module's layout and compilation. ``generator`` draws t and
    the noise. ``global_step`` is for messages; ``log(name, value)`` logs a training number; ``all_gather`` gathers a
    tensor from every process (the importance sampler's update). ``augment_labels`` (B, A): how each example of the
    batch was augmented (``augment=...``; None: not augmented), which the network is given beside c:
    :meth:`conditioned` is the network for some of the batch's rows. Call the network through it, never ``network``
    directly, which would drop the labels."""

    network: Callable[..., Tensor]
    generator: torch.Generator | None
    device: torch.device
    global_step: int = 0
    log: Callable[[str, Tensor], None] = lambda name, value: None
    all_gather: Callable[[Tensor], Tensor] = lambda value: value
    augment_labels: Tensor | None = None

    def conditioned(self, rows: slice = slice(None)) -> Network:
        """``(x, c) -> out`` for the batch's ``rows`` (all by default): the network with those rows' augmentation
        labels, or the network itself where the batch is not augmented."""
        if self.augment_labels is None:
            return self.network
        labels = self.augment_labels[rows]
        return lambda x, c: self.network(x, c, augment_labels=labels)


@dataclass
class StepLoss:
    """One training step's loss and what the training step asks of it: ``nonfinite_message`` (why the loss is not
    finite; called only then), ``metrics`` (the train/ numbers of a logged step, under no_grad), ``after_finite`` (work
    that needs a finite loss on every rank, e.g. the importance sampler's update) and ``times`` (the batch's t, (B,),
    for messages)."""

    loss: Tensor
    nonfinite_message: Callable[[], str]
    metrics: Callable[[], dict[str, Tensor]]
    after_finite: Callable[[], None] = lambda: None
    times: Tensor | None = field(default=None)


def nonfinite_advice(loss: Tensor, step: int, what: str) -> str:
    """The message of a non-finite training loss: the step, what went non-finite, and the settings that help."""
    return (
        f"non-finite loss ({loss.item()}) at global step {step}: {what}. Try a lower optimizer.lr, "
        "trainer.gradient_clip_val=1.0, or trainer.precision=32-true; checkpoints already written are kept."
    )


def term_metrics(terms: dict[str, Tensor], num_dims: int) -> dict[str, Tensor]:
    """``train/<name>_bpd`` and its standard error over the batch for each per-example term (B,) in nats."""
    to_bpd = bits_per_dim_scale(num_dims)
    metrics = {}
    for name, values in terms.items():
        metrics[f"train/{name}_bpd"] = values.mean() * to_bpd
        metrics[f"train/{name}_bpd_se"] = values.std() / math.sqrt(values.numel()) * to_bpd
    return metrics


class TimeAxis(ABC):
    """How time is drawn, told to the network and integrated over in the bound (the module's other half).

    :attr:`chain` is the T-step chain that samplers, the exact evaluator and the ODE walk; :attr:`modules` names the
    ``nn.Module`` s the LightningModule registers (their parameters and buffers are its own, and its state dict keys
    are theirs). Subclasses are pure torch; the module passes what they need of it in a :class:`StepContext`."""

    chain: NoiseSchedule

    def __init__(self, *, objective: Objective | None, parametrization: Parametrization, num_bins: int | None,
                 num_dims: int):  # fmt: skip
        self.objective = self.default_objective() if objective is None else objective
        self.parametrization = Parametrization(parametrization)
        self.num_bins = num_bins
        self.num_dims = int(num_dims)

    @staticmethod
    def default_objective() -> Objective:
        """The objective of a model given none: L_simple (Ho et al. 2020)."""
        return EpsMSE()

    @property
    def modules(self) -> dict[str, nn.Module]:
        """The modules to register on the LightningModule, by attribute name."""
        return {"schedule": self.chain}

    def reverse_variance(self, requested: ReverseVariance) -> ReverseVariance:
        """The reverse variance of the bound's kernels and of ancestral sampling, given the one asked for."""
        return requested

    def decoder_variance(self, requested: DecoderVariance) -> DecoderVariance:
        """sigma_1^2 of the chain's decoder under the fixed variances, given the convention asked for."""
        return requested

    @abstractmethod
    def training_setup(self, variance: ReverseVariance) -> TrainingSetup:
        """What the objective is asked to train (:meth:`~diffusion_elbo.core.losses.Objective.problems`)."""

    def refresh(self, device: torch.device) -> bool:
        """Rebuild :attr:`chain` from the schedule's current parameters (a learned schedule's, after a step or a load);
        True when it changed. A fixed chain has nothing to rebuild."""
        return False

    @abstractmethod
    def chain_denoiser(self, network: Network) -> Network:
        """The denoiser on the chain's steps, ``(x_t, t) -> out`` with t in 1..T (B,), read by ``parametrization``."""

    @abstractmethod
    def step_loss(self, ctx: StepContext, x0: Tensor, *, variance: ReverseVariance,
                  decoder_variance: DecoderVariance) -> StepLoss:  # fmt: skip
        """The training loss of the data ``x0`` (B, *D): t and the noise drawn from ``ctx.generator``."""

    @abstractmethod
    def validation_result(self, ctx: StepContext, x0: Tensor, *, strata: int, draws: dict,
                          variance: ReverseVariance, decoder_variance: DecoderVariance) -> ELBOResult:  # fmt: skip
        """The stratified bound of the batch ``x0`` (B, *D) in float32 (per example and stratum); ``draws`` are from
        :meth:`example_draws` or ``{"generator": g}``."""

    @abstractmethod
    def example_draws(self, indices: Tensor, *, strata: int, shape: tuple[int, ...], device: torch.device) -> dict:
        """Validation's t and noise of each example from its own seed (``indices``, (B,), in the split), so the numbers
        are the same on 1 or N processes."""

    @abstractmethod
    def profile_size(self, strata: int) -> int:
        """The number of entries of the validation profile with ``strata`` strata."""

    @abstractmethod
    def profile_weights(self, strata: int) -> Tensor:
        """The sizes n_k of the validation profile's entries (in steps of the chain), (K,)."""

    def metrics(self) -> dict[str, Tensor]:
        """What the schedule reports beside the bound (a learned schedule's endpoints)."""
        return {}

    def parameter_groups(self) -> list[dict]:
        """The optimizer's parameter groups beside the network's (a learned schedule's, with their own settings)."""
        return []

    def bound_inputs(self, network: Network, device: torch.device) -> dict | None:
        """The inputs of :func:`~diffusion_elbo.evaluation.estimators.evaluate_continuous` where this model has a
        continuous-time bound of its own; None for a chain."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """State to save in checkpoints beside the modules' (the importance sampler's history)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027  (a fixed schedule has no state)
        """Restore :meth:`state_dict` from a checkpoint (a dict that may hold other keys too)."""


class ChainTime(TimeAxis):
    """A T-step chain (Ho et al. 2020): t in 1..T drawn by the objective's timestep sampler (uniform, importance or
    low-discrepancy), the network on (x_t, t), the chain's ELBO terms (lecture: L_1, L_{t-1}, L_T)."""

    def __init__(self, schedule: NoiseSchedule, *, objective: Objective | None, parametrization: Parametrization,
                 num_bins: int | None, num_dims: int) -> None:  # fmt: skip
        super().__init__(objective=objective, parametrization=parametrization, num_bins=num_bins, num_dims=num_dims)
        self.chain = schedule
        self.timestep_sampler = make_timestep_sampler(self.objective.timestep_sampling, schedule.T)

    def training_setup(self, variance: ReverseVariance) -> TrainingSetup:
        return TrainingSetup(schedule=self.chain.name, continuous=False, learned_schedule=False, variance=variance)

    def chain_denoiser(self, network: Network) -> Network:
        return network

    def _terms(self, x0: Tensor, x_t: Tensor, t: Tensor, out: Tensor, *, variance: ReverseVariance,
               decoder_variance: DecoderVariance) -> Tensor:  # fmt: skip
        # The ELBO terms stay in float32 under mixed precision: log-CDFs and small-variance KLs need it.
        with torch.autocast(device_type=x0.device.type, enabled=False):
            return term_from_output(
                self.chain,
                x0.float(),
                x_t=x_t.float(),
                t=t,
                out=out.float(),
                parametrization=self.parametrization,
                variance=variance,
                decoder_variance=decoder_variance,
                num_bins=self.num_bins,
            )

    def step_loss(self, ctx: StepContext, x0: Tensor, *, variance: ReverseVariance,
                  decoder_variance: DecoderVariance) -> StepLoss:  # fmt: skip
        """t from the objective's sampler, x_t from q(x_t | x0), the objective on the network's output
        (:class:`~diffusion_elbo.core.losses.TrainingBatch`)."""
        t, weight = self.timestep_sampler.sample(x0.shape[0], device=ctx.device, generator=ctx.generator)
        eps = torch.randn(x0.shape, generator=ctx.generator, device=x0.device, dtype=x0.dtype)
        x_t = q_sample(self.chain, x0, t=t, noise=eps)
        out = ctx.conditioned()(x_t, t)
        batch = TrainingBatch(
            schedule=self.chain,
            parametrization=self.parametrization,
            variance=variance,
            num_dims=self.num_dims,
            x0=x0,
            eps=eps,
            x_t=x_t,
            t=t,
            inv_p=weight.to(torch.float32),
            out=out,
            terms_of=lambda output: self._terms(
                x0, x_t, t, output, variance=variance, decoder_variance=decoder_variance
            ),
            prior_of=lambda: prior_kl_nats(self.chain, x0.float()),
        )
        loss = self.objective.loss(batch).mean()

        def term() -> Tensor:
            # L_t (B,) nats: what importance sampling learns from and the logs show; the objective's own where it
            # computed them (the same values whatever gradient it routed)
            computed = batch.computed_terms()
            return batch.elbo_terms() if computed is None else computed

        def nonfinite_message() -> str:
            with torch.no_grad():
                return self._nonfinite_message(loss, term(), batch.prior(), t, ctx.global_step)

        def after_finite() -> None:
            if isinstance(self.timestep_sampler, ImportanceSampler):
                t_all, term_all = ctx.all_gather(t), ctx.all_gather(term().detach())
                self.timestep_sampler.update(t_all.reshape(-1), term_all.reshape(-1))

        def metrics() -> dict[str, Tensor]:
            # unbiased estimates of -ELBO and its terms from this batch's t: L_t / p(t) per example
            scaled, prior = term().detach() * batch.inv_p, batch.prior()
            zeros = torch.zeros_like(scaled)
            return term_metrics(
                {
                    "elbo": prior + scaled,
                    "reconstruction": torch.where(t == 1, scaled, zeros),
                    "prior": prior,
                    "denoising": torch.where(t >= 2, scaled, zeros),
                },
                self.num_dims,
            )

        return StepLoss(loss, nonfinite_message, metrics, after_finite, times=t)

    @staticmethod
    def _nonfinite_message(loss: Tensor, term: Tensor, prior: Tensor, t: Tensor, step: int) -> str:
        bad = ~torch.isfinite(term)
        parts = []
        if (bad & (t == 1)).any():
            parts.append("reconstruction (t = 1)")
        if (bad & (t >= 2)).any():
            parts.append(f"denoising matching at t = {sorted(set(t[bad & (t >= 2)].tolist()))[:10]}")
        if not torch.isfinite(prior).all():
            parts.append("prior matching")
        which = ", ".join(parts) or (
            "the loss weighting (the ELBO terms are finite)"
            if not torch.isfinite(loss)
            else "another rank's loss (this rank's is finite; all ranks skip together)"
        )
        times = f"{sorted(set(t.tolist()))[:12]}{'...' if t.unique().numel() > 12 else ''}"
        return nonfinite_advice(loss, step, f"{which} went non-finite; batch timesteps {times}")

    def validation_result(self, ctx: StepContext, x0: Tensor, *, strata: int, draws: dict,
                          variance: ReverseVariance, decoder_variance: DecoderVariance) -> ELBOResult:  # fmt: skip
        return stratified_elbo(
            ctx.conditioned(),
            self.chain,
            x0,
            parametrization=self.parametrization,
            variance=variance,
            decoder_variance=decoder_variance,
            num_bins=self.num_bins,
            strata=strata,
            **draws,
        )

    def example_draws(self, indices: Tensor, *, strata: int, shape: tuple[int, ...], device: torch.device) -> dict:
        timesteps, noise = per_example_draws(self.chain.T, strata, indices=indices, seed=VAL_EXAMPLE_SEED, shape=shape)
        return {"timesteps": timesteps, "noise": noise.to(device)}

    def profile_size(self, strata: int) -> int:
        return num_stratified_timesteps(self.chain.T, strata)

    def profile_weights(self, strata: int) -> Tensor:
        _, t_weights = stratified_timesteps(self.chain.T, strata)
        return t_weights

    def state_dict(self) -> dict[str, Any]:
        if isinstance(self.timestep_sampler, ImportanceSampler):
            return {"importance_sampler": self.timestep_sampler.state_dict()}
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if isinstance(self.timestep_sampler, ImportanceSampler) and "importance_sampler" in state:
            self.timestep_sampler.load_state_dict(state["importance_sampler"])


class ContinuousTime(TimeAxis):
    """Continuous time t in [0, 1] with a log-SNR schedule gamma(t), fixed or learned (Kingma et al. 2021).

    Args:
        logsnr: the schedule gamma(t) (fixed, or learned jointly with the network).
        objective: :class:`~diffusion_elbo.core.losses.ELBOLoss` (the bound, VDM; its ``timestep_sampling``
            ``low_discrepancy`` or ``uniform``, its ``sigmoid_weight``/``sigmoid_bias`` weighting of the diffusion term
            and its ``aux_weight``/``aux_fraction`` v-MSE share) or an MSE weighting of the SNR (fixed schedules).
        timesteps: None for the continuous-time bound, T for the T-step one (VDM eq. 13).
        eval_timesteps: the T of :attr:`chain`, used for validation's profile, sampling, the exact evaluator and the ODE.
        variance_gradient: the learned shape follows the gradient of the estimator's variance (continuous time), the
            endpoints that of the bound; False trains everything on the bound.
        schedule_lr: learning rate of a learned schedule's parameters (None: the optimizer's).

    The network sees c = 1000 (gamma - gamma_lo) / (gamma_hi - gamma_lo) over the schedule's fixed reference range: the
    noise level, not t, so a reshaped schedule leaves the function it computes unchanged (the invariance that makes
    the bound depend on the endpoints only)."""

    def __init__(self, logsnr: LogSNRSchedule, *, objective: Objective | None, parametrization: Parametrization,
                 num_bins: int | None, num_dims: int, timesteps: int | None = None, eval_timesteps: int = 1000,
                 variance_gradient: bool = True, schedule_lr: float | None = None) -> None:  # fmt: skip
        super().__init__(objective=objective, parametrization=parametrization, num_bins=num_bins, num_dims=num_dims)
        if timesteps is not None and (not isinstance(timesteps, int) or timesteps < 1):
            raise ValueError(f"schedule.timesteps must be null (continuous time) or an integer T >= 1; got {timesteps}")
        objective = self.objective
        bound = isinstance(objective, ELBOLoss)  # else an MSE weighting of the SNR (Objective.problems)
        # t in [0, 1] of the bound is the schedule's window [t_min, 1]: the schedule itself for VDM's (t_min = 0), a beta
        # schedule's latents [1 / T, 1] (its t = 0 is the data); the chain is the schedule's view on its own grid
        self.logsnr = logsnr.window()
        self.timesteps = timesteps
        self.eval_timesteps = int(eval_timesteps)
        self.schedule_lr = schedule_lr
        self.chain = logsnr.discretize(self.eval_timesteps)
        # the chain steps the bound's t in [0, 1] spans, from step 1 (its decoder): T for VDM's T + 1 steps, T - 1 for a
        # beta schedule's own T (the profile's labels and widths)
        self.chain_span = self.chain.T - 1
        # the bound's weighting and its v-MSE share (ELBOLoss's arguments; none for an MSE weighting)
        self.sigmoid_weight = objective.sigmoid_weight if bound else 0.0
        self.sigmoid_bias = objective.sigmoid_bias if bound else 0.0
        self.aux_weight = objective.aux_weight if bound else 0.0
        self.aux_fraction = objective.aux_fraction if bound else 0.5
        # the auxiliary loss's noise levels: fixed, on the range the network's conditioning is scaled to; a multivariate
        # schedule's own (held fixed), since its network reads one mean noise level and the pattern across dimensions
        # from the schedule (a uniform noise level would be an input it never meets in the bound)
        self.multivariate = logsnr.multivariate
        self.aux_logsnr = CosineLogSNR(*logsnr.reference) if self.aux_weight and not self.multivariate else None
        self.low_discrepancy = objective.timestep_sampling is TimestepSampling.LOW_DISCREPANCY
        self.variance_gradient = bool(variance_gradient) and timesteps is None and bound
        if self.multivariate and logsnr.endpoints()[0][0].numel() != num_dims:
            shape = tuple(logsnr.endpoints()[0].shape[1:])
            raise ValueError(
                f"schedule={logsnr.name} has one gamma per dimension of shape {shape}, but the data has {num_dims} "
                "dimensions: set schedule.event_shape to the data's shape (e.g. [channels, size, size])"
            )
        if self.variance_gradient and self.multivariate:
            raise ValueError(
                f"schedule={logsnr.name} has one gamma per dimension, so the bound depends on its shape, which must train "
                "on the bound's gradient: set schedule.variance_gradient=false (variance_gradient is for a scalar "
                "schedule, whose continuous-time bound depends on its endpoints only)"
            )

    @staticmethod
    def default_objective() -> Objective:
        """The objective of a continuous-time model given none: the bound with low-discrepancy t (VDM)."""
        return ELBOLoss(TimestepSampling.LOW_DISCREPANCY)

    @property
    def modules(self) -> dict[str, nn.Module]:
        return {"schedule": self.chain, "logsnr": self.logsnr}

    def reverse_variance(self, requested: ReverseVariance) -> ReverseVariance:
        """``small``: the bound's reverse kernels are q(z_s | z_t, x = x_hat), whose variance is the posterior's."""
        if requested is not ReverseVariance.SMALL:
            raise ValueError(
                f"schedule={self.logsnr.name} trains the bound with the posterior variance (its reverse kernels are "
                f"q(z_s | z_t, x = x_hat)); variance={requested.value} is for discrete schedules: leave variance=small "
                "(variance=analytic can still be chosen at eval time)"
            )
        return requested

    def decoder_variance(self, requested: DecoderVariance) -> DecoderVariance:
        """beta_1 of the chain (:data:`CHAIN_DECODER_VARIANCE`): the variance of z_0 given x in continuous time, set by
        gamma(0), not a convention to choose."""
        return CHAIN_DECODER_VARIANCE

    def training_setup(self, variance: ReverseVariance) -> TrainingSetup:
        return TrainingSetup(
            schedule=self.logsnr.name, continuous=True, learned_schedule=self.logsnr.learned, variance=variance
        )

    def refresh(self, device: torch.device) -> bool:
        if not self.logsnr.learned:
            return False
        self.chain = self.logsnr.discretize(self.eval_timesteps).to(device)
        return True

    # ------------------------------------------------------------------------------------------- network
    def conditioning(self, gamma: Tensor) -> Tensor:
        """The network's noise-level input, (B,): 1000 (gamma - gamma_lo) / (gamma_hi - gamma_lo); for a multivariate
        schedule's gamma (B, *D), of its mean over the dimensions."""
        gamma = mean_level(gamma)
        lo, hi = self.logsnr.reference
        return (gamma - lo) * (CONDITIONING_SCALE / (hi - lo))

    def gamma_denoiser(self, network: Network, *, amp_dtype: torch.dtype | None = None) -> Network:
        """The network at noise level gamma = -log SNR (B,), ``(z_t, gamma) -> out``, run under autocast to
        ``amp_dtype`` when given (the trainer's mixed precision, re-enabled inside the bound's float32 region) and read
        in float32."""

        def denoise(z_t: Tensor, gamma: Tensor) -> Tensor:
            with torch.autocast(device_type=z_t.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                return network(z_t, self.conditioning(gamma)).float()

        return denoise

    def chain_denoiser(self, network: Network) -> Network:
        """The network as a denoiser of :attr:`chain`: t are chain steps (1 is the decoder, z_0)."""
        return chain_denoiser(
            lambda z_t, gamma: network(z_t, self.conditioning(gamma)), self.chain, self.parametrization
        )

    @staticmethod
    def _amp_dtype(device: torch.device) -> torch.dtype | None:
        """The autocast dtype active now on ``device`` (mixed precision), before the bound's terms turn it off."""
        return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None

    # ------------------------------------------------------------------------------------------ training
    def _draw_u(self, ctx: StepContext, batch: int) -> Tensor:
        if self.low_discrepancy:
            return low_discrepancy_uniform(batch, ctx.device, ctx.generator)
        return torch.rand(batch, generator=ctx.generator, device=ctx.device, dtype=torch.float64)

    def step_loss(self, ctx: StepContext, x0: Tensor, *, variance: ReverseVariance,
                  decoder_variance: DecoderVariance) -> StepLoss:  # fmt: skip
        """The continuous-time (or T-step) bound, a weighting of it or an MSE weighting of the SNR, at times drawn from
        u ~ U[0, 1) (low-discrepancy by default), with the auxiliary v-MSE share when the objective has one."""
        x0, x_aux = self.split_aux(x0)
        amp_dtype = self._amp_dtype(ctx.device)
        denoise = self.gamma_denoiser(ctx.conditioned(slice(0, x0.shape[0])), amp_dtype=amp_dtype)
        u = self._draw_u(ctx, x0.shape[0])
        eps = torch.randn(x0.shape, generator=ctx.generator, device=x0.device, dtype=x0.dtype)
        with torch.autocast(device_type=ctx.device.type, enabled=False):  # the schedule and terms in float32
            t, s = step_times(u.float(), self.timesteps)
            log_snr = self.logsnr(t)
            log_snr_s = None if s is None else self.logsnr(s)  # the T-step term's gamma(s)
        terms: ContinuousTerms | None = None
        if not isinstance(self.objective, ELBOLoss):  # an MSE weighting (loss=simple, v_mse, ...)
            loss = self._mse_loss(denoise, x0, eps, log_snr)
        else:
            with torch.autocast(device_type=ctx.device.type, enabled=False):
                terms = continuous_terms(
                    denoise,
                    self.logsnr,
                    x0=x0.float(),
                    u=u,
                    eps=eps.float(),
                    parametrization=self.parametrization,
                    num_bins=self.num_bins,
                    timesteps=self.timesteps,
                    log_snr=log_snr,
                    log_snr_s=log_snr_s,
                )
            weights = self._training_weights(log_snr)
            per_example = terms.weighted_total(weights) / self.num_dims
            loss = per_example.mean()
            if weights is not None:  # the network trains on the weighted loss, the schedule on the bound
                for at in (log_snr, log_snr_s):
                    if at is not None:
                        route_bound_gradient(at, weights)
            if self.variance_gradient and bool(torch.isfinite(loss)):
                route_variance_gradient(log_snr, per_example, weights)
        if x_aux is not None:  # the batch's last rows, with their own augmentation labels
            aux_denoise = self.gamma_denoiser(ctx.conditioned(slice(x0.shape[0], None)), amp_dtype=amp_dtype)
            aux = self._aux_loss(ctx, aux_denoise, x_aux)
            ctx.log("train/aux_v_mse", aux.detach())
            loss = loss + self.aux_weight * aux
        return StepLoss(
            loss=loss,
            nonfinite_message=lambda: self._nonfinite_message(loss, terms, t, ctx.global_step),
            metrics=lambda: self._metrics(terms),
            times=t,
        )

    def split_aux(self, x0: Tensor) -> tuple[Tensor, Tensor | None]:
        """The batch's share for the bound and (the last round(aux_fraction B), at least 1) for the auxiliary loss."""
        if not self.aux_weight or x0.shape[0] < 2:
            return x0, None
        n_aux = min(max(round(self.aux_fraction * x0.shape[0]), 1), x0.shape[0] - 1)
        return x0[:-n_aux], x0[-n_aux:]

    def _aux_loss(self, ctx: StepContext, denoise: Network, x0: Tensor) -> Tensor:
        """||v - v_hat||^2 / D at t uniform (low-discrepancy) on the fixed cosine log-SNR (Salimans & Ho 2022); on a
        multivariate schedule, on the schedule itself, held fixed."""
        u = self._draw_u(ctx, x0.shape[0])
        eps = torch.randn(x0.shape, generator=ctx.generator, device=x0.device, dtype=x0.dtype)
        with torch.autocast(device_type=ctx.device.type, enabled=False):
            if self.aux_logsnr is None:
                gamma = self.logsnr(u.float()).gamma.detach()  # (B, *D)
            else:
                gamma = self.aux_logsnr(u.float()).gamma
            return self._noise_mse(denoise, x0.float(), eps.float(), gamma, weight=v_weight(gamma)).mean()

    def _training_weights(self, log_snr) -> Tensor | None:
        """w(gamma(t)) (B,) of the weighted diffusion term (None: the bound), held fixed (detached)."""
        if not self.sigmoid_weight:
            return None
        # a multivariate schedule: the weighting of its mean noise level, the network's input
        return sigmoid_weighting(mean_level(log_snr.gamma.detach()), self.sigmoid_weight, self.sigmoid_bias)

    def _mse_loss(self, denoise: Network, x0: Tensor, eps: Tensor, log_snr) -> Tensor:
        """The objective's w(SNR) ||x0 - x0_hat||^2 / D = w(SNR) / SNR ||eps - eps_hat||^2 / D at the drawn t (for
        L_simple, w = SNR: Ho et al.'s ||eps - eps_hat||^2 / D in continuous time)."""
        gamma = log_snr.gamma.detach()
        snr = torch.exp(-gamma.double())
        scale = (self.objective.snr_weight(snr) / snr).to(gamma.dtype)  # exactly 1 for L_simple
        return self._noise_mse(denoise, x0, eps, gamma, weight=scale).mean()  # (per dimension, multivariate)

    def _noise_mse(
        self, denoise: Network, x0: Tensor, eps: Tensor, gamma: Tensor, weight: Tensor | None = None
    ) -> Tensor:
        """||eps - eps_hat(z_t)||^2 / D per example, (B,), at z_t = alpha x0 + sigma eps with gamma (B,) or (B, *D) held
        fixed, each error weighted by ``weight`` (shaped like gamma) when given."""
        alpha, sigma = (NoiseSchedule.broadcast(v, x0) for v in alpha_sigma(gamma))
        z_t = alpha * x0 + sigma * eps
        eps_hat = eps_from_output(self.parametrization, z_t, gamma, denoise(z_t, gamma))
        sq = (eps - eps_hat) ** 2
        if weight is not None and weight.ndim == sq.ndim:  # per dimension
            return sum_flat(weight * sq) / self.num_dims
        mse = sum_flat(sq) / self.num_dims
        return mse if weight is None else mse * weight

    def _endpoints(self) -> tuple[Tensor, Tensor]:
        """gamma(0) and gamma(1) as 0-dim tensors: a multivariate schedule's averaged over the dimensions."""
        gamma_0, gamma_1 = self.logsnr.endpoints()
        return (gamma_0.mean(), gamma_1.mean()) if gamma_0.ndim else (gamma_0, gamma_1)

    def _metrics(self, terms: ContinuousTerms | None) -> dict[str, Tensor]:
        gamma_0, gamma_1 = self._endpoints()
        metrics = {"train/gamma_min": gamma_0.detach(), "train/gamma_max": gamma_1.detach()}
        if terms is not None:
            metrics |= term_metrics(
                {
                    "elbo": terms.total,
                    "reconstruction": terms.reconstruction,
                    "prior": terms.prior,
                    "denoising": terms.diffusion,
                },
                self.num_dims,
            )
            # the spread of the one-sample estimator itself: what the variance-minimizing schedule shrinks
            metrics["train/elbo_bpd_std"] = terms.total.std() * bits_per_dim_scale(self.num_dims)
        return metrics

    def _nonfinite_message(self, loss: Tensor, terms: ContinuousTerms | None, t: Tensor, step: int) -> str:
        parts = []
        if terms is not None:
            for name, values in (
                ("reconstruction", terms.reconstruction),
                ("prior matching", terms.prior),
                ("diffusion", terms.diffusion),
            ):
                if not torch.isfinite(values).all():
                    parts.append(name)
        gamma_0, gamma_1 = self._endpoints()
        return nonfinite_advice(
            loss,
            step,
            f"{', '.join(parts) or 'the loss'} went non-finite (gamma(0)={float(gamma_0):.4g}, "
            f"gamma(1)={float(gamma_1):.4g}, t in [{float(t.min()):.3g}, {float(t.max()):.3g}])",
        )

    # ---------------------------------------------------------------------------------------- validation
    def validation_result(self, ctx: StepContext, x0: Tensor, *, strata: int, draws: dict,
                          variance: ReverseVariance, decoder_variance: DecoderVariance) -> ELBOResult:  # fmt: skip
        """The stratified estimate of the continuous-time (or T-step) bound."""
        return stratified_continuous_elbo(
            self.gamma_denoiser(ctx.conditioned(), amp_dtype=self._amp_dtype(ctx.device)),
            self.logsnr,
            x0.float(),
            parametrization=self.parametrization,
            num_bins=self.num_bins,
            strata=strata,
            timesteps=self.timesteps,
            chain_timesteps=self.chain_span,
            **draws,
        )

    def example_draws(self, indices: Tensor, *, strata: int, shape: tuple[int, ...], device: torch.device) -> dict:
        u, eps = continuous_example_draws(indices, VAL_EXAMPLE_SEED, strata, shape)
        return {"u": u.to(device), "eps": eps.to(device)}

    def profile_size(self, strata: int) -> int:
        return strata + 1

    def profile_weights(self, strata: int) -> Tensor:
        """The decoder (1) and the K equal strata of [0, 1) in steps of the chain discretized at eval_timesteps."""
        widths = torch.full((strata,), self.chain_span / strata, dtype=torch.float64)
        return torch.cat([torch.ones(1, dtype=torch.float64), widths])

    def metrics(self) -> dict[str, Tensor]:
        gamma_0, gamma_1 = self._endpoints()
        return {"gamma_min": gamma_0, "gamma_max": gamma_1}

    def parameter_groups(self) -> list[dict]:
        schedule_params = [p for p in self.logsnr.parameters() if p.requires_grad]
        if not schedule_params:
            return []
        group = {"params": schedule_params, "weight_decay": 0.0}  # decay would pull the log-SNR endpoints towards 0
        if self.schedule_lr is not None:
            group["lr"] = float(self.schedule_lr)
        return [group]

    def bound_inputs(self, network: Network, device: torch.device) -> dict:
        """The denoiser in the log-SNR interface (the network under the autocast active now on ``device``, read in
        float32), the schedule, the parametrization, the data's levels, T (None: continuous time) and the chain's T."""
        return {
            "denoiser": self.gamma_denoiser(network, amp_dtype=self._amp_dtype(device)),
            "logsnr": self.logsnr,
            "parametrization": self.parametrization,
            "num_bins": self.num_bins,
            "timesteps": self.timesteps,
            "chain_timesteps": self.chain_span,
        }


def mean_level(gamma: Tensor) -> Tensor:
    """gamma (B,) as it is; a multivariate schedule's (B, *D) averaged over the dimensions, (B,): the one noise level
    the network is conditioned on."""
    return gamma.flatten(1).mean(dim=1) if gamma.ndim > 1 else gamma


def make_time_axis(schedule: NoiseSchedule | LogSNRSchedule, *, objective: Objective | None,
                   parametrization: Parametrization, num_bins: int | None, num_dims: int,
                   timesteps: int | None = None, eval_timesteps: int = 1000, variance_gradient: bool = True,
                   schedule_lr: float | None = None) -> TimeAxis:  # fmt: skip
    """The time axis of ``schedule``: :class:`ContinuousTime` for a log-SNR schedule, :class:`ChainTime` for a chain
    (which has no continuous-time options: ``timesteps`` is its own T)."""
    common = {"objective": objective, "parametrization": parametrization, "num_bins": num_bins, "num_dims": num_dims}
    if isinstance(schedule, LogSNRSchedule):
        return ContinuousTime(
            schedule,
            timesteps=timesteps,
            eval_timesteps=eval_timesteps,
            variance_gradient=variance_gradient,
            schedule_lr=schedule_lr,
            **common,
        )
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(
            f"schedule must be a NoiseSchedule (a T-step chain) or a LogSNRSchedule (continuous time); got "
            f"{type(schedule).__name__}"
        )
    if timesteps is not None:
        raise ValueError(
            f"timesteps={timesteps} is a continuous-time schedule's option (its T-step bound); a chain's T is its "
            f"schedule's own ({schedule.T})"
        )
    return ChainTime(schedule, **common)
