"""The reverse step p_theta(x_{t-1} | x_t) = N(mu_theta(x_t, t), sigma_t^2) and its variance choices.

mu_theta is the posterior mean of q(x_{t-1} | x_t, x_0) with x_0 replaced by the model's x0_hat
(Ho et al. 2020 eq. 11, written for any parametrization). sigma_t^2 is fixed (``small``, ``large``), a table
(``analytic``), or predicted per dimension by the network (``learned_range``, Nichol & Dhariwal 2021 eq. 15).
Shapes: x_t (B, *D); t (B,) in 1..T; out (B, *D), or (B, 2 C, ...) with ``learned_range`` (channels on dim 1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from diffusion_elbo.core.chain import NoiseSchedule
from diffusion_elbo.core.forward import q_posterior_mean_variance
from diffusion_elbo.core.parametrization import Parametrization, predict_x0


class ReverseVariance(str, Enum):
    """The reverse variance. ``small`` and ``large`` are the fixed choices of Ho et al. 2020 (Sec. 3.2); the
    KL-optimal ``analytic`` one of Bao et al. 2022 (:mod:`core.analytic`) is estimated for a trained mean and
    passed as a table sigma_t^2 for t = 0..T; ``learned_range`` is read from extra network outputs."""

    SMALL = "small"  # sigma_t^2 = sigma_q^2(t), the posterior variance: optimal for deterministic x0
    LARGE = "large"  # sigma_t^2 = beta_t: optimal for x0 ~ N(0, I)
    ANALYTIC = "analytic"  # KL-optimal for the trained mean (Bao et al. 2022): estimated, then passed as a table
    LEARNED_RANGE = "learned_range"  # log sigma^2 = v log beta_t + (1 - v) log sigma_q^2(t), v from the network


class DecoderVariance(str, Enum):
    """sigma_1^2 of the decoder p(x_0 | x_1) under the fixed variances (``small`` and ``large``), where the posterior
    variance sigma_q^2(1) is 0. Any choice gives a valid bound; on 256-level data they differ by 0.1-0.4 bits/dim."""

    # sigma_q^2(2): Ho et al.'s released code and improved-diffusion ("posterior_log_variance_clipped")
    CLIPPED = "clipped"
    BETA = "beta"  # beta_1: the lecture's choice (sigma_1^2 = 1 - alpha_1)


VarianceSpec = ReverseVariance | str | Tensor  # a named fixed variance, or a table sigma_t^2 for t = 0..T


def decoder_variance_value(schedule: NoiseSchedule, decoder_variance: DecoderVariance | str) -> Tensor:
    """sigma_1^2 of the fixed variances under ``decoder_variance``, a float64 scalar: sigma_q^2(2) (``clipped``, the
    published convention; beta_1 when T = 1) or beta_1 (``beta``)."""
    kind = DecoderVariance(decoder_variance)
    if kind is DecoderVariance.CLIPPED and schedule.T >= 2:
        return schedule.posterior_variance[2]
    return schedule.betas[1]


def reverse_variance_table(
    schedule: NoiseSchedule, variance: VarianceSpec, decoder_variance: DecoderVariance | str = DecoderVariance.CLIPPED
) -> Tensor:
    """sigma_t^2 for t = 0..T, shape (T + 1,) float64 ((T + 1, *D) multivariate; entry 0 unused).

    At t = 1 (the decoder p(x_0 | x_1)), where sigma_q^2(1) is 0, both fixed choices use ``decoder_variance``:
    sigma_q^2(2) by default, as Ho et al.'s and Nichol & Dhariwal's code do, or beta_1. A tensor is taken as the table
    itself (e.g. an analytic variance estimated for a trained model, whose t = 1 entry is its own).
    """
    if isinstance(variance, Tensor):
        if schedule.multivariate:
            raise ValueError(
                f"a variance table (variance=analytic) holds one variance per step; schedule '{schedule.name}' has one "
                "noise level per dimension: use variance=small"
            )
        if variance.shape != (schedule.T + 1,) or not (variance[1:] > 0).all():
            raise ValueError(f"a variance table must have T + 1 = {schedule.T + 1} entries, positive for t >= 1")
        return variance.to(schedule.betas.device, torch.float64)
    kind = ReverseVariance(variance)
    if kind is ReverseVariance.LEARNED_RANGE:
        raise ValueError(
            "variance=learned_range is predicted by the network for each x_t, not a table: pass the network output "
            "(mean and variance channels) to p_mean_variance"
        )
    if kind is ReverseVariance.ANALYTIC:
        raise ValueError(
            "variance=analytic is estimated for a trained mean predictor: build its table with "
            "core.analytic.analytic_variance_table (src/eval.py does this) and pass the table as the variance"
        )
    table = schedule.posterior_variance.clone() if kind is ReverseVariance.SMALL else schedule.betas.clone()
    table[1] = decoder_variance_value(schedule, decoder_variance)
    table[0] = table[1]  # never used; kept positive so log() stays finite
    return table


def learns_variance(variance: VarianceSpec) -> bool:
    """True when the network itself outputs the variance (extra output channels)."""
    return isinstance(variance, str) and variance == ReverseVariance.LEARNED_RANGE.value


def split_output(out: Tensor, variance: VarianceSpec) -> tuple[Tensor, Tensor | None]:
    """(mean part, variance part) of a network output. With ``learned_range`` the network outputs 2 C channels
    along dim 1 (2 D features for vector data): the first half is read through the parametrization, the second
    half are the logits of v. Otherwise the output is all mean and the variance part is None."""
    if not learns_variance(variance):
        return out, None
    if out.shape[1] % 2:
        raise ValueError(
            f"variance=learned_range needs a network with twice the data's channels (mean and variance); its output "
            f"has {out.shape[1]} on dim 1. Build the model with the variance chosen (builders.build_model does this)."
        )
    mean_out, v_logits = out.chunk(2, dim=1)
    return mean_out, v_logits


def stop_mean_gradient(out: Tensor, variance: VarianceSpec) -> Tensor:
    """The output with its mean part detached: the ELBO terms of it train only the variance channels
    (the L_vlb half of Nichol & Dhariwal's L_hybrid, sec. 3.1)."""
    mean_out, v_logits = split_output(out, variance)
    return out if v_logits is None else torch.cat([mean_out.detach(), v_logits], dim=1)


def mean_denoiser(
    model: Callable[[Tensor, Tensor], Tensor], variance: VarianceSpec
) -> Callable[[Tensor, Tensor], Tensor]:
    """``model`` restricted to its mean output, for a ``learned_range`` network used with another variance (e.g.
    DDIM, or eval with variance=analytic); any other model is returned as is."""
    if not learns_variance(variance):
        return model

    def mean_only(x_t: Tensor, t: Tensor) -> Tensor:
        return split_output(model(x_t, t), variance)[0]

    return mean_only


def denoiser_for(
    model: Callable[[Tensor, Tensor], Tensor], trained: VarianceSpec, requested: VarianceSpec
) -> Callable[[Tensor, Tensor], Tensor]:
    """The network to use under the ``requested`` variance for a model trained with ``trained``: the model itself,
    or its mean half when it learned a variance that is not asked for. ``learned_range`` for a model without
    variance outputs is refused (ValueError naming its variance and the choices it has)."""
    if learns_variance(requested) and not learns_variance(trained):
        name = trained.value if isinstance(trained, ReverseVariance) else trained
        raise ValueError(
            f"variance=learned_range needs a model trained with it (its network outputs the variance); this one was "
            f"trained with variance={name}: choose small, large or analytic"
        )
    return model if learns_variance(requested) else mean_denoiser(model, trained)


def learned_range_logvar(schedule: NoiseSchedule, t: Tensor, v_logits: Tensor) -> Tensor:
    """log sigma_t^2 = v log beta_t + (1 - v) log sigma_q^2(t) per dimension (Nichol & Dhariwal 2021 eq. 15), with
    v = sigmoid(v_logits) in (0, 1), so sigma_t^2 lies between the ``small`` and ``large`` variances. At t = 1,
    where sigma_q^2 = 0, the lower end is sigma_q^2(2) (their clipped posterior log-variance).
    v_logits (B, *D), t (B,) -> (B, *D) in v_logits' dtype."""
    small = schedule.posterior_variance.clone()
    small[1] = decoder_variance_value(schedule, DecoderVariance.CLIPPED)
    lo = schedule.broadcast(torch.log(small[t]), v_logits)  # (B, 1, ..., 1), or (B, *D) multivariate
    hi = schedule.broadcast(torch.log(schedule.betas[t]), v_logits)
    v = torch.sigmoid(v_logits)
    return v * hi + (1.0 - v) * lo


@dataclass
class ReverseStep:
    """Moments of p_theta(x_{t-1} | x_t): ``mean`` (B, *D), ``logvar`` (B, 1, ..., 1) or (B, *D) when learned,
    and ``x0_hat``."""

    mean: Tensor
    logvar: Tensor
    x0_hat: Tensor


def p_mean_variance(
    schedule: NoiseSchedule,
    out: Tensor,
    *,
    x_t: Tensor,
    t: Tensor,
    parametrization: Parametrization | str,
    variance: VarianceSpec,
    clip_denoised: bool = False,
    decoder_variance: DecoderVariance | str = DecoderVariance.CLIPPED,
) -> ReverseStep:
    """mu_theta and sigma_t^2 of p_theta(x_{t-1} | x_t) from the network output ``out``.

    ``clip_denoised`` clamps x0_hat to [-1, 1] (image data) before forming the mean; the ELBO is
    evaluated without clipping so it stays a bound on the model that was trained. ``decoder_variance``: sigma_1^2 of
    the fixed variances (:class:`DecoderVariance`).
    """
    mean_out, v_logits = split_output(out, variance)
    x0_hat = predict_x0(Parametrization(parametrization), schedule, x_t=x_t, t=t, out=mean_out)
    if clip_denoised:
        x0_hat = x0_hat.clamp(-1.0, 1.0)
    mean, _ = q_posterior_mean_variance(schedule, x0_hat, x_t, t)
    if v_logits is not None:
        logvar = learned_range_logvar(schedule, t, v_logits)
    else:
        var = reverse_variance_table(schedule, variance, decoder_variance).to(x_t.device)[t]  # (B,) or (B, *D)
        logvar = schedule.broadcast(torch.log(var), x_t)
    return ReverseStep(mean=mean, logvar=logvar, x0_hat=x0_hat)
