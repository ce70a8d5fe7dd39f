"""The model's own likelihood by the probability-flow ODE (Song et al. 2021, "Score-based generative modeling through
stochastic differential equations", Sec. 4.3 and App. D.2; "Maximum likelihood training of score-based diffusion
models", 2021), beside the bound.

Time is real, t in [0, T], through the schedule's continuous interpolation (``NoiseSchedule.log_alpha_bar_at``): x_t =
a(t) x0 + sigma(t) eps with a^2 = alpha_bar(t), sigma^2 = 1 - alpha_bar(t), the marginals of the VP SDE
dx = -beta(t) x / 2 dt + sqrt(beta(t)) dW with beta(t) = -d log alpha_bar(t) / dt. Its probability-flow ODE

    dx/dt = f(t) x - g(t)^2 / 2 * score(x, t) = -beta(t) / 2 * (x - eps_hat(x, t) / sigma(t))        (Song eq. 13)

(score = -eps_hat / sigma) carries q_t to q_T deterministically, and the instantaneous change of variables (Chen et al.
2018, Thm. 1) gives log p_t0(x(t0)) = log p_T(x(T)) + int_t0^T div f(x(t), t) dt. With the prior N(0, I) at t = T this
is the exact log-density of a continuous normalizing flow: a likelihood, not a bound (up to the solver's tolerance and,
with Hutchinson's estimator, an unbiased estimate of it).

Shapes: x (B, *D); per-example results (B,) in nats summed over dims. Randomness (probes, dequantization noise) comes in
as tensors, so a caller can draw it per example (the same numbers on 1 or N processes).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from diffusion_elbo.core.chain import NoiseSchedule
from diffusion_elbo.core.distributions import LOG_2PI, sum_flat
from diffusion_elbo.core.parametrization import Parametrization, predict_eps

Denoiser = Callable[[Tensor, Tensor], Tensor]
# torchdiffeq's solvers with error control (rtol/atol): a likelihood needs the integral to a stated tolerance, which
# its fixed-step solvers (euler, rk4, ...) do not give
ODE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")


class Divergence(str, Enum):
    """How div f is computed: ``hutchinson`` (E[v^T J v] over Rademacher probes v, one vector-Jacobian product per
    probe; Hutchinson 1989, Grathwohl et al. 2019) or ``exact`` (the Jacobian's trace by D autograd passes)."""

    HUTCHINSON = "hutchinson"
    EXACT = "exact"


@dataclass
class ODELikelihood:
    """-log p(x) of the probability-flow ODE for a batch, nats summed over dims, each (B,) float64."""

    nll: Tensor  # -log p(x): the prior term minus the divergence integral minus log |dz0/dx|
    prior: Tensor  # -log N(x(T); 0, I)
    divergence_integral: Tensor  # int_t0^T div f dt
    nfe: int  # function evaluations of the solver (each: one network call and its divergence)


def probability_flow_drift(schedule: NoiseSchedule, x: Tensor, t: Tensor, eps_hat: Tensor) -> Tensor:
    """f(x, t) = -beta(t) / 2 * (x - eps_hat / sigma(t)), the probability-flow ODE of the VP SDE (Song et al. 2021,
    eq. 13 with f = -beta/2, g^2 = beta, score = -eps_hat / sigma). x, eps_hat (B, *D); t (B,) real times."""
    log_ab, slope = schedule.log_alpha_bar_at(t)  # (B,) float64
    beta = -slope
    sigma = torch.sqrt(-torch.expm1(log_ab))
    half_beta = schedule.broadcast(0.5 * beta, x)
    return half_beta * (eps_hat / schedule.broadcast(sigma, x) - x)


def rademacher(shape: tuple[int, ...], generator: torch.Generator | None = None, dtype=torch.float64) -> Tensor:
    """Independent +-1 entries (the probes of Hutchinson's trace estimator; lower variance than Gaussian ones)."""
    return torch.randint(0, 2, shape, generator=generator).to(dtype) * 2 - 1


class Dequantization(str, Enum):
    """How K-level data becomes continuous for a density model. ``uniform``: y = x0 + u, u ~ U(bin) (Theis et al.
    2016). ``truncated_normal``: y = x0 + (sigma(t0) / a(t0)) eta with eta ~ N(0, I) truncated to the bin, the
    forward process's own noise at the ODE's start (Zheng et al. 2023, i-DODE, Sec. 4.2), which fits the model's
    density at t0 better than a flat one. Either way -log P(x0) <= E_q[-log p(y) + log q(y | x0)] (Jensen)."""

    UNIFORM = "uniform"
    TRUNCATED_NORMAL = "truncated_normal"


def dequantize(
    x0: Tensor,
    num_bins: int,
    *,
    u: Tensor,
    kind: Dequantization | str = Dequantization.UNIFORM,
    noise_scale: float | Tensor = 1.0,
) -> tuple[Tensor, Tensor]:
    """A continuous y in x0's bin and log q(y | x0), for the bound -log P(x0) <= E_q[-log p(y) + log q(y | x0)].

    x0 (B, *D) on the K-level grid of [-1, 1] (spacing Delta = 2 / (K - 1), bins of width Delta around each level; the
    end bins reach past [-1, 1], still disjoint); u (B, *D) ~ U(0, 1), the randomness. ``uniform``: y = x0 + (u - 1/2)
    Delta, log q = -D log Delta. ``truncated_normal``: y = x0 + s eta, eta ~ N(0, 1) truncated to |eta| <= tau =
    Delta / (2 s) by inverse CDF, s = ``noise_scale`` (sigma(t0) / a(t0)); log q = sum_d [log N(eta_d) - log Z - log s],
    Z = Phi(tau) - Phi(-tau); s is a float, or a (*D) tensor of one scale per dimension (a multivariate schedule's).
    Returns y (B, *D) in x0's dtype and log q (B,) float64 nats."""
    kind = Dequantization(kind)
    delta = 2.0 / (num_bins - 1)
    u = u.to(torch.float64)
    dims = x0[0].numel()
    if kind is Dequantization.UNIFORM:
        y = x0.to(torch.float64) + (u - 0.5) * delta
        log_q = torch.full((x0.shape[0],), -dims * math.log(delta), dtype=torch.float64, device=x0.device)
        return y.to(x0.dtype), log_q
    if isinstance(noise_scale, Tensor):  # one scale per dimension, (*D)
        scale = noise_scale.to(device=u.device, dtype=torch.float64)
        tau, log_scale = delta / (2.0 * scale), torch.log(scale)
    else:
        scale, tau, log_scale = (
            noise_scale,
            torch.tensor(delta / (2.0 * noise_scale), dtype=torch.float64),
            math.log(noise_scale),
        )
    lo, z = torch.special.ndtr(-tau), torch.special.ndtr(tau) - torch.special.ndtr(-tau)
    eta = torch.minimum(torch.maximum(torch.special.ndtri(lo + u * z), -tau), tau)  # (B, *D), inside the bin
    y = x0.to(torch.float64) + scale * eta
    log_q_dim = -0.5 * eta**2 - 0.5 * LOG_2PI - torch.log(z) - log_scale
    return y.to(x0.dtype), log_q_dim.flatten(1).sum(dim=1)


def dequantization_start_time(schedule: NoiseSchedule, num_bins: int | None, minimum: float = 1.0) -> float:
    """Where the ODE starts, t0 in [minimum, T].

    K-level data: the t whose noise matches the dequantization noise, sigma(t)^2 / a(t)^2 = Delta^2 / 12 (the variance
    of U(-Delta/2, Delta/2)), so the model's density at t0 is about as wide as the dequantized data around each level.
    Continuous data (``num_bins`` None): ``minimum``. Never below ``minimum`` (1: a network trained on steps 1..T is not
    evaluated below the first one)."""
    if num_bins is None:
        return float(minimum)
    target = math.log(12.0) - 2.0 * math.log(2.0 / (num_bins - 1))  # log SNR at which the noises match

    def log_snr(t: float) -> float:  # averaged over the dimensions of a multivariate schedule
        log_ab, _ = schedule.log_alpha_bar_at(torch.tensor([t], dtype=torch.float64))
        return float((log_ab - torch.log(-torch.expm1(log_ab))).mean())

    lo, hi = float(minimum), float(schedule.T)
    if log_snr(lo) <= target:
        return lo
    if log_snr(hi) >= target:
        return hi
    for _ in range(60):  # bisection: log SNR(t) is strictly decreasing
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if log_snr(mid) > target else (lo, mid)
    return 0.5 * (lo + hi)


def divergence_hutchinson(f: Tensor, x: Tensor, probes: Tensor) -> Tensor:
    """div f ~ mean_p v_p^T (df/dx) v_p (unbiased), one vector-Jacobian product per probe. f, x (B, *D) with f a function
    of x in the autograd graph; probes (B, P, *D). Returns (B,) in f's dtype; the graph is freed after the last probe."""
    num = probes.shape[1]
    total = torch.zeros(x.shape[0], dtype=f.dtype, device=f.device)
    for p in range(num):
        v = probes[:, p].to(f.dtype)
        (vjp,) = torch.autograd.grad(f, x, grad_outputs=v, retain_graph=p < num - 1)
        total = total + (vjp * v).flatten(1).sum(dim=1)
    return total / num


def divergence_exact(f: Tensor, x: Tensor) -> Tensor:
    """div f = trace(df/dx) by D vector-Jacobian products with the basis vectors (exact; for small D). f, x (B, *D)."""
    flat = f.flatten(1)  # (B, D)
    d = flat.shape[1]
    total = torch.zeros(x.shape[0], dtype=f.dtype, device=f.device)
    for i in range(d):
        (grad,) = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=i < d - 1)
        total = total + grad.flatten(1)[:, i]
    return total


