"""The diffusion ELBO in continuous time with a log-SNR schedule (Kingma et al. 2021, "Variational Diffusion
Models", VDM), keeping the lecture's three terms:

    -ELBO(x) = L_recon + L_prior + L_diffusion, all in nats summed over dims:
    - reconstruction  L_recon = E_{q(z_0 | x)}[-log p(x | z_0)]
    - prior matching  L_prior = KL(q(z_1 | x) || N(0, I))                       (closed form)
    - diffusion       L_inf   = 1/2 E_{t ~ U[0, 1]} [gamma'(t) ||eps - eps_hat(z_t; t)||^2]          (VDM eq. 17)
      or, for T steps, L_T    = T/2 E_{i ~ U{1..T}} [(exp(gamma(t) - gamma(s)) - 1) ||eps - eps_hat(z_t; t)||^2],
                                 t = i / T, s = (i - 1) / T                                            (VDM eq. 13)

L_T is the lecture's denoising-matching sum for the chain z_0, z_{1/T}, ..., z_1 with the ``small`` reverse variance:
(SNR(s) - SNR(t)) / 2 ||x - x_hat||^2 = (SNR(s) / SNR(t) - 1) / 2 ||eps - eps_hat||^2. L_inf is its limit T -> inf.

The decoder is p(x | z_0) = N(z_0 / alpha_0, sigma_0^2) (discretized to the K levels for K-level data; a density for
continuous data): the denoiser at t = 0 is the identity, so the reconstruction term costs no network evaluation (VDM
does the same), and sigma_0^2 = sigmoid(gamma_min) is the lecture's beta_1 of the discretized chain
(``decoder_variance=beta``), so the chain's exact evaluator computes the same term.

A model is ``model(z_t, gamma_t) -> out`` with z_t (B, *D), gamma_t (B,) = -log SNR; ``out`` is eps, x0 or v.

A multivariate schedule (:class:`~diffusion_elbo.core.logsnr.MultivariateLearnedLogSNR`) gives each dimension its
own gamma: gamma_t and gamma'(t) are (B, *D), the endpoints (1, *D), and every formula here holds per dimension, the
diffusion term summing gamma_i'(t) (eps_i - eps_hat_i)^2 over the dimensions i (Sahoo et al. 2024, "Diffusion Models
With Learned Adaptive Noise", eq. 7). The model then gets gamma (B, *D) and reduces it to its own conditioning.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion_elbo.core.chain import NoiseSchedule
from diffusion_elbo.core.distributions import standard_normal_kl_nats, sum_flat
from diffusion_elbo.core.elbo import ELBOResult, decoder_nll_nats
from diffusion_elbo.core.gaussian_data import posterior_mean
from diffusion_elbo.core.logsnr import LogSNR, LogSNRSchedule, alpha_sigma
from diffusion_elbo.core.parametrization import Parametrization, output_from_x0

GammaDenoiser = Callable[[Tensor, Tensor], Tensor]


# (B,) -> (B, 1, ..., 1) in like's dtype; (B, *D) or (1, *D) (a multivariate schedule's) kept as they are
_bcast = NoiseSchedule.broadcast


def eps_from_output(parametrization: Parametrization | str, z: Tensor, gamma: Tensor, out: Tensor) -> Tensor:
    """eps_hat from the network output at z = alpha x + sigma eps: eps itself; (z - alpha x0_hat) / sigma for x0;
    sigma z + alpha v for v = alpha eps - sigma x (Salimans & Ho 2022, App. D). z, out (B, *D), gamma (B,)."""
    p = Parametrization(parametrization)
    if p is Parametrization.EPS:
        return out
    alpha, sigma = (_bcast(v, z) for v in alpha_sigma(gamma))
    if p is Parametrization.X0:
        return (z - alpha * out) / sigma
    return sigma * z + alpha * out


def x0_from_eps(z: Tensor, gamma: Tensor, eps: Tensor) -> Tensor:
    """x_hat = (z - sigma eps_hat) / alpha. z, eps (B, *D), gamma (B,)."""
    alpha, sigma = (_bcast(v, z) for v in alpha_sigma(gamma))
    return (z - sigma * eps) / alpha


def diffusion_nats(
    sq_error: Tensor, gamma_t: Tensor, *, slope_t: Tensor | None = None, gamma_s: Tensor | None = None, timesteps=None
) -> Tensor:
    """The one-sample diffusion term, (B,) nats, from the squared error (eps - eps_hat)^2 per dimension (B, *D):
    1/2 gamma'(t) ||.||^2 in continuous time (``timesteps`` None; VDM eq. 17), else
    T/2 expm1(gamma(t) - gamma(s)) ||.||^2 for T = ``timesteps`` (VDM eq. 13; expm1 keeps the small steps exact).
    gamma and its slope are (B,), or (B, *D) for a multivariate schedule, whose weights apply per dimension before
    the sum."""
    weight = 0.5 * slope_t if timesteps is None else 0.5 * timesteps * torch.expm1(gamma_t - gamma_s)
    if weight.ndim == sq_error.ndim:
        return sum_flat(weight * sq_error)
    return weight * sum_flat(sq_error)


def sigmoid_weighting(gamma: Tensor, weight: float, bias: float) -> Tensor:
    """Weights w(gamma) = 1 + ``weight`` sigmoid(gamma + ``bias``), (B,) -> (B,), of the diffusion term's integrand.

    Kingma & Gao 2023 ("Understanding Diffusion Objectives as the ELBO with Simple Data Augmentation") write the usual
    diffusion losses as 1/2 E_t[w(lambda_t) (-dlambda/dt) ||eps - eps_hat||^2] with lambda = log SNR = -gamma: w = 1
    is the bound (VDM eq. 17), and their sigmoid weighting is sigmoid(bias - lambda). Added to the bound's weight, it
    keeps every noise level at least at the bound's weight (the low-noise end, where the bits are) and lifts the noisy
    end (gamma > -bias), where the coarse structure that sample quality depends on is learned, by up to 1 + ``weight``.
    A weight non-decreasing in gamma makes the loss the bound plus ``weight`` times an average of the bounds of
    noise-perturbed data (their main result), so it stays a likelihood objective. ``weight`` = 0: the bound itself."""
    if weight == 0:
        return torch.ones_like(gamma)
    return 1.0 + weight * torch.sigmoid(gamma + bias)


def v_weight(gamma: Tensor) -> Tensor:
    """1 / alpha^2 = 1 + exp(gamma), (B,) -> (B,): the factor that turns ||eps - eps_hat||^2 into the v-prediction
    error ||v - v_hat||^2 (Salimans & Ho 2022), v = alpha eps - sigma x. With alpha^2 + sigma^2 = 1,
    eps = sigma z + alpha v, so eps - eps_hat = alpha (v - v_hat) for any parametrization of the network."""
    return 1.0 + torch.exp(gamma)


def reconstruction_nats(x0: Tensor, z0: Tensor, gamma_0: Tensor, num_bins: int | None) -> Tensor:
    """-log p(x | z_0) summed over dims, (B,) nats, with p(x | z_0) = N(z_0 / alpha_0, sigma_0^2) discretized to
    ``num_bins`` levels (a density for None). gamma_0 is a scalar (0-dim), (B,), or (1, *D) / (B, *D) per dimension."""
    alpha, _ = alpha_sigma(gamma_0)
    logvar = F.logsigmoid(gamma_0)
    if gamma_0.ndim:
        alpha, logvar = _bcast(alpha, z0), _bcast(logvar, z0)
    else:
        logvar = logvar.view(*([1] * z0.ndim))
    mean = z0 / alpha
    return decoder_nll_nats(x0, mean, logvar.to(x0.dtype), num_bins)


def chain_denoiser(model: GammaDenoiser, chain: NoiseSchedule, parametrization: Parametrization | str):
    """The model as a denoiser ``(x_t, t) -> out`` of the chain from :meth:`LogSNRSchedule.discretize`: the network
    gets gamma = log((1 - alpha_bar_t) / alpha_bar_t) of chain step t (integer, or a real time of the chain's
    interpolation, as the probability-flow ODE asks), and at the decoder step t = 1 (integer t only: a real t = 1.0 is the
    network at gamma_min) the output is that of the identity denoiser x0_hat = x_1 / alpha_0, which makes the chain's
    decoder the continuous model's p(x | z_0)."""

    def denoise(x_t: Tensor, t: Tensor) -> Tensor:
        alpha, sigma = chain.signal_noise(t)  # (B,) float64
        gamma = 2.0 * (torch.log(sigma) - torch.log(alpha))
        out = model(x_t, gamma.to(x_t.dtype))
        # the decoder is chain step 1 (integer t); a real t = 1.0 (the ODE's t0) is the noise level gamma_min
        if t.is_floating_point():
            return out
        at_decoder = t == 1
        if not bool(at_decoder.any()):
            return out
        identity = output_from_x0(parametrization, chain, x_t=x_t, t=t, x0=x_t / chain.broadcast(alpha, x_t))
        return torch.where(at_decoder.view(-1, *([1] * (x_t.ndim - 1))), identity, out)

    return denoise


