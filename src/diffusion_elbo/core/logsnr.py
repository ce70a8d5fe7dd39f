"""Noise schedules in log-SNR form on continuous time t in [0, 1] (Kingma et al. 2021, "Variational Diffusion
Models", VDM).

gamma(t) = -log SNR(t) increases from gamma_min at t = 0 (least noise) to gamma_max at t = 1:
    alpha_t^2 = sigmoid(-gamma(t)),  sigma_t^2 = sigmoid(gamma(t)),  z_t = alpha_t x + sigma_t eps  (VDM eq. 1-3).
The continuous-time bound needs gamma'(t) (VDM eq. 17), so every schedule returns gamma and its derivative, in closed
form. Shapes: ``t`` (B,) float in [0, 1]; everything returned is shaped like ``t`` and in its dtype.

One time axis: every schedule of the package is a log-SNR function on [0, 1], the beta-defined ones of
:mod:`core.schedules` included (:class:`~diffusion_elbo.core.schedules.BetaSchedule`, whose values at t_i = i / T are
their tables). A T-step chain is the schedule's view at the grid t_i = i / T (:meth:`LogSNRSchedule.discretize`): its
latents are the grid points at or after :attr:`LogSNRSchedule.t_min`, the first time where the SNR is finite, and the
data x_0 comes before them. A VDM schedule (gamma(0) = gamma_min finite, t_min = 0) gives T + 1 latents, z_0 .. z_1, so
the lecture's x_1 is VDM's z_0 and its decoder p(x_0 | x_1) is VDM's p(x | z_0); a beta schedule of T steps (gamma(0) =
-inf: t = 0 is the data, t_min = 1 / T) gives back its own T-step chain. The exact T-step evaluator of :mod:`core.elbo`
applies to both unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_elbo.core.chain import InvalidScheduleError, NoiseSchedule


class LogSNRShape(str, Enum):
    LINEAR = "linear"  # gamma linear in t (VDM's fixed baseline)
    COSINE = "cosine"  # alpha_bar = cos^2 of an affine map of t (Nichol & Dhariwal 2021) with the given endpoints
    LEARNED = "learned"  # VDM's monotone network with learned endpoints (Kingma et al. 2021, App. H)
    MULTIVARIATE = "multivariate"  # a learned monotone gamma per data dimension (Sahoo et al. 2024, MuLAN)
    BETAS = "betas"  # a beta schedule's tables, interpolated between its steps (core.schedules.BetaSchedule)


@dataclass
class LogSNR:
    """gamma(t) and gamma'(t) at a batch of times, (B,) each ((B, *D) for a multivariate schedule, one per data
    dimension). ``shape`` and ``shape_slope`` are the learned
    schedule's normalized shape in [0, 1] and its derivative (None for fixed schedules): the tensors through which
    the shape's parameters get their gradient, so a variance-minimizing gradient can be routed to them alone."""

    gamma: Tensor
    slope: Tensor
    shape: Tensor | None = None
    shape_slope: Tensor | None = None


def alpha_sigma(gamma: Tensor) -> tuple[Tensor, Tensor]:
    """(alpha, sigma) = (sqrt(sigmoid(-gamma)), sqrt(sigmoid(gamma))), the scales of x and eps in z (VDM eq. 3)."""
    return torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()


