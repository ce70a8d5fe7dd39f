"""The LightningModule of a continuous-time model with a log-SNR schedule (VDM, Kingma et al. 2021).

It trains the continuous-time bound (or its T-step form) of :mod:`diffusion_elbo.core.vdm`, with a fixed or learned
schedule, and is otherwise a :class:`DiffusionModule`: ``self.schedule`` is the schedule discretized at
``eval_timesteps`` steps (a chain of eval_timesteps + 1 steps, refreshed whenever the learned schedule may have
moved), and ``denoise(x_t, t)`` reads chain steps, so the exact T-step evaluator, the samplers (ancestral, DDIM),
the probability-flow ODE, FID and the callbacks work on it unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from diffusion_elbo.core import DecoderVariance, Parametrization, ReverseVariance
from diffusion_elbo.core.distributions import bits_per_dim_scale, sum_flat
from diffusion_elbo.core.elbo import ELBOResult
from diffusion_elbo.core.logsnr import CosineLogSNR, LogSNRSchedule, alpha_sigma
from diffusion_elbo.core.losses import ELBOLoss, Objective, TrainingSetup
from diffusion_elbo.core.timesteps import TimestepSampling, low_discrepancy_uniform
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
from diffusion_elbo.data.base import IndexedBatch
from diffusion_elbo.lightning.metrics import ProfileMetric
from diffusion_elbo.lightning.module import VAL_EXAMPLE_SEED, DiffusionModule, StepLoss

# the network's noise-level input: gamma mapped from the schedule's reference range onto [0, 1000], the range of
# the discrete models' timestep input, so the same sinusoidal embedding and UNet serve both
CONDITIONING_SCALE = 1000.0


# The decoder variance of a continuous-time model's discretized chain (its exact T-step bound, sampling, the ODE):
# sigma_0^2 = beta_1 of the chain, the variance of z_0 given x in continuous time
CHAIN_DECODER_VARIANCE = DecoderVariance.BETA


class ContinuousDiffusionModule(DiffusionModule):
    """A diffusion model in continuous time t in [0, 1] with a log-SNR schedule (Kingma et al. 2021).

    Args:
        net: denoiser ``net(z_t, c)`` with c = 1000 (gamma - gamma_lo) / (gamma_hi - gamma_lo) from the schedule's
            fixed reference range: the network sees the noise level, not t, so a reshaped schedule leaves the
            function it computes unchanged (the invariance that makes the bound depend on the endpoints only).
        logsnr: the schedule gamma(t) (fixed, or learned jointly with the network).
        objective: the training loss: :class:`~diffusion_elbo.core.losses.ELBOLoss` (the bound, VDM; ``loss=vdm``, the
            default) or :class:`~diffusion_elbo.core.losses.EpsMSE` (||eps - eps_hat||^2 at uniform t; fixed schedules
            only). Its ``timestep_sampling``: ``low_discrepancy`` (VDM) or ``uniform`` t in a batch. Its
            ``sigmoid_weight``, ``sigmoid_bias``, ``aux_weight`` and ``aux_fraction``:
        timesteps: None for the continuous-time bound, T for the T-step one (VDM eq. 13).
        eval_timesteps: the T of the chain used for validation's profile, sampling, the exact evaluator and the ODE.
        variance_gradient: the learned shape follows the gradient of the estimator's variance (continuous time),
            the endpoints that of the bound; False trains everything on the bound.
        schedule_lr: learning rate of the learned schedule's parameters (None: the optimizer's).
        sigmoid_weight, sigmoid_bias (of the objective): train on the diffusion term weighted by
            w(gamma) = 1 + sigmoid_weight * sigmoid(gamma + sigmoid_bias) (Kingma & Gao 2023;
            :func:`~diffusion_elbo.core.vdm.sigmoid_weighting`) for sample quality; 0 trains on the bound itself.
            The network trains on the weighted loss; a learned schedule's endpoints keep the bound's gradient and its
            shape the weighted loss's variance gradient. Validation and eval report the bound either way.
        aux_weight, aux_fraction (of the objective): a hybrid for sample quality (the bound plus a sample-quality
            loss, as Nichol & Dhariwal's L_hybrid pairs L_simple with L_vlb): the last ``aux_fraction`` of each batch
            trains on the v-prediction MSE at uniform t on a fixed cosine log-SNR over the schedule's reference range
            (Salimans & Ho 2022), weighted by ``aux_weight``; the rest trains on the bound, which alone reaches the
            learned schedule. The bound spends its draws of t where the bits are (low noise); the auxiliary share
            draws half its t at log SNR < 0, where the coarse structure of a sample is decided. 0: the bound alone.
        The other arguments are those of :class:`DiffusionModule`.
    """

    def __init__(
        self,
        net: nn.Module,
        logsnr: LogSNRSchedule,
        *,
        data_shape: Sequence[int],
        num_bins: int | None,
        parametrization: str = Parametrization.EPS.value,
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
        config: dict | None = None,
    ) -> None:
        objective = ELBOLoss(TimestepSampling.LOW_DISCREPANCY) if objective is None else objective
        bound = isinstance(objective, ELBOLoss)  # else an MSE weighting of the SNR (Objective.problems)
        if timesteps is not None and (not isinstance(timesteps, int) or timesteps < 1):
            raise ValueError(f"schedule.timesteps must be null (continuous time) or an integer T >= 1; got {timesteps}")
        super().__init__(
            net=net,
            schedule=logsnr.discretize(eval_timesteps),
            data_shape=data_shape,
            num_bins=num_bins,
            parametrization=parametrization,
            variance=ReverseVariance.SMALL.value,  # the bound's reverse kernels: q(z_s | z_t, x = x_hat)
            decoder_variance=CHAIN_DECODER_VARIANCE.value,
            objective=objective,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            val_strata=val_strata,
            clip_denoised=clip_denoised,
            seed=seed,
            nonfinite=nonfinite,
            nonfinite_max_skips=nonfinite_max_skips,
            compile=compile,
            channels_last=channels_last,
            config=config,
        )
        self.logsnr = logsnr
        self.timesteps = timesteps
        self.eval_timesteps = eval_timesteps
        self.schedule_lr = schedule_lr
        # the bound's weighting and its v-MSE share (ELBOLoss's arguments; none for loss=simple)
        self.sigmoid_weight = objective.sigmoid_weight if bound else 0.0
        self.sigmoid_bias = objective.sigmoid_bias if bound else 0.0
        self.aux_weight = objective.aux_weight if bound else 0.0
        self.aux_fraction = objective.aux_fraction if bound else 0.5
        # the auxiliary loss's noise levels: fixed, on the range the network's conditioning is scaled to
        self.aux_logsnr = CosineLogSNR(*logsnr.reference) if self.aux_weight else None
        self.low_discrepancy = objective.timestep_sampling is TimestepSampling.LOW_DISCREPANCY
        self.variance_gradient = bool(variance_gradient) and timesteps is None and bound
        self.val_profile = ProfileMetric(val_strata + 1, self.num_dims)
        self._val_generator: torch.Generator | None = None
        self._amp_dtype: torch.dtype | None = None
        # the chain follows the learned schedule's parameters wherever they are loaded from
        self.register_load_state_dict_post_hook(lambda module, keys: module.refresh_schedule())

    def training_setup(self) -> TrainingSetup:
        return TrainingSetup(
            schedule=self.logsnr.name, continuous=True, learned_schedule=self.logsnr.learned, variance=self.variance
        )

    # ----------------------------------------------------------------------------------------- model
    def refresh_schedule(self) -> None:
        """Rebuild the discretized chain from the schedule's current (e.g. EMA or loaded) parameters."""
        if self.logsnr.learned:
            self.schedule = self.logsnr.discretize(self.eval_timesteps).to(self.device)

    def bound_inputs(self) -> dict:
        """What :func:`~diffusion_elbo.evaluation.evaluate_continuous` takes to evaluate this model's own bound: the
        denoiser in the log-SNR interface (the network under the autocast active now, its output read in float32), the
        schedule, the parametrization, the data's levels and T (None: continuous time). Leaves the module in eval mode
        with its chain rebuilt from the schedule's current parameters."""
        self.eval()
        self.refresh_schedule()
        self._note_precision()
        return {
            "denoiser": self._network_float32,
            "logsnr": self.logsnr,
            "parametrization": self.parametrization,
            "num_bins": self.num_bins,
            "timesteps": self.timesteps,
            "chain_timesteps": self.eval_timesteps,
        }

    def conditioning(self, gamma: Tensor) -> Tensor:
        """The network's noise-level input, (B,): 1000 (gamma - gamma_lo) / (gamma_hi - gamma_lo)."""
        lo, hi = self.logsnr.reference
        return (gamma - lo) * (CONDITIONING_SCALE / (hi - lo))

    def denoise_at(self, z_t: Tensor, gamma: Tensor) -> Tensor:
        """The network at noise level gamma = -log SNR, (B,)."""
        return DiffusionModule.denoise(self, z_t, self.conditioning(gamma))

    def denoise(self, x_t: Tensor, t: Tensor) -> Tensor:
        """The network as a denoiser of the discretized chain: t are chain steps (1 is the decoder, z_0)."""
        return chain_denoiser(self.denoise_at, self.schedule, self.parametrization)(x_t, t)

    # -------------------------------------------------------------------------------------- training
    def _draw_u(self, batch: int) -> Tensor:
        if self.low_discrepancy:
            return low_discrepancy_uniform(batch, self.device, self.generator)
        return torch.rand(batch, generator=self.generator, device=self.device, dtype=torch.float64)

    def step_loss(self, x0: Tensor) -> StepLoss:
        """The continuous-time (or T-step) bound, a weighting of it or an MSE weighting of the SNR, at times drawn from
        u ~ U[0, 1) (low-discrepancy by default), with the auxiliary v-MSE share when the objective has one."""
        self._note_precision()
        x0, x_aux = self._split_aux(x0)
        u = self._draw_u(x0.shape[0])
        eps = torch.randn(x0.shape, generator=self.generator, device=x0.device, dtype=x0.dtype)
        with torch.autocast(device_type=self.device.type, enabled=False):  # the schedule and terms in float32
            t, s = step_times(u.float(), self.timesteps)
            log_snr = self.logsnr(t)
            log_snr_s = None if s is None else self.logsnr(s)  # the T-step term's gamma(s)
        if not isinstance(self.objective, ELBOLoss):  # an MSE weighting (loss=simple, v_mse, ...)
            loss, terms = self._mse_loss(x0, eps, log_snr), None
        else:
            terms = self._continuous_terms(x0, u, eps, log_snr, log_snr_s)
            weights = self._training_weights(log_snr)
            per_example = terms.weighted_total(weights) / self.num_dims
            loss = per_example.mean()
            if weights is not None:  # the network trains on the weighted loss, the schedule on the bound
                for at in (log_snr, log_snr_s):
                    if at is not None:
                        route_bound_gradient(at, weights)
            if self.variance_gradient and bool(torch.isfinite(loss)):
                route_variance_gradient(log_snr, per_example, weights)
        if x_aux is not None:
            aux = self._aux_loss(x_aux)
            self.log("train/aux_v_mse", aux.detach(), on_step=True, on_epoch=False)
            loss = loss + self.aux_weight * aux
        return StepLoss(
            loss=loss,
            nonfinite_message=lambda: self._continuous_nonfinite_message(loss, terms, t),
            metrics=lambda: self._continuous_metrics(terms),
        )

    def _split_aux(self, x0: Tensor) -> tuple[Tensor, Tensor | None]:
        """The batch's share for the bound and (the last round(aux_fraction B), at least 1) for the auxiliary loss."""
        if not self.aux_weight or x0.shape[0] < 2:
            return x0, None
        n_aux = min(max(round(self.aux_fraction * x0.shape[0]), 1), x0.shape[0] - 1)
        return x0[:-n_aux], x0[-n_aux:]

    def _aux_loss(self, x0: Tensor) -> Tensor:
        """||v - v_hat||^2 / D at t uniform (low-discrepancy) on the fixed cosine log-SNR (Salimans & Ho 2022)."""
        u = self._draw_u(x0.shape[0])
        eps = torch.randn(x0.shape, generator=self.generator, device=x0.device, dtype=x0.dtype)
        with torch.autocast(device_type=self.device.type, enabled=False):
            gamma = self.aux_logsnr(u.float()).gamma
            return (self._noise_mse(x0.float(), eps.float(), gamma) * v_weight(gamma)).mean()

    def _training_weights(self, log_snr) -> Tensor | None:
        """w(gamma(t)) (B,) of the weighted diffusion term (None: the bound), held fixed (detached)."""
        if not self.sigmoid_weight:
            return None
        return sigmoid_weighting(log_snr.gamma.detach(), self.sigmoid_weight, self.sigmoid_bias)

    def _continuous_terms(self, x0: Tensor, u: Tensor, eps: Tensor, log_snr, log_snr_s=None) -> ContinuousTerms:
        with torch.autocast(device_type=self.device.type, enabled=False):
            return continuous_terms(
                self._network_float32,
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

    def _network_float32(self, z_t: Tensor, gamma: Tensor) -> Tensor:
        # the network itself runs under the trainer's precision (autocast, when the step had it, re-enabled inside the
        # terms' float32 region), its output read in float32
        with torch.autocast(device_type=self.device.type, dtype=self._amp_dtype, enabled=self._amp_dtype is not None):
            return self.denoise_at(z_t, gamma).float()

    def _note_precision(self) -> None:
        """Remember whether this step runs under autocast (mixed precision), before the terms turn it off."""
        kind = self.device.type
        self._amp_dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None

    def _mse_loss(self, x0: Tensor, eps: Tensor, log_snr) -> Tensor:
        """The objective's w(SNR) ||x0 - x0_hat||^2 / D = w(SNR) / SNR ||eps - eps_hat||^2 / D at the drawn t (for
        L_simple, w = SNR: Ho et al.'s ||eps - eps_hat||^2 / D in continuous time)."""
        gamma = log_snr.gamma.detach()
        snr = torch.exp(-gamma.double())
        scale = (self.objective.snr_weight(snr) / snr).to(gamma.dtype)  # exactly 1 for L_simple
        return (scale * self._noise_mse(x0, eps, gamma)).mean()

    def _noise_mse(self, x0: Tensor, eps: Tensor, gamma: Tensor) -> Tensor:
        """||eps - eps_hat(z_t)||^2 / D per example, (B,), at z_t = alpha x0 + sigma eps with gamma (B,) held fixed."""
        alpha, sigma = (v.view(-1, *([1] * (x0.ndim - 1))) for v in alpha_sigma(gamma))
        z_t = alpha * x0 + sigma * eps
        eps_hat = eps_from_output(self.parametrization, z_t, gamma, self._network_float32(z_t, gamma))
        return sum_flat((eps - eps_hat) ** 2) / self.num_dims

    def _continuous_metrics(self, terms: ContinuousTerms | None) -> dict[str, Tensor]:
        gamma_0, gamma_1 = self.logsnr.endpoints()
        metrics = {"train/gamma_min": gamma_0.detach(), "train/gamma_max": gamma_1.detach()}
        if terms is not None:
            to_bpd = bits_per_dim_scale(self.num_dims)
            root_n = math.sqrt(terms.total.numel())
            for name, values in (
                ("elbo", terms.total),
                ("reconstruction", terms.reconstruction),
                ("prior", terms.prior),
                ("denoising", terms.diffusion),
            ):
                metrics[f"train/{name}_bpd"] = values.mean() * to_bpd
                metrics[f"train/{name}_bpd_se"] = values.std() / root_n * to_bpd
            # the spread of the one-sample estimator itself: what the variance-minimizing schedule shrinks
            metrics["train/elbo_bpd_std"] = terms.total.std() * to_bpd
        return metrics

    def _continuous_nonfinite_message(self, loss: Tensor, terms: ContinuousTerms | None, t: Tensor) -> str:
        parts = []
        if terms is not None:
            for name, values in (
                ("reconstruction", terms.reconstruction),
                ("prior matching", terms.prior),
                ("diffusion", terms.diffusion),
            ):
                if not torch.isfinite(values).all():
                    parts.append(name)
        gamma_0, gamma_1 = self.logsnr.endpoints()
        return (
            f"non-finite loss ({loss.item()}) at global step {self.global_step}: "
            f"{', '.join(parts) or 'the loss'} went non-finite (gamma(0)={float(gamma_0):.4g}, "
            f"gamma(1)={float(gamma_1):.4g}, t in [{float(t.min()):.3g}, {float(t.max()):.3g}]). Try a lower "
            "optimizer.lr, trainer.gradient_clip_val=1.0, or trainer.precision=32-true; checkpoints already "
            "written are kept."
        )

    # ------------------------------------------------------------------------------------ validation
    def validation_result(self, batch: tuple[Tensor, ...]) -> ELBOResult:
        """The stratified estimate of the continuous-time (or T-step) bound, each example's times and noise from its own
        seed."""
        self._note_precision()  # float32: the base class's validation_step turned autocast off
        draws: dict = {"generator": self._val_generator}
        if isinstance(batch, IndexedBatch):  # each example's times and noise from its own seed: the same on 1 or N
            u, eps = continuous_example_draws(
                batch.index.cpu(), VAL_EXAMPLE_SEED, self.val_strata, tuple(batch.x0.shape[1:])
            )
            draws = {"u": u.to(self.device), "eps": eps.to(self.device)}
        return stratified_continuous_elbo(
            self._network_float32,
            self.logsnr,
            batch[0].float(),
            parametrization=self.parametrization,
            num_bins=self.num_bins,
            strata=self.val_strata,
            timesteps=self.timesteps,
            chain_timesteps=self.eval_timesteps,
            **draws,
        )

    def profile_weights(self) -> Tensor:
        """The decoder (1) and the K equal strata of [0, 1) in steps of the chain discretized at eval_timesteps."""
        widths = torch.full((self.val_strata,), self.eval_timesteps / self.val_strata, dtype=torch.float64)
        return torch.cat([torch.ones(1, dtype=torch.float64), widths])

    def schedule_metrics(self) -> dict[str, Tensor]:
        gamma_0, gamma_1 = self.logsnr.endpoints()
        return {"gamma_min": gamma_0, "gamma_max": gamma_1}

    # ------------------------------------------------------------------------------------ optimizers
    def schedule_parameter_groups(self) -> list[dict]:
        schedule_params = [p for p in self.logsnr.parameters() if p.requires_grad]
        if not schedule_params:
            return []
        group = {"params": schedule_params, "weight_decay": 0.0}  # decay would pull the log-SNR endpoints towards 0
        if self.schedule_lr is not None:
            group["lr"] = float(self.schedule_lr)
        return [group]
