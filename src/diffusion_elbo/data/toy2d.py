"""Two-dimensional toy densities (swiss roll, moons, 8 Gaussians, checkerboard, rings): continuous data.

The generators follow the toy sets of FFJORD (Grathwohl et al. 2019, ``lib/toy_data.py``) that later
diffusion and flow papers reuse; all randomness comes from one seeded ``torch.Generator``.

Scaling: each raw set is mapped to x = (raw - center) / scale with a fixed per-set ``center`` (2,)
and scalar ``scale`` (estimated once from 10^6 samples of seed 0 and rounded; see
:data:`STANDARDIZATION`), so every split of every seed has mean ~0 and per-coordinate RMS ~1 while the
data density stays the same function whatever the seed or the split sizes. One scalar scale keeps the
shape (circles stay circles); the density in raw units is p_raw(r) = p(x) / scale^2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import Enum

import torch
from torch import Tensor

from diffusion_elbo.data.base import GeneratedDataModule


class Toy2D(str, Enum):
    SWISS_ROLL = "swiss_roll"
    MOONS = "moons"
    EIGHT_GAUSSIANS = "eight_gaussians"
    CHECKERBOARD = "checkerboard"
    RINGS = "rings"

    @classmethod
    def parse(cls, name: str | Toy2D) -> Toy2D:
        try:
            return cls(name)
        except ValueError:
            choices = ", ".join(member.value for member in cls)
            raise ValueError(f"unknown data.name={name!r}; choose one of: {choices}") from None


def swiss_roll(n: int, generator: torch.Generator) -> Tensor:
    """(n, 2): t = 1.5 pi (1 + 2u), (t cos t, t sin t) + N(0, 1) noise (sklearn's make_swiss_roll, x-z plane)."""
    t = 1.5 * math.pi * (1.0 + 2.0 * torch.rand(n, generator=generator))  # (n,)
    points = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1)  # (n, 2)
    return points + torch.randn(n, 2, generator=generator)


def moons(n: int, generator: torch.Generator) -> Tensor:
    """(n, 2): two interleaved half circles (sklearn's make_moons) + N(0, 0.1^2) noise."""
    theta = math.pi * torch.rand(n, generator=generator)  # (n,)
    lower = torch.rand(n, generator=generator) < 0.5  # which moon, (n,)
    upper_moon = torch.stack([torch.cos(theta), torch.sin(theta)], dim=1)
    lower_moon = torch.stack([1.0 - torch.cos(theta), 0.5 - torch.sin(theta)], dim=1)
    points = torch.where(lower[:, None], lower_moon, upper_moon)  # (n, 2)
    return points + 0.1 * torch.randn(n, 2, generator=generator)


def eight_gaussians(n: int, generator: torch.Generator) -> Tensor:
    """(n, 2): mixture of 8 equal Gaussians N(c_k, 0.5^2 I), c_k = 4 (cos 2 pi k/8, sin 2 pi k/8) (FFJORD)."""
    k = torch.randint(0, 8, (n,), generator=generator)  # (n,)
    angle = 2.0 * math.pi * k / 8.0
    centers = 4.0 * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)  # (n, 2)
    return centers + 0.5 * torch.randn(n, 2, generator=generator)


def checkerboard(n: int, generator: torch.Generator) -> Tensor:
    """(n, 2): uniform on the black squares of a 4x4 checkerboard of unit squares on [-2, 2]^2 (FFJORD, x2)."""
    x1 = 4.0 * torch.rand(n, generator=generator) - 2.0  # (n,) column in [-2, 2)
    x2 = torch.rand(n, generator=generator) - 2.0 * torch.randint(0, 2, (n,), generator=generator)
    x2 = x2 + torch.floor(x1) % 2  # shift into the square of the right colour
    return 2.0 * torch.stack([x1, x2], dim=1)


def rings(n: int, generator: torch.Generator) -> Tensor:
    """(n, 2): 4 concentric circles of radii 1, 2, 3, 4 (equal mass) + N(0, 0.08^2) noise (FFJORD-like)."""
    radius = 1.0 + torch.randint(0, 4, (n,), generator=generator).to(torch.float32)  # (n,)
    angle = 2.0 * math.pi * torch.rand(n, generator=generator)
    points = radius[:, None] * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)  # (n, 2)
    return points + 0.08 * torch.randn(n, 2, generator=generator)


GENERATORS: dict[Toy2D, Callable[[int, torch.Generator], Tensor]] = {
    Toy2D.SWISS_ROLL: swiss_roll,
    Toy2D.MOONS: moons,
    Toy2D.EIGHT_GAUSSIANS: eight_gaussians,
    Toy2D.CHECKERBOARD: checkerboard,
    Toy2D.RINGS: rings,
}

# (center x, center y, scale): the mean and sqrt of the mean per-coordinate variance of the raw set,
# from 10^6 samples (seed 0), rounded to 2-3 digits. Closed forms where they exist: moons center
# (1/2, 1/4); eight Gaussians 16 + 0.25 = 8.25 per coordinate; checkerboard uniform on [-4, 4]
# marginals, 64/12; rings E[r^2]/2 + 0.08^2 = 3.75 + 0.0064.
STANDARDIZATION: dict[Toy2D, tuple[float, float, float]] = {
    Toy2D.SWISS_ROLL: (2.0, 0.2, 6.86),
    Toy2D.MOONS: (0.5, 0.25, 0.71),
    Toy2D.EIGHT_GAUSSIANS: (0.0, 0.0, math.sqrt(8.25)),
    Toy2D.CHECKERBOARD: (0.0, 0.0, math.sqrt(64.0 / 12.0)),
    Toy2D.RINGS: (0.0, 0.0, math.sqrt(3.7564)),
}


def sample_toy2d(name: str | Toy2D, n: int, generator: torch.Generator) -> Tensor:
    """n standardised samples (n, 2) float32 of the toy set ``name``."""
    toy = Toy2D.parse(name)
    cx, cy, scale = STANDARDIZATION[toy]
    raw = GENERATORS[toy](n, generator)  # (n, 2)
    return ((raw - torch.tensor([cx, cy])) / scale).to(torch.float32)


class Toy2DDataModule(GeneratedDataModule):
    """x0 (B, 2) continuous (num_bins None), y = -1; the splits are independent draws of one generator."""

    num_bins = None

    def __init__(self, name: str = "swiss_roll", dim: int = 2, **options) -> None:
        """``options``: num_train, num_val, num_test, seed, batch_size, eval_batch_size, num_workers
        (:class:`~diffusion_elbo.data.base.GeneratedDataModule`)."""
        super().__init__(**options)
        self.name = Toy2D.parse(name)
        if dim != 2:
            raise ValueError(f"data=toy2d has dim 2; got data.dim={dim}")
        self.dim = 2
        self.data_shape = (2,)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        return sample_toy2d(self.name, n, generator)
