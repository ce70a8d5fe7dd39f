"""Beta schedules beta_1..beta_T as log-SNR schedules on the one time axis t in [0, 1].

A beta schedule of T steps (Ho et al. 2020) is a :class:`~diffusion_elbo.core.logsnr.LogSNRSchedule` whose values at
the grid t_i = i / T are its tables: gamma(i / T) = log((1 - alpha_bar_i) / alpha_bar_i), i = 0..T, with t = 0 the data
(alpha_bar_0 = 1, gamma = -inf); between the grid points, the monotone C^1 interpolation of log alpha_bar. Its T-step
view is its own chain (:class:`~diffusion_elbo.core.chain.NoiseSchedule`, the tables in the lecture's indexing), bit for
bit; other T view the same function on their own grid, and continuous time runs on its latents' window [1 / T, 1].

The ``*_betas`` functions are the published schedules (each cites its paper), (T,) float64; the classes are what
``conf/schedule/*.yaml`` build by ``_target_``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from diffusion_elbo.core.chain import InvalidScheduleError, NoiseSchedule
from diffusion_elbo.core.logsnr import LogSNR, LogSNRSchedule, LogSNRShape


def linear_betas(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Linear betas of Ho et al. 2020 (Sec. 4): 1e-4 to 0.02 over T = 1000 steps.

    For other T the endpoints are scaled by 1000 / T so the total noise added stays about the same
    (Nichol & Dhariwal 2021, ``get_named_beta_schedule`` in improved-diffusion). Returns (T,) float64.
    """
    scale = 1000.0 / timesteps
    return torch.linspace(scale * beta_start, scale * beta_end, timesteps, dtype=torch.float64)


