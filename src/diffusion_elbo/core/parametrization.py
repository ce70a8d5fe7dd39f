"""What the network predicts: eps, x0 or v, and exact conversions between them.

With x_t = a x0 + s eps, a = sqrt(alpha_bar_t), s = sqrt(1 - alpha_bar_t) (so a^2 + s^2 = 1):
- eps-prediction (Ho et al. 2020): x0 = (x_t - s eps) / a
- v-prediction (Salimans & Ho 2022, eq. 9 and App. D): v = a eps - s x0, so x0 = a x_t - s v and eps = s x_t + a v
Shapes: x_t, out (B, *D); t LongTensor (B,) in 1..T, or a float tensor (B,) of real times in [0, T].
"""

from __future__ import annotations

from enum import Enum

from torch import Tensor

from diffusion_elbo.core.chain import NoiseSchedule


class Parametrization(str, Enum):
    EPS = "eps"
    X0 = "x0"
    V = "v"


def _coefs(schedule: NoiseSchedule, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    # float64 coefficients cast once: 1 - alpha_bar formed in float32 loses digits near t = 1. A float t is a real time
    # of the schedule's continuous interpolation (the probability-flow ODE evaluates the network between steps).
    a, s = schedule.signal_noise(t)
    return schedule.broadcast(a, like), schedule.broadcast(s, like)


def eps_to_x0(schedule: NoiseSchedule, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    a, s = _coefs(schedule, t, x_t)
    return (x_t - s * eps) / a


def x0_to_eps(schedule: NoiseSchedule, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
    a, s = _coefs(schedule, t, x_t)
    return (x_t - a * x0) / s


def v_to_x0(schedule: NoiseSchedule, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
    a, s = _coefs(schedule, t, x_t)
    return a * x_t - s * v


def v_to_eps(schedule: NoiseSchedule, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
    a, s = _coefs(schedule, t, x_t)
    return s * x_t + a * v


def target_v(schedule: NoiseSchedule, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0 (Salimans & Ho 2022, eq. 9)."""
    a, s = _coefs(schedule, t, x0)
    return a * eps - s * x0


def predict_x0(
    parametrization: Parametrization, schedule: NoiseSchedule, *, x_t: Tensor, t: Tensor, out: Tensor
) -> Tensor:
    """x0_hat from the network output ``out`` under ``parametrization``."""
    p = Parametrization(parametrization)
    if p is Parametrization.X0:
        return out
    if p is Parametrization.EPS:
        return eps_to_x0(schedule, x_t, t, out)
    return v_to_x0(schedule, x_t, t, out)


def predict_eps(
    parametrization: Parametrization, schedule: NoiseSchedule, *, x_t: Tensor, t: Tensor, out: Tensor
) -> Tensor:
    """eps_hat from the network output ``out`` under ``parametrization``."""
    p = Parametrization(parametrization)
    if p is Parametrization.EPS:
        return out
    if p is Parametrization.X0:
        return x0_to_eps(schedule, x_t, t, out)
    return v_to_eps(schedule, x_t, t, out)


def output_from_x0(
    parametrization: Parametrization, schedule: NoiseSchedule, *, x_t: Tensor, t: Tensor, x0: Tensor
) -> Tensor:
    """The network output that corresponds to the prediction ``x0`` (used by closed-form oracles)."""
    p = Parametrization(parametrization)
    if p is Parametrization.X0:
        return x0
    eps = x0_to_eps(schedule, x_t, t, x0)
    return eps if p is Parametrization.EPS else target_v(schedule, x0, t, eps)


def training_target(
    parametrization: Parametrization, schedule: NoiseSchedule, *, x0: Tensor, t: Tensor, eps: Tensor
) -> Tensor:
    """The regression target of the network for a sample x_t built from (x0, eps)."""
    p = Parametrization(parametrization)
    if p is Parametrization.EPS:
        return eps
    if p is Parametrization.X0:
        return x0
    return target_v(schedule, x0, t, eps)


def x0_error_scale(parametrization: Parametrization, schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """c_p(t) with ||x0 - x0_hat||^2 = c_p(t) ||p - p_hat||^2 at fixed x_t, shape (B,) float64.

    x0: 1; eps: 1 / SNR(t); v: 1 / (1 + SNR(t)) = 1 - alpha_bar_t.
    """
    p = Parametrization(parametrization)
    snr = schedule.gather("snr", t)
    if p is Parametrization.X0:
        return snr.new_ones(snr.shape)
    if p is Parametrization.EPS:
        return 1.0 / snr
    return 1.0 / (1.0 + snr)
