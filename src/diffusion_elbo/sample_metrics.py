"""Sample-quality numbers for low-dimensional data, each with a standard error.

- energy distance (Szekely & Rizzo 2013): 2 E|X - Y| - E|X - X'| - E|Y - Y'| >= 0, zero iff the laws match;
  estimated without bias (U-statistics: the within-sample means leave out the zero diagonal)
- sliced Wasserstein-2 (Rabin et al. 2011): mean over random directions of the squared 1-D W2 distance
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def energy_distance(x: Tensor, y: Tensor) -> Tensor:
    """Unbiased estimate of the energy distance between samples x (N, D) and y (M, D); can be slightly
    negative when the laws are equal (the V-statistic, dividing by N^2, is biased upwards by ~E|X - X'| / N)."""
    n, m = x.shape[0], y.shape[0]
    xy = torch.cdist(x, y).mean()
    xx = torch.cdist(x, x).sum() / (n * (n - 1))
    yy = torch.cdist(y, y).sum() / (m * (m - 1))
    return 2 * xy - xx - yy


def energy_distance_with_se(x: Tensor, y: Tensor, folds: int = 10) -> tuple[float, float]:
    """Energy distance averaged over ``folds`` disjoint pairs of chunks, and its standard error over folds."""
    n = min(x.shape[0], y.shape[0]) // folds
    if n < 2:
        raise ValueError(f"need at least {2 * folds} samples in each set for {folds} folds")
    values = torch.stack([energy_distance(x[i * n : (i + 1) * n], y[i * n : (i + 1) * n]) for i in range(folds)])
    return float(values.mean()), float(values.std() / math.sqrt(folds))


def sliced_wasserstein_with_se(
    x: Tensor, y: Tensor, num_projections: int = 128, generator: torch.Generator | None = None
) -> tuple[float, float]:
    """Sliced W2^2 between x (N, D) and y (N, D) (equal sizes), and its standard error over directions."""
    n = min(x.shape[0], y.shape[0])
    x, y = x[:n].double(), y[:n].double()
    directions = torch.randn(x.shape[1], num_projections, generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=0, keepdim=True)  # (D, P) unit vectors
    px, _ = torch.sort(x @ directions, dim=0)  # (N, P)
    py, _ = torch.sort(y @ directions, dim=0)
    per_direction = ((px - py) ** 2).mean(dim=0)  # (P,)
    return float(per_direction.mean()), float(per_direction.std() / math.sqrt(num_projections))
