"""Samplers for any denoiser model(x_t, t): ancestral DDPM and DDIM, as functions and as the objects the ``sampler``
config group builds (:class:`Sampler`, the extension point for a sampler of one's own).

All run under ``torch.no_grad``, draw all randomness from the given generator, and report progress
through ``progress(step, num_steps)``. ``shape`` is (N, *D) of the samples to draw.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from diffusion_elbo.core.chain import NoiseSchedule
from diffusion_elbo.core.elbo import Denoiser
from diffusion_elbo.core.parametrization import Parametrization, predict_eps, predict_x0
from diffusion_elbo.core.reverse import (
    ReverseVariance,
    VarianceSpec,
    denoiser_for,
    mean_denoiser,
    p_mean_variance,
)

Progress = Callable[[int, int], None]


class Spacing(str, Enum):
    """Which timesteps a sampler with fewer steps than T visits: evenly spaced in t (DDIM sec. 4.2, Nichol &
    Dhariwal's respacing) or evenly spaced in log-SNR (DPM-Solver's ``skip_type='logSNR'``, Lu et al. 2022); the latter
    does not follow a learned schedule into the low-noise end, where it spends most of t."""

    TIME = "time"
    LOGSNR = "logsnr"


def _randn(shape: Sequence[int], generator: torch.Generator | None, device, dtype) -> Tensor:
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)


@torch.no_grad()
def ancestral_sample(
    model: Denoiser,
    schedule: NoiseSchedule,
    shape: Sequence[int],
    *,
    parametrization: Parametrization | str,
    variance: VarianceSpec = ReverseVariance.SMALL,
    clip_denoised: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    x_T: Tensor | None = None,
    steps: int | None = None,
    spacing: Spacing | str = Spacing.TIME,
    progress: Progress | None = None,
    final_noise_std: float | None = None,
) -> Tensor:
    """Ancestral sampling x_T ~ N(0, I), x_{t-1} ~ p_theta(x_{t-1} | x_t) for t = T..1 (Ho et al. 2020, Alg. 2).

    The last step returns the decoder mean mu_theta(x_1, 1) = x0_hat without noise, as in Ho et al.
    With ``steps`` < T the chain runs on a respaced subsequence of timesteps, whose betas are
    1 - alpha_bar_{tau_i} / alpha_bar_{tau_{i-1}} (Nichol & Dhariwal 2021, sec. 4), chosen by ``spacing``.

    ``final_noise_std`` caps the std of the noise added by the step that produces x_1: the last step returns the
    mean, so that noise stays in the sample (see :func:`final_noise_cap`).
    """
    x = _randn(shape, generator, device, dtype) if x_T is None else x_T.to(device, dtype)
    full = schedule
    schedule, model_t = respace(schedule, steps or schedule.T, spacing)
    if isinstance(variance, torch.Tensor) and schedule is not full:  # a table for the full chain: re-weight it
        from diffusion_elbo.core.analytic import respaced_variance_table

        variance = respaced_variance_table(full, variance, schedule, model_t)
    model_t = model_t.to(x.device)
    T = schedule.T
    for i, step_t in enumerate(range(T, 0, -1)):
        t = torch.full((x.shape[0],), step_t, dtype=torch.long, device=x.device)
        out = model(x, model_t[t])
        step = p_mean_variance(
            schedule, out, x_t=x, t=t, parametrization=parametrization, variance=variance, clip_denoised=clip_denoised
        )
        if step_t > 1:
            std = torch.exp(0.5 * step.logvar)
            if step_t == 2 and final_noise_std is not None:
                std = std.clamp(max=final_noise_std)
            x = step.mean + std * _randn(x.shape, generator, x.device, x.dtype)
        else:
            x = step.mean
        if progress is not None:
            progress(i + 1, T)
    return x


def respace(schedule: NoiseSchedule, steps: int, spacing: Spacing | str = Spacing.TIME) -> tuple[NoiseSchedule, Tensor]:
    """A schedule over ``steps`` of the original timesteps (:func:`spaced_timesteps`), and the map from its t
    (0..steps) to the original t the model was trained on, (steps + 1,) long. With steps = T it is the schedule
    itself."""
    if steps == schedule.T:
        return schedule, torch.arange(schedule.T + 1)
    kept = torch.tensor(sorted(spaced_timesteps(schedule, steps, spacing)))  # ascending original timesteps
    alpha_bar = schedule.alpha_bar.cpu()[kept]  # (steps, *D)
    alpha_bar_prev = torch.cat([torch.ones_like(alpha_bar[:1]), alpha_bar[:-1]])
    sub = NoiseSchedule(1.0 - alpha_bar / alpha_bar_prev, name=f"{schedule.name}-respaced{steps}")
    return sub.to(schedule.betas.device), torch.cat([torch.zeros(1, dtype=torch.long), kept])


def respaced_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """``steps`` timesteps evenly spaced in 1..T, descending, always including T (DDIM sec. 4.2)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"sampler.steps must be in 1..T={num_timesteps}; got {steps}")
    if steps == 1:  # linspace(1, T, 1) is [1]: the one step must start from the noise, at T
        return [num_timesteps]
    grid = torch.linspace(1, num_timesteps, steps, dtype=torch.float64).round().long()
    return sorted(set(grid.tolist()), reverse=True)


