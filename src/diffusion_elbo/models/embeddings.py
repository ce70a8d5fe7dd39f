"""Sinusoidal timestep embedding shared by the denoising networks."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of the timestep (Vaswani et al. 2017 §3.5; used for t by Ho et al. 2020 §4).

    t: (B,) timesteps, integer or float; the float value is embedded, so any T works.
    Returns (B, dim) float32: ``[cos(t w_0), ..., cos(t w_{h-1}), sin(t w_0), ..., sin(t w_{h-1})]`` with
    h = dim // 2 and frequencies w_i = max_period^(-i / h) geometric from 1 down to ~1/max_period; for odd
    ``dim`` a zero column is appended. Frequencies divide by h (as improved-diffusion's
    ``timestep_embedding``), not by h - 1 (as Ho et al.'s TF code), so that dim=2 or 3 is well defined.
    """
    if dim < 2:
        raise ValueError(f"sinusoidal_embedding needs dim >= 2 (one cos and one sin), got dim={dim}")
    if t.dim() != 1:
        raise ValueError(f"t must have shape (B,), got {tuple(t.shape)}")
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=t.device) / half  # (h,)
    freqs = torch.exp(-math.log(max_period) * exponent)  # (h,)
    args = t.to(torch.float32)[:, None] * freqs[None, :]  # (B, h)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2h)
    if dim % 2 == 1:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)  # (B, dim)
    return emb