class LogSNRSchedule(nn.Module):
    """gamma(t) on [0, 1] with gamma'(t): the one schedule abstraction of the package. ``reference`` = (gamma_lo,
    gamma_hi), the fixed range the network's noise-level input is normalized with (the learned endpoints move; the
    input scale must not).

    :attr:`t_min` is the time of the first latent, where the decoder p(x | z_{t_min}) sits: 0 where gamma(0) is finite
    (VDM), 1 / T for a beta schedule of T steps, whose t = 0 is the data itself (gamma(0) = -inf)."""

    shape_name: LogSNRShape
    t_min: float = 0.0
    # one gamma per data dimension: forward gives (B, *D), endpoints (1, *D) (MultivariateLearnedLogSNR)
    multivariate: bool = False

    def __init__(self, reference: tuple[float, float], name: str) -> None:
        super().__init__()
        self.reference = (float(reference[0]), float(reference[1]))
        self.name = name

    def forward(self, t: Tensor) -> LogSNR:
        raise NotImplementedError

    @property
    def learned(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    def endpoints(self, like: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(gamma(0), gamma(1)) as 0-dim tensors (with gradient for a learned schedule); (1, *D) each for a
        multivariate schedule."""
        if like is None:  # the schedule's own device: a learned schedule's parameters live on the GPU with the model
            held = next(iter([*self.parameters(), *self.buffers()]), None)
            like = torch.empty(0, device=held.device if held is not None else "cpu")
        t = torch.tensor([0.0, 1.0], dtype=like.dtype, device=like.device)
        gamma = self(t).gamma
        if gamma.ndim > 1:  # one per dimension: kept with a leading 1, the per-dimension layout of core.vdm
            return gamma[:1], gamma[1:]
        return gamma[0], gamma[1]

    @torch.no_grad()
    def discretize(self, timesteps: int) -> NoiseSchedule:
        """The T-step view of the schedule: the grid t_i = i / T, i = 0..T; its points at or after :attr:`t_min` are the
        chain's latents in order (steps j = 1, 2, ...) and the data comes first (alpha_bar_0 = 1). A VDM schedule
        (t_min = 0) gives T + 1 steps with step j = i + 1 holding z_{i / T}; a beta schedule of T steps (t_min = 1 / T)
        gives T steps with step j = i, its own tables. alpha_bar_j = sigmoid(-gamma(t_i)),
        beta_j = 1 - alpha_bar_j / alpha_bar_{j - 1}; float64 throughout: the betas are formed as -expm1 of differences
        of log alpha_bar, exact where consecutive alpha_bar nearly agree."""
        if not isinstance(timesteps, int) or isinstance(timesteps, bool) or timesteps < 1:
            raise InvalidScheduleError(f"a log-SNR schedule discretizes to T >= 1 steps; got {timesteps!r}")
        device = next((b.device for b in self.buffers()), None) or next((p.device for p in self.parameters()), "cpu")
        t = torch.arange(timesteps + 1, dtype=torch.float64, device=device) / timesteps
        t = t[t >= self.t_min * (1 - 1e-12)]  # the latents: grid points where the SNR is finite
        if t.numel() < 1:
            raise InvalidScheduleError(f"schedule '{self.name}' has no latent on the grid of T={timesteps} steps")
        gamma = float64_gamma(self, t)
        if not bool(torch.isfinite(gamma).all()) or not bool((gamma[1:] > gamma[:-1]).all()):
            raise InvalidScheduleError(
                f"schedule '{self.name}' is not finite and increasing in gamma = -log SNR at T={timesteps}: "
                f"gamma(t_min)={float(gamma[0].min()):.4g}, gamma(1)={float(gamma[-1].max()):.4g}; "
                "set schedule.gamma_min < gamma_max"
            )
        log_alpha_bar = torch.cat([torch.zeros_like(gamma[:1]), F.logsigmoid(-gamma)])
        betas = -torch.expm1(log_alpha_bar[1:] - log_alpha_bar[:-1])  # (number of latents,) or (.., *D) multivariate
        return NoiseSchedule(betas.cpu(), name=f"{self.name}@{timesteps}").to(device)

    def window(self) -> LogSNRSchedule:
        """The schedule on its latents' times [t_min, 1], mapped onto [0, 1] (the continuous-time bound draws t there
        and puts its decoder at 0): the schedule itself where t_min = 0."""
        return self if self.t_min == 0.0 else TimeWindow(self)

    def extra_repr(self) -> str:
        return f"name={self.name}, reference={self.reference}"


def float64_gamma(schedule: LogSNRSchedule, t: Tensor) -> Tensor:
    """gamma(t) in float64 with the schedule's parameters cast to float64 (not in place), without gradient: for
    tables, where float32 parameters would round gamma to ~1e-6."""
    params = {name: p.detach().double() for name, p in schedule.named_parameters()}
    buffers = {name: b.double() if b.is_floating_point() else b for name, b in schedule.named_buffers()}
    return torch.func.functional_call(schedule, {**params, **buffers}, (t.double(),)).gamma


class TimeWindow(LogSNRSchedule):
    """``base`` on [t_min, 1] mapped affinely onto u in [0, 1]: gamma(u) = gamma_base(t_min + (1 - t_min) u), slope
    scaled by (1 - t_min). Its chain (:meth:`discretize`) is the base's, on the base's own grid."""

    def __init__(self, base: LogSNRSchedule) -> None:
        if not 0.0 < base.t_min < 1.0:
            raise InvalidScheduleError(
                f"schedule '{base.name}' has no time window: t_min={base.t_min} must be in (0, 1)"
            )
        super().__init__(base.reference, name=base.name)
        self.base = base
        self.shape_name = base.shape_name
        self.multivariate = base.multivariate
        self.span = 1.0 - base.t_min

    def forward(self, t: Tensor) -> LogSNR:
        out = self.base(self.base.t_min + self.span * t)
        return LogSNR(gamma=out.gamma, slope=out.slope * self.span, shape=out.shape, shape_slope=out.shape_slope)

    def discretize(self, timesteps: int) -> NoiseSchedule:
        return self.base.discretize(timesteps)


class LinearLogSNR(LogSNRSchedule):
    """gamma(t) = gamma_min + (gamma_max - gamma_min) t; gamma' is constant (VDM's fixed baseline schedule)."""

    shape_name = LogSNRShape.LINEAR

    def __init__(self, gamma_min: float = -13.3, gamma_max: float = 5.0) -> None:
        super().__init__((gamma_min, gamma_max), name="logsnr_linear")
        _check_endpoints(gamma_min, gamma_max)
        self.register_buffer("gamma_range", torch.tensor([gamma_min, gamma_max], dtype=torch.float64), persistent=False)

    def forward(self, t: Tensor) -> LogSNR:
        lo, hi = self.gamma_range.to(t.dtype)
        return LogSNR(gamma=lo + (hi - lo) * t, slope=(hi - lo).expand_as(t))


class CosineLogSNR(LogSNRSchedule):
    """gamma(t) = 2 log tan(a + b t): the cosine schedule alpha_bar = cos^2(pi u / 2) (Nichol & Dhariwal 2021, whose
    log-SNR is 2 log tan(pi u / 2)) with u an affine map of t chosen so that gamma(0) = gamma_min and
    gamma(1) = gamma_max: a = atan(exp(gamma_min / 2)), a + b = atan(exp(gamma_max / 2)).
    gamma'(t) = 2 b / (sin(a + b t) cos(a + b t)) = 4 b / sin(2 (a + b t))."""

    shape_name = LogSNRShape.COSINE

    def __init__(self, gamma_min: float = -13.3, gamma_max: float = 5.0) -> None:
        super().__init__((gamma_min, gamma_max), name="logsnr_cosine")
        _check_endpoints(gamma_min, gamma_max)
        a = math.atan(math.exp(gamma_min / 2))
        b = math.atan(math.exp(gamma_max / 2)) - a
        self.register_buffer("ab", torch.tensor([a, b], dtype=torch.float64), persistent=False)

    def forward(self, t: Tensor) -> LogSNR:
        a, b = self.ab.to(t.dtype)
        angle = a + b * t
        return LogSNR(gamma=2 * torch.log(torch.tan(angle)), slope=4 * b / torch.sin(2 * angle))


