"""The diffusion ELBO of the lecture, its three terms, and estimators of it.

-ELBO(x0) = L_prior + L_1 + sum_{t=2..T} L_t, all in nats (losses, so they add up to -ELBO):
- prior matching   L_prior = KL(q(x_T | x_0) || N(0, I))                         (closed form)
- reconstruction   L_1     = E_{q(x_1 | x_0)}[-log p_theta(x_0 | x_1)]
- denoising        L_t     = E_{q(x_t | x_0)}[KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t))],  t >= 2

(Ho et al. 2020 eq. 5; the lecture's second derivation.) The lecture's first derivation gives the
"consistency" form with the same expectation and a higher variance, in :func:`consistency_mc_elbo`.

A model is any callable ``model(x_t, t) -> out`` with x_t (B, *D) and t a LongTensor (B,) in 1..T; ``out``
is interpreted through a :class:`Parametrization`. Data with ``num_bins`` = K levels in [-1, 1] uses the
discretized decoder (honest bits/dim); ``num_bins=None`` means continuous data (a density).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from diffusion_elbo.core.chain import NoiseSchedule
from diffusion_elbo.core.distributions import (
    discretized_gaussian_log_likelihood,
    gaussian_log_prob,
    mean_flat,
    nats_to_bits_per_dim,
    normal_kl,
    standard_normal_kl_nats,
    sum_flat,
)
from diffusion_elbo.core.forward import q_posterior_mean_variance, q_sample, q_step_sample
from diffusion_elbo.core.parametrization import Parametrization, predict_x0
from diffusion_elbo.core.reverse import DecoderVariance, ReverseStep, ReverseVariance, p_mean_variance, split_output
from diffusion_elbo.core.timesteps import TimestepSampler

Denoiser = Callable[[Tensor, Tensor], Tensor]


def prior_kl_nats(schedule: NoiseSchedule, x0: Tensor) -> Tensor:
    """L_prior = KL(q(x_T | x_0) || N(0, I)) in closed form, summed over dims: (B, *D) -> (B,) nats; q(x_T | x_0) =
    N(sqrt(alpha_bar_T) x_0, (1 - alpha_bar_T) I) (:func:`~diffusion_elbo.core.distributions.standard_normal_kl_nats`,
    with the schedule's float64 tables)."""
    T = schedule.T  # the tables' last row, (1,) or (1, *D) for a multivariate schedule
    return standard_normal_kl_nats(
        x0, schedule.alpha_bar[T:].to(x0.device), schedule.log_one_minus_alpha_bar[T:].to(x0.device)
    )


def decoder_nll_nats(x0: Tensor, mean: Tensor, logvar: Tensor, num_bins: int | None) -> Tensor:
    """-log p_theta(x_0 | x_1) summed over dims, (B,) nats: discretized Gaussian for K-level data
    (Ho et al. 2020 eq. 13), a Gaussian density for continuous data."""
    if num_bins is None:
        return -sum_flat(gaussian_log_prob(x0, mean, logvar.expand_as(x0)))
    log_scale = 0.5 * logvar.expand_as(x0)
    return -sum_flat(discretized_gaussian_log_likelihood(x0, mean, log_scale, num_bins))


def denoising_kl_nats(schedule: NoiseSchedule, x0: Tensor, *, x_t: Tensor, t: Tensor, step: ReverseStep) -> Tensor:
    """KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)) summed over dims, (B,) nats; valid for t >= 2.

    With the ``small`` variance this is alpha_bar_{t-1}(1 - alpha_t)^2 / (2 sigma_q^2 (1 - alpha_bar_t)^2)
    ||x0_hat - x0||^2 = (SNR(t-1) - SNR(t)) / 2 ||x0_hat - x0||^2 (lecture; Kingma et al. 2021 eq. 13).
    """
    mean_q, _ = q_posterior_mean_variance(schedule, x0, x_t, t)
    # log sigma_q^2 from the float64 table (finite placeholder at t = 1, which callers mask out)
    logvar_q = schedule.gather("posterior_log_variance", t, x0)
    return sum_flat(normal_kl(mean_q, logvar_q.expand_as(x0), step.mean, step.logvar.expand_as(x0)))


def term_from_output(
    schedule: NoiseSchedule,
    x0: Tensor,
    *,
    x_t: Tensor,
    t: Tensor,
    out: Tensor,
    parametrization: Parametrization | str,
    variance: ReverseVariance | str,
    decoder_variance: DecoderVariance | str = DecoderVariance.CLIPPED,
    num_bins: int | None,
) -> Tensor:
    """L_t for each example at its own t from a network output ``out`` = model(x_t, t) already computed:
    the decoder NLL where t = 1, the denoising KL where t >= 2. x0, x_t, out (B, *D); t (B,). Returns (B,) nats."""
    step = p_mean_variance(
        schedule,
        out,
        x_t=x_t,
        t=t,
        parametrization=parametrization,
        variance=variance,
        decoder_variance=decoder_variance,
    )
    kl = denoising_kl_nats(schedule, x0, x_t=x_t, t=t, step=step)
    nll = decoder_nll_nats(x0, step.mean, step.logvar, num_bins)
    return torch.where(t == 1, nll, kl)


def term_nats(
    model: Denoiser,
    schedule: NoiseSchedule,
    x0: Tensor,
    t: Tensor,
    *,
    parametrization: Parametrization | str,
    variance: ReverseVariance | str,
    decoder_variance: DecoderVariance | str = DecoderVariance.CLIPPED,
    num_bins: int | None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """One-sample estimate of L_t for each example at its own t (x_t ~ q(x_t | x_0) drawn here).
    x0 (B, *D), t (B,) in 1..T. Returns (L_t (B,) nats, network output)."""
    x_t = q_sample(schedule, x0, t=t, noise=noise, generator=generator)
    out = model(x_t, t)
    term = term_from_output(
        schedule,
        x0,
        x_t=x_t,
        t=t,
        out=out,
        parametrization=parametrization,
        variance=variance,
        decoder_variance=decoder_variance,
        num_bins=num_bins,
    )
    return term, out


@dataclass
class ELBOResult:
    """-ELBO per example and its terms, in nats summed over the ``num_dims`` data dimensions.

    ``per_t`` (B, T) holds L_t for t = 1..T (column 0 is the reconstruction term).
    """

    reconstruction: Tensor  # (B,)
    prior: Tensor  # (B,)
    denoising: Tensor  # (B,)
    per_t: Tensor  # (B, T)
    num_dims: int
    # stratified estimates only: the timesteps used, their weights n_k, and ||x0_hat - x0||^2 / D at each
    t_values: Tensor | None = None  # (B, K), or (K,) when shared by all examples
    t_weights: Tensor | None = None  # (K,)
    x0_mse: Tensor | None = None  # (B, K)

    @property
    def total(self) -> Tensor:
        """-ELBO per example, (B,) nats."""
        return self.reconstruction + self.prior + self.denoising

    @property
    def nats_per_dim(self) -> Tensor:
        return self.total / self.num_dims

    @property
    def bits_per_dim(self) -> Tensor:
        return nats_to_bits_per_dim(self.nats_per_dim)


@torch.no_grad()
def exact_elbo(
    model: Denoiser,
    schedule: NoiseSchedule,
    x0: Tensor,
    *,
    parametrization: Parametrization | str,
    variance: ReverseVariance | str = ReverseVariance.SMALL,
    decoder_variance: DecoderVariance | str = DecoderVariance.CLIPPED,
    num_bins: int | None = None,
    max_batch: int = 512,
    generator: torch.Generator | None = None,
    progress: Callable[[int, int], None] | None = None,
    generators: list[torch.Generator] | None = None,
) -> ELBOResult:
    """Every term of -ELBO for a batch x0 (B, *D): all T terms, one x_t draw per (example, t).

    The T network evaluations per example are batched: each call stacks a chunk of timesteps for all
    B examples, about ``max_batch`` rows, so memory stays bounded and the network runs at full batch.
    ``generators`` (one per example, e.g. :func:`example_generator`) make each example's draws its own, whatever
    batch it is in; otherwise the noise comes from ``generator``.
    """
    T = schedule.T
    per_t, _ = _terms_at_timesteps(
        model,
        schedule,
        x0,
        torch.arange(1, T + 1, device=x0.device),
        parametrization=parametrization,
        variance=variance,
        decoder_variance=decoder_variance,
        num_bins=num_bins,
        max_batch=max_batch,
        generator=generator,
        progress=progress,
        generators=generators,
    )
    return _result(schedule, x0, per_t)


def _result(schedule: NoiseSchedule, x0: Tensor, per_t: Tensor, **extra) -> ELBOResult:
    """The ELBOResult of per-t terms (B, K) whose column 0 is the reconstruction term and the rest (weighted)
    denoising terms, with the closed-form prior of x0."""
    return ELBOResult(
        reconstruction=per_t[:, 0],
        prior=prior_kl_nats(schedule, x0).double(),
        denoising=per_t[:, 1:].sum(dim=1),
        per_t=per_t,
        num_dims=x0[0].numel(),
        **extra,
    )


def _terms_at_timesteps(
    model: Denoiser,
    schedule: NoiseSchedule,
    x0: Tensor,
    t_values: Tensor,
    *,
    parametrization: Parametrization | str,
    variance: ReverseVariance | str,
    decoder_variance: DecoderVariance | str = DecoderVariance.CLIPPED,
    num_bins: int | None,
    max_batch: int,
    generator: torch.Generator | None,
    progress: Callable[[int, int], None] | None = None,
    with_x0_mse: bool = False,
    clip_x0: bool = False,
    noise: Tensor | None = None,
    generators: list[torch.Generator] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """L_t for every example of x0 (B, *D) at every t of ``t_values`` (K,), or at its own row of ``t_values`` (B, K),
    one x_t draw each: (B, K) float64, and with ``with_x0_mse`` the x0 reconstruction error per dim, (B, K), of x0_hat clamped to [-1, 1] with
    ``clip_x0`` (as image samplers use it). Each network call stacks a chunk of
    timesteps for all B examples, about ``max_batch`` rows, so memory stays bounded at full batch."""
    batch, k = x0.shape[0], t_values.shape[-1]
    t_rows = t_values.expand(batch, k)  # (B, K): every example's own timesteps
    per_t = torch.empty(batch, k, dtype=torch.float64, device=x0.device)
    x0_mse = torch.empty(batch, k, dtype=torch.float64, device=x0.device) if with_x0_mse else None
    chunk = max(1, max_batch // batch)
    for start in range(0, k, chunk):
        ts = t_rows[:, start : start + chunk]  # (B, C)
        n = ts.shape[1]
        t = ts.T.reshape(-1)  # (C * B,): column-major, examples within
        x0_rep = x0.repeat(n, *([1] * (x0.ndim - 1)))  # (C * B, *D)
        # ``noise`` (B, K, *D) fixes each example's eps at each of its timesteps (per-example generators)
        eps = None if noise is None else noise[:, start : start + n].transpose(0, 1).reshape(x0_rep.shape).to(x0)
        if generators is not None:  # one CPU generator per example, drawn in timestep order chunk after chunk
            per_example = torch.stack([torch.randn((n, *x0.shape[1:]), generator=g) for g in generators])
            eps = per_example.transpose(0, 1).reshape(x0_rep.shape).to(x0)  # (B, C, *D) -> (C * B, *D)
        x_t = q_sample(schedule, x0_rep, t=t, noise=eps, generator=generator)
        out = model(x_t, t)
        values = term_from_output(
            schedule,
            x0_rep,
            x_t=x_t,
            t=t,
            out=out,
            parametrization=parametrization,
            variance=variance,
            decoder_variance=decoder_variance,
            num_bins=num_bins,
        )
        per_t[:, start : start + n] = values.view(n, batch).T.double()
        if x0_mse is not None:
            mean_out, _ = split_output(out, variance)
            x0_hat = predict_x0(Parametrization(parametrization), schedule, x_t=x_t, t=t, out=mean_out)
            if clip_x0:
                x0_hat = x0_hat.clamp(-1.0, 1.0)
            x0_mse[:, start : start + n] = mean_flat((x0_hat - x0_rep) ** 2).view(n, batch).T.double()
        if progress is not None:
            progress(int(ts[0, -1]), int(t_rows[0, -1]))
    return per_t, x0_mse


def stratum_edges(num_timesteps: int, strata: int) -> Tensor:
    """Edges e_0 = 2 < e_1 < ... = T + 1 of about ``strata`` geometrically spaced strata [e_k, e_{k+1}) of 2..T."""
    grid = torch.logspace(math.log10(2), math.log10(num_timesteps + 1), strata + 1, dtype=torch.float64)
    edges = torch.unique(grid.floor().long())  # ascending, starts at 2
    edges[-1] = num_timesteps + 1
    return edges


def num_stratified_timesteps(num_timesteps: int, strata: int) -> int:
    """How many timesteps :func:`stratified_timesteps` returns (t = 1 plus one per stratum); draws nothing."""
    if num_timesteps - 1 <= strata:
        return num_timesteps
    return stratum_edges(num_timesteps, strata).numel()  # (K' strata) + t = 1


def stratified_timesteps(
    num_timesteps: int, strata: int, generator: torch.Generator | None = None, num_examples: int | None = None
) -> tuple[Tensor, Tensor]:
    """t = 1 plus one t drawn uniformly in each stratum of 2..T, and each stratum's size n_k:
    sum_k n_k L_{t_k} is an unbiased estimate of sum_{t>=2} L_t. Returns t (K' + 1,), or with ``num_examples`` = B
    an independent draw for every example, (B, K' + 1), and the sizes (K' + 1,).

    Strata are geometrically spaced (about ``strata`` of them): L_t falls steeply with t (on quantized data
    the first few t can hold half of the bound), so the smallest t get strata of width one and are evaluated
    exactly, while the flat tail is sampled. Equal-width strata would be unbiased too but heavy-tailed.
    """
    rows = 1 if num_examples is None else num_examples
    if num_timesteps - 1 <= strata:  # few steps: every t is its own stratum (the exact sum)
        t = torch.arange(1, num_timesteps + 1)
        return (t if num_examples is None else t.expand(rows, -1).clone()), torch.ones_like(t)
    edges = stratum_edges(num_timesteps, strata)
    sizes = edges[1:] - edges[:-1]  # (K',)
    device = generator.device if generator is not None else "cpu"
    u = torch.rand(rows, sizes.numel(), generator=generator, dtype=torch.float64, device=device).cpu()
    offsets = (u * sizes).floor().long()  # (rows, K')
    t = torch.cat([torch.ones(rows, 1, dtype=torch.long), edges[:-1] + offsets], dim=1)  # (rows, K' + 1)
    return (t[0] if num_examples is None else t), torch.cat([torch.ones(1, dtype=torch.long), sizes])


@torch.no_grad()
def stratified_elbo(
    model: Denoiser,
    schedule: NoiseSchedule,
    x0: Tensor,
    *,
    parametrization: Parametrization | str,
    variance: ReverseVariance | str = ReverseVariance.SMALL,
    decoder_variance: DecoderVariance | str = DecoderVariance.CLIPPED,
    num_bins: int | None = None,
    strata: int = 32,
    max_batch: int = 512,
    generator: torch.Generator | None = None,
    timesteps: tuple[Tensor, Tensor] | None = None,
    noise: Tensor | None = None,
) -> ELBOResult:
    """-ELBO per example from K + 1 network evaluations instead of T: the reconstruction term exactly at
    t = 1 and the denoising sum by stratified sampling over 2..T (one t per stratum, weighted by its size).

    Unbiased for the same quantity as :func:`exact_elbo`; used for cheap validation. Every example draws its own
    t_k, so the per-example values are independent and their standard error over examples covers the stratification
    error too (one draw shared by all examples would add an error common to all of them, which no SE over examples
    sees). ``per_t`` holds the K + 1 weighted terms n_k L_{t_k} (column 0 the reconstruction); ``x0_mse`` the
    reconstruction error of x0_hat(x_t) at each t_k (the distortion of Ho et al.'s progressive coding).
    ``timesteps`` = (t_k (K,) or (B, K), n_k (K,)) fixes the draw, and ``noise`` (B, K, *D) the eps of each x_t
    (:func:`per_example_draws` makes both from per-example generators).
    """
    if timesteps is None:
        timesteps = stratified_timesteps(schedule.T, strata, generator, num_examples=x0.shape[0])
    t_values, sizes = timesteps
    t_values, sizes = t_values.to(x0.device), sizes.to(x0.device)
    per_t, x0_mse = _terms_at_timesteps(
        model,
        schedule,
        x0,
        t_values,
        parametrization=parametrization,
        variance=variance,
        decoder_variance=decoder_variance,
        num_bins=num_bins,
        max_batch=max_batch,
        generator=generator,
        with_x0_mse=True,
        noise=noise,
    )
    return _result(schedule, x0, per_t * sizes.double(), t_values=t_values, t_weights=sizes, x0_mse=x0_mse)


SEED_STRIDE = 0x9E3779B9  # round(2^32 / golden ratio), odd: consecutive base seeds' streams are spread over 2^32


def example_seed(seed: int, index: int) -> int:
    """The 32-bit seed of example ``index`` of a split under base seed ``seed``: (index + seed * SEED_STRIDE) mod 2^32.

    torch's CPU generator (mt19937) keeps only the low 32 bits of its seed, so seed and index are folded into 32 bits
    (``seed * 2**32 + index`` would drop the base seed). One-to-one in the index for a given base seed (the stride is
    odd); base seed 0 gives the index itself; the streams of base seeds 0..999 start at least 1.6e6 apart (three-gap
    theorem of the golden-ratio sequence), so no two of them share an example's draws on splits below 10^6 examples.
    """
    index = int(index)
    if not 0 <= index < 2**32:
        raise ValueError(f"example index {index} is outside [0, 2^32): per-example draws index a split's examples")
    return (index + int(seed) * SEED_STRIDE) % 2**32


def example_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator of its own for example ``index`` (< 2^32) of a split (seeded with :func:`example_seed`): the
    noise an example gets depends on the base seed and its index only, not on the batch or process it lands in (the
    same numbers on 1 or N processes)."""
    return torch.Generator().manual_seed(example_seed(seed, index))


def per_example_draws(
    num_timesteps: int, strata: int, *, indices: Tensor, seed: int, shape: tuple[int, ...]
) -> tuple[tuple[Tensor, Tensor], Tensor]:
    """The stratified timesteps and noise of :func:`stratified_elbo` for the examples ``indices`` (B,) of a split,
    each from its own generator (:func:`example_generator`): ((t (B, K), n_k (K,)), noise (B, K, *shape)), on the
    CPU. An example's draw is the same whatever batch or DDP rank it is evaluated in."""
    rows, noises, sizes = [], [], None
    for index in indices.tolist():
        g = example_generator(seed, index)
        t, sizes = stratified_timesteps(num_timesteps, strata, g, num_examples=1)
        rows.append(t[0])
        noises.append(torch.randn((t.shape[1], *shape), generator=g))
    return (torch.stack(rows), sizes), torch.stack(noises)


@dataclass
class MCEstimate:
    """An unbiased one-timestep estimate of -ELBO per example (nats summed over dims).

    ``total`` = prior + L_t / p(t); ``reconstruction`` and ``denoising`` split the L_t / p(t) part by
    whether t = 1, so each is an unbiased estimate of its own term. ``term`` is L_t itself (for the
    importance sampler's history) and ``out`` the network output (for the training loss).
    """

    t: Tensor  # (B,)
    term: Tensor  # (B,) L_t, differentiable
    weight: Tensor  # (B,) 1 / p(t)
    prior: Tensor  # (B,)
    out: Tensor
    num_dims: int

    @property
    def reconstruction(self) -> Tensor:
        return torch.where(self.t == 1, self.term * self.weight, torch.zeros_like(self.term))

    @property
    def denoising(self) -> Tensor:
        return torch.where(self.t >= 2, self.term * self.weight, torch.zeros_like(self.term))

    @property
    def total(self) -> Tensor:
        return self.prior + self.term * self.weight


def mc_elbo(
    model: Denoiser,
    schedule: NoiseSchedule,
    x0: Tensor,
    sampler: TimestepSampler,
    *,
    parametrization: Parametrization | str,
    variance: ReverseVariance | str = ReverseVariance.SMALL,
    decoder_variance: DecoderVariance | str = DecoderVariance.CLIPPED,
    num_bins: int | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> MCEstimate:
    """-ELBO estimated with one t per example drawn from ``sampler`` (uniform or importance-sampled,
    Nichol & Dhariwal 2021 sec. 3.3): E_{t ~ p}[L_t / p(t)] = sum_t L_t, so the estimate is unbiased."""
    t, weight = sampler.sample(x0.shape[0], device=x0.device, generator=generator)
    term, out = term_nats(
        model,
        schedule,
        x0,
        t,
        parametrization=parametrization,
        variance=variance,
        decoder_variance=decoder_variance,
        num_bins=num_bins,
        noise=noise,
        generator=generator,
    )
    return MCEstimate(
        t=t,
        term=term,
        weight=weight.to(term.dtype),
        prior=prior_kl_nats(schedule, x0),
        out=out,
        num_dims=x0[0].numel(),
    )


def standard_error(values: Tensor) -> float:
    """Standard error of the mean of a (N,) sample: std / sqrt(N) (0 for N < 2)."""
    n = values.numel()
    return float(values.double().std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0


def consistency_term_nats(
    model: Denoiser,
    schedule: NoiseSchedule,
    x0: Tensor,
    t: Tensor,
    *,
    parametrization: Parametrization | str,
    variance: ReverseVariance | str = ReverseVariance.SMALL,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One sample of the lecture's consistency term for t in 1..T-1, (B,) nats summed over dims:

        log q(x_t | x_{t-1}) - log p_theta(x_t | x_{t+1}),  x_{t-1} ~ q(. | x_0), x_t ~ q(. | x_{t-1}), x_{t+1} ~ q(. | x_t).

    The lecture writes it as E_{q(x_{t-1}, x_{t+1} | x_0)}[KL(q(x_t | x_{t-1}) || p(x_t | x_{t+1}))]; since
    x_{t+1} is drawn after x_t, the term is an expectation over the joint (x_{t-1}, x_t, x_{t+1}),
    which is what is sampled here. Summed with the reconstruction and the first form's prior term,
    it telescopes to the same -ELBO as :func:`term_nats`, in expectation.
    """
    prev_t = t - 1
    x_prev = torch.where(
        (prev_t == 0).view(-1, *([1] * (x0.ndim - 1))),
        x0,
        q_sample(schedule, x0, t=prev_t.clamp(min=1), generator=generator),
    )
    x_t = q_step_sample(schedule, x_prev, t=t, generator=generator)
    x_next = q_step_sample(schedule, x_t, t=t + 1, generator=generator)
    log_beta = schedule.broadcast(torch.log(schedule.betas[t]), x0)
    log_q = gaussian_log_prob(x_t, schedule.gather("sqrt_alphas", t, x0) * x_prev, log_beta.expand_as(x0))
    step = p_mean_variance(
        schedule, model(x_next, t + 1), x_t=x_next, t=t + 1, parametrization=parametrization, variance=variance
    )
    log_p = gaussian_log_prob(x_t, step.mean, step.logvar.expand_as(x0))
    return sum_flat(log_q - log_p)


def consistency_prior_nats(schedule: NoiseSchedule, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One sample of the first form's prior term E_{q(x_{T-1} | x_0)}[KL(q(x_T | x_{T-1}) || N(0, I))], (B,) nats."""
    T = schedule.T
    if T == 1:
        return prior_kl_nats(schedule, x0)
    t_prev = torch.full((x0.shape[0],), T - 1, dtype=torch.long, device=x0.device)
    x_prev = q_sample(schedule, x0, t=t_prev, generator=generator)
    t_last = t_prev + 1
    log_beta = schedule.broadcast(torch.log(schedule.betas[t_last]), x0)
    zero = torch.zeros((), dtype=x0.dtype, device=x0.device)
    return sum_flat(normal_kl(schedule.gather("sqrt_alphas", t_last, x0) * x_prev, log_beta.expand_as(x0), zero, zero))


@torch.no_grad()
def consistency_mc_elbo(
    model: Denoiser,
    schedule: NoiseSchedule,
    x0: Tensor,
    *,
    parametrization: Parametrization | str,
    variance: ReverseVariance | str = ReverseVariance.SMALL,
    decoder_variance: DecoderVariance | str = DecoderVariance.CLIPPED,
    num_bins: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """-ELBO per example from the lecture's first form, with one term sampled uniformly, (B,) nats:

    k ~ U{1..T}: k = 1 the reconstruction term, k >= 2 the consistency term at t = k - 1; scaled by T,
    plus one sample of the first form's prior term. Same expectation as :func:`mc_elbo` with uniform t.
    """
    batch, T = x0.shape[0], schedule.T
    k = torch.randint(1, T + 1, (batch,), device=x0.device, generator=generator)
    recon, _ = term_nats(
        model,
        schedule,
        x0,
        torch.ones_like(k),
        parametrization=parametrization,
        variance=variance,
        decoder_variance=decoder_variance,
        num_bins=num_bins,
        generator=generator,
    )
    if T > 1:
        consistency = consistency_term_nats(
            model,
            schedule,
            x0,
            (k - 1).clamp(min=1, max=T - 1),
            parametrization=parametrization,
            variance=variance,
            generator=generator,
        )
        term = torch.where(k == 1, recon, consistency)
    else:
        term = recon
    return consistency_prior_nats(schedule, x0, generator) + T * term