def spaced_timesteps(schedule: NoiseSchedule, steps: int, spacing: Spacing | str = Spacing.TIME) -> list[int]:
    """``steps`` distinct timesteps of 1..T, descending, always including T (and 1 where steps > 1).

    ``time``: evenly spaced in t (:func:`respaced_timesteps`). ``logsnr``: the timesteps nearest to ``steps`` values
    evenly spaced between log SNR(1) and log SNR(T) (averaged over the dimensions of a multivariate schedule); where
    the schedule moves faster than the grid (several values nearest one timestep) the neighbouring timesteps are taken
    instead, so there are always ``steps`` of them."""
    try:
        spacing = Spacing(spacing)
    except ValueError:
        raise ValueError(f"sampler.spacing={spacing!r} is not an option; choose time or logsnr") from None
    if spacing is Spacing.TIME:
        return respaced_timesteps(schedule.T, steps)
    T = schedule.T
    if not 1 <= steps <= T:
        raise ValueError(f"sampler.steps must be in 1..T={T}; got {steps}")
    log_snr = schedule.mean_log_snr().cpu()  # (T,), decreasing in t
    if steps == 1:
        return [T]
    targets = torch.linspace(float(log_snr[0]), float(log_snr[-1]), steps, dtype=torch.float64)
    nearest = (log_snr[None, :] - targets[:, None]).abs().argmin(dim=1) + 1  # (steps,) ascending in t
    chosen = nearest.tolist()
    for i in range(1, steps):  # distinct, ascending: push collisions up ...
        chosen[i] = max(chosen[i], chosen[i - 1] + 1)
    chosen[-1] = T
    for i in range(steps - 2, -1, -1):  # ... and back below T
        chosen[i] = min(chosen[i], chosen[i + 1] - 1)
    return sorted(chosen, reverse=True)