class LearnedLogSNR(LogSNRSchedule):
    """VDM's learned schedule (Kingma et al. 2021, App. H): gamma(t) = gamma_min + (gamma_max - gamma_min) s(t) with
    learnable endpoints and a learnable monotone shape s(t) = (h(t) - h(0)) / (h(1) - h(0)) in [0, 1], where

        h(t) = w1 t + (1 / H) sum_j w3_j sigmoid(w2_j (2 t - 1) + b2_j),   w1, w2, w3 > 0 (softplus of parameters),

    a linear term plus H = ``hidden`` increasing sigmoids, so h (and gamma) increases strictly in t.
    h'(t) = w1 + (2 / H) sum_j w3_j w2_j sigmoid'(.) in closed form. The shape starts close to linear."""

    shape_name = LogSNRShape.LEARNED

    def __init__(self, gamma_min: float = -13.3, gamma_max: float = 5.0, hidden: int = 1024, seed: int = 0) -> None:
        super().__init__((gamma_min, gamma_max), name="learned")
        _check_endpoints(gamma_min, gamma_max)
        if hidden < 1:
            raise InvalidScheduleError(f"schedule.hidden must be >= 1; got {hidden}")
        generator = torch.Generator().manual_seed(seed)
        self.gamma_min = nn.Parameter(torch.tensor(float(gamma_min)))
        self.gamma_max = nn.Parameter(torch.tensor(float(gamma_max)))
        self.w1 = nn.Parameter(torch.tensor(math.log(math.e - 1.0)))  # softplus -> 1
        self.w2 = nn.Parameter(torch.randn(hidden, generator=generator))
        self.b2 = nn.Parameter(torch.randn(hidden, generator=generator))
        # the sigmoids start with weight softplus(-4) = 0.018 against w1 = 1: a nearly linear shape
        self.w3 = nn.Parameter(torch.full((hidden,), -4.0))

    def _h(self, t: Tensor) -> tuple[Tensor, Tensor]:
        w1, w2, w3 = F.softplus(self.w1), F.softplus(self.w2), F.softplus(self.w3)  # () (H,) (H,)
        u = w2 * (2 * t[:, None] - 1) + self.b2  # (B, H)
        sig = torch.sigmoid(u)
        h = w1 * t + (sig * w3).mean(dim=1)  # (B,)
        dh = w1 + 2 * (sig * (1 - sig) * w2 * w3).mean(dim=1)
        return h, dh

    def forward(self, t: Tensor) -> LogSNR:
        t = t.to(self.w1.dtype)
        h, dh = self._h(torch.cat([t, t.new_tensor([0.0, 1.0])]))
        h0, h1 = h[-2], h[-1]
        shape, shape_slope = (h[:-2] - h0) / (h1 - h0), dh[:-2] / (h1 - h0)
        span = self.gamma_max - self.gamma_min
        return LogSNR(
            gamma=self.gamma_min + span * shape, slope=span * shape_slope, shape=shape, shape_slope=shape_slope
        )


