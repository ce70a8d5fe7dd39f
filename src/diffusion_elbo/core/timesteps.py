"""Distributions over timesteps t in 1..T for Monte Carlo estimates of the ELBO and training losses."""

from __future__ import annotations

from enum import Enum

import torch
from torch import Tensor


class TimestepSampling(str, Enum):
    UNIFORM = "uniform"
    IMPORTANCE = "importance"
    # one uniform offset per batch, spread evenly: u_i = (u + i / B) mod 1 (Kingma et al. 2021, Sec. 3.4)
    LOW_DISCREPANCY = "low_discrepancy"


def low_discrepancy_uniform(
    batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
) -> Tensor:
    """u_i = (u_0 + i / B) mod 1 for i = 0..B-1 with one u_0 ~ U[0, 1): each u_i is uniform on [0, 1) (so estimates
    stay unbiased), and the batch covers [0, 1) evenly, which lowers the variance of a batch mean over t (VDM's
    "low-discrepancy sampler", Kingma et al. 2021, Sec. 3.4). Returns (B,) float64 on ``device``."""
    where = generator.device if generator is not None else torch.device(device)
    u0 = torch.rand((), generator=generator, device=where, dtype=torch.float64)
    steps = torch.arange(batch_size, device=where, dtype=torch.float64) / batch_size
    return torch.remainder(u0 + steps, 1.0).to(device)


class TimestepSampler:
    """Draws t (B,) in 1..T with p(t) and returns (t, 1 / p(t)); subclasses define ``probs``."""

    def __init__(self, num_timesteps: int) -> None:
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1; got {num_timesteps}")
        self.num_timesteps = num_timesteps

    def probs(self) -> Tensor:
        """p(t) for t = 1..T, shape (T,) float64, summing to 1."""
        raise NotImplementedError

    def sample(
        self, batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        # draw where the generator lives (a CUDA generator needs CUDA tensors), then move to ``device``
        where = generator.device if generator is not None else torch.device(device)
        p = self.probs().to(where)
        idx = torch.multinomial(p, batch_size, replacement=True, generator=generator)  # (B,) in 0..T-1
        return (idx + 1).to(device), (1.0 / p[idx]).to(device)

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Record per-example losses L_t observed at timesteps t (no-op unless adaptive)."""


class UniformSampler(TimestepSampler):
    """t ~ U{1..T}, the sampler of Ho et al. 2020 (Algorithm 1)."""

    def probs(self) -> Tensor:
        return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)

    def sample(
        self, batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        # Cheaper than multinomial; drawn where the generator lives.
        where = generator.device if generator is not None else torch.device(device)
        t = torch.randint(1, self.num_timesteps + 1, (batch_size,), generator=generator, device=where).to(device)
        return t, torch.full((batch_size,), float(self.num_timesteps), dtype=torch.float64, device=device)


class ImportanceSampler(TimestepSampler):
    """p(t) proportional to sqrt(E[L_t^2]) over the last ``history`` values of each L_t
    (Nichol & Dhariwal 2021, eq. 18); uniform until every t has a full history.

    A small ``uniform_prob`` is mixed in so that no t has probability zero (their code does the same),
    which keeps 1 / p(t) bounded and the estimator unbiased. The history is a tensor so it can be saved
    in checkpoints (:meth:`state_dict`) and synchronised across DDP ranks by the caller.
    """

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 1e-3) -> None:
        super().__init__(num_timesteps)
        self.history = history
        self.uniform_prob = uniform_prob
        self.losses = torch.zeros(num_timesteps, history, dtype=torch.float64)
        self.counts = torch.zeros(num_timesteps, dtype=torch.long)

    def warmed_up(self) -> bool:
        return bool((self.counts >= self.history).all())

    def probs(self) -> Tensor:
        if not self.warmed_up():
            return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)
        weights = (self.losses**2).mean(dim=1).sqrt()
        weights = weights / weights.sum()
        return weights * (1.0 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def update(self, t: Tensor, losses: Tensor) -> None:
        for ti, li in zip(t.detach().cpu().tolist(), losses.detach().double().cpu().tolist(), strict=True):
            row = ti - 1
            if self.counts[row] == self.history:
                self.losses[row] = torch.roll(self.losses[row], -1)
                self.losses[row, -1] = li
            else:
                self.losses[row, self.counts[row]] = li
                self.counts[row] += 1

    def state_dict(self) -> dict[str, Tensor]:
        return {"losses": self.losses.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.losses = state["losses"].clone().double()
        self.counts = state["counts"].clone().long()


class LowDiscrepancySampler(UniformSampler):
    """t = floor(u_i T) + 1 with u_i from :func:`low_discrepancy_uniform`: each t is uniform on 1..T, and a batch
    holds every part of 1..T in equal measure."""

    def sample(
        self, batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        u = low_discrepancy_uniform(batch_size, device, generator)
        t = (u * self.num_timesteps).long().clamp(max=self.num_timesteps - 1) + 1
        return t, torch.full((batch_size,), float(self.num_timesteps), dtype=torch.float64, device=device)


def make_timestep_sampler(kind: TimestepSampling | str, num_timesteps: int) -> TimestepSampler:
    kind = TimestepSampling(kind)
    if kind is TimestepSampling.LOW_DISCREPANCY:
        return LowDiscrepancySampler(num_timesteps)
    return UniformSampler(num_timesteps) if kind is TimestepSampling.UNIFORM else ImportanceSampler(num_timesteps)