@torch.no_grad()
def ddim_sample(
    model: Denoiser,
    schedule: NoiseSchedule,
    shape: Sequence[int],
    *,
    parametrization: Parametrization | str,
    steps: int = 50,
    eta: float = 0.0,
    spacing: Spacing | str = Spacing.TIME,
    clip_denoised: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    x_T: Tensor | None = None,
    progress: Progress | None = None,
    x0_error: Tensor | None = None,
    final_noise_std: float | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12) on ``steps`` timesteps chosen by ``spacing``; eta = 0 is deterministic, eta = 1
    matches the ancestral sampler's variance on the respaced grid.

    x_{s} = sqrt(alpha_bar_s) x0_hat + sqrt(1 - alpha_bar_s - lambda^2) eps_hat + sigma z, with
    lambda = eta sqrt((1 - alpha_bar_s) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_s), s the next
    (smaller) timestep or 0 (alpha_bar_0 = 1, which returns x0_hat), and sigma = lambda.

    ``x0_error`` (T + 1,): e_t = E||x0 - x0_hat(x_t, t)||^2 / D of the analytic variance (:mod:`core.analytic`).
    With it sigma^2 is the KL-optimal lambda^2 + c^2 e_t, c = sqrt(alpha_bar_s) - sqrt(1 - alpha_bar_s - lambda^2)
    sqrt(alpha_bar_t / (1 - alpha_bar_t)) the mean's coefficient on x0_hat (Bao et al. 2022, Analytic-DDIM).
    ``final_noise_std`` caps sigma at the step that produces the last x_t before x0_hat is returned.
    """
    p = Parametrization(parametrization)
    x = _randn(shape, generator, device, dtype) if x_T is None else x_T.to(device, dtype)
    ts = spaced_timesteps(schedule, steps, spacing)
    for i, step_t in enumerate(ts):
        next_t = ts[i + 1] if i + 1 < len(ts) else 0
        t = torch.full((x.shape[0],), step_t, dtype=torch.long, device=x.device)
        out = model(x, t)
        x0_hat = predict_x0(p, schedule, x_t=x, t=t, out=out)
        if clip_denoised:
            x0_hat = x0_hat.clamp(-1.0, 1.0)
            eps_hat = predict_eps(Parametrization.X0, schedule, x_t=x, t=t, out=x0_hat)
        else:
            eps_hat = predict_eps(p, schedule, x_t=x, t=t, out=out)
        # float64 coefficients, () or (*D) for a multivariate schedule, cast once where they meet x
        ab_t, ab_s = schedule.alpha_bar[step_t], schedule.alpha_bar[next_t]
        lam2 = eta**2 * (1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)
        direction = (1 - ab_s - lam2).clamp(min=0.0).sqrt()
        x = ab_s.sqrt().to(x.dtype) * x0_hat + direction.to(x.dtype) * eps_hat
        sigma = lam2.sqrt()
        if x0_error is not None:
            c = ab_s.sqrt() - direction * (ab_t / (1 - ab_t)).sqrt()
            sigma = (lam2 + c**2 * x0_error[step_t].to(c)).sqrt()
        if final_noise_std is not None and i == len(ts) - 2:
            sigma = sigma.clamp(max=final_noise_std)
        if next_t > 0 and bool((sigma > 0).any()):
            x = x + sigma.to(x.dtype) * _randn(x.shape, generator, x.device, x.dtype)
        if progress is not None:
            progress(i + 1, len(ts))
    return x


def final_noise_cap(num_bins: int | None) -> float | None:
    """The largest std of the noise added by the step that produces x_1, for K-level data in [-1, 1]: E|sigma z| =
    sigma sqrt(2 / pi) at most half a quantization bin, 1 / (K - 1). The last step returns the decoder mean, which
    removes only the noise level the model expects at t = 1 (sqrt(beta_1), 0.01 for the linear schedule), so with
    few steps the ``large`` or ``analytic`` variance would leave noise of several grey levels in the samples.
    Bao et al. (2022) clip this step's noise the same way for their few-step samples. None for continuous data."""
    if num_bins is None:
        return None
    return (1.0 / (num_bins - 1)) / math.sqrt(2.0 / math.pi)


# ---- the sampler objects of the ``sampler`` config group ---------------------------------------------------------------


@dataclass(frozen=True)
class Chain:
    """What a sampler walks: a trained network on a T-step chain, as a LightningModule or a closed-form oracle gives it.

    ``denoise(x_t, t)`` is the network's raw output at chain steps t (B,) in 1..T, read through ``parametrization``;
    under ``network_variance=learned_range`` it holds the mean's channels, then v's (dim 1). ``variance`` is the reverse
    variance to sample with: a :class:`ReverseVariance` name or a (T + 1,) table of sigma_t^2 (the analytic one).
    ``clip_denoised`` clamps x0_hat to [-1, 1]; ``num_bins`` is K for K-level data (None: continuous data)."""

    denoise: Denoiser
    schedule: NoiseSchedule
    parametrization: Parametrization
    network_variance: ReverseVariance = ReverseVariance.SMALL
    variance: VarianceSpec = ReverseVariance.SMALL
    clip_denoised: bool = False
    num_bins: int | None = None

    def mean_model(self) -> Denoiser:
        """The network restricted to its mean output (all of it unless it learned a variance)."""
        return mean_denoiser(self.denoise, self.network_variance)

    def x0_hat(self, x_t: Tensor, t: Tensor) -> Tensor:
        """x0_hat(x_t, t) (B, *D) in data units, clamped to [-1, 1] where ``clip_denoised``."""
        x0 = predict_x0(self.parametrization, self.schedule, x_t=x_t, t=t, out=self.mean_model()(x_t, t))
        return x0.clamp(-1.0, 1.0) if self.clip_denoised else x0