class MultivariateLearnedLogSNR(LogSNRSchedule):
    """A learned log-SNR per data dimension (Sahoo et al. 2024, "Diffusion Models With Learned Adaptive Noise", MuLAN,
    without its input-conditioned part): gamma_i(t) = gamma_min,i + (gamma_max,i - gamma_min,i) s_i(t) for each
    dimension i of the data's ``event_shape`` D, with learned endpoints and a learned monotone shape per dimension,

        s_i(t) = (h_i(t) - h_i(0)) / (h_i(1) - h_i(0)),  h_i(t) = w1_i t + (1 / H) sum_j w3_ij sigmoid(w2_ij (2 t - 1) + b2_ij),

    VDM's monotone network (:class:`LearnedLogSNR`, App. H) with H = ``hidden`` sigmoids for every dimension. gamma
    and gamma'(t) are (B, *D), the endpoints (1, *D).

    Why it is a lever: with one gamma for all dimensions the continuous-time bound depends on the schedule only through
    its endpoints (VDM eq. 20), so a learned shape can lower only the estimator's variance. With one gamma per
    dimension the bound itself depends on the shapes (each dimension is noised at its own pace, and the network
    denoises each from all the others), so the shapes train on the bound's gradient, as MuLAN's do.

    The network's noise-level input is the mean of gamma over the dimensions, (B,): the shapes are a fixed function of t,
    so the mean (which increases strictly in t) tells the network every dimension's noise level."""

    shape_name = LogSNRShape.MULTIVARIATE
    multivariate = True

    def __init__(
        self,
        event_shape: list[int] | tuple[int, ...],
        gamma_min: float = -13.3,
        gamma_max: float = 5.0,
        hidden: int = 16,
        seed: int = 0,
    ) -> None:
        super().__init__((gamma_min, gamma_max), name="learned_multivariate")
        _check_endpoints(gamma_min, gamma_max)
        shape = tuple(int(n) for n in event_shape)
        if not shape or any(n < 1 for n in shape):
            raise InvalidScheduleError(
                f"schedule.event_shape must list the data's dimensions (e.g. [1, 8, 8] for digits); got {event_shape}"
            )
        if hidden < 1:
            raise InvalidScheduleError(f"schedule.hidden must be >= 1; got {hidden}")
        self.event_shape = shape
        generator = torch.Generator().manual_seed(seed)
        self.gamma_min = nn.Parameter(torch.full(shape, float(gamma_min)))
        self.gamma_max = nn.Parameter(torch.full(shape, float(gamma_max)))
        self.w1 = nn.Parameter(torch.full(shape, math.log(math.e - 1.0)))  # softplus -> 1
        self.w2 = nn.Parameter(torch.randn((*shape, hidden), generator=generator))
        self.b2 = nn.Parameter(torch.randn((*shape, hidden), generator=generator))
        # as VDM's: the sigmoids start at weight softplus(-4) = 0.018 against w1 = 1, every shape nearly linear
        self.w3 = nn.Parameter(torch.full((*shape, hidden), -4.0))

    def _h(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """h(t) and h'(t), (N, *D), at t (N,)."""
        w1, w2, w3 = F.softplus(self.w1), F.softplus(self.w2), F.softplus(self.w3)  # (*D) (*D, H) (*D, H)
        tt = t.view(-1, *([1] * (w2.ndim - 1)))  # (N, 1, ..., 1) against (*D) and, with one more 1, (*D, H)
        sig = torch.sigmoid(w2 * (2 * tt[..., None] - 1) + self.b2)  # (N, *D, H)
        h = w1 * tt + (sig * w3).mean(dim=-1)
        dh = w1 + 2 * (sig * (1 - sig) * w2 * w3).mean(dim=-1)
        return h, dh

    def forward(self, t: Tensor) -> LogSNR:
        t = t.to(self.w1.dtype)
        h, dh = self._h(torch.cat([t, t.new_tensor([0.0, 1.0])]))
        h0, h1 = h[-2], h[-1]  # (*D)
        span = self.gamma_max - self.gamma_min
        shape = (h[:-2] - h0) / (h1 - h0)
        # no ``shape`` field: the bound depends on the shapes, which train on its gradient, not on its variance's
        return LogSNR(gamma=self.gamma_min + span * shape, slope=span * dh[:-2] / (h1 - h0))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, event_shape={self.event_shape}"


def _check_endpoints(gamma_min: float, gamma_max: float) -> None:
    if not (math.isfinite(gamma_min) and math.isfinite(gamma_max)) or gamma_min >= gamma_max:
        raise InvalidScheduleError(
            f"a log-SNR schedule needs finite schedule.gamma_min < schedule.gamma_max (gamma = -log SNR rises with the "
            f"noise); got gamma_min={gamma_min}, gamma_max={gamma_max}. VDM uses gamma_min=-13.3, gamma_max=5.0"
        )