def quadratic_betas(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Betas linear in sqrt(beta) (the "quad" schedule of the DDPM/DDIM code), scaled by 1000 / T.

    Returns (T,) float64.
    """
    scale = 1000.0 / timesteps
    root = torch.linspace(math.sqrt(scale * beta_start), math.sqrt(scale * beta_end), timesteps, dtype=torch.float64)
    return root**2


def betas_from_alpha_bar(alpha_bar: Tensor, max_beta: float) -> Tensor:
    """beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}, clipped at ``max_beta`` (Nichol & Dhariwal 2021, eq. 17).

    ``alpha_bar``: (T + 1,) float64 with alpha_bar[0] the value at t = 0. Returns (T,) float64.
    """
    betas = 1.0 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(max=max_beta)


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Cosine schedule of Nichol & Dhariwal 2021 (eq. 17): alpha_bar(t) = f(t) / f(0),
    f(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2), betas clipped at 0.999. Returns (T,) float64."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return betas_from_alpha_bar(f / f[0], max_beta)


def sigmoid_betas(
    timesteps: int, start: float = -3.0, *, end: float = 3.0, tau: float = 1.0, max_beta: float = 0.999
) -> Tensor:
    """Sigmoid schedule of Jabri et al. 2023 (RIN, Alg. 1): alpha_bar(t) follows a rescaled sigmoid
    of (t / T) * (end - start) + start with temperature tau; betas clipped at 0.999. Returns (T,) float64.
    """
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    v_start = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
    v_end = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))
    alpha_bar = (v_end - torch.sigmoid((steps * (end - start) + start) / tau)) / (v_end - v_start)
    return betas_from_alpha_bar(alpha_bar, max_beta)


def _check_timesteps(timesteps: object) -> int:
    if not isinstance(timesteps, int) or isinstance(timesteps, bool) or timesteps < 1:
        raise InvalidScheduleError(
            f"schedule.timesteps must be an integer >= 1 (T, the number of diffusion steps); got {timesteps!r}"
        )
    return timesteps


class BetaSchedule(LogSNRSchedule):
    """The schedule of explicit betas beta_1..beta_T (``schedule=custom``; the base of the named ones).

    gamma(t) at chain time j = t T reads the chain's monotone C^1 interpolation of log alpha_bar
    (:meth:`NoiseSchedule.log_alpha_bar_at`): gamma = log(1 - alpha_bar) - log alpha_bar and, with l = log alpha_bar,
    gamma'(t) = -T (dl / dj) / (1 - alpha_bar). gamma(0) = -inf (the data), so :attr:`t_min` = 1 / T, the lecture's
    x_1; ``reference`` is (gamma(1 / T), gamma(1)), the range of the network's noise-level input in continuous time.

    Attributes: ``chain`` the T-step tables (:class:`NoiseSchedule`, also the result of ``discretize(T)``), ``T``."""

    shape_name = LogSNRShape.BETAS

    def __init__(self, betas: Tensor | Sequence[float], name: str = "custom") -> None:
        chain = NoiseSchedule(betas if isinstance(betas, Tensor) else list(betas), name=name)
        gamma_ends = -torch.log(chain.snr[[1, chain.T]])
        super().__init__((float(gamma_ends[0]), float(gamma_ends[1])), name=name)
        self.chain = chain
        self.t_min = 1.0 / chain.T

    @property
    def T(self) -> int:
        return self.chain.T

    def forward(self, t: Tensor) -> LogSNR:
        log_ab, dlog_ab = self.chain.log_alpha_bar_at(t.double() * self.T)  # float64
        one_minus = -torch.expm1(log_ab)
        gamma = torch.log(one_minus) - log_ab  # -inf at t = 0, the data
        slope = -dlog_ab / one_minus * self.T
        return LogSNR(gamma=gamma.to(t.dtype), slope=slope.to(t.dtype))

    def discretize(self, timesteps: int) -> NoiseSchedule:
        """Its own tables at its own T (the values at the grid are the tables, not a round trip through gamma); the
        view at t_i = i / T' of the interpolated function for another T'."""
        if timesteps == self.T:
            return self.chain
        return super().discretize(timesteps)

    def extra_repr(self) -> str:
        return f"name={self.name}, T={self.T}"


class _ScaledBetas(BetaSchedule):
    """A schedule whose ``beta_start`` and ``beta_end`` are scaled by 1000 / T: its refusal says so."""

    def _build(self, betas: Tensor, name: str) -> None:
        try:
            BetaSchedule.__init__(self, betas, name=name)
        except InvalidScheduleError as err:
            raise InvalidScheduleError(
                f"{err} The {name} schedule scales beta_start and beta_end by 1000/T, so small T pushes them past 1: "
                "use more timesteps (schedule.timesteps) or a smaller schedule.beta_end, or schedule=cosine."
            ) from None


class LinearBetas(_ScaledBetas):
    """``schedule=linear``: :func:`linear_betas` (Ho et al. 2020)."""

    def __init__(self, timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> None:
        self._build(linear_betas(_check_timesteps(timesteps), beta_start, beta_end), "linear")


class QuadraticBetas(_ScaledBetas):
    """``schedule=quadratic``: :func:`quadratic_betas` (the DDPM/DDIM code's "quad")."""

    def __init__(self, timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> None:
        self._build(quadratic_betas(_check_timesteps(timesteps), beta_start, beta_end), "quadratic")


class CosineBetas(BetaSchedule):
    """``schedule=cosine``: :func:`cosine_betas` (Nichol & Dhariwal 2021)."""

    def __init__(self, timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> None:
        super().__init__(cosine_betas(_check_timesteps(timesteps), s, max_beta), name="cosine")


class SigmoidBetas(BetaSchedule):
    """``schedule=sigmoid``: :func:`sigmoid_betas` (Jabri et al. 2023)."""

    def __init__(self, timesteps: int = 1000, start: float = -3.0, end: float = 3.0, tau: float = 1.0,
                 max_beta: float = 0.999) -> None:  # fmt: skip
        betas = sigmoid_betas(_check_timesteps(timesteps), start, end=end, tau=tau, max_beta=max_beta)
        super().__init__(betas, name="sigmoid")


# the built-in beta schedules by their config names, for :func:`make_schedule`
BETA_SCHEDULES: dict[str, type[BetaSchedule]] = {
    "linear": LinearBetas,
    "quadratic": QuadraticBetas,
    "cosine": CosineBetas,
    "sigmoid": SigmoidBetas,
}


def beta_log_snr(base: str | BetaSchedule = "linear", base_timesteps: int = 1000) -> BetaSchedule:
    """``schedule=logsnr_discrete``: a beta schedule to train in continuous time, the built-in one named ``base`` with
    ``base_timesteps`` steps, or ``base`` itself where it is a schedule (a node with its own ``_target_``, e.g. a class
    of one's own; then ``base_timesteps`` is unused). Its node's ``timesteps`` is the bound's (null or T), so the base's
    T has a name of its own."""
    if isinstance(base, BetaSchedule):
        return base
    if base not in BETA_SCHEDULES:
        raise InvalidScheduleError(
            f"schedule.base={base!r} is not a beta schedule; choose one of: {', '.join(BETA_SCHEDULES)}, or give a node "
            "with the _target_ of a BetaSchedule of one's own"
        )
    return BETA_SCHEDULES[base](base_timesteps)


def make_schedule(
    name: str, timesteps: int = 1000, *, betas: Sequence[float] | None = None, **kwargs: float
) -> NoiseSchedule:
    """The T-step chain of a built-in beta schedule by its config name (``linear | quadratic | cosine | sigmoid``, with
    the class's keyword arguments; ``custom`` with ``betas``): a shorthand for tests, notebooks and benchmarks,
    ``BETA_SCHEDULES[name](T).chain``. Configs build the classes themselves by ``_target_``."""
    if name == "custom":
        if betas is None:
            raise InvalidScheduleError("the custom schedule needs explicit betas: schedule.betas=[0.1,0.2,...]")
        return BetaSchedule(list(betas)).chain
    if name not in BETA_SCHEDULES:
        options = ", ".join([*BETA_SCHEDULES, "custom"])
        raise InvalidScheduleError(f"unknown schedule '{name}'; choose one of: {options}")
    return BETA_SCHEDULES[name](timesteps, **kwargs).chain
