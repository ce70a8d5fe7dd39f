"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", EDM2, sec. 3
and App. C): keep power-function EMAs of the weights while training, store snapshots of them, and afterwards rebuild
the average of any other length as a least-squares combination of the snapshots.

Steps count optimizer updates: theta_k is the network after k updates, k = 1..t. An average of theta_1..theta_t is a
*profile*, the weights w (t,) it puts on them (summing to 1), so ``sum_k w_k theta_k`` is the averaged network.

- Power-function EMA with exponent gamma (EDM2 eq. 118-121): ema_t = beta_t ema_{t-1} + (1 - beta_t) theta_t with
  beta_t = (1 - 1/t)^(gamma + 1). Its profile is exactly w_k = (k^(gamma+1) - (k-1)^(gamma+1)) / t^(gamma+1) (the
  product of the betas after k telescopes to (k / t)^(gamma+1)), the discrete form of the continuous
  (gamma + 1) k^gamma / t^(gamma+1). Its width relative to its age, sigma_rel = sqrt((gamma+1) / ((gamma+2)^2
  (gamma+3))) (eq. 123), is what one chooses: 0.05 to 0.10 are typical (EDM2's best values lie there).
- A classic EMA of decay beta (the EMA callback's, warm-up included) started at theta_1: :func:`ema_profile`.
- Reconstruction (EDM2 Alg. 3, here on the exact discrete profiles rather than their continuous approximation): the
  snapshots' profiles P (N, t) and the target r (t,); the coefficients x (N,) minimise ||P^T x - r||^2; the rebuilt
  weights are sum_i x_i snapshot_i, whose profile P^T x is r up to the least-squares residual (returned, so a caller
  can say how close it is).

Pure torch, float64 throughout: profiles of 10^4 steps have entries ~1e-4 and the Gram matrix of nearby snapshots is
ill-conditioned.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def sigma_rel_from_gamma(gamma: float) -> float:
    """sigma_rel of the power-function profile of exponent ``gamma`` (EDM2 eq. 123): its standard deviation over its
    age t, sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))."""
    if not gamma > -1:
        raise ValueError(f"gamma={gamma} must be > -1 (the profile k^gamma must be integrable)")
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def gamma_from_sigma_rel(sigma_rel: float) -> float:
    """The exponent gamma >= 0 whose profile has relative width ``sigma_rel`` (EDM2 eq. 126, Alg. 2): the largest real
    root of gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) = 0 with s = sigma_rel^-2. ``sigma_rel`` in
    (0, 1/sqrt(12) = 0.2887]: the upper end is gamma = 0, the plain average of every step so far."""
    if not 0 < sigma_rel <= 1 / math.sqrt(12):
        raise ValueError(
            f"sigma_rel={sigma_rel} must be in (0, 1/sqrt(12) = 0.288675] (the plain average of all steps); EDM2's useful range "
            "is 0.05 to 0.15"
        )
    s = sigma_rel**-2
    companion = torch.tensor([[-7.0, -(16 - s), -(12 - s)], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    roots = torch.linalg.eigvals(companion)  # the companion matrix's eigenvalues are the cubic's roots
    real = roots.real[roots.imag.abs() <= 1e-9 * (1 + roots.abs())]
    return max(float(real.max()), 0.0)  # at sigma_rel = 1/sqrt(12) the root is 0 up to rounding


def power_ema_decay(step: int, gamma: float) -> float:
    """beta_t = (1 - 1/t)^(gamma + 1) of the power-function EMA at update ``step`` = t >= 1 (0 at t = 1: the first
    average is theta_1 itself)."""
    return (1.0 - 1.0 / step) ** (gamma + 1)


def power_profile(step: int, gamma: float, length: int | None = None) -> Tensor:
    """The weights of theta_1..theta_t in the power-function EMA at ``step`` = t, (length,) float64 (length >= t, zeros
    after t): w_k = (k^(gamma+1) - (k-1)^(gamma+1)) / t^(gamma+1), the exact discrete profile."""
    length = step if length is None else length
    k = torch.arange(1, step + 1, dtype=torch.float64)
    e = gamma + 1
    w = (k.pow(e) - (k - 1).pow(e)) / float(step) ** e
    return torch.cat([w, torch.zeros(length - step, dtype=torch.float64)])


def ema_profile(step: int, decay: float, length: int | None = None, *, warmup: bool = True) -> Tensor:
    """The weights of theta_1..theta_t in a classic EMA of ``decay`` updated after every step from the first, (length,)
    float64 (zeros after t). As the EMA callback (``callbacks.ema``) does it: the first update copies theta_1, update n
    (at theta_{n+1}) uses d_n = decay, or min(decay, (1 + n) / (10 + n)) with ``warmup``; so
    w_k = (1 - d_{k-1}) prod_{j >= k} d_j with d_0 = 0."""
    length = step if length is None else length
    n = torch.arange(0, step, dtype=torch.float64)  # update n happens at theta_{n + 1}
    d = torch.full_like(n, float(decay))
    if warmup:
        d = torch.minimum(d, (1 + n) / (10 + n))
    d[0] = 0.0  # the first update copies theta_1
    after = torch.cat([torch.flip(torch.cumprod(torch.flip(d[1:], [0]), 0), [0]), torch.ones(1, dtype=torch.float64)])
    w = (1 - d) * after  # (t,): w_k = (1 - d_{k-1}) prod_{j >= k} d_j
    return torch.cat([w, torch.zeros(length - step, dtype=torch.float64)])


@dataclass(frozen=True)
class Snapshot:
    """One stored average: the update ``step`` it was taken at and the ``gamma`` of its power-function EMA."""

    step: int
    gamma: float


@dataclass(frozen=True)
class Reconstruction:
    """The coefficients (N,) of the snapshots and how well their combined profile matches the target: ``residual``
    = ||P^T x - r|| / ||r|| (0 for a target that is itself a snapshot)."""

    coefficients: Tensor
    residual: float


def solve_coefficients(snapshots: Sequence[Snapshot], target: Tensor) -> Reconstruction:
    """The least-squares coefficients x (N,) with sum_i x_i profile_i closest to ``target`` (L,) float64, a profile over
    theta_1..theta_L with L >= the last snapshot's step (EDM2 Alg. 3 on the exact discrete profiles)."""
    if not snapshots:
        raise ValueError("no snapshots to reconstruct from: train with callbacks.posthoc_ema on")
    length = target.numel()
    if max(s.step for s in snapshots) > length:
        raise ValueError(f"the target profile covers {length} steps, fewer than the last snapshot's")
    profiles = torch.stack([power_profile(s.step, s.gamma, length) for s in snapshots])  # (N, L)
    solution = torch.linalg.lstsq(profiles.T, target.double().unsqueeze(1), driver="gelsd").solution.squeeze(1)  # (N,)
    residual = torch.linalg.vector_norm(profiles.T @ solution - target) / torch.linalg.vector_norm(target)
    return Reconstruction(coefficients=solution, residual=float(residual))


def combine(states: Sequence[Mapping[str, Tensor]], coefficients: Tensor) -> dict[str, Tensor]:
    """sum_i x_i state_i for each floating-point tensor (accumulated in float64, returned in its own dtype); other
    entries (integer buffers) are taken from the last state."""
    if len(states) != coefficients.numel():
        raise ValueError(f"{len(states)} states but {coefficients.numel()} coefficients")
    out = {}
    for key, last in states[-1].items():
        if not last.is_floating_point():
            out[key] = last.clone()
            continue
        total = torch.zeros_like(last, dtype=torch.float64)
        for state, x in zip(states, coefficients.tolist(), strict=True):
            total.add_(state[key].double(), alpha=x)
        out[key] = total.to(last.dtype)
    return out