def ode_nll_nats(
    model: Denoiser,
    schedule: NoiseSchedule,
    x: Tensor,
    *,
    parametrization: Parametrization | str,
    t_start: float = 1.0,
    divergence: Divergence | str = Divergence.HUTCHINSON,
    probes: Tensor | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
) -> ODELikelihood:
    """-log p(x) of the probability-flow ODE model, (B,) nats summed over dims (density in x's units).

    The ODE starts at z(t0) = a(t0) x (``t_start`` = t0 in (0, T) real time) and runs to T with torchdiffeq's adaptive
    solver (``method``, ``rtol``, ``atol``; state in float64, the network in its own dtype). -log p(x) =
    -log N(z(T); 0, I) - int_t0^T div f dt - D log a(t0), the last term the change of variables z = a(t0) x (it makes
    the density at t0 that of x0 + (sigma/a) eps, not of a shrunk copy). The model is called as model(z_t, t) with a
    float t (B,) of real times and its output read under ``parametrization``. ``probes`` (B, P, *D) for Hutchinson's
    estimator (e.g. :func:`rademacher`); ``divergence=exact`` needs none.
    """
    from torchdiffeq import odeint  # maintained adaptive solvers (dopri5 with error control, Chen et al. 2018)

    divergence = Divergence(divergence)
    if divergence is Divergence.HUTCHINSON and probes is None:
        raise ValueError("divergence=hutchinson needs probes (B, P, *D), e.g. rademacher((B, P, *D), generator)")
    if not 0.0 < t_start < schedule.T:
        # at t = 0 the noise is zero and the score eps_hat / sigma is 0 / 0
        raise ValueError(f"likelihood.ode.t_start must lie in (0, T) = (0, {schedule.T}); got {t_start}")
    batch = x.shape[0]
    net_dtype = x.dtype
    a0, _ = schedule.signal_noise(torch.tensor([t_start], dtype=torch.float64, device=x.device))  # (1,) or (1, *D)
    z0 = NoiseSchedule.broadcast(a0, x.to(torch.float64)) * x.to(torch.float64)
    nfe = 0

    def rhs(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        nonlocal nfe
        nfe += 1
        z = state[0]
        # torchdiffeq picks its first step by probing the drift at t0 + h0 (Hairer et al. II.4), which passes T where
        # the drift is small (short chains, a start near T); the drift at T stands in for that probe. Every step the
        # solver takes lies in [t0, T] (step_t below), so the integral never uses it.
        tt = t.to(torch.float64).clamp(max=float(schedule.T)).expand(batch)
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            out = model(z.to(net_dtype), tt)
            eps_hat = predict_eps(parametrization, schedule, x_t=z, t=tt, out=out.to(torch.float64))
            f = probability_flow_drift(schedule, z, tt, eps_hat)
            div = divergence_exact(f, z) if divergence is Divergence.EXACT else divergence_hutchinson(f, z, probes)
        return f.detach(), div.detach()

    times = torch.tensor([t_start, float(schedule.T)], dtype=torch.float64, device=x.device)
    zeros = torch.zeros(batch, dtype=torch.float64, device=x.device)
    # step_t: the last step lands on T exactly (adaptive solvers otherwise step past the end and interpolate back,
    # evaluating the drift at t > T where the schedule is not defined)
    if method not in ODE_METHODS:
        raise ValueError(
            f"likelihood.ode.method={method!r}: choose an adaptive torchdiffeq solver, one of {' | '.join(ODE_METHODS)}"
        )
    options = {"step_t": times[1:]}
    z_path, div_path = odeint(rhs, (z0, zeros), times, rtol=rtol, atol=atol, method=method, options=options)
    z_end, integral = z_path[-1], div_path[-1]
    dims = z_end[0].numel()
    prior = 0.5 * (z_end.flatten(1) ** 2).sum(dim=1) + 0.5 * dims * LOG_2PI
    log_det = sum_flat(torch.log(a0)) if schedule.multivariate else dims * torch.log(a0)  # log |dz0/dx|, (1,)
    nll = prior - integral - log_det
    return ODELikelihood(nll=nll, prior=prior, divergence_integral=integral, nfe=nfe)
