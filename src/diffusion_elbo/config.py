"""Checks on a composed config, run at start so a bad value fails before any work is done.

Hydra composes the config; this module checks the values that Hydra cannot (choices, ranges) and
turns them into one :class:`ConfigError` that names the key, the bad value and how to fix it.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import types
import typing
from collections.abc import Iterable
from enum import Enum
from pathlib import Path

import torch
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from diffusion_elbo.core import DecoderVariance, Parametrization, ReverseVariance
from diffusion_elbo.core.losses import TrainingSetup


class ConfigError(ValueError):
    """A config value that cannot work; the message says which key and what to use instead."""


def _choices(enum: type[Enum]) -> str:
    return " | ".join(member.value for member in enum)


def _target_name(cfg: DictConfig, key: str) -> str | None:
    """The class (or function) name of the node's ``_target_``, None where it has none."""
    target = OmegaConf.select(cfg, f"{key}._target_", default=None)
    return None if target is None else str(target).rsplit(".", 1)[-1]


def _check_choice(cfg: DictConfig, key: str, enum: type[Enum], problems: list[str]) -> None:
    value = OmegaConf.select(cfg, key, default=None)
    if value is None:
        return
    if value not in {m.value for m in enum}:
        problems.append(
            f"{key}={value!r} is not an option; choose one of {_choices(enum)} (e.g. {key}={next(iter(enum)).value})"
        )


def _check_range(
    cfg: DictConfig,
    key: str,
    problems: list[str],
    *,
    minimum: float | None = None,
    positive: bool = False,
    integer: bool = False,
    fix: str = "",
) -> None:
    """A number in range; ``fix``, where given, follows the problem after a colon (what the key means, a value)."""
    value = OmegaConf.select(cfg, key, default=None)
    if value is None:
        return
    suffix = f": {fix}" if fix else ""
    if integer and (not isinstance(value, int) or isinstance(value, bool)):
        problems.append(f"{key}={value!r} must be an integer{suffix}")
        return
    if not isinstance(value, int | float) or isinstance(value, bool):
        problems.append(f"{key}={value!r} must be a number{suffix}")
        return
    if positive and not value > 0:
        problems.append(f"{key}={value!r} must be > 0{suffix}")
    if minimum is not None and value < minimum:
        problems.append(f"{key}={value!r} must be >= {minimum}{suffix}")


