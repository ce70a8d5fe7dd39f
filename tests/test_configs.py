"""Every config group option and experiment preset composes and builds; bad values are caught at start."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from diffusion_elbo.builders import build_module
from diffusion_elbo.config import ConfigError, validate_config

from .helpers import CONF_DIR


def compose_with(overrides: list[str], hydra: bool = False):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=hydra)
    if not hydra:
        with open_dict(cfg):
            cfg.paths.output_dir = "/tmp/unused"
    return cfg


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiment_presets_compose_and_build(experiment):
    cfg = compose_with([f"experiment={experiment}"])
    validate_config(cfg)
    module, datamodule = build_module(cfg)
    assert module.data_shape == tuple(datamodule.data_shape)
    if experiment == "cifar10_ddpm":
        assert sum(p.numel() for p in module.net.parameters()) == pytest.approx(35.7e6, rel=0.01)
        assert cfg.callbacks.ema.decay == 0.9999 and cfg.lr_scheduler.warmup_steps == 5000


def _leaves(cfg) -> dict:
    """The composed config as ``{"model.model_channels": 16, ...}`` (unresolved interpolations kept as written)."""
    from omegaconf import OmegaConf

    from diffusion_elbo.resume import _flatten

    return _flatten(OmegaConf.to_container(cfg, resolve=False))


def test_the_15_cpu_minute_preset_is_the_vdm_preset_smaller_with_a_short_warmup_and_its_calibrated_steps():
    """experiment=digits_vdm_15cpu is experiment=digits_vdm plus the overrides its yaml states, nothing else; its steps
    are what the lever table trained (15 CPU-minutes at the depth1 variant's calibrated cost, benchmarks/short_run)."""
    import json

    short, long = (_leaves(compose_with([f"experiment={name}"])) for name in ("digits_vdm_15cpu", "digits_vdm"))
    differ = {k: (long.get(k), short.get(k)) for k in short.keys() | long.keys() if short.get(k) != long.get(k)}
    assert differ == {
        "model.model_channels": (32, 16),
        "model.num_res_blocks": (2, 1),
        "lr_scheduler.warmup_steps": (500, 50),
        "trainer.max_steps": (10000, 2839),
        "trainer.val_check_interval": (1000, 2839),
        # the EMA each was chosen with: the preset's width post hoc at 10k, the classic decay of the lever table
        "callbacks.ema.sigma_rel": (0.2, None),
        "callbacks.ema.decay": (None, 0.999),
    }
    overrides = ["experiment=digits_vdm", "model.model_channels=16", "lr_scheduler.warmup_steps=50",
                 "model.num_res_blocks=1"]  # fmt: skip
    table = Path(__file__).resolve().parents[1] / "benchmarks" / "short_run" / "vdm_15cpu"
    cost = json.loads((table / "calibration.json").read_text())["depth1"]
    assert cost["overrides"] == overrides and "anchor" in cost  # calibrated a day later, on the table's scale
    assert round(60 * 15 / cost["cpu_seconds_per_step"]) == 2839
    rows = [r for r in json.loads((table / "runs.json").read_text()) if r["label"] == "depth1"]
    assert rows
    for row in rows:
        assert row["overrides"] == [*overrides, "trainer.val_check_interval=2839"]
        assert row["steps_trained"] == 2839 and row["cost_of"] == "depth1"


@pytest.mark.parametrize(
    "group", ["schedule", "loss", "optimizer", "lr_scheduler", "sampler", "trainer", "logger", "callbacks", "augment"]
)
def test_every_option_of_a_group_composes(group, monkeypatch):
    # trainer=gpu composes; on a machine without a GPU it is refused (test_keys_the_project_does_not_own_...)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for option in options(group):
        if group == "schedule" and option == "custom":
            cfg = compose_with(["schedule=custom", "schedule.betas=[0.1,0.2,0.3]"])
        elif group == "loss" and option == "hybrid":  # it trains a learned variance (tested in test_learned_variance)
            cfg = compose_with(["loss=hybrid", "variance=learned_range"])
        elif group == "schedule" and option in (
            "learned",
            "learned_multivariate",
            "logsnr_linear",
            "logsnr_cosine",
            "logsnr_discrete",
        ):
            # continuous time trains with the bound (loss=vdm; tested in test_continuous), not the default v_mse
            cfg = compose_with([f"schedule={option}", "loss=vdm"])
        else:
            cfg = compose_with([f"{group}={option}"])
        validate_config(cfg)


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local", "submitit_slurm"])
def test_launchers_are_available(launcher):
    cfg = compose_with([f"hydra/launcher={launcher}"], hydra=True)
    assert "hydra_plugins" in cfg.hydra.launcher._target_


def test_validate_config_lists_every_problem():
    cfg = compose_with(
        [
            "parametrization=eps3",
            "loss.timestep_sampling=l1",
            "optimizer.lr=-1",
            "data.batch_size=0",
            "sampler.spacing=sigma",
        ]
    )
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    msg = str(err.value)
    for fragment in (
        "parametrization='eps3'",
        "loss.timestep_sampling='l1' is not an option",
        "optimizer.lr=-1 must be > 0",
        "data.batch_size=0",
        "sampler.spacing='sigma' is not an option; choose time | logsnr",
        "callbacks.fid.sampler.spacing='sigma'",  # the FID callback samples on the run's grid
    ):
        assert fragment in msg


@pytest.mark.parametrize(
    "overrides, problem",
    [
        (["trainer.max_steps=abc"], "trainer.max_steps='abc' must be int (Trainer's argument max_steps: int)"),
        (["callbacks.ema.decay=high"], "callbacks.ema.decay='high' must be float or null (EMA's argument decay: float "
         "or null)"),
        # the EMA is a classic decay or a power-function EMA (the default's sigma_rel 0.14): one of the two
        (["callbacks.ema.decay=0.99"], "callbacks.ema.decay=0.99 and sigma_rel=0.14 are both set: the EMA is a classic "
         "decay or a power-function EMA of a relative width, not both; add callbacks.ema.sigma_rel=null to use decay "
         "0.99"),
        (["callbacks.ema.sigma_rel=null"], "callbacks.ema.decay=null and sigma_rel=null: the EMA needs one of them"),
        (["callbacks.ema.sigma_rel=0.5"], "callbacks.ema.sigma_rel=0.5 must be in (0, 1/sqrt(12)"),
        (["experiment=digits_ddpm", "callbacks.ema.decay=1.5"], "callbacks.ema.decay=1.5 must be in (0, 1)"),
        (["+trainer.max_step=5"], "trainer.max_step is not an argument of Trainer: did you mean trainer.max_steps=...?"),
        (["+callbacks.ema.decy=0.9"], "callbacks.ema.decy is not an argument of EMA: did you mean callbacks.ema.decay"),
        (["data=mnist"], "never reaches; it runs at [28, 14, 7]: the model does not fit the data; with data=mnist use "
         "model=unet_mnist (or experiment=mnist_unet)"),
        (["data=cifar10"], "with data=cifar10 use model=unet_cifar10 (or experiment=cifar10_ddpm)"),
        (["trainer=gpu"], "trainer.accelerator=gpu (trainer=gpu) but torch"),
        (["callbacks.fid.features=inception"], "callbacks.fid.features=inception needs torch-fidelity, which is not "
         "installed here: use callbacks.fid.features=classifier"),
        # the schedule, an object like the others: its keys against its class, then the class's own checks
        (["schedule=cosine", "schedule.s=abc"], "schedule.s='abc' must be float (CosineBetas's argument s: float)"),
        (["schedule=custom", "schedule.betas=[0.1,1.5]"], "schedule: schedule 'custom' with T=2 has 1 beta(s) "
         "outside (0, 1) or non-finite: t=2: beta=1.5"),
        (["schedule=logsnr_discrete", "schedule.base=quartic"], "schedule: schedule.base='quartic' is not a beta "
         "schedule; choose one of: linear, quadratic, cosine, sigmoid"),
    ],
)  # fmt: skip
def test_keys_the_project_does_not_own_are_checked_at_start(monkeypatch, overrides, problem):
    """Lightning's Trainer and the callbacks' arguments are checked against their constructors, the UNet against the
    data, the config against the machine: one line naming the key and the fix, before anything is built."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("diffusion_elbo.config.module_available", lambda name: False)
    with pytest.raises(ConfigError) as err:
        validate_config(compose_with(overrides))
    assert str(err.value).count("\n  - ") == 1 and problem in str(err.value)


@pytest.mark.parametrize(
    "overrides, problem",
    [
        (["schedule.timesteps=1"], "schedule.timesteps=1 must be >= 2: a chain needs t = 1 (the decoder) and at least "
         "one diffusion step"),
        (["schedule=logsnr_cosine", "loss=vdm", "schedule.timesteps=0"], "schedule.timesteps=0 must be >= 1: the T of "
         "the T-step bound (or schedule.timesteps=null"),
        (["val_strata=0"], "val_strata=0 must be >= 1: it is the number of strata"),
        (["val_strata=-3"], "val_strata=-3 must be >= 1"),
        (["trainer.val_check_interval=0"], "trainer.val_check_interval=0 must be > 0: validate every N training steps"),
        (["schedule.timesteps=20", "callbacks.fid.num_samples=0"], "sampler.steps=50 sampling steps exceed the "
         "chain's schedule.timesteps=20 (callbacks.sample_grid samples during training): use sampler.steps=20 or "
         "fewer"),
        (["ckpt_path=<run>"], "ckpt_path=<run> is a folder, not a checkpoint file: point it at a .ckpt file, e.g. "
         "ckpt_path=<run>/checkpoints/last.ckpt"),
        (["logger=wandb", "logger.wandb.mode=ofline"], "logger.wandb.mode='ofline' is not a W&B mode; choose one of "
         "auto | online | offline | disabled"),
        (["data=toy2d", "model=mlp", "augment=geometric"], "augment (GeometricAugmentation) tells the network how each "
         "training image was transformed, and model MLPDenoiser takes no augmentation labels (no augment_dim argument): use "
         "model=unet, or augment=null"),
        (["augment=geometric", "augment.translate=8"], "augment.translate=8 must be smaller than the images "
         "(data.image_size=8 pixels)"),
        (["augment=geometric", "augment.p=2"], "augment.p=2 must be a probability in [0, 1]"),
    ],
    ids=["discrete-T-1", "continuous-T-0", "val-strata-0", "val-strata-negative", "val-check-interval-0",
         "sampler-steps-above-T", "ckpt-dir", "wandb-mode", "augment-without-labels", "augment-shift-too-far", "augment-p"],
)  # fmt: skip
def test_values_that_fail_only_once_training_runs_are_refused_at_start(tmp_path, overrides, problem):
    """Each of these trained until the first validation (or the first step) and then crashed with a traceback
    (``'float' object is not iterable``, a division by zero, "does not exist" for a folder)."""
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").touch()
    overrides = [o.replace("<run>", str(tmp_path)) for o in overrides]
    with pytest.raises(ConfigError) as err:
        validate_config(compose_with(overrides))
    assert str(err.value).count("\n  - ") == 1 and problem.replace("<run>", str(tmp_path)) in str(err.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["schedule.timesteps=2", "sampler.steps=2", "callbacks.fid.sampler.steps=2"],
        ["val_strata=1"],
        ["schedule=logsnr_cosine", "loss=vdm", "schedule.timesteps=1"],
        ["data=gaussian", "model=mlp", "schedule.timesteps=20", "sampler.steps=20"],
    ],
    ids=["discrete-T-2", "val-strata-1", "continuous-T-1", "no-fid-without-images"],
)
def test_the_smallest_values_that_train_are_accepted(overrides):
    """The limits above are the tightest: these values train and validate (a discrete chain of 2 steps, one stratum,
    the 1-step bound of a continuous-time schedule; FID's 50 steps on 20-step vector data, where FID does not run)."""
    validate_config(compose_with(overrides))


def test_sampling_a_checkpoint_uses_its_own_grid_unless_told():
    from diffusion_elbo.checkpoints import sampler_spacing

    assert sampler_spacing(None, {"sampler": {"name": "ddim", "spacing": "logsnr"}}) == "logsnr"
    assert sampler_spacing("time", {"sampler": {"name": "ddim", "spacing": "logsnr"}}) == "time"
    assert sampler_spacing(None, {"sampler": {"name": "ddim"}}) == "time"  # trained before the option existed


@pytest.mark.slow
def test_a_non_editable_install_finds_the_config_groups(tmp_path):
    """The config groups are package data: a wheel install (not editable, no repository beside it) composes every
    script's config from its own copy."""
    import shutil
    import subprocess
    import sys

    from tests.helpers import REPO_ROOT

    source = tmp_path / "source"
    shutil.copytree(REPO_ROOT / "src" / "diffusion_elbo", source / "src" / "diffusion_elbo",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site),
         str(source)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    probe = (
        "from hydra import compose, initialize_config_dir\n"
        "from diffusion_elbo.cli import CONFIG_PATH\n"
        "print(CONFIG_PATH)\n"
        "with initialize_config_dir(config_dir=CONFIG_PATH, version_base='1.3'):\n"
        "    for name in ('train', 'eval', 'sample', 'report'):\n"
        "        cfg = compose(name, overrides=['ckpt_path=x.ckpt'] if name == 'sample' else [])\n"
        "    print(compose('train').loss._target_)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    config_path, loss_target = result.stdout.split()
    assert config_path == str(site / "diffusion_elbo" / "conf")
    assert loss_target == "diffusion_elbo.core.losses.VMSE"


@pytest.mark.parametrize(
    ("script", "override", "new"),
    [
        ("eval.py", "fid.steps=10", "fid.sampler.steps"),
        ("eval.py", "ode.rtol=1e-4", "likelihood.ode.rtol (with likelihood=ode or both)"),
        ("eval.py", "continuous_strata=16", "likelihood.continuous.strata"),
        ("train.py", "callbacks.sample_grid.steps=5", "sampler.steps"),
        ("train.py", "loss.name=elbo", "loss (the group's option"),
    ],
)
def test_a_renamed_key_names_its_new_name_before_anything_runs(tmp_path, script, override, new):
    """The keys the sampler, likelihood and loss groups renamed (2026-12-05) are refused with their new names, status 2,
    before Hydra composes anything (Hydra alone says only that the key is not in the config)."""
    from tests.helpers import run_cli

    result = run_cli(script, override, f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert f"error: {override.split('=')[0]} is now {new}" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_calibrations_of_another_sitting_are_put_on_the_table_scale_by_their_anchor():
    """short_run --anchor: a cost measured in a later sitting is scaled by the anchor variant's table cost over its
    cost in that sitting, so its ratio to the anchor is the ratio measured side by side; re-anchoring starts from the
    measured cost, not the scaled one. Every anchored entry of the committed calibration follows that rule."""
    import json
    import sys

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))
    from short_run import anchored

    entry = {"overrides": ["model.num_res_blocks=1"], "cpu_seconds_per_step": 0.30}
    scaled = anchored(entry, "narrow", table_cost=0.48, same_sitting=0.45)
    assert scaled["cpu_seconds_per_step"] / 0.48 == pytest.approx(0.30 / 0.45)
    assert anchored(scaled, "narrow", 0.48, 0.45) == scaled  # from the measured cost again
    costs = json.loads((bench / "short_run" / "vdm_15cpu" / "calibration.json").read_text())
    anchored_entries = {label: c for label, c in costs.items() if "anchor" in c}
    assert anchored_entries  # the table has levers calibrated in a later sitting
    for c in anchored_entries.values():
        a = c["anchor"]
        assert a["table_cpu_seconds_per_step"] == costs[a["label"]]["cpu_seconds_per_step"]
        assert a["same_sitting"] == costs[f"{a['label']}@anchor"]["cpu_seconds_per_step"]
        assert c["cpu_seconds_per_step"] == pytest.approx(
            c["measured_cpu_seconds_per_step"] * a["table_cpu_seconds_per_step"] / a["same_sitting"]
        )
