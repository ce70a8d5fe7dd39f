"""The tables of a T-step chain: the view of a schedule at t_i = i / T (:meth:`LogSNRSchedule.discretize`).

Timestep convention (used throughout the package): ``t`` is an integer in 1..T as in the lecture, ``t = 1`` is the
decoder step p(x_0 | x_1) and ``t = 0`` is the data. Every table here has T + 1 entries so it can be indexed by ``t``
directly; entry 0 is the data (alpha_bar_0 = 1, beta_0 = 0).

Tables are computed in float64: 1 - alpha_bar_t near t = 1 and the SNR ratios used by the ELBO weights lose several
digits in float32. Callers gather what they need with :func:`NoiseSchedule.gather` and cast to their own dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class InvalidScheduleError(ValueError):
    """A beta schedule that does not define a valid forward process."""


def validate_betas(betas: Tensor, name: str = "custom") -> None:
    """Refuse a schedule that does not define a forward process: T >= 1, finite, 0 < beta_t < 1.

    ``betas`` is (T,), or (T, *D) for a multivariate schedule (a beta per step and data dimension).
    Raises :class:`InvalidScheduleError` naming the offending steps (1-based t) and their values.
    """
    if betas.ndim < 1 or betas.shape[0] < 1 or betas.numel() < 1:
        raise InvalidScheduleError(
            f"schedule '{name}' must have at least one step (T >= 1); got betas of shape {tuple(betas.shape)}"
        )
    bad = ~torch.isfinite(betas) | (betas <= 0) | (betas >= 1)
    if bad.any():
        per_step, worst = bad, betas  # (T,)
        if betas.ndim > 1:  # a multivariate schedule: each bad step's first offending value
            flat, flat_bad = betas.flatten(1), bad.flatten(1)
            per_step = flat_bad.any(dim=1)
            worst = flat.gather(1, flat_bad.float().argmax(dim=1, keepdim=True)).squeeze(1)
        steps = (torch.nonzero(per_step).flatten() + 1).tolist()
        shown = ", ".join(f"t={t}: beta={worst[t - 1].item():.4g}" for t in steps[:5])
        more = f" and {len(steps) - 5} more" if len(steps) > 5 else ""
        raise InvalidScheduleError(
            f"schedule '{name}' with T={betas.shape[0]} has {len(steps)} beta(s) outside (0, 1) or "
            f"non-finite: {shown}{more}."
        )


def pchip_slopes(y: Tensor) -> Tensor:
    """Slopes at the knots 0, 1, ..., n - 1 of the monotone piecewise-cubic interpolant of ``y`` (n,) or (n, *D) (each
    column its own curve) (Fritsch & Carlson 1980; the rule of scipy's ``PchipInterpolator`` for unit spacing): the
    harmonic mean of the neighbouring secants where they share a sign, else 0; the one-sided three-point rule at the
    ends, limited to keep the shape. Returns y's shape and dtype."""
    d = y[1:] - y[:-1]  # (n - 1, *D) secants
    if d.shape[0] == 1:  # two knots: the line through them
        return torch.cat([d, d])
    same = d[:-1] * d[1:] > 0
    inner = torch.where(same, 2 * d[:-1] * d[1:] / torch.where(same, d[:-1] + d[1:], torch.ones_like(d[1:])), 0.0)

    def edge(d0: Tensor, d1: Tensor) -> Tensor:
        m = (3 * d0 - d1) / 2
        m = torch.where(torch.sign(m) != torch.sign(d0), torch.zeros_like(m), m)
        overshoot = (torch.sign(d0) != torch.sign(d1)) & (m.abs() > 3 * d0.abs())
        return torch.where(overshoot, 3 * d0, m)

    return torch.cat([edge(d[0], d[1])[None], inner, edge(d[-1], d[-2])[None]])


class NoiseSchedule(nn.Module):
    """Betas and derived tables of the forward process q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t I).

    Buffers (all float64, shape (T + 1,), indexed by t in 0..T; non-persistent so checkpoints stay
    independent of T and the tables are rebuilt from the config). A multivariate schedule (one noise level per data
    dimension, :class:`~diffusion_elbo.core.logsnr.MultivariateLearnedLogSNR`) has betas (T, *D) and tables
    (T + 1, *D): :attr:`event_shape` is D, every formula holds per dimension, and :meth:`gather` and
    :meth:`broadcast` give coefficients shaped like the data instead of (B, 1, ..., 1):

    - ``betas``, ``alphas`` = 1 - beta_t, ``alpha_bar`` = prod_{i<=t} alpha_i, ``alpha_bar_prev`` = alpha_bar_{t-1}
    - ``posterior_variance`` sigma_q^2(t) = (1 - alpha_t)(1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)
      (lecture, q(x_{t-1} | x_t, x_0); Ho et al. 2020 eq. 7); 0 at t = 1
    - ``posterior_mean_coef_x0`` sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t)
    - ``posterior_mean_coef_xt`` sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)
    - ``snr`` alpha_bar_t / (1 - alpha_bar_t) (Kingma et al. 2021); +inf at t = 0
    - ``sqrt_alpha_bar``, ``sqrt_one_minus_alpha_bar``, ``log_one_minus_alpha_bar``, ``sqrt_alphas``, ``sqrt_betas``,
      ``posterior_log_variance``: every coefficient the core needs, in float64, so callers cast once
    """

    def __init__(self, betas: Tensor | Sequence[float], name: str = "custom") -> None:
        super().__init__()
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().clone()
        validate_betas(betas, name)
        self.name = name
        self.num_timesteps = betas.shape[0]
        self.event_shape = tuple(betas.shape[1:])  # () for one noise level shared by every dimension

        zero = torch.zeros(1, *self.event_shape, dtype=torch.float64)
        betas = torch.cat([zero, betas])  # (T + 1, *E), beta_0 = 0 so alpha_bar_0 = 1
        alphas = 1.0 - betas
        alpha_bar = torch.cumprod(alphas, dim=0)
        alpha_bar_prev = torch.cat([torch.ones_like(zero), alpha_bar[:-1]])
        # 1 - alpha_bar by expm1 of the summed log1p: exact to float64 rounding even where alpha_bar is near 1
        one_minus = -torch.expm1(torch.cumsum(torch.log1p(-betas), dim=0))
        # t = 0 has 1 - alpha_bar = 0: the posterior is undefined there; store 0 rather than nan.
        safe = torch.where(one_minus > 0, one_minus, torch.ones_like(one_minus))
        posterior_variance = torch.where(one_minus > 0, betas * (1.0 - alpha_bar_prev) / safe, zero)
        coef_x0 = torch.where(one_minus > 0, alpha_bar_prev.sqrt() * betas / safe, zero)
        coef_xt = torch.where(one_minus > 0, alphas.sqrt() * (1.0 - alpha_bar_prev) / safe, zero)

        for key, value in {
            "betas": betas,
            "alphas": alphas,
            "alpha_bar": alpha_bar,
            "alpha_bar_prev": alpha_bar_prev,
            "posterior_variance": posterior_variance,
            "posterior_mean_coef_x0": coef_x0,
            "posterior_mean_coef_xt": coef_xt,
            "snr": alpha_bar / one_minus,  # +inf at t = 0 by design
            # Square roots and logs of the tables, in float64 before any cast: in float32 alpha_bar_1 = 0.99996 (cosine)
            # keeps only ~3 digits of 1 - alpha_bar_1 and biases the bound by +5e-4 bits/dim (benchmarks/precision.py).
            "sqrt_alpha_bar": alpha_bar.sqrt(),
            "sqrt_one_minus_alpha_bar": one_minus.sqrt(),
            "log_one_minus_alpha_bar": torch.log(one_minus),  # -inf at t = 0
            "sqrt_alphas": alphas.sqrt(),
            "sqrt_betas": betas.sqrt(),
            # log sigma_q^2(t); at t <= 1, where sigma_q^2 = 0, a finite placeholder (sigma_q^2(2), or beta_1 when T = 1)
            # that the ELBO masks out there: a -inf would turn the masked KL's gradient into NaN
            "posterior_log_variance": torch.log(
                torch.where(
                    posterior_variance > 0,
                    posterior_variance,
                    posterior_variance[2] if self.num_timesteps >= 2 else betas[1],
                )
            ),
        }.items():
            self.register_buffer(key, value, persistent=False)

        # slopes of the monotone cubic (PCHIP) through log alpha_bar at t = 0..T: the continuous-time interpolation
        self.register_buffer("log_alpha_bar_slope", pchip_slopes(torch.log(alpha_bar)), persistent=False)

    @property
    def T(self) -> int:
        return self.num_timesteps

    @property
    def multivariate(self) -> bool:
        """Whether each data dimension has its own noise level (tables (T + 1, *D))."""
        return bool(self.event_shape)

    def gather(self, name: str, t: Tensor, like: Tensor | None = None) -> Tensor:
        """Table ``name`` at timesteps ``t`` (LongTensor (B,)), shaped (B, 1, ..., 1) to broadcast
        against ``like`` (B, *D) and cast to its dtype; without ``like`` returns (B,) float64 ((B, *D) for a
        multivariate schedule)."""
        return self.broadcast(getattr(self, name)[t], like)  # (B,) float64 -> (B, 1, ..., 1)

    @staticmethod
    def broadcast(values: Tensor, like: Tensor | None) -> Tensor:
        """Coefficients ``values`` (B,) float64, cast once to ``like``'s dtype and shaped (B, 1, ..., 1) to broadcast
        against it; per-dimension coefficients (B, *D) (a multivariate schedule's) keep their shape. Without ``like``
        returned as they are. Combine float64 coefficients before this cast."""
        if like is None:
            return values
        if values.ndim == like.ndim:  # one coefficient per dimension
            return values.to(like.dtype)
        return values.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def log_alpha_bar_at(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """log alpha_bar(t) and its derivative d/dt at real t in [0, T], each shaped like ``t`` ((B, *D) for a
        multivariate schedule, each dimension its own curve), float64.

        The discrete schedule's continuous-time interpolation: the monotone cubic (PCHIP, Fritsch & Carlson 1980)
        through log alpha_bar_t at t = 0..T. It equals the table at every integer t, decreases strictly (so
        beta(t) = -d log alpha_bar / dt > 0 is the rate of a VP SDE, Song et al. 2021 eq. 11, whose marginals are
        q(x_t | x0) = N(sqrt(alpha_bar(t)) x0, (1 - alpha_bar(t)) I) at every real t), and is C^1, so an adaptive
        ODE solver sees no jumps in the drift at the integers."""
        y, m = torch.log(self.alpha_bar), self.log_alpha_bar_slope  # (T + 1,) float64
        t = t.to(device=y.device, dtype=torch.float64)  # a CPU t for a schedule on the GPU, e.g. one scalar time
        slack = 1e-9 * self.T  # an ODE solver's stage times may round past the end by an ulp
        if (t < -slack).any() or (t > self.T + slack).any():
            raise ValueError(
                f"continuous time must lie in [0, T] = [0, {self.T}]; got values in [{t.min()}, {t.max()}]"
            )
        t = t.clamp(0.0, float(self.T))
        k = t.floor().long().clamp(max=self.T - 1)  # interval [k, k + 1]; t = T uses the last one with u = 1
        u = t - k
        if self.multivariate:
            u = u.view(-1, *([1] * len(self.event_shape)))  # (B, 1, ..., 1) against the tables' (B, *D)
        u2, u3 = u * u, u * u * u
        # cubic Hermite basis on a unit interval: value and derivative
        value = (
            (2 * u3 - 3 * u2 + 1) * y[k]
            + (u3 - 2 * u2 + u) * m[k]
            + (-2 * u3 + 3 * u2) * y[k + 1]
            + (u3 - u2) * m[k + 1]
        )
        slope = (6 * u2 - 6 * u) * (y[k] - y[k + 1]) + (3 * u2 - 4 * u + 1) * m[k] + (3 * u2 - 2 * u) * m[k + 1]
        return value, slope

    def signal_noise(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)), each (B,) float64 ((B, *D) multivariate), the scales of x0 and
        eps in x_t.

        ``t`` (B,): a LongTensor of steps reads the tables; a float tensor of real times in [0, T] reads the
        continuous interpolation (:meth:`log_alpha_bar_at`), which agrees with the tables at integers."""
        if not t.is_floating_point():
            return self.sqrt_alpha_bar[t], self.sqrt_one_minus_alpha_bar[t]
        log_ab, _ = self.log_alpha_bar_at(t)
        return torch.exp(0.5 * log_ab), torch.sqrt(-torch.expm1(log_ab))

    def log_snr(self) -> Tensor:
        """log SNR(t) for t = 1..T, shape (T,) float64 ((T, *D) multivariate)."""
        return torch.log(self.snr[1:])

    def mean_log_snr(self) -> Tensor:
        """log SNR(t) for t = 1..T averaged over the data dimensions, (T,) float64: the one noise axis a sampler spaces
        its steps on (the schedule's own log SNR where it is shared by every dimension)."""
        log_snr = self.log_snr()
        return log_snr.flatten(1).mean(dim=1) if self.multivariate else log_snr

    def extra_repr(self) -> str:
        shape = f", event_shape={self.event_shape}" if self.multivariate else ""
        return f"name={self.name}, T={self.num_timesteps}{shape}"
