"""Builds the framework's objects from a composed config: the only module that calls ``instantiate``."""

from __future__ import annotations

import logging
import netrc
import os
import uuid
from pathlib import Path
from urllib.parse import urlparse

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffusion_elbo.core import BetaSchedule, LogSNRSchedule, NoiseSchedule
from diffusion_elbo.data.augment import Augmentation
from diffusion_elbo.data.base import DiffusionDataModule

log = logging.getLogger(__name__)


# the keys of a continuous-time schedule's node that configure the bound and the chain built from it (read by the
# module), not the log-SNR function: the schedule's own constructor never sees them
CHAIN_KEYS = ("timesteps", "eval_timesteps", "variance_gradient", "lr")


def is_continuous(cfg: DictConfig) -> bool:
    """Whether ``cfg.schedule`` trains in continuous time: its node carries ``eval_timesteps``, the T of the chain it is
    sampled and evaluated on (with the other :data:`CHAIN_KEYS`; ``schedule=logsnr_* | learned``, or a schedule of
    one's own, ``docs/extending.md``). Every schedule is a log-SNR function on [0, 1]; a beta schedule's node without
    those keys trains on its own T-step chain (its ``timesteps`` is then the constructor's T)."""
    node = OmegaConf.select(cfg, "schedule", default=None)
    return isinstance(node, DictConfig) and "eval_timesteps" in node


def build_logsnr(cfg: DictConfig) -> LogSNRSchedule:
    """The schedule of ``cfg.schedule``, a log-SNR function on [0, 1], built by its ``_target_`` (without the
    :data:`CHAIN_KEYS` of a continuous-time node)."""
    node = OmegaConf.to_container(cfg.schedule, resolve=True)
    if is_continuous(cfg):
        node = {k: v for k, v in node.items() if k not in CHAIN_KEYS}
    schedule = instantiate(node)
    if not isinstance(schedule, LogSNRSchedule):
        raise TypeError(
            f"schedule._target_={node.get('_target_')} built a {type(schedule).__name__}; a schedule is a "
            "diffusion_elbo.core.logsnr.LogSNRSchedule (a beta schedule: return diffusion_elbo.core.schedules."
            "BetaSchedule(betas), docs/extending.md)"
        )
    return schedule


def build_schedule(cfg: DictConfig) -> NoiseSchedule:
    """The T-step chain of ``cfg.schedule``: a beta schedule's own; a continuous-time one's view at its
    ``eval_timesteps``."""
    schedule = build_logsnr(cfg)
    if is_continuous(cfg):
        return schedule.discretize(int(OmegaConf.select(cfg, "schedule.eval_timesteps", default=1000)))
    if not isinstance(schedule, BetaSchedule):
        raise TypeError(
            f"schedule {schedule.name!r} ({type(schedule).__name__}) has no T of its own to train a chain on: give its "
            "node the continuous-time keys (timesteps: null, eval_timesteps: 1000, variance_gradient: false) to train "
            "it in continuous time, or build it from betas as a diffusion_elbo.core.schedules.BetaSchedule"
        )
    return schedule.chain


def build_objective(cfg: DictConfig):
    """The training objective of ``cfg.loss`` (:class:`~diffusion_elbo.core.losses.Objective`); L_simple where the
    config has none."""
    from diffusion_elbo.core.losses import EpsMSE

    node = OmegaConf.select(cfg, "loss")
    return EpsMSE() if node is None else instantiate(node)


def build_estimators(cfg: DictConfig) -> dict:
    """The likelihood estimators of ``cfg.likelihood``, by name, in config order (each an object of the group)."""
    nodes = OmegaConf.select(cfg, "likelihood") or {}
    return {str(name): instantiate(node) for name, node in nodes.items() if node is not None}


def build_sampler(node: DictConfig, train_config: dict | None = None):
    """The :class:`~diffusion_elbo.core.samplers.Sampler` of a ``sampler`` node (``sampler``, ``fid.sampler``); a
    ``spacing`` left null takes the checkpoint's own ``sampler.spacing`` from ``train_config`` (time where it has
    none)."""
    from diffusion_elbo.checkpoints import sampler_spacing

    if "spacing" in node and node.spacing is None:
        return instantiate(node, spacing=sampler_spacing(None, train_config or {}))
    return instantiate(node)


