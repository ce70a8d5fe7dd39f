"""Builds the framework's objects from a composed config: the only module that calls ``instantiate``."""

from __future__ import annotations

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from diffusion_elbo.core import NoiseSchedule
from diffusion_elbo.data.base import DiffusionDataModule


def build_schedule(cfg: DictConfig) -> NoiseSchedule:
    return instantiate(cfg.schedule)


def build_datamodule(cfg: DictConfig) -> DiffusionDataModule:
    return instantiate(cfg.data)


def build_model(cfg: DictConfig) -> torch.nn.Module:
    return instantiate(cfg.model)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name} asked for CUDA but torch sees no GPU here; use device=cpu or device=auto")
    return device
