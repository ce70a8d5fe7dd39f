"""Training objectives: the objects of the ``loss`` config group (:class:`Objective`, the extension point for a loss of
one's own, ``docs/extending.md``).

The MSE losses are w(t) * ||x0_hat - x0||^2 (mean over dims) for a weight w of the signal-to-noise ratio
SNR(t) = alpha_bar_t / (1 - alpha_bar_t) (Kingma et al. 2021, sec. 5), computed in the network's own
parametrization p with ||x0_hat - x0||^2 = c_p(t) ||p_hat - p||^2 so no conversion amplifies error:

=========================  =====================================  ===========================================
objective (``loss=``)      w(t) on ||x0_hat - x0||^2 per dim      source
=========================  =====================================  ===========================================
:class:`ELBOLoss` (elbo,   the true ELBO terms (see core.elbo);   Ho et al. 2020 eq. 5, the lecture
vdm)                       for t >= 2 and ``small``:
                           (SNR(t-1) - SNR(t)) / 2
:class:`EpsMSE` (simple)   SNR(t)            (unweighted eps-MSE) Ho et al. 2020 eq. 14 (L_simple)
:class:`X0MSE`             1                 (unweighted x0-MSE)  the lecture's x0 regression, no weight
:class:`WeightedX0MSE`     (SNR(t-1) - SNR(t)) / 2 for t >= 2;    the lecture's weighted x0 form
(x0_mse_weighted)          1 / (2 beta_1) at t = 1 (decoder)
:class:`VMSE` (v_mse)      SNR(t) + 1        (unweighted v-MSE)   Salimans & Ho 2022
:class:`HybridLoss`        an MSE loss above + lambda L_vlb,      Nichol & Dhariwal 2021 sec. 3.1
(hybrid)                   L_vlb training only a learned variance
=========================  =====================================  ===========================================
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from diffusion_elbo.core.chain import NoiseSchedule
from diffusion_elbo.core.distributions import bits_per_dim_scale
from diffusion_elbo.core.parametrization import Parametrization, training_target, x0_error_scale
from diffusion_elbo.core.reverse import ReverseVariance, split_output, stop_mean_gradient
from diffusion_elbo.core.timesteps import TimestepSampling


@dataclass
class TrainingBatch:
    """One training batch at its drawn timesteps: what an objective reads.

    x0, eps, x_t: (B, *D) in data units, x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps; t: (B,) long in 1..T;
    ``inv_p``: (B,) 1 / p(t) of the timestep sampler (T for uniform t; an importance sampler's weights otherwise);
    ``out``: the network's output on (x_t, t), its mean's channels first, then v's under ``variance=learned_range``.
    :meth:`elbo_terms` gives L_t (B,) nats, the t-th term of the -ELBO (the decoder's NLL at t = 1, the denoising KL
    at t >= 2) of this output, and :meth:`prior` the prior term (B,) nats; both computed once, on first use."""

    schedule: NoiseSchedule
    parametrization: Parametrization
    variance: ReverseVariance
    num_dims: int
    x0: Tensor
    eps: Tensor
    x_t: Tensor
    t: Tensor
    inv_p: Tensor
    out: Tensor
    terms_of: Callable[[Tensor], Tensor]  # network output -> L_t (B,) nats
    prior_of: Callable[[], Tensor]  # () -> (B,) nats
    _terms: dict = field(default_factory=dict, repr=False)
    _prior: Tensor | None = field(default=None, repr=False)

    def mean_output(self) -> Tensor:
        """The output's mean channels (all of it unless the network learns a variance)."""
        return split_output(self.out, self.variance)[0]

    def target(self) -> Tensor:
        """The true value of the network's parametrization (eps, x0 or v), (B, *D)."""
        return training_target(self.parametrization, self.schedule, x0=self.x0, t=self.t, eps=self.eps)

    def elbo_terms(self, *, stop_mean_gradient: bool = False) -> Tensor:
        """L_t (B,) nats. ``stop_mean_gradient``: the same values with the mean's gradient stopped, so they train only a
        learned variance (the L_vlb of Nichol & Dhariwal's hybrid)."""
        if stop_mean_gradient not in self._terms:
            out = _stop_mean(self.out, self.variance) if stop_mean_gradient else self.out
            self._terms[stop_mean_gradient] = self.terms_of(out)
        return self._terms[stop_mean_gradient]

    def computed_terms(self) -> Tensor | None:
        """The L_t an objective has already computed (any gradient routing: the values are the same), else None."""
        return next(iter(self._terms.values()), None)

    def prior(self) -> Tensor:
        if self._prior is None:
            self._prior = self.prior_of()
        return self._prior


def _stop_mean(out: Tensor, variance: ReverseVariance) -> Tensor:
    return stop_mean_gradient(out, variance)


class Objective(ABC):
    """A training loss: the interface an objective of one's own implements (``docs/extending.md``).

    The constructor takes its config keys and checks them (a ``ValueError`` that starts with the argument,
    ``gamma=0 must be ...``); :meth:`loss` returns the per-example loss (B,) of a :class:`TrainingBatch`, whose mean is
    minimized. ``timestep_sampling`` draws t: uniform, importance (Nichol & Dhariwal's, from the history of L_t) or
    low_discrepancy (VDM). ``trains_variance``: the loss gives a learned variance (``variance=learned_range``) a
    gradient (through the ELBO terms). ``name`` labels the loss in records and sweep reports."""

    name = "objective"
    trains_variance = False
    # whether the loss is defined on a continuous-time (log-SNR) schedule, and whether it reaches a learned schedule's
    # parameters (only the bound does: the MSE weightings leave the schedule out)
    continuous_time = False
    trains_schedule = False

    def __init__(self, timestep_sampling: TimestepSampling | str = TimestepSampling.UNIFORM) -> None:
        try:
            self.timestep_sampling = TimestepSampling(timestep_sampling)
        except ValueError:
            choices = " | ".join(s.value for s in TimestepSampling)
            raise ValueError(f"timestep_sampling={timestep_sampling!r} is not an option; choose {choices}") from None

    @abstractmethod
    def loss(self, batch: TrainingBatch) -> Tensor:
        """(B,) per-example loss."""

    def problems(self, setup: TrainingSetup) -> list[str]:
        """Why this objective cannot train ``setup`` (empty: it can), each naming the key and the fix. The one place
        these rules are written: the config check (before any work) and the module (before fitting) both ask here.
        A subclass adds its own to ``super().problems(setup)``."""
        found = []
        if setup.continuous:
            if not self.continuous_time:
                found.append(
                    f"schedule={setup.schedule} trains with loss=vdm (the bound) or an MSE weighting of the SNR "
                    f"(loss=simple, v_mse, x0_mse); got loss={self.name}"
                )
            if self.timestep_sampling is TimestepSampling.IMPORTANCE:
                found.append(
                    f"schedule={setup.schedule} draws low-discrepancy t (VDM); importance sampling is for discrete "
                    "schedules: use loss=vdm (or loss.timestep_sampling=low_discrepancy)"
                )
            if setup.learned_schedule and not self.trains_schedule:
                found.append(
                    f"schedule={setup.schedule} is trained through the bound, which loss={self.name} leaves out: "
                    "use loss=vdm"
                )
        if setup.variance is ReverseVariance.LEARNED_RANGE and not self.trains_variance:
            found.append(
                f"variance=learned_range is trained through the ELBO terms, which loss={self.name} leaves out: "
                "use loss=hybrid (Nichol & Dhariwal 2021) or loss=elbo"
            )
        return found

    def check(self, setup: TrainingSetup) -> None:
        """Raise ``ValueError`` with every one of :meth:`problems`."""
        found = self.problems(setup)
        if found:
            raise ValueError("; ".join(found))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(timestep_sampling={self.timestep_sampling.value})"


@dataclass(frozen=True)
class TrainingSetup:
    """What an objective is asked to train: the schedule's config name (for messages), whether it is a continuous-time
    (log-SNR) schedule and whether it learns its parameters, and the module's reverse variance."""

    schedule: str
    continuous: bool
    learned_schedule: bool
    variance: ReverseVariance


def weighted_mse(
    x0_weight: Tensor, parametrization: Parametrization | str, *, schedule: NoiseSchedule, t: Tensor, out: Tensor,
    target: Tensor,
) -> Tensor:  # fmt: skip
    """Per-example loss (B,): w(t) c_p(t) mean_dims((out - target)^2), with ``x0_weight`` w(t) (B,) the weight on
    ||x0_hat - x0||^2, ``target`` the true value of the parametrization (eps, x0 or v) and c_p the factor that turns
    its squared error into x0's."""
    weight = (x0_weight * x0_error_scale(parametrization, schedule, t)).to(out.dtype)
    return weight * (out - target).pow(2).reshape(out.shape[0], -1).mean(dim=1)


class WeightedMSE(Objective):
    """w ||x0_hat - x0||^2 per dim with a weight w(SNR) of the signal-to-noise ratio, given by :meth:`snr_weight`: the
    base of every MSE loss, and of a weighting of one's own. On a T-step chain the loss is computed in the network's
    parametrization and weighted by 1 / (T p(t)) (1 for uniform t); in continuous time (a log-SNR schedule) it is
    w(SNR) / SNR ||eps - eps_hat||^2 per dim at the drawn t, the same quantity."""

    # False for a weighting defined by the chain's steps only (WeightedX0MSE); Objective.problems then refuses it in
    # continuous time
    continuous_time = True

    @abstractmethod
    def snr_weight(self, snr: Tensor) -> Tensor:
        """w (B,) float64, the weight on ||x0_hat - x0||^2 (mean over dims) at SNR = alpha^2 / sigma^2 (B,)."""

    def x0_weight(self, schedule: NoiseSchedule, t: Tensor) -> Tensor:
        """w(t) (B,) float64 at chain steps t (B,) in 1..T."""
        return self.snr_weight(schedule.gather("snr", t))

    def loss(self, batch: TrainingBatch) -> Tensor:
        mse = weighted_mse(
            self.x0_weight(batch.schedule, batch.t),
            batch.parametrization,
            schedule=batch.schedule,
            t=batch.t,
            out=batch.mean_output().float(),
            target=batch.target().float(),
        )
        return mse * batch.inv_p / batch.schedule.T  # 1 / (T p(t)) = 1 for uniform t


class EpsMSE(WeightedMSE):
    """Unweighted eps-MSE (Ho et al. 2020, L_simple): w = SNR."""

    name = "simple"

    def snr_weight(self, snr: Tensor) -> Tensor:
        return snr


class X0MSE(WeightedMSE):
    """The lecture's x0 regression without its weight: w = 1."""

    name = "x0_mse"

    def snr_weight(self, snr: Tensor) -> Tensor:
        return torch.ones_like(snr)


class WeightedX0MSE(WeightedMSE):
    """The lecture's weighted x0 regression, the ELBO's own weight on a T-step chain: w(t) = (SNR(t-1) - SNR(t)) / 2
    for t >= 2 and 1 / (2 beta_1) at t = 1 (a continuous decoder). In continuous time that weight is the bound itself
    (``loss=vdm``)."""

    name = "x0_mse_weighted"
    continuous_time = False

    def snr_weight(self, snr: Tensor) -> Tensor:
        raise ValueError(
            "loss=x0_mse_weighted is the T-step ELBO's weight; in continuous time train the bound, loss=vdm"
        )

    def x0_weight(self, schedule: NoiseSchedule, t: Tensor) -> Tensor:
        snr = schedule.gather("snr", t)
        snr_prev = schedule.gather("snr", (t - 1).clamp(min=1))
        decoder = 1.0 / (2.0 * schedule.gather("betas", torch.ones_like(t)))
        return torch.where(t == 1, decoder, 0.5 * (snr_prev - snr))


class VMSE(WeightedMSE):
    """Unweighted v-MSE (Salimans & Ho 2022): w = SNR + 1."""

    name = "v_mse"

    def snr_weight(self, snr: Tensor) -> Tensor:
        return snr + 1.0


class ELBOLoss(Objective):
    """The -ELBO itself per dim, (L_prior + L_t / p(t)) / D with L_t its t-th term (an unbiased estimate of the whole
    bound). ``loss=elbo`` draws t by importance (Nichol & Dhariwal's recommendation for L_vlb), ``loss=vdm`` by
    low-discrepancy (VDM).

    The other arguments are the continuous-time bound's (a log-SNR schedule; refused on a discrete one):
    ``sigmoid_weight`` and ``sigmoid_bias`` weight the diffusion term's integrand by 1 + c sigmoid(gamma + b) (Kingma &
    Gao 2023), ``aux_weight`` and ``aux_fraction`` train the last share of each batch on the v-MSE beside the bound
    (:class:`~diffusion_elbo.core.time_axis.ContinuousTime`)."""

    name = "elbo"
    trains_variance = True
    continuous_time = True
    trains_schedule = True

    def __init__(
        self,
        timestep_sampling: TimestepSampling | str = TimestepSampling.IMPORTANCE,
        sigmoid_weight: float = 0.0,
        *,
        sigmoid_bias: float = 0.0,
        aux_weight: float = 0.0,
        aux_fraction: float = 0.5,
    ) -> None:
        super().__init__(timestep_sampling)
        if not sigmoid_weight >= 0:
            raise ValueError(f"sigmoid_weight={sigmoid_weight} must be >= 0 (0 trains on the bound itself)")
        if not aux_weight >= 0:
            raise ValueError(f"aux_weight={aux_weight} must be >= 0 (0 trains on the bound alone)")
        if aux_weight and not 0 < aux_fraction < 1:
            raise ValueError(f"aux_fraction={aux_fraction} is the share of each batch for the v-MSE: use 0 < it < 1")
        self.sigmoid_weight, self.sigmoid_bias = float(sigmoid_weight), float(sigmoid_bias)
        self.aux_weight, self.aux_fraction = float(aux_weight), float(aux_fraction)

    def loss(self, batch: TrainingBatch) -> Tensor:
        return (batch.prior() + batch.elbo_terms() * batch.inv_p) / batch.num_dims

    def problems(self, setup: TrainingSetup) -> list[str]:
        found = super().problems(setup)
        if not setup.continuous:  # the weighting and the v-MSE share act on the continuous-time bound's integrand
            fix = "use schedule=learned | logsnr_linear | logsnr_cosine"
            if self.aux_weight:
                found.append(
                    f"loss.aux_weight adds a v-MSE share to the continuous-time bound; schedule={setup.schedule} is "
                    f"discrete: {fix} (or loss=hybrid for discrete schedules), or loss.aux_weight=0"
                )
            if self.sigmoid_weight:
                found.append(
                    f"loss.sigmoid_weight weights the continuous-time bound; schedule={setup.schedule} is discrete: "
                    f"{fix}, or loss.sigmoid_weight=0"
                )
        return found


def hybrid_vlb_weight(vlb_weight: float, num_dims: int) -> float:
    """The factor that turns the sampled ELBO term L_t / p(t) (nats summed over D dims) into lambda L_vlb of
    Nichol & Dhariwal (2021, eq. 16, sec. 3.1) with L_vlb in bits per dim: lambda / (D ln 2).

    Their code adds ``vb * T / 1000`` to the MSE, ``vb`` being L_t in bits/dim at one uniform t; that is
    lambda L_vlb = lambda T L_t at lambda = 0.001 (L_vlb = sum_t L_t, estimated by T L_t), which is why 0.001
    means the same at any T. For uniform t, L_t / p(t) = T L_t already carries the T, so no further T/1000 here."""
    return vlb_weight * bits_per_dim_scale(num_dims)


# the MSE losses by the names ``loss.mean_loss`` takes (and configs written before the loss group built objects)
MSE_LOSSES: dict[str, type[WeightedMSE]] = {cls.name: cls for cls in (EpsMSE, X0MSE, WeightedX0MSE, VMSE)}


class HybridLoss(Objective):
    """L_hybrid = the ``mean_loss`` MSE + ``vlb_weight`` L_vlb (Nichol & Dhariwal 2021, sec. 3.1): the ELBO terms with
    the mean's gradient stopped, so they train only a learned variance (``variance=learned_range``)."""

    name = "hybrid"
    trains_variance = True

    def __init__(
        self,
        mean_loss: str = "simple",
        vlb_weight: float = 0.001,
        timestep_sampling: TimestepSampling | str = TimestepSampling.UNIFORM,
    ) -> None:
        super().__init__(timestep_sampling)
        if mean_loss not in MSE_LOSSES:
            raise ValueError(f"mean_loss={mean_loss!r} is not an MSE loss; choose one of {' | '.join(MSE_LOSSES)}")
        if not vlb_weight >= 0:
            raise ValueError(f"vlb_weight={vlb_weight} must be >= 0 (Nichol & Dhariwal's lambda: 0.001)")
        self.mean_loss = MSE_LOSSES[mean_loss]()
        self.vlb_weight = float(vlb_weight)

    def loss(self, batch: TrainingBatch) -> Tensor:
        scale = hybrid_vlb_weight(self.vlb_weight, batch.num_dims)
        return self.mean_loss.loss(batch) + scale * batch.elbo_terms(stop_mean_gradient=True) * batch.inv_p

    def problems(self, setup: TrainingSetup) -> list[str]:
        found = super().problems(setup)
        if setup.variance is not ReverseVariance.LEARNED_RANGE and not setup.continuous:
            found.append(
                f"loss=hybrid trains a learned variance; with variance={setup.variance.value} its ELBO half has no "
                "gradient: set variance=learned_range (or use loss=simple)"
            )
        return found


# the built-in objectives by the ``loss.name`` of configs written before the loss group built objects (checkpoints)
OBJECTIVES_BY_NAME: dict[str, type[Objective]] = {**MSE_LOSSES, "elbo": ELBOLoss, "hybrid": HybridLoss}