def build_datamodule(cfg: DictConfig) -> DiffusionDataModule:
    """The data module of ``cfg.data``; its training order is seeded with the run's ``seed``."""
    datamodule = instantiate(cfg.data)
    if isinstance(datamodule, DiffusionDataModule):
        datamodule.order_seed = int(OmegaConf.select(cfg, "seed", default=0))
    return datamodule


def build_augmentation(cfg: DictConfig) -> Augmentation | None:
    """The training augmentation of ``cfg.augment`` (augmentation with conditioning), None without one."""
    node = OmegaConf.select(cfg, "augment", default=None)
    return None if node is None else instantiate(node)


def build_model(cfg: DictConfig, schedule: NoiseSchedule | None = None) -> torch.nn.Module:
    """The network of ``cfg.model``; with ``variance=learned_range`` it outputs twice the data's channels (the
    mean, then v of Nichol & Dhariwal's interpolated variance): the UNet's ``out_channels`` and the MLP's
    ``out_dim`` are set to twice their inputs when left null. ``schedule``: the chain for a model that takes one (the
    closed-form oracles), in place of ``cfg.schedule`` (a continuous-time schedule's discretization). With an
    ``augment``, the network takes its labels: ``augment_dim`` is set to the augmentation's ``dim``."""
    extra = {"schedule": schedule} if schedule is not None and "schedule" in cfg.model else {}
    augmentation = build_augmentation(cfg)
    if augmentation is not None:
        extra["augment_dim"] = augmentation.dim
    if OmegaConf.select(cfg, "variance") != "learned_range":
        return instantiate(cfg.model, **extra)
    for out_key, in_key in (("out_channels", "in_channels"), ("out_dim", "dim")):
        if out_key in cfg.model:
            doubled = 2 * int(cfg.model[in_key])
            chosen = cfg.model[out_key]
            if chosen is not None and int(chosen) != doubled:
                raise ValueError(
                    f"variance=learned_range needs model.{out_key}={doubled} (mean and variance); it is set to "
                    f"{chosen}: leave model.{out_key}=null"
                )
            return instantiate(cfg.model, **{out_key: doubled}, **extra)
    raise ValueError(
        f"variance=learned_range needs a network that outputs a variance, and {cfg.model._target_} cannot: use "
        "model=unet (images) or model=mlp (vectors), or a fixed variance (small | large)"
    )


