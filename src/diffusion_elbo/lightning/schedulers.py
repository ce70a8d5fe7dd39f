"""Learning-rate schedules stepped every optimizer step (diffusion runs count steps, not epochs)."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_constant(optimizer: Optimizer, warmup_steps: int = 5000) -> LambdaLR:
    """Linear warm-up from 0 to the base LR over ``warmup_steps``, then constant (Ho et al. 2020, App. B)."""
    if warmup_steps < 0:
        raise ValueError(f"lr_scheduler.warmup_steps must be >= 0; got {warmup_steps}")
    return LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0)


def warmup_cosine(
    optimizer: Optimizer, warmup_steps: int = 500, total_steps: int = 10_000, min_lr_ratio: float = 0.1
) -> LambdaLR:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` x the base LR at ``total_steps``."""
    if total_steps <= warmup_steps:
        raise ValueError(
            f"lr_scheduler.total_steps={total_steps} must exceed warmup_steps={warmup_steps} "
            "(total_steps follows trainer.max_steps by default)"
        )

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