def validate_config(cfg: DictConfig, extra: Iterable[str] = ()) -> None:
    """Raise :class:`ConfigError` listing every invalid value found in ``cfg``."""
    problems: list[str] = list(extra)
    _check_choice(cfg, "parametrization", Parametrization, problems)
    _check_choice(cfg, "variance", ReverseVariance, problems)
    _check_choice(cfg, "decoder_variance", DecoderVariance, problems)
    from diffusion_elbo.builders import is_continuous

    continuous = is_continuous(cfg)
    # the schedule's keys the framework itself reads (T, the log-SNR endpoints), then the schedule built once unless one
    # of those keys is already refused (its own check would say the same again)
    key_problems: list[str] = []
    _check_timesteps(cfg, continuous, key_problems)
    if continuous:
        key_problems.extend(_continuous_problems(cfg))
    schedule_problems = _schedule_problems(
        cfg, continuous, build=not any(p.startswith("schedule.") for p in key_problems)
    )
    problems.extend([*schedule_problems, *key_problems])
    schedule_name = _schedule_name(cfg) if not schedule_problems else _target_name(cfg, "schedule")
    for key in object_nodes(cfg):
        problems.extend(object_problems(cfg, key))
    if OmegaConf.select(cfg, "task_name") == "train":
        problems.extend(_objective_problems(cfg, schedule_name, continuous))
    for key in ("data.batch_size", "batch_size", "max_batch", "num_samples", "fid.seeds"):
        _check_range(cfg, key, problems, minimum=1, integer=True)
    _check_range(cfg, "num_examples", problems, minimum=1, integer=True)
    _check_range(
        cfg,
        "val_strata",
        problems,
        minimum=1,
        integer=True,
        fix="it is the number of strata of 2..T the validation ELBO draws a timestep from (the default is 32)",
    )
    _check_range(
        cfg,
        "nonfinite_max_skips",
        problems,
        minimum=1,
        integer=True,
        fix="the batches in a row nonfinite=skip may skip before the next non-finite one stops training (default 20)",
    )
    problems.extend(_trainer_value_problems(cfg))
    problems.extend(_ckpt_path_problems(cfg))
    for key in ("optimizer.lr", "data.std"):
        _check_range(cfg, key, problems, positive=True)
    if OmegaConf.select(cfg, "task_name") == "train" and OmegaConf.select(cfg, "variance") == "analytic":
        problems.append(
            "variance=analytic is chosen after training (it is estimated for the trained mean, Bao et al. 2022): "
            "train with variance=small and run src/eval.py ckpt_path=... variance=analytic"
        )
    split = OmegaConf.select(cfg, "split", default=None)
    if split is not None and split not in ("train", "val", "test"):
        problems.append(f"split={split!r} is not a data split; choose one of train | val | test")
    problems.extend(_constructor_problems(cfg, "trainer"))
    for name in OmegaConf.select(cfg, "callbacks", default=None) or {}:
        key = f"callbacks.{name}"
        problems.extend(object_problems(cfg, key) if key in BUILT_CALLBACKS else _constructor_problems(cfg, key))
    problems.extend(_unet_problems(cfg))
    problems.extend(_environment_problems(cfg))
    problems.extend(wandb_mode_problems(cfg))
    problems.extend(_augment_problems(cfg))
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


def _augment_problems(cfg: DictConfig) -> list[str]:
    """An augmentation with conditioning needs a network that takes its labels (an ``augment_dim`` argument)."""
    if OmegaConf.select(cfg, "augment", default=None) is None or OmegaConf.select(cfg, "model._target_") is None:
        return []
    translate, size = OmegaConf.select(cfg, "augment.translate", default=0), OmegaConf.select(cfg, "data.image_size")
    if isinstance(translate, int) and isinstance(size, int) and translate >= size:
        return [f"augment.translate={translate} must be smaller than the images (data.image_size={size} pixels)"]
    found = constructor_parameters(str(cfg.model._target_))
    if found is None or "augment_dim" in found[1]:
        return []
    return [
        f"augment ({_target_name(cfg, 'augment')}) tells the network how each training image was transformed, and "
        f"model {found[0]} takes no augmentation labels (no augment_dim argument): use model=unet, or augment=null"
    ]


# W&B's own modes (wandb.init's `mode`; dryrun and run are its old names of offline and online) and the project's auto
WANDB_MODES = ("auto", "online", "offline", "disabled", "shared", "dryrun", "run")


def wandb_mode_problems(cfg: DictConfig) -> list[str]:
    """A W&B mode (``wandb.mode`` of the eval and post-hoc jobs, ``logger.wandb.mode`` of training) that W&B does not
    know, named before any work (W&B itself would refuse it only when the job logs, at its end)."""
    problems = []
    for key in ("wandb.mode", "logger.wandb.mode"):
        mode = OmegaConf.select(cfg, key, default=None)
        if mode is not None and mode not in WANDB_MODES:
            problems.append(
                f"{key}={mode!r} is not a W&B mode; choose one of {' | '.join(WANDB_MODES[:5])} (auto: online with "
                "credentials, else offline)"
            )
    return problems