class Sampler(ABC):
    """Draws samples from a :class:`Chain`: the interface a sampler of one's own implements (``docs/extending.md``).

    The constructor takes the sampler's config keys and checks them: a ``ValueError`` whose message starts with the
    argument and its value (``steps=0 must be ...``; the config check puts the node's key in front) and says what
    works; :meth:`sample` returns (N, *D) samples in data units. ``steps`` (None: all T) and ``spacing`` choose the
    timesteps visited (:func:`spaced_timesteps`); ``cap_final_noise`` caps, on K-level data, the noise of the step that
    produces x_1 (:func:`final_noise_cap`). ``name`` labels samples and records (``ddim-50``)."""

    name = "sampler"

    def __init__(
        self, steps: int | None = None, spacing: Spacing | str = Spacing.TIME, cap_final_noise: bool = False
    ) -> None:
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"steps={steps!r} must be an integer >= 1 (or null: all T steps of the chain)")
        try:
            self.spacing = Spacing(spacing)
        except ValueError:
            raise ValueError(
                f"spacing={spacing!r} is not an option; choose {' | '.join(s.value for s in Spacing)}"
            ) from None
        self.steps = steps
        self.cap_final_noise = bool(cap_final_noise)

    def num_steps(self, chain: Chain) -> int:
        """The network calls per sample: ``steps``, or the chain's T."""
        return self.steps or chain.schedule.T

    def final_noise_std(self, chain: Chain) -> float | None:
        return final_noise_cap(chain.num_bins) if self.cap_final_noise else None

    @property
    def label(self) -> str:
        """``ddim-50``, ``ddpm-T``, ``ddim-50-logsnr``: the sampler as records and titles name it."""
        return f"{self.name}-{self.steps or 'T'}" + ("" if self.spacing is Spacing.TIME else f"-{self.spacing.value}")

    @abstractmethod
    def sample(
        self,
        chain: Chain,
        shape: Sequence[int],
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        x_T: Tensor | None = None,
        progress: Progress | None = None,
    ) -> Tensor:
        """(N, *D) samples of ``shape`` from ``chain``, all randomness from ``generator``; ``x_T`` fixes the start."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.label})"


class AncestralSampler(Sampler):
    """Ancestral sampling with the chain's reverse variance (Ho et al. 2020, Alg. 2; respaced to ``steps`` as Nichol &
    Dhariwal 2021, sec. 4): :func:`ancestral_sample`."""

    name = "ddpm"

    def sample(self, chain, shape, *, generator=None, device="cpu", x_T=None, progress=None) -> Tensor:
        model = denoiser_for(chain.denoise, chain.network_variance, chain.variance)
        return ancestral_sample(
            model,
            chain.schedule,
            shape,
            parametrization=chain.parametrization,
            variance=chain.variance,
            clip_denoised=chain.clip_denoised,
            generator=generator,
            device=device,
            x_T=x_T,
            steps=self.steps,
            spacing=self.spacing,
            progress=progress,
            final_noise_std=self.final_noise_std(chain),
        )


class DDIMSampler(Sampler):
    """DDIM (Song et al. 2021) on ``steps`` timesteps (default 50), noise ``eta`` (0: deterministic); with an analytic
    variance table, Analytic-DDIM's KL-optimal noise (Bao et al. 2022): :func:`ddim_sample`."""

    name = "ddim"

    def __init__(
        self,
        steps: int | None = 50,
        eta: float = 0.0,
        spacing: Spacing | str = Spacing.TIME,
        cap_final_noise: bool = False,
    ) -> None:
        super().__init__(steps=steps, spacing=spacing, cap_final_noise=cap_final_noise)
        if isinstance(eta, bool) or not isinstance(eta, int | float) or eta < 0:
            raise ValueError(f"eta={eta!r} must be a number >= 0 (0: deterministic DDIM, 1: DDPM's noise)")
        self.eta = float(eta)

    def sample(self, chain, shape, *, generator=None, device="cpu", x_T=None, progress=None) -> Tensor:
        from diffusion_elbo.core.analytic import x0_error_from_variance

        table = chain.variance if isinstance(chain.variance, Tensor) else None
        return ddim_sample(
            chain.mean_model(),
            chain.schedule,
            shape,
            parametrization=chain.parametrization,
            steps=self.num_steps(chain),
            eta=self.eta,
            spacing=self.spacing,
            clip_denoised=chain.clip_denoised,
            generator=generator,
            device=device,
            x_T=x_T,
            progress=progress,
            x0_error=None if table is None else x0_error_from_variance(chain.schedule, table),
            final_noise_std=self.final_noise_std(chain),
        )