def build_module(cfg: DictConfig):
    """The :class:`DiffusionModule` and its data module; the resolved config rides along in checkpoints. A
    continuous-time schedule (:func:`is_continuous`) is given as its log-SNR function with the node's
    :data:`CHAIN_KEYS`; a chain as itself."""
    from diffusion_elbo.lightning.module import DiffusionModule

    datamodule = build_datamodule(cfg)
    net = build_model(cfg)
    continuous = is_continuous(cfg)
    module = DiffusionModule(
        net=net,
        schedule=build_logsnr(cfg) if continuous else build_schedule(cfg),
        data_shape=datamodule.data_shape,
        num_bins=datamodule.num_bins,
        parametrization=cfg.parametrization,
        variance=cfg.variance,
        decoder_variance=OmegaConf.select(cfg, "decoder_variance", default="clipped"),
        objective=build_objective(cfg) if OmegaConf.select(cfg, "loss") else None,
        **(
            {
                "timesteps": OmegaConf.select(cfg, "schedule.timesteps", default=None),
                "eval_timesteps": int(OmegaConf.select(cfg, "schedule.eval_timesteps", default=1000)),
                "variance_gradient": bool(OmegaConf.select(cfg, "schedule.variance_gradient", default=True)),
                "schedule_lr": OmegaConf.select(cfg, "schedule.lr", default=None),
            }
            if continuous
            else {}
        ),
        optimizer=instantiate(cfg.optimizer) if OmegaConf.select(cfg, "optimizer") else None,
        lr_scheduler=instantiate(cfg.lr_scheduler) if OmegaConf.select(cfg, "lr_scheduler") else None,
        val_strata=OmegaConf.select(cfg, "val_strata", default=32),
        clip_denoised=OmegaConf.select(cfg, "clip_denoised", default=True),
        seed=int(OmegaConf.select(cfg, "seed", default=0)),
        nonfinite=OmegaConf.select(cfg, "nonfinite", default="error"),
        nonfinite_max_skips=OmegaConf.select(cfg, "nonfinite_max_skips", default=20),
        compile=bool(OmegaConf.select(cfg, "compile", default=False)),
        channels_last=bool(OmegaConf.select(cfg, "channels_last", default=False)),
        augmentation=build_augmentation(cfg),
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    return module, datamodule


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """Callbacks in config order (sample_grid before ema, so samples use the EMA weights), the CPU budget last; no
    progress bar under ``trainer.enable_progress_bar=false`` (Lightning refuses a bar it is told not to show)."""
    from lightning.pytorch.callbacks import ProgressBar

    callbacks_cfg = OmegaConf.select(cfg, "callbacks") or {}
    from diffusion_elbo.lightning.callbacks import CPUBudget

    callbacks = [instantiate(c) for c in callbacks_cfg.values() if c is not None and "_target_" in c]
    if OmegaConf.select(cfg, "trainer.enable_progress_bar") is False:
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    # the CPU budget last: its count of a training batch then holds every other callback's work on it
    return [c for c in callbacks if not isinstance(c, CPUBudget)] + [c for c in callbacks if isinstance(c, CPUBudget)]


def wandb_host() -> str:
    """The W&B server's host, as the client finds it: WANDB_BASE_URL (a self-hosted server), else api.wandb.ai."""
    return urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"


def wandb_credentials_present() -> bool:
    """True when W&B can log in without asking, by the client's own lookup: WANDB_API_KEY, or an entry for the
    server's host (:func:`wandb_host`) in the netrc file (``NETRC`` if set, else ~/.netrc, where `wandb login`
    writes it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc(os.environ.get("NETRC") or None).authenticators(wandb_host()) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_mode(mode: str) -> str:
    """``auto``: WANDB_MODE if set, else online with credentials, else offline (runs sync later)."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if wandb_credentials_present():
        return "online"
    log.warning(
        "no W&B credentials found (WANDB_API_KEY or `wandb login`): logging offline. Upload later with "
        "`wandb sync <run dir>/wandb/offline-run-*`"
    )
    return "offline"


def wandb_run_id(output_dir: str | Path) -> str:
    """The W&B run id of this run directory: created once, read back when the run is resumed in place."""
    path = Path(output_dir) / "wandb_run_id.txt"
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]  # W&B ids: lowercase letters and digits
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


def build_loggers(cfg: DictConfig, output_dir: str, group: str | None = None, name: str | None = None) -> list:
    """Loggers of the ``logger`` config group; W&B gets its mode resolved and, in a sweep, a shared group."""
    loggers = []
    for key, logger_cfg in (OmegaConf.select(cfg, "logger") or {}).items():
        if logger_cfg is None or "_target_" not in logger_cfg:
            continue
        overrides = {}
        if key == "wandb":
            overrides["mode"] = resolve_wandb_mode(logger_cfg.get("mode", "auto"))
            # a resumed run (same run directory) continues the same W&B run
            overrides["id"], overrides["resume"] = wandb_run_id(output_dir), "allow"
            if logger_cfg.get("group") is None and group is not None:
                overrides["group"] = group
            if logger_cfg.get("name") is None and name is not None:
                overrides["name"] = name
            Path(logger_cfg.save_dir).mkdir(parents=True, exist_ok=True)
        loggers.append(instantiate(logger_cfg, **overrides))
    return loggers


def resolve_device(name: str) -> torch.device:
    """``auto`` picks the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} asked for CUDA but torch sees no GPU here; use device=cpu or device=auto")
    return device