def _check_timesteps(cfg: DictConfig, continuous: bool, problems: list[str]) -> None:
    """T of a named schedule. A discrete chain needs T >= 2: t = 1 is the decoder p(x_0 | x_1) and the validation
    ELBO's per-t profile has at least one diffusion step t >= 2 besides it. A continuous-time schedule's
    ``schedule.timesteps`` is the T of its T-step bound (null: T -> infinity), for which T = 1 is a bound too."""
    if continuous:
        _check_range(
            cfg,
            "schedule.timesteps",
            problems,
            minimum=1,
            integer=True,
            fix="the T of the T-step bound (or schedule.timesteps=null for the continuous-time bound)",
        )
        return
    _check_range(
        cfg,
        "schedule.timesteps",
        problems,
        minimum=2,
        integer=True,
        fix="a chain needs t = 1 (the decoder) and at least one diffusion step (e.g. schedule.timesteps=1000)",
    )
    timesteps = OmegaConf.select(cfg, "schedule.timesteps", default=None)
    if isinstance(timesteps, int) and not isinstance(timesteps, bool) and timesteps >= 2:
        problems.extend(_sampling_steps_problems(cfg, timesteps))


def _sampling_steps_problems(cfg: DictConfig, timesteps: int) -> list[str]:
    """The callbacks that sample during training walk at most the chain's T steps: more fail at the first validation
    that samples (the sample grid at the first, FID at its ``every_n_val``-th), after all the training before it."""
    problems = []
    # FID runs on image data only, and with the classifier features only on labelled images (not an image folder)
    images = OmegaConf.select(cfg, "data.image_size", default=None) is not None
    labelled = not str(OmegaConf.select(cfg, "data._target_", default="")).endswith("ImageFolderDataModule")
    fid_runs = images and (labelled or OmegaConf.select(cfg, "callbacks.fid.features", default=None) != "classifier")
    for name in ("sample_grid", "fid") if fid_runs else ("sample_grid",):
        node = OmegaConf.select(cfg, f"callbacks.{name}", default=None)
        if not isinstance(node, DictConfig) or not (OmegaConf.select(node, "num_samples", default=0) or 0) > 0:
            continue
        steps = OmegaConf.select(node, "sampler.steps", default=None)
        if isinstance(steps, int) and not isinstance(steps, bool) and steps > timesteps:
            # the key the user sets: the sample grid's sampler is ${sampler}
            shared = OmegaConf.is_interpolation(node, "sampler")
            key = "sampler.steps" if shared else f"callbacks.{name}.sampler.steps"
            problems.append(
                f"{key}={steps} sampling steps exceed the chain's schedule.timesteps={timesteps} (callbacks.{name} "
                f"samples during training): use {key}={timesteps} or fewer, or callbacks.{name}.num_samples=0"
            )
    return problems


def _trainer_value_problems(cfg: DictConfig) -> list[str]:
    """Values of the Trainer's arguments whose type fits (checked by :func:`_constructor_problems`) but which fail
    only once training runs: ``val_check_interval=0`` divides by zero after the first step."""
    problems: list[str] = []
    _check_range(
        cfg,
        "trainer.val_check_interval",
        problems,
        positive=True,
        fix="validate every N training steps (an integer >= 1, e.g. trainer.val_check_interval=1000) or after a "
        "fraction of each epoch (a float in (0, 1]); to validate never, set trainer.limit_val_batches=0",
    )
    return problems


def _ckpt_path_problems(cfg: DictConfig) -> list[str]:
    """``ckpt_path`` names a checkpoint file (or ``last``); a folder would be reported as missing when it is read."""
    ckpt_path = OmegaConf.select(cfg, "ckpt_path", default=None)
    if not isinstance(ckpt_path, str) or ckpt_path == "last" or not Path(ckpt_path).is_dir():
        return []
    folder = Path(ckpt_path)
    found = [p for p in (folder / "last.ckpt", folder / "checkpoints" / "last.ckpt") if p.is_file()]
    found += sorted(folder.glob("*.ckpt")) + sorted(folder.glob("checkpoints/*.ckpt"))
    fix = f"ckpt_path={found[0]}" if found else "ckpt_path=<run dir>/checkpoints/last.ckpt"
    return [f"ckpt_path={ckpt_path} is a folder, not a checkpoint file: point it at a .ckpt file, e.g. {fix}"]