@dataclass
class ContinuousTerms:
    """One-sample estimates per example, (B,) nats each; ``x0_mse`` (B,) is ||x - x_hat(z_t)||^2 / D at the t drawn."""

    reconstruction: Tensor
    prior: Tensor
    diffusion: Tensor
    x0_mse: Tensor

    @property
    def total(self) -> Tensor:
        return self.reconstruction + self.prior + self.diffusion

    def weighted_total(self, weights: Tensor | None) -> Tensor:
        """The training loss per example, (B,) nats: the bound for None, else reconstruction + prior + weights x
        diffusion (weights (B,), e.g. :func:`sigmoid_weighting` of gamma(t))."""
        if weights is None:
            return self.total
        return self.reconstruction + self.prior + weights.to(self.diffusion.dtype) * self.diffusion


def step_times(u: Tensor, timesteps: int | None) -> tuple[Tensor, Tensor | None]:
    """Times for the diffusion term from u (B,) uniform on [0, 1): t = u in continuous time; for T steps
    t = i / T and s = (i - 1) / T with i = floor(u T) + 1 in 1..T."""
    if timesteps is None:
        return u, None
    i = (u * timesteps).floor().clamp(max=timesteps - 1) + 1
    return i / timesteps, (i - 1) / timesteps


def continuous_terms(
    model: GammaDenoiser,
    schedule: LogSNRSchedule,
    *,
    x0: Tensor,
    u: Tensor,
    eps: Tensor,
    parametrization: Parametrization | str,
    num_bins: int | None,
    timesteps: int | None = None,
    log_snr: LogSNR | None = None,
    log_snr_s: LogSNR | None = None,
) -> ContinuousTerms:
    """The three terms for x0 (B, *D) at times from u (B,) with noise eps (B, *D) (the same eps forms z_0 and z_t).
    Gradients reach the network and the schedule's parameters (``log_snr`` and, for T steps, ``log_snr_s`` may pass
    precomputed gamma(t) and gamma(s), e.g. to route their gradients with :func:`route_bound_gradient`)."""
    t, s = step_times(u.to(x0.dtype), timesteps)
    at_t = schedule(t) if log_snr is None else log_snr
    gamma_0, gamma_1 = schedule.endpoints(like=x0)
    alpha_t, sigma_t = (_bcast(v, x0) for v in alpha_sigma(at_t.gamma))
    z_t = alpha_t * x0 + sigma_t * eps
    eps_hat = eps_from_output(parametrization, z_t, at_t.gamma, model(z_t, at_t.gamma))
    gamma_s = None if s is None else (schedule(s) if log_snr_s is None else log_snr_s).gamma
    diffusion = diffusion_nats(
        (eps - eps_hat) ** 2, at_t.gamma, slope_t=at_t.slope, gamma_s=gamma_s, timesteps=timesteps
    )
    alpha_0, sigma_0 = (_bcast(v, x0) if gamma_0.ndim else v for v in alpha_sigma(gamma_0))
    z_0 = alpha_0 * x0 + sigma_0 * eps
    with torch.no_grad():
        x0_mse = sum_flat((x0_from_eps(z_t, at_t.gamma, eps_hat) - x0) ** 2) / x0[0].numel()
    return ContinuousTerms(
        reconstruction=reconstruction_nats(x0, z_0, gamma_0, num_bins),
        prior=standard_normal_kl_nats(
            x0, torch.sigmoid(-gamma_1.double()), F.logsigmoid(gamma_1.double())
        ),  # ()|(1, *D)
        diffusion=diffusion,
        x0_mse=x0_mse,
    )


