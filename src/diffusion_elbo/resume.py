"""What a resumed run may change: the checkpoint's config (``diffusion_elbo_config``, the resolved config of the run
that wrote it) against the config of the job that resumes it, key by key. The policy is in docs/faults.md."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusion_elbo.checkpoints import CheckpointError

log = logging.getLogger(__name__)

# Keys (and groups: a key and everything under it) that define the model, the noise process, the objective or the
# data the model learns: a resume that changed one would continue another model from these weights, so it is refused.
MUST_MATCH = (
    "parametrization",
    "variance",
    "decoder_variance",
    "schedule",
    "model",
    "loss",
    "data",
    "augment",
    "optimizer._target_",
)
# Exceptions under MUST_MATCH groups: how the data are read and batched, and the learned schedule's learning rate.
MAY_CHANGE = (
    "schedule.lr",
    "augment.p",  # how often, not what the labels mean
    "data.batch_size",
    "data.eval_batch_size",
    "data.num_workers",
    "data.val_examples",
    "data.root",
    "data.download",
)
# Optimizer settings Lightning restores from the checkpoint's optimizer state, which
# :class:`~diffusion_elbo.lightning.callbacks.ResumedOptimizerSettings` sets back to this job's values. The other
# optimizer keys (fused, foreach, amsgrad, ...) keep the checkpoint's values, with a warning.
APPLIED = ("optimizer.lr", "optimizer.weight_decay", "optimizer.betas", "optimizer.eps", "schedule.lr")

_NOT_SET = object()


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """``{"schedule.timesteps": 1000, "model.channel_mult": [1, 2, 2], ...}``: lists are values, dicts are groups."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _shown(value: Any) -> str:
    """A value as it is typed in an override (``null``, ``[1,2,2]``, ``1e-05``)."""
    if value is _NOT_SET:
        return "(not set)"
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


@dataclass(frozen=True)
class Change:
    key: str
    saved: Any  # the checkpoint's value (_NOT_SET: the checkpoint's config has no such key)
    new: Any  # this job's value

    def __str__(self) -> str:
        return f"{self.key}: checkpoint {_shown(self.saved)}, now {_shown(self.new)}"


@dataclass(frozen=True)
class ResumeChanges:
    refused: list[Change]  # under MUST_MATCH: another model or noise process
    applied: list[Change]  # APPLIED: set on the restored optimizer
    kept: list[Change]  # other optimizer keys: the restored optimizer keeps the checkpoint's value
    allowed: list[Change]  # everything else (trainer, callbacks, logger, sampler, ...): takes effect as configured


def compare_resume_config(saved: dict, new: dict) -> ResumeChanges:
    """Sort the keys whose values differ between the checkpoint's config ``saved`` and this job's ``new`` (both
    resolved, as :func:`~diffusion_elbo.builders.build_module` stores them) by what a resume does with them.

    Keys in both configs are compared. A key in one of them only (a run written before the key existed, or a config
    group switched, ``schedule=sigmoid`` -> ``schedule=cosine``) is listed only beside a difference in the same
    group, so it adds detail to a refusal but never causes one."""
    saved_flat, new_flat = _flatten(saved), _flatten(new)
    differing = [
        Change(k, saved_flat[k], new_flat[k]) for k in saved_flat if k in new_flat and saved_flat[k] != new_flat[k]
    ]
    groups = {c.key.split(".")[0] for c in differing}
    one_sided = [
        Change(k, saved_flat.get(k, _NOT_SET), new_flat.get(k, _NOT_SET))
        for k in [*saved_flat, *(k for k in new_flat if k not in saved_flat)]
        if (k in saved_flat) != (k in new_flat) and k.split(".")[0] in groups
    ]
    if (saved.get("augment") is None) != (new.get("augment") is None):  # an augmentation on one side only: the
        # network has its label input on one side only (a group absent is not otherwise a difference)
        one_sided.append(Change("augment", saved.get("augment") or _NOT_SET, new.get("augment") or _NOT_SET))
    refused, applied, kept, allowed = [], [], [], []
    for change in differing + one_sided:
        if _under(change.key, APPLIED):
            applied.append(change)
        elif _under(change.key, MUST_MATCH) and not _under(change.key, MAY_CHANGE):
            refused.append(change)
        elif _under(change.key, ("optimizer",)):
            kept.append(change)
        else:
            allowed.append(change)
    return ResumeChanges(refused=refused, applied=applied, kept=kept, allowed=allowed)


def check_resume_config(saved: dict, new: dict, *, path: str | Path, log_changes: bool = True) -> ResumeChanges:
    """Refuse (:class:`CheckpointError`) a resume from checkpoint ``path`` whose config ``saved`` differs from this
    job's ``new`` in a key that defines the model or the noise process, naming each key with both values and the
    fix; log what the resume changes otherwise (unless ``log_changes`` is False). Runs before anything is trained."""
    changes = compare_resume_config(saved, new)
    path = Path(path)
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
    if changes.refused:
        lines = "\n".join(f"  {c}" for c in changes.refused)
        back = " ".join(
            f"{c.key}={_shown(c.saved)}" for c in changes.refused if c.saved is not _NOT_SET and c.new is not _NOT_SET
        )
        where = f" (its config: {run_dir / '.hydra' / 'config.yaml'})" if run_dir is not None else ""
        raise CheckpointError(
            f"checkpoint {path} was trained with another model, noise process or data than this command configures, "
            f"and a resume continues the same run:\n{lines}\nResume with the run's own values{where}"
            + (f", e.g. {back}" if back else "")
            + "; or, to train with the new values, start a new run (without ckpt_path)."
        )
    if not log_changes:
        return changes
    for change in changes.kept:
        log.warning(
            "resume: %s is not applied: the optimizer state restored from the checkpoint keeps %s=%s (start a new run "
            "to change it)",
            change,
            change.key,
            _shown(change.saved),
        )
    for change in changes.allowed:
        if _under(change.key, ("ckpt_path", "paths")):  # where this job writes and what it resumes: not a setting
            continue
        log.info("resume: %s -> %s (takes effect from the restored step)", change.key, _shown(change.new))
    return changes