def _continuous_problems(cfg: DictConfig) -> list[str]:
    """What a continuous-time schedule (VDM) cannot combine with."""
    problems = []
    _check_range(cfg, "schedule.eval_timesteps", problems, minimum=1, integer=True)
    _check_range(cfg, "schedule.hidden", problems, minimum=1, integer=True)
    lo, hi = OmegaConf.select(cfg, "schedule.gamma_min"), OmegaConf.select(cfg, "schedule.gamma_max")
    if isinstance(lo, int | float) and isinstance(hi, int | float) and not lo < hi:
        problems.append(
            f"schedule.gamma_min={lo} must be below schedule.gamma_max={hi} (gamma = -log SNR grows with the noise; "
            "VDM uses -13.3 and 5.0)"
        )
    if OmegaConf.select(cfg, "task_name") != "train":
        return problems
    name = _schedule_name(cfg)
    variance = OmegaConf.select(cfg, "variance")
    if variance not in (None, ReverseVariance.SMALL.value):
        problems.append(
            f"schedule={name} trains the bound with the posterior variance (its reverse kernels are "
            f"q(z_s | z_t, x = x_hat)); variance={variance} is for discrete schedules: leave variance=small "
            "(variance=analytic can still be chosen at eval time)"
        )
    return problems


def _objective(cfg: DictConfig):
    """The training objective of ``cfg.loss``, None where there is none or it cannot be built (its own problem is
    reported by :func:`object_problems`)."""
    from diffusion_elbo.builders import build_objective

    if OmegaConf.select(cfg, "loss._target_", default=None) is None:
        return None
    try:
        return build_objective(cfg)
    except Exception:
        return None


def _objective_problems(cfg: DictConfig, schedule_name: str | None, continuous: bool) -> list[str]:
    """What the training objective cannot train with this schedule and reverse variance: the objective's own rules
    (:meth:`~diffusion_elbo.core.losses.Objective.problems`, which the module asks as well)."""
    objective = _objective(cfg)
    variance = OmegaConf.select(cfg, "variance", default=None)
    if objective is None or variance not in {v.value for v in ReverseVariance}:
        return []  # a loss node that cannot be built, or a variance that is not one: reported on their own
    setup = TrainingSetup(
        schedule=str(schedule_name),
        continuous=continuous,
        learned_schedule=continuous and _schedule_learns(cfg),
        variance=ReverseVariance(variance),
    )
    return objective.problems(setup)


def _schedule_learns(cfg: DictConfig) -> bool:
    """Whether the configured continuous-time schedule has trainable parameters (False where it cannot be built)."""
    from diffusion_elbo.builders import build_logsnr

    try:
        return build_logsnr(cfg).learned
    except Exception:
        return False


# ---- keys the project does not own: Lightning's Trainer and the callbacks' constructors, the machine -----------------


def _type_name(annotation: object) -> str:
    """``int``, ``int or null``, ``'32-true' | 'bf16-mixed' ...``: an annotation as a user reads it."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_type_name(a) for a in args))
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _fits(value: object, annotation: object) -> bool:
    """Whether a config value can be passed as an argument of this annotation. Lenient where the annotation is not a
    plain type: a node with ``_target_`` (built by instantiate), a list or dict for a container, an unknown class."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation in (inspect.Parameter.empty, typing.Any):
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if annotation is type(None):
        return value is None
    if isinstance(value, DictConfig | ListConfig):
        return annotation not in (bool, int, float, str)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    cls = origin or annotation
    return not isinstance(cls, type) or isinstance(value, cls)


def not_an_argument(key: str, name: str, params: Iterable[str], owner: str) -> str:
    """The problem line for ``<key>.<name>``, which ``owner``'s constructor does not take, with the closest match."""
    close = difflib.get_close_matches(name, list(params), n=1)
    fix = f"did you mean {key}.{close[0]}=...?" if close else f"its arguments are {', '.join(params)}"
    return f"{key}.{name} is not an argument of {owner}: {fix}"