def route_variance_gradient(log_snr: LogSNR, per_example_loss: Tensor, weights: Tensor | None = None) -> None:
    """Make the learned shape's parameters follow the gradient of the batch variance of the loss estimator, while
    the endpoints and the network keep the gradient of the bound (Kingma et al. 2021, Sec. 5.2 and App. I.2).

    In continuous time the bound's expectation depends on the schedule only through its endpoints (VDM eq. 20), so
    the bound gives the shape no signal, only noise; its variance does depend on the shape. A backward pass of
    mean_i L_i gives d L_i / d shape_i / B; scaling that by 2 (L_i - mean L) turns it into the gradient of
    Var_batch(L) = mean_i (L_i - mean L)^2 with respect to the shape. Hooks on ``shape`` and ``shape_slope`` do the
    scaling, so only the shape's parameters see it. A no-op for fixed schedules.

    ``weights`` (B,): the loss is a weighted one whose schedule gradient :func:`route_bound_gradient` divided by the
    weights; they are multiplied back here, so the shape follows the variance of the loss that is trained."""
    if log_snr.shape is None or not log_snr.shape.requires_grad:
        return
    centred = (per_example_loss - per_example_loss.mean()).detach()
    scale = 2.0 * centred if weights is None else 2.0 * centred * weights.detach()
    for tensor in (log_snr.shape, log_snr.shape_slope):
        tensor.register_hook(lambda grad, scale=scale: grad * scale.to(grad.dtype))


