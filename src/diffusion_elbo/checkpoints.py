"""Loading trained runs back: checkpoints carry their resolved config, so eval and sample rebuild
the schedule, network and data exactly as they were trained."""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from diffusion_elbo.core import NoiseSchedule, Parametrization, ReverseVariance
from diffusion_elbo.data.base import DiffusionDataModule


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def sampler_spacing(requested: str | None, train_config: dict) -> str:
    """The sampler grid for a loaded run: ``requested`` (time | logsnr), or where it is None the run's own
    ``sampler.spacing`` from training (``time`` for runs trained before the option existed)."""
    if requested is not None:
        return str(requested)
    return str(OmegaConf.select(OmegaConf.create(train_config), "sampler.spacing", default=None) or "time")


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """torch.load a checkpoint with errors that name the problem: missing, truncated or corrupt, or not ours.

    Checkpoints hold pickled Python objects (Lightning's loop state): load only files you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"ckpt_path={path} does not exist; point ckpt_path at a .ckpt file of a training run "
            "(they are in <run dir>/checkpoints/)"
        )
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({type(exc).__name__}: {exc}); it was probably cut off "
            "while being written. Use an earlier checkpoint from the same checkpoints/ folder."
        ) from exc
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(
            f"{path} is not a Lightning checkpoint (no state_dict); pass a .ckpt written by src/train.py"
        )
    if checkpoint.get("diffusion_elbo_config") is None:
        raise CheckpointError(
            f"{path} has no diffusion_elbo_config: it was not written by src/train.py, so its model cannot be rebuilt"
        )
    checkpoint["diffusion_elbo_config"] = upgrade_config(checkpoint["diffusion_elbo_config"])
    return checkpoint


def fingerprint(checkpoint: dict) -> str:
    """A digest of what an evaluation of ``checkpoint`` depends on: its ``state_dict`` (names, dtypes, shapes and
    values) and its resolved training config: two files with the same fingerprint hold the same model, whatever else
    (optimizer, loop state, callbacks) differs. The code that evaluates it is not part of it."""
    import hashlib
    import json

    digest = hashlib.sha256()

    def field(data: bytes) -> None:  # length-prefixed: no two sequences of fields give the same stream
        digest.update(len(data).to_bytes(8, "little") + data)

    for name in sorted(checkpoint["state_dict"]):
        value = checkpoint["state_dict"][name]
        field(name.encode())
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu()
            tensor = (tensor.to_dense() if tensor.is_sparse else tensor).resolve_conj().contiguous()
            field(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            field(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        else:
            field(json.dumps(value, sort_keys=True, default=str).encode())
    field(json.dumps(checkpoint.get("diffusion_elbo_config"), sort_keys=True, default=str).encode())
    return digest.hexdigest()


def upgrade_config(config: dict) -> dict:
    """A checkpoint's config in today's form, so the run is rebuilt, evaluated and resumed as it was trained:

    - before the loss group built objects (2026-12-05) a loss was named (``loss: {name: simple, ...}``); it becomes
      its objective's ``_target_`` with the same arguments;
    - before every schedule was a class on the one time axis (2026-12-05) a schedule was named
      (``_target_: ...make_schedule`` or ``...make_logsnr_schedule`` with ``name: cosine``); it becomes its class's
      ``_target_`` (``logsnr_discrete``: :func:`~diffusion_elbo.core.schedules.beta_log_snr`) with the same arguments.
    """
    return _upgrade_schedule(_upgrade_loss(config))


def _upgrade_loss(config: dict) -> dict:
    import inspect

    loss = config.get("loss")
    if not isinstance(loss, dict) or "_target_" in loss or "name" not in loss:
        return config
    from diffusion_elbo.core.losses import OBJECTIVES_BY_NAME

    cls = OBJECTIVES_BY_NAME[loss["name"]]
    params = inspect.signature(cls).parameters
    arguments = {k: v for k, v in loss.items() if k in params}
    return {**config, "loss": {"_target_": f"{cls.__module__}.{cls.__qualname__}", **arguments}}


# the class (or function) each named schedule of the old factories became, by its name
_SCHEDULE_TARGETS = {
    "linear": "diffusion_elbo.core.schedules.LinearBetas",
    "quadratic": "diffusion_elbo.core.schedules.QuadraticBetas",
    "cosine": "diffusion_elbo.core.schedules.CosineBetas",
    "sigmoid": "diffusion_elbo.core.schedules.SigmoidBetas",
    "custom": "diffusion_elbo.core.schedules.BetaSchedule",
    "logsnr_linear": "diffusion_elbo.core.logsnr.LinearLogSNR",
    "logsnr_cosine": "diffusion_elbo.core.logsnr.CosineLogSNR",
    "learned": "diffusion_elbo.core.logsnr.LearnedLogSNR",
    "logsnr_discrete": "diffusion_elbo.core.schedules.beta_log_snr",
}
_OLD_FACTORIES = ("diffusion_elbo.core.schedules.make_schedule", "diffusion_elbo.core.logsnr.make_logsnr_schedule")


def _upgrade_schedule(config: dict) -> dict:
    import inspect

    from hydra.utils import get_object

    from diffusion_elbo.builders import CHAIN_KEYS

    node = config.get("schedule")
    if (
        not isinstance(node, dict)
        or node.get("_target_") not in _OLD_FACTORIES
        or node.get("name") not in _SCHEDULE_TARGETS
    ):
        return config
    target = _SCHEDULE_TARGETS[node["name"]]
    params = inspect.signature(get_object(target)).parameters
    arguments = {k: v for k, v in node.items() if k in params or (k in CHAIN_KEYS and "eval_timesteps" in node)}
    return {**config, "schedule": {"_target_": target, **arguments}}


def check_targets_importable(config: dict, path: str | Path) -> None:
    """Refuse, naming each class and the fix, a checkpoint whose config builds classes (``_target_``) that cannot be
    imported here: one's own schedule, loss or sampler (``docs/extending.md``) lives in a module outside the package,
    found at training through PYTHONPATH; without it Hydra's error names neither the module nor what to set."""
    from hydra.utils import get_object

    missing = []

    def visit(node: object, key: str) -> None:
        if isinstance(node, dict):
            target = node.get("_target_")
            if isinstance(target, str):
                try:
                    get_object(target)  # Hydra's own lookup, the one instantiate will use
                except Exception:
                    missing.append(f"{target} ({key or 'the config'})")
            for k, v in node.items():
                visit(v, f"{key}.{k}" if key else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                visit(v, f"{key}[{i}]")

    visit(config, "")
    if missing:
        raise CheckpointError(
            f"checkpoint {path} was trained with classes that cannot be imported here: {', '.join(missing)}. A class "
            "of one's own (docs/extending.md) lives in a module outside the package: put the folder that holds it on "
            "PYTHONPATH as at training, e.g. PYTHONPATH=path/to/plugins python src/eval.py ckpt_path=..."
        )


@dataclass
class LoadedRun:
    model: torch.nn.Module  # the denoiser net(x_t, t), with EMA weights when the run used EMA
    module: torch.nn.Module  # the DiffusionModule around it (for sampling)
    schedule: NoiseSchedule
    datamodule: DiffusionDataModule
    parametrization: Parametrization
    variance: ReverseVariance
    decoder_variance: str  # sigma_1^2 convention the run was trained and validated with
    config: dict
    global_step: int


def load_for_eval(path: str | Path, device: torch.device | str = "cpu") -> LoadedRun:
    """Rebuild a trained run from its checkpoint. The ``state_dict`` holds the EMA weights when EMA was on
    (Lightning's weight averaging stores the raw ones under ``current_model_state``)."""
    from diffusion_elbo.builders import build_module

    checkpoint = read_checkpoint(path)
    check_targets_importable(checkpoint["diffusion_elbo_config"], path)
    cfg = OmegaConf.create(checkpoint["diffusion_elbo_config"])
    module, datamodule = build_module(cfg)
    missing, unexpected = module.load_state_dict(checkpoint["state_dict"], strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not fit the model its config describes: missing keys {missing[:8]}, "
            f"unexpected keys {unexpected[:8]}. Was the file edited or written by another version?"
        )
    module = module.to(device).eval()
    return LoadedRun(
        # the denoiser on the chain's steps (a continuous-time model's module maps them to noise levels)
        model=module,
        module=module,
        schedule=module.schedule,
        datamodule=datamodule,
        parametrization=module.parametrization,
        variance=module.variance,
        decoder_variance=module.decoder_variance.value,
        config=checkpoint["diffusion_elbo_config"],
        global_step=int(checkpoint.get("global_step", 0)),
    )