def constructor_parameters(target: str) -> tuple[str, dict[str, inspect.Parameter]] | None:
    """The name and the parameters (annotations resolved) of the constructor of ``target`` (a ``_target_`` string);
    None where it cannot be imported or read."""
    try:
        obj = get_object(target)
        signature = inspect.signature(obj, eval_str=True)
    except Exception:  # an unimportable target fails later in instantiate, with its own message
        return None
    return getattr(obj, "__name__", target), dict(signature.parameters)


# the nodes that build one object of an extension point by ``_target_`` (the sample grid's sampler is ``${sampler}``)
OBJECT_NODES = ("loss", "sampler", "augment", "fid.sampler", "callbacks.fid.sampler", "callbacks.toy2d_metrics.sampler")
# callbacks built once at the check, as the objects are, for the checks of their values their constructors make (the
# EMA: one of decay and sigma_rel, each in range); the others, whose constructors touch files or data, only against
# their signatures
BUILT_CALLBACKS = ("callbacks.ema",)


def _schedule_name(cfg: DictConfig) -> str | None:
    """The schedule's own name (``sigmoid``, ``logsnr_linear``; a class of one's own: its ``name``), for messages; its
    ``_target_``'s where it cannot be built (that problem is reported by :func:`_schedule_problems`)."""
    from diffusion_elbo.builders import build_logsnr

    try:
        return build_logsnr(cfg).name
    except Exception:
        return _target_name(cfg, "schedule")


def _schedule_problems(cfg: DictConfig, continuous: bool, *, build: bool = True) -> list[str]:
    """The schedule node checked before any work: its keys against its ``_target_``'s constructor (a continuous-time
    node's ``builders.CHAIN_KEYS`` are the module's, not the schedule's), then the schedule built once, so its own checks
    run (a beta outside (0, 1), T < 1, an unknown base, gamma_min >= gamma_max: each names the key and the fix)."""
    from hydra.errors import InstantiationException

    from diffusion_elbo.builders import CHAIN_KEYS, build_logsnr

    node = OmegaConf.select(cfg, "schedule", default=None)
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return []  # eval and sample read the schedule from the checkpoint
    problems = _constructor_problems(cfg, "schedule", ignored=CHAIN_KEYS if continuous else ())
    if problems or not build or constructor_parameters(str(node._target_)) is None:
        return problems  # an unimportable target fails in instantiate, with Hydra's message
    try:
        build_logsnr(cfg)
    except InstantiationException as exc:
        cause = exc.__cause__
        if not isinstance(cause, ValueError | TypeError):
            raise
        return [f"schedule: {cause}"]
    except (ValueError, TypeError) as exc:
        return [f"schedule: {exc}"]
    return []


def object_nodes(cfg: DictConfig) -> list[str]:
    """The keys of every extension point's object in ``cfg``: :data:`OBJECT_NODES` and each estimator of
    ``likelihood``."""
    estimators = OmegaConf.select(cfg, "likelihood", default=None)
    named = [f"likelihood.{k}" for k in estimators] if isinstance(estimators, DictConfig) else []
    return [*OBJECT_NODES, *named]


def object_problems(cfg: DictConfig, key: str) -> list[str]:
    """The node ``key`` (an object of an extension point: a sampler, a likelihood estimator, ...) checked before any
    work: its keys against its ``_target_``'s constructor (:func:`_constructor_problems`), then the object built once,
    so its own argument checks run (their ``ValueError`` starts with the argument, ``steps=0 must be ...``, and gets
    the node's key in front). A ``spacing`` left null (the checkpoint's own, filled in later) is built as ``time``."""
    node = OmegaConf.select(cfg, key, default=None)
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return []
    filled = {"spacing": "time"} if "spacing" in node and node.spacing is None else {}
    problems = _constructor_problems(cfg, key, unchecked=filled)
    if problems or constructor_parameters(str(node._target_)) is None:
        return problems  # an unimportable target fails in instantiate, with Hydra's message
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        instantiate(node, **filled)
    except InstantiationException as exc:
        cause = exc.__cause__
        if not isinstance(cause, ValueError | TypeError):
            raise
        return [f"{key}.{cause}" if "=" in str(cause).split(" ", 1)[0] else f"{key}: {cause}"]
    return problems


