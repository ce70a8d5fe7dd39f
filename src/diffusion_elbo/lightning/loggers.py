"""Loggers: Lightning's, with the keys Lightning adds by itself put in the ``train/`` group."""

from __future__ import annotations

from collections.abc import Mapping

from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

# keys Lightning logs on its own: the epoch (added to every logged row) and the LearningRateMonitor's lr-<optimizer>
# (lr-AdamW, lr-AdamW/pg2 with parameter groups; momentum-* and weight_decay-* when it is asked to log them)
_LIGHTNING_KEYS = ("lr-", "momentum-", "weight_decay-")


def train_group(key: str) -> str:
    """``epoch`` -> ``train/epoch``, ``lr-AdamW`` -> ``train/lr-AdamW``; every other key as it is."""
    return f"train/{key}" if key == "epoch" or key.startswith(_LIGHTNING_KEYS) else key


class WandbLogger(LightningWandbLogger):
    """Lightning's WandbLogger, with ``epoch`` and the learning rate under ``train/`` beside ``train/loss``, so W&B
    shows them in the training section instead of a section of their own (the metric keys read ``stage/name``)."""

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        super().log_metrics({train_group(k): v for k, v in metrics.items()}, step)