def route_bound_gradient(log_snr: LogSNR, weights: Tensor) -> None:
    """With a weighted diffusion term w_i D_i in the loss (w held fixed, e.g. :func:`sigmoid_weighting`), give the
    schedule's parameters the gradient of the bound, not of the weighted loss: the gradient reaching gamma(t_i) and
    gamma'(t_i) of example i (only the diffusion term D_i depends on them; reconstruction and prior see the endpoints
    through their own evaluation) is divided by w_i, so the learned endpoints settle where the bound is tightest, as in
    VDM. The network's gradient is untouched: it trains on the weighted loss. weights (B,); a no-op for fixed
    schedules. For T steps D_i also uses gamma(s_i): route the gradient of that :class:`LogSNR` too (pass it to
    :func:`continuous_terms` as ``log_snr_s``)."""
    inverse = (1.0 / weights).detach()
    for tensor in (log_snr.gamma, log_snr.slope):
        if tensor.requires_grad:  # (B,), or (B, *D) for a multivariate schedule's gamma
            tensor.register_hook(lambda grad, inverse=inverse: grad * _bcast(inverse, grad))


@torch.no_grad()
def stratified_continuous_elbo(
    model: GammaDenoiser,
    schedule: LogSNRSchedule,
    x0: Tensor,
    *,
    parametrization: Parametrization | str,
    num_bins: int | None,
    strata: int,
    generator: torch.Generator | None = None,
    u: Tensor | None = None,
    eps: Tensor | None = None,
    timesteps: int | None = None,
    chain_timesteps: int = 1000,
    max_batch: int = 512,
) -> ELBOResult:
    """-ELBO per example with the diffusion term from K = ``strata`` times, one uniform in each of the K equal
    strata of [0, 1) per example (unbiased; the strata remove most of the variance over t). x0 (B, *D).

    Returned as an :class:`ELBOResult` laid out like the chain's stratified estimate, so the same metrics, per-t
    profile and rate-distortion apply: ``per_t`` (B, K + 1) holds the reconstruction then each stratum's weighted
    diffusion term; ``t_values`` are the times as chain steps j = 1 + t S, S = ``chain_timesteps`` the steps that t in
    [0, 1] spans (T for VDM's chain of T + 1 steps, T - 1 for a beta schedule's own T), ``t_weights`` the strata's
    widths in those steps. ``u`` (B, K) and ``eps`` (B, K, *D) fix the
    draw (e.g. per-example generators); otherwise they come from ``generator``."""
    batch, dims = x0.shape[0], x0[0].numel()
    device = generator.device if generator is not None else x0.device
    if u is None:
        u = torch.rand(batch, strata, generator=generator, dtype=torch.float64, device=device).to(x0.device)
    if eps is None:
        eps = torch.randn((batch, strata, *x0.shape[1:]), generator=generator, device=device).to(x0)
    grid = (torch.arange(strata, device=x0.device, dtype=torch.float64) + u.double()) / strata  # (B, K)
    diffusion = torch.empty(batch, strata, dtype=torch.float64, device=x0.device)
    x0_mse = torch.empty(batch, strata, dtype=torch.float64, device=x0.device)
    recon = None
    chunk = max(1, max_batch // batch)
    for start in range(0, strata, chunk):
        n = min(chunk, strata - start)
        cols = slice(start, start + n)
        x_rep = x0.repeat(n, *([1] * (x0.ndim - 1)))  # (n B, *D), column-major over strata
        u_rep = grid[:, cols].T.reshape(-1)
        eps_rep = eps[:, cols].transpose(0, 1).reshape(n * batch, *x0.shape[1:])
        terms = continuous_terms(
            model, schedule, x0=x_rep, u=u_rep, eps=eps_rep, parametrization=parametrization, num_bins=num_bins,
            timesteps=timesteps,
        )  # fmt: skip
        diffusion[:, cols] = terms.diffusion.view(n, batch).T.double() / strata
        x0_mse[:, cols] = terms.x0_mse.view(n, batch).T.double()
        if recon is None:
            recon = terms.reconstruction[:batch].double()  # z_0 from the first stratum's eps
            prior = terms.prior[:batch].double()
    per_t = torch.cat([recon[:, None], diffusion], dim=1)  # (B, K + 1)
    t_values = torch.cat([torch.ones(batch, 1, dtype=torch.float64, device=x0.device), 1 + grid * chain_timesteps], 1)
    width = torch.full((strata,), chain_timesteps / strata, dtype=torch.float64)
    return ELBOResult(
        reconstruction=recon,
        prior=prior,
        denoising=diffusion.sum(dim=1),
        per_t=per_t,
        num_dims=dims,
        t_values=t_values,
        t_weights=torch.cat([torch.ones(1, dtype=torch.float64), width]).to(x0.device),
        x0_mse=torch.cat([x0_mse[:, :1] * 0, x0_mse], dim=1),  # no x0 error is measured at the decoder
    )


def continuous_example_draws(indices: Tensor, seed: int, strata: int, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """u (B, K) and eps (B, K, *shape) of :func:`stratified_continuous_elbo` for the examples ``indices`` (B,) of a
    split, each from its own generator (:func:`~diffusion_elbo.core.elbo.example_generator`), on the CPU."""
    from diffusion_elbo.core.elbo import example_generator

    draws = [example_generator(seed, int(i)) for i in indices.tolist()]
    u = torch.stack([torch.rand(strata, generator=g, dtype=torch.float64) for g in draws])
    eps = torch.stack([torch.randn((strata, *shape), generator=g) for g in draws])
    return u, eps


def gaussian_continuous_terms(mean: float, std: float, gamma_min: float, gamma_max: float) -> dict[str, float]:
    """Expected terms per dim (nats) of the continuous-time bound for data x ~ N(m, s^2) under the Bayes-optimal
    denoiser E[x | z], which depend on the schedule only through its endpoints (VDM eq. 20):

    - diffusion: 1/2 int_{SNR_1}^{SNR_0} mmse(v) dv with mmse(v) = Var[x | z at SNR v] = s^2 / (1 + v s^2), so
      1/2 log((1 + SNR_0 s^2) / (1 + SNR_1 s^2)), SNR_0 = exp(-gamma_min), SNR_1 = exp(-gamma_max);
    - prior: (alpha_1^2 (m^2 + s^2) + sigma_1^2 - 1 - log sigma_1^2) / 2;
    - reconstruction (continuous data, decoder N(z_0 / alpha_0, sigma_0^2)): E(x - z_0 / alpha_0)^2 = sigma_0^2 /
      alpha_0^2, so (log(2 pi sigma_0^2) + 1 / alpha_0^2) / 2."""
    snr0, snr1 = math.exp(-gamma_min), math.exp(-gamma_max)
    s2 = std**2
    alpha1_2, sigma1_2 = 1 / (1 + math.exp(gamma_max)), 1 / (1 + math.exp(-gamma_max))
    sigma0_2, alpha0_2 = 1 / (1 + math.exp(-gamma_min)), 1 / (1 + math.exp(gamma_min))
    diffusion = 0.5 * (math.log1p(snr0 * s2) - math.log1p(snr1 * s2))
    prior = 0.5 * (alpha1_2 * (mean**2 + s2) + sigma1_2 - 1 - math.log(sigma1_2))
    recon = 0.5 * (math.log(2 * math.pi * sigma0_2) + 1 / alpha0_2)
    return {"reconstruction": recon, "prior": prior, "diffusion": diffusion, "total": recon + prior + diffusion}


def gaussian_oracle_x0(z: Tensor, gamma: Tensor, mean: float, std: float) -> Tensor:
    """E[x | z] for x ~ N(m, s^2), z = alpha x + sigma eps at gamma = -log SNR (B,)
    (:func:`~diffusion_elbo.core.gaussian_data.posterior_mean`)."""
    return posterior_mean(z, *alpha_sigma(gamma.double()), mean=mean, std=std)