def _constructor_problems(
    cfg: DictConfig, key: str, unchecked: Iterable[str] = (), ignored: Iterable[str] = ()
) -> list[str]:
    """Each key of the node ``key`` (``trainer``, ``callbacks.ema``) checked against its ``_target_``'s constructor:
    a key it does not take (a misspelling), a value of the wrong type (``trainer.max_steps=abc``)."""
    node = OmegaConf.select(cfg, key, default=None)
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return []
    found = constructor_parameters(str(node._target_))
    if found is None:
        return []
    owner, params = found
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n != "self"]
    problems = []
    for name in node:
        name = str(name)
        if name.startswith("_") or name in ignored:
            continue
        if name not in params:
            if not takes_any:
                problems.append(not_an_argument(key, name, named, owner))
            continue
        if OmegaConf.is_interpolation(node, name) or OmegaConf.is_missing(node, name) or name in unchecked:
            continue  # the project's own wiring (${data.channels}, ${paths.output_dir}); resolved later
        value, annotation = node[name], params[name].annotation
        if not _fits(value, annotation):
            kind = _type_name(annotation)
            problems.append(f"{key}.{name}={value!r} must be {kind} ({owner}'s argument {name}: {kind})")
    return problems


# the model preset of each image data set whose size the default UNet (8x8 digits) does not fit
UNET_PRESETS = {
    "MNISTDataModule": "with data=mnist use model=unet_mnist (or experiment=mnist_unet)",
    "CIFAR10DataModule": "with data=cifar10 use model=unet_cifar10 (or experiment=cifar10_ddpm)",
    "DigitsDataModule": "with data=digits use model=unet",
}


def _unet_problems(cfg: DictConfig) -> list[str]:
    """A UNet whose levels do not fit the data's image size (``data=mnist`` with the digits UNet): the UNet's own
    shape check, named before any data is read, with the model preset of that data."""
    from diffusion_elbo.models.unet import _validate

    if not str(OmegaConf.select(cfg, "model._target_", default="")).endswith("UNet"):
        return []
    try:
        _validate(
            int(cfg.data.image_size),
            int(cfg.model.model_channels),
            list(cfg.model.channel_mult),
            int(cfg.model.num_res_blocks),
            list(cfg.model.attention_resolutions),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        data = str(OmegaConf.select(cfg, "data._target_", default="")).rsplit(".", 1)[-1]
        preset = UNET_PRESETS.get(data)
        fix = preset or "set model.attention_resolutions to sizes it runs at"
        return [f"{exc}: the model does not fit the data; {fix}"]
    return []


def module_available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _environment_problems(cfg: DictConfig) -> list[str]:
    """What this machine lacks for the config: a GPU for ``trainer.accelerator=gpu``, torch-fidelity for the
    Inception FID."""
    problems = []
    accelerator = OmegaConf.select(cfg, "trainer.accelerator", default=None)
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        problems.append(
            f"trainer.accelerator={accelerator} (trainer=gpu) but torch {torch.__version__} sees no CUDA GPU on this "
            "machine: use trainer=cpu, or trainer=default (accelerator auto: the GPU where there is one)"
        )
    for key in ("callbacks.fid", "fid"):
        features = OmegaConf.select(cfg, f"{key}.features", default=None)
        wanted = (OmegaConf.select(cfg, f"{key}.num_samples", default=0) or 0) > 0
        if features == "inception" and wanted and not module_available("torch_fidelity"):
            problems.append(
                f"{key}.features=inception needs torch-fidelity, which is not installed here: use "
                f"{key}.features=classifier, or {key}.num_samples=0, or install the fid extra as the README says "
                "(keeping your torch)"
            )
    return problems
