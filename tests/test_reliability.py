"""Faults: killed and preempted runs resume exactly; a dying DDP rank stops the run; non-finite losses are
caught at their step; bad inputs get clear errors and overwrite nothing; same seed, same loss curve."""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from diffusion_elbo.builders import wandb_run_id
from diffusion_elbo.checkpoints import CheckpointError
from diffusion_elbo.cli import RunProtected, UserError, write_failure
from diffusion_elbo.evaluation import write_metrics
from diffusion_elbo.lightning.module import NonFiniteLossError
from diffusion_elbo.report import collect_runs
from diffusion_elbo.resume import ResumeChanges, check_resume_config, compare_resume_config
from diffusion_elbo.run_dir import check_run_dir_free, hold_run_dir
from diffusion_elbo.training import train

from .helpers import FAST, REPO_ROOT, SMALL_UNET, compose_train, popen_python, run_cli, run_python

# A small, quick digits run: checkpoint every 5 steps, rare validation.
RUN = [
    *FAST,
    *SMALL_UNET,
    "schedule.timesteps=100",
    "trainer.max_steps=40",
    "trainer.val_check_interval=20",
    "callbacks.model_checkpoint.every_n_train_steps=5",
    "callbacks.sample_grid.num_samples=0",
    "lr_scheduler.warmup_steps=30",
]


def fault_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def start_train(run_dir: Path, *args: str):
    """``python src/train.py <RUN> hydra.run.dir=<run_dir> <args>`` started, as a Popen-like handle."""
    return popen_python(REPO_ROOT / "src" / "train.py", *RUN, f"hydra.run.dir={run_dir}", *args, env=fault_env())


def loss_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "loss_curve.csv").read_text().splitlines()[1:]
    return [int(line.split(",")[0]) for line in lines]


@pytest.mark.slow
def test_sigkill_at_random_points_and_mid_checkpoint_write_then_resume_exactly(tmp_path):
    run_dir = tmp_path / "run"
    rng = random.Random(0)
    # 1: killed while writing its second checkpoint (a half-written temporary file is left behind)
    proc = start_train(run_dir, "checkpoint_io._target_=tests.faults.KillMidWrite", "+checkpoint_io.kill_on_save=2")
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "checkpoints" / "last.ckpt").exists()  # the write of last.ckpt was cut off ...
    assert list((run_dir / "checkpoints").glob(".last.ckpt.tmp-*"))  # ... leaving half a temporary file
    assert torch.load(run_dir / "checkpoints" / "step_0000005.ckpt", weights_only=False)["global_step"] == 5
    # 2-4: SIGKILL at random moments, resuming each time from the last complete checkpoint
    kills = 0
    for _ in range(3):
        proc = start_train(run_dir, "ckpt_path=last")
        deadline = time.time() + 60
        while not (run_dir / "loss_curve.csv").exists() or len(loss_steps(run_dir)) < 3:
            assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
            time.sleep(0.1)
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is None:
            proc.kill()
            kills += 1
        proc.communicate(timeout=60)
    assert kills >= 2
    # last: run to the end
    proc = start_train(run_dir, "ckpt_path=last")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]

    metrics = json.loads((run_dir / "train_metrics.json").read_text())
    assert metrics["global_step"] == 40
    assert loss_steps(run_dir) == list(range(40))  # the curve has no gap and no repeat
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 40
    assert last["lr_schedulers"][0]["last_epoch"] == 40  # the LR schedule continued exactly
    assert int(last["averaging_state"]["n_averaged"]) == 40  # EMA restored and updated every step
    assert not list((run_dir / "checkpoints").glob(".*tmp-*"))  # stale temporary files are cleaned on resume
    for ckpt in (run_dir / "checkpoints").glob("step_*.ckpt"):
        torch.load(ckpt, weights_only=False)  # every checkpoint on disk is complete


def test_a_run_that_finishes_after_a_failed_attempt_is_reported_finished(tmp_path):
    """The failure.json of an attempt that failed (then resumed to the end) is removed when the run finishes, so the
    sweep report no longer lists the run as failed."""
    run = tmp_path / "job"
    tiny = ["data=gaussian", "data.dim=2", "model=mlp", "model.hidden_dim=32", "schedule.timesteps=50"]
    cfg = compose_train(run, [*tiny, "trainer.max_steps=2", "trainer.val_check_interval=100"])
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    write_failure(run, NonFiniteLossError("non-finite loss at global step 1"))
    assert [r["status"] for r in collect_runs(tmp_path)] == ["failed"]
    train(cfg, str(run))
    assert not (run / "failure.json").exists()
    assert [r["status"] for r in collect_runs(tmp_path)] == ["finished"]


@pytest.mark.slow
def test_a_resume_with_other_checkpoint_settings_keeps_last_ckpt_current(tmp_path):
    """Resumed with another every_n_train_steps, the checkpoint callback's state is not restored; the periodic saves
    must still overwrite last.ckpt (not write last-v1.ckpt beside it), so a kill leaves last.ckpt at the latest save."""
    run_dir = tmp_path / "run"
    proc = start_train(run_dir, "trainer.max_steps=4", "callbacks.model_checkpoint.every_n_train_steps=2")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    proc = start_train(
        run_dir, "trainer.max_steps=8", "ckpt_path=last", "callbacks.model_checkpoint.every_n_train_steps=3",
        "+callbacks.die._target_=tests.faults.SignalAtStep", "+callbacks.die.step=7", "+callbacks.die.signum=9",
    )  # fmt: skip
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    names = sorted(p.name for p in (run_dir / "checkpoints").glob("last*.ckpt"))
    assert names == ["last.ckpt"]
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6


@pytest.mark.slow
def test_a_failing_ddp_rank_stops_the_run_quickly_and_the_runs_files_name_its_error(tmp_path):
    """The loss goes NaN on rank 1 only (nonfinite=error): rank 1 stops with NonFiniteLossError and rank 0, waiting in
    a collective, sees it die; both stop within seconds. failure.json, train.log and the sweep report give rank 1's
    own error and step first, not only "another process died"; rank 1's record is failure.rank1.json."""
    run_dir = tmp_path / "run"
    started = time.time()
    proc = run_cli(
        "train.py",
        *FAST,
        *NAN_AFTER_4,
        "+model.rank=1",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "trainer.val_check_interval=100",
        f"hydra.run.dir={run_dir}",
        env=fault_env(),
        timeout=240,
    )
    elapsed = time.time() - started
    assert proc.returncode == 2, proc.stderr[-3000:]
    cause = "rank 1 failed at step 4: NonFiniteLossError: non-finite loss (nan) at global step 4"
    assert f"error: {cause}" in proc.stderr and "ckpt_path=last" in proc.stderr
    assert json.loads((run_dir / "failure.json").read_text())["message"].startswith(cause)
    rank1 = json.loads((run_dir / "failure.rank1.json").read_text())
    assert (rank1["rank"], rank1["step"], rank1["error"]) == (1, 4, "NonFiniteLossError")
    log = (run_dir / "train.log").read_text()
    assert "rank 1: NonFiniteLossError: non-finite loss (nan) at global step 4" in log  # rank 1's own line
    assert f"PeerDiedError: {cause}" in log  # rank 0's
    assert collect_runs(tmp_path)[0]["failure"].startswith(f"PeerDiedError: {cause}")
    assert elapsed < 120


def test_a_rank_that_left_no_record_is_reported_as_before_and_stale_records_are_ignored(tmp_path):
    """rank 0's message when another rank died: a record of an earlier attempt (older than this one's start) and a
    rank that only saw another die are not causes; with none left it says the process left no record."""
    from types import SimpleNamespace

    from diffusion_elbo.training import PeerDiedError, peer_died_message

    trainer = SimpleNamespace(world_size=3, global_rank=0, global_step=7)
    died = RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:9618")
    write_failure(tmp_path, NonFiniteLossError("an earlier attempt's"), rank=1, step=2)
    since = time.time() + 1  # the earlier record is older than this attempt
    os.utime(tmp_path / "failure.rank1.json", (since - 5, since - 5))
    write_failure(tmp_path, PeerDiedError("another process died"), rank=2, step=7)
    os.utime(tmp_path / "failure.rank2.json", (since + 1, since + 1))
    message = peer_died_message(trainer, died, tmp_path, since=since, wait_s=0.0)
    assert (
        message.startswith("another process of this 3-process run died near step 7") and "no failure record" in message
    )
    write_failure(tmp_path, NonFiniteLossError("non-finite loss (nan) at global step 7"), rank=1, step=7)
    os.utime(tmp_path / "failure.rank1.json", (since + 1, since + 1))
    message = peer_died_message(trainer, died, tmp_path, since=since, wait_s=0.0)
    assert message.startswith("rank 1 failed at step 7: NonFiniteLossError: non-finite loss (nan) at global step 7")


# a 2-D MLP whose output turns NaN after 4 training forward passes
NAN_AFTER_4 = [
    "data=gaussian",
    "data.dim=2",
    "model=mlp",
    "model._target_=tests.faults.NaNAfter",
    "model.hidden_dim=32",
    "+model.calls=4",
    "schedule.timesteps=50",
]


def test_nonfinite_loss_stops_at_its_step_naming_term_and_timesteps_keeping_checkpoints(tmp_path):
    cfg = compose_train(
        tmp_path,
        [*NAN_AFTER_4, "trainer.max_steps=10", "callbacks.model_checkpoint.every_n_train_steps=2"],
    )
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg, str(tmp_path))
    msg = str(err.value)
    assert "global step 4" in msg and "timesteps" in msg and "went non-finite" in msg
    kept = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert kept["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in kept["state_dict"].values() if v.is_floating_point())


def test_nonfinite_loss_can_skip_batches_with_a_warning(tmp_path):
    cfg = compose_train(
        tmp_path,
        [
            *NAN_AFTER_4,
            "trainer.max_steps=6",
            "nonfinite=skip",
            "trainer.val_check_interval=100",
        ],
    )
    with pytest.warns(UserWarning, match="Skipping this batch"):
        train(cfg, str(tmp_path))
    assert loss_steps(tmp_path) == [0, 1, 2, 3]  # the skipped batches left no loss behind


def test_nonfinite_skip_stops_after_nonfinite_max_skips_batches_in_a_row(tmp_path):
    """A model whose every batch is non-finite does not recover: nonfinite=skip stops after nonfinite_max_skips skipped
    batches in a row, naming why and the key, instead of skipping to trainer.max_steps and exiting 0."""
    cfg = compose_train(
        tmp_path,
        [
            *NAN_AFTER_4,
            "trainer.max_steps=40",
            "nonfinite=skip",
            "nonfinite_max_skips=3",
            "trainer.val_check_interval=100",
        ],
    )
    with pytest.warns(UserWarning, match="Skipping this batch"), pytest.raises(NonFiniteLossError) as err:
        train(cfg, str(tmp_path))
    msg = str(err.value)
    assert "4 batches in a row" in msg and "nonfinite_max_skips=3" in msg and "stops at global step 7" in msg
    assert loss_steps(tmp_path) == [0, 1, 2, 3]
    kept = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert kept["global_step"] == 7  # steps 4, 5, 6 skipped (counted, no update); the fourth NaN batch stopped the run


def test_nan_in_the_data_is_named_as_the_cause_not_the_learning_rate(tmp_path):
    cfg = compose_train(
        tmp_path,
        ["data=gaussian", "data._target_=tests.faults.NaNData", "data.dim=2", "data.batch_size=10", "model=mlp",
         "model.hidden_dim=32", "schedule.timesteps=50", "trainer.max_steps=4", "trainer.val_check_interval=100"],
    )  # fmt: skip
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg, str(tmp_path))
    msg = str(err.value)
    assert re.search(r"non-finite data at global step 0: [1-9]\d* of the batch's 10 examples", msg), msg
    assert "hold NaN or inf in x0" in msg
    assert "a lower optimizer.lr will not help" in msg and "Try a lower" not in msg


def test_metrics_files_are_strict_json_with_null_for_non_finite_values(tmp_path):
    """A run that ended with NaN metrics wrote bare NaN, which strict JSON readers refuse."""
    metrics = {"val/elbo_bpd": float("nan"), "train/loss": float("inf"), "per_t": [1.0, float("-inf")], "step": 3}
    text = write_metrics(metrics, tmp_path, "train_metrics.json").read_text()
    strict = json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name} in {text}"))
    assert strict == {"val/elbo_bpd": None, "train/loss": None, "per_t": [1.0, None], "step": 3}


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_keeps_elbo_terms_in_float32_and_finite(tmp_path, precision):
    """On CPU Lightning runs 16-mixed as bf16 (its fp16 GradScaler path needs a GPU); the float16 autocast check
    below is direct."""
    # a small UNet and batch: CPU autocast in half precision is slow where the CPU lacks native bf16/fp16 kernels
    small = ["model.model_channels=16", "data.batch_size=16", "trainer.max_steps=4", "trainer.val_check_interval=2"]
    metrics = train(
        compose_train(tmp_path, [f"trainer.precision={precision}", "schedule.timesteps=100", *small]), str(tmp_path)
    )
    for key in ("train/loss", "val/elbo_bpd", "val/reconstruction_bpd"):
        assert np.isfinite(metrics[key])
    from diffusion_elbo.builders import build_module

    module, _ = build_module(compose_train(tmp_path / "m", ["schedule.timesteps=100"]))
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    t = torch.tensor([1, 2, 50, 100])
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    with torch.autocast("cpu", dtype=dtype):
        out = module.denoise(x0, t)
        term = module.time._terms(x0, x0, t, out, variance=module.variance, decoder_variance=module.decoder_variance)
    assert term.dtype == torch.float32 and torch.isfinite(term).all()


def test_same_seed_on_cpu_gives_the_same_loss_curve(tmp_path):
    curves = []
    for name in ("a", "b"):  # 5 steps: one validation (at 3) between them, which must not shift what follows
        cfg = compose_train(tmp_path / name, [*SMALL_UNET, "schedule.timesteps=100", "trainer.max_steps=5"])
        train(cfg, str(tmp_path / name))
        curves.append((tmp_path / name / "loss_curve.csv").read_text())
    assert curves[0] == curves[1] and len(curves[0].splitlines()) == 6
    train(
        compose_train(tmp_path / "c", [*SMALL_UNET, "schedule.timesteps=100", "trainer.max_steps=5", "seed=7"]),
        str(tmp_path / "c"),
    )
    assert (tmp_path / "c" / "loss_curve.csv").read_text() != curves[0]


@pytest.mark.slow
def test_a_resumed_run_repeats_the_uninterrupted_runs_losses_exactly(tmp_path):
    """12 steps in one go, and the same run stopped at step 6 (mid-epoch: 4 batches an epoch here), resumed to step 8
    (an epoch's last batch) and resumed to 12, each from its periodic checkpoint: the same loss at every step. The data
    order resumes mid-epoch (EpochSampler), the dropout masks continue (torch's global generator is in the checkpoint;
    dropout 0.1) and validations (every 4 steps, which the resumed run does not repeat) draw nothing from it."""
    run = ["data=gaussian", "data.dim=2", "data.num_train=64", "data.batch_size=16", "model=mlp", "model.hidden_dim=32",
           "model.dropout=0.1", "schedule.timesteps=50", "trainer.val_check_interval=4",
           "callbacks.model_checkpoint.every_n_train_steps=2", "lr_scheduler.warmup_steps=2"]  # fmt: skip
    train(compose_train(tmp_path / "a", [*run, "trainer.max_steps=12"]), str(tmp_path / "a"))
    for steps, resume in ((6, []), (8, ["ckpt_path=last"]), (12, ["ckpt_path=last"])):
        train(compose_train(tmp_path / "b", [*run, f"trainer.max_steps={steps}", *resume]), str(tmp_path / "b"))
    whole, resumed = ((tmp_path / name / "loss_curve.csv").read_text().splitlines() for name in ("a", "b"))
    assert len(whole) == 13 and resumed == whole


def test_a_run_directory_that_holds_a_run_is_never_overwritten(tmp_path):
    train(compose_train(tmp_path, ["schedule.timesteps=100", "trainer.max_steps=3"]), str(tmp_path))
    before = (tmp_path / "checkpoints" / "last.ckpt").read_bytes()
    with pytest.raises(UserError, match="already holds a training run.*ckpt_path=last"):
        train(compose_train(tmp_path, ["schedule.timesteps=100", "trainer.max_steps=3"]), str(tmp_path))
    assert (tmp_path / "checkpoints" / "last.ckpt").read_bytes() == before


def test_checkpoint_from_another_model_shape_names_the_mismatched_keys(tmp_path):
    train(compose_train(tmp_path / "a", ["schedule.timesteps=100", "trainer.max_steps=2"]), str(tmp_path / "a"))
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    cfg = compose_train(tmp_path / "b", ["schedule.timesteps=100", "model.model_channels=16", f"ckpt_path={ckpt}"])
    # the run's config names the key first (test_a_resume_may_change_the_lr_but_not_the_model_or_the_noise_process)
    with pytest.raises(CheckpointError, match=r"model.model_channels: checkpoint 32, now 16"):
        train(cfg, str(tmp_path / "b"))
    # tensors that do not fit a model of the checkpoint's own config (a file edited or written by another version)
    from diffusion_elbo.builders import build_module
    from diffusion_elbo.training import check_checkpoint_fits

    module, _ = build_module(compose_train(tmp_path / "b", ["schedule.timesteps=100", "model.model_channels=16"]))
    module.config = torch.load(ckpt, weights_only=False)["diffusion_elbo_config"]
    with pytest.raises(CheckpointError, match=r"mismatched \['net\..*checkpoint \(\d+"):
        check_checkpoint_fits(module, str(ckpt), tmp_path / "b", cfg=cfg)


def test_resumed_runs_keep_their_wandb_run_id(tmp_path):
    first = wandb_run_id(tmp_path)
    assert wandb_run_id(tmp_path) == first and len(first) >= 8
    assert wandb_run_id(tmp_path / "other") != first


def test_every_n_val_callbacks_keep_their_cadence_across_a_resume(tmp_path):
    """Sample grids (and FID, the same counter) every 2nd validation: at steps 4 and 8 of an 8-step run with
    validation every 2 steps, also when the run stops at step 4 and resumes. Counting from 0 again after the resume
    gave steps 4 and 6 (and a run resumed more often than every_n_val validations never drew one)."""
    overrides = [
        *SMALL_UNET,
        "schedule.timesteps=100",
        "trainer.val_check_interval=2",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "callbacks.sample_grid.every_n_val=2",
    ]
    train(compose_train(tmp_path, [*overrides, "trainer.max_steps=4"]), str(tmp_path))
    train(compose_train(tmp_path, [*overrides, "trainer.max_steps=8", "ckpt_path=last"]), str(tmp_path))
    grids = sorted(p.name for p in (tmp_path / "samples").glob("step_*.png"))
    assert grids == ["step_0000004.png", "step_0000008.png"]
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["callbacks"]["SampleGrid"]
    assert state["validations"] in (3, 4)  # written before or after the validation at step 8


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["optimizer.lr=-0.1"], ["optimizer.lr=-0.1 must be > 0"]),
        (["data.batch_size=0"], ["data.batch_size=0 must be >= 1"]),
        (["schedule=custom", "schedule.betas=[0.1,1.5]"], ["t=2: beta=1.5"]),
        (["data=image_folder", "data.root=/nonexistent/images", "data.image_size=8"], ["/nonexistent/images"]),
        (["data=image_folder", "data.root=.", "data.image_size=10"], ["image_size=10", "multiple of 4"]),
        (["val_strata=0", "trainer.val_check_interval=0"], ["val_strata=0 must be >= 1", "val_check_interval=0"]),
    ],
    ids=["negative-lr", "batch-size-0", "beta-above-1", "missing-folder", "bad-image-size", "found-late-values"],
)
def test_bad_training_inputs_fail_with_clear_messages(tmp_path, args, fragments):
    result = run_cli("train.py", *args, "logger=csv", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_empty_image_folder_and_sixteen_bit_images_are_refused(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli(
        "train.py",
        "data=image_folder",
        f"data.root={empty}",
        "data.image_size=8",
        "logger=csv",
        f"hydra.run.dir={tmp_path / 'r1'}",
    )
    assert result.returncode == 2 and str(empty) in result.stderr
    deep = tmp_path / "deep"
    deep.mkdir()
    Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16)).save(deep / "a.png")
    from diffusion_elbo.data.image_folder import load_image

    with pytest.raises(ValueError, match="mode I;16.*convert it to 8 bits"):
        load_image(deep / "a.png", 1, 8)


def _last(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)


def test_max_steps_between_checkpoints_leaves_last_at_the_final_step_with_raw_and_ema_weights(tmp_path):
    """max_steps=30 with checkpoints every 20: last.ckpt holds step 30 (not 20), with the EMA weights as the state_dict
    and the raw ones kept beside them (saved before EMA's end of training copies its average into the model)."""
    cfg = compose_train(
        tmp_path,
        ["trainer.max_steps=30", "callbacks.model_checkpoint.every_n_train_steps=20", "trainer.val_check_interval=15",
         "model.model_channels=16", "data.batch_size=16"],
    )  # fmt: skip
    metrics = train(cfg, str(tmp_path))
    assert metrics["global_step"] == 30 and (tmp_path / "checkpoints" / "step_0000020.ckpt").is_file()
    last = _last(tmp_path)
    assert last["global_step"] == 30
    raw = last["current_model_state"]
    assert any(not torch.equal(raw[k], v) for k, v in last["state_dict"].items() if k in raw and v.is_floating_point())


def test_max_time_leaves_last_at_the_final_step(tmp_path):
    cfg = compose_train(
        tmp_path,
        [
            "trainer.max_steps=100000",
            "trainer.max_time=00:00:00:04",
            "callbacks.model_checkpoint.every_n_train_steps=5000",
        ],
    )
    metrics = train(cfg, str(tmp_path))
    assert 0 < metrics["global_step"] < 100000
    assert _last(tmp_path)["global_step"] == metrics["global_step"]


def test_an_exception_leaves_last_at_the_last_completed_step(tmp_path):
    cfg = compose_train(
        tmp_path,
        [*SMALL_UNET, "trainer.max_steps=40", "callbacks.model_checkpoint.every_n_train_steps=20",
         "+callbacks.fail._target_=tests.faults.RaiseAtStep", "+callbacks.fail.step=7"],
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="injected failure after step 7"):
        train(cfg, str(tmp_path))
    assert _last(tmp_path)["global_step"] == 7


def test_a_full_disk_names_the_checkpoint_and_keeps_the_previous_one(tmp_path):
    """The disk fills up while last.ckpt is rewritten at step 6 (saves: step 3, last 3, step 6, last 6): torch.save's
    "enforce fail at inline_container.cc ... unexpected pos" becomes a user error that says the disk is full, names
    the file and the fix; the temporary file is removed and last.ckpt still holds step 3."""
    tiny = ["data=gaussian", "data.dim=2", "model=mlp", "model.hidden_dim=32", "schedule.timesteps=50"]
    cfg = compose_train(tmp_path, [*tiny, "checkpoint_io._target_=tests.faults.DiskFullOnSave",
                                   "+checkpoint_io.full_on_save=4"])  # fmt: skip
    with pytest.raises(UserError) as err:
        train(cfg, str(tmp_path))
    assert "unexpected pos" in str(err.value.__cause__)  # what torch.save raises on a full disk
    message = str(err.value)
    assert message.startswith(
        f"no space left on device writing the checkpoint {tmp_path / 'checkpoints' / 'last.ckpt'}"
    )
    assert (
        "the previous last.ckpt is kept" in message and "hydra.run.dir=" in message and "unexpected pos" not in message
    )
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "last.ckpt",
        "step_0000003.ckpt",
        "step_0000006.ckpt",
    ]
    assert _last(tmp_path)["global_step"] == 3


@pytest.mark.slow
def test_ctrl_c_leaves_last_at_the_last_completed_step_then_resumes(tmp_path):
    run_dir = tmp_path / "run"
    proc = start_train(
        run_dir,
        "+callbacks.sigint._target_=tests.faults.SignalAtStep",
        "+callbacks.sigint.step=7",
        "+callbacks.sigint.signum=2",
    )
    out, err = proc.communicate(timeout=300)
    assert _last(run_dir)["global_step"] == 7, err[-3000:]
    # the log gives the command that resumes this run in its folder; followed as printed, it does
    command = shlex.split(next(line for line in (out + err).splitlines() if "resume with: " in line).split(": ")[-1])
    assert command[0] == "python" and f"hydra.run.dir={run_dir}" in command and command[-1] == "ckpt_path=last"
    proc = run_python(command[1], *command[2:], env=fault_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert loss_steps(run_dir) == list(range(40))


def test_logger_none_and_fast_dev_run_train_without_a_plus(tmp_path):
    """logger=none trains and checkpoints (the learning-rate monitor, which needs a logger, is turned off); any Trainer
    argument is a key of trainer/ (`trainer.fast_dev_run=true`, no `+`; it turns the loggers off too)."""
    metrics = train(
        compose_train(tmp_path / "none", [*SMALL_UNET, "logger=none", "trainer.max_steps=4"]), str(tmp_path / "none")
    )
    assert metrics["global_step"] == 4 and _last(tmp_path / "none")["global_step"] == 4
    assert not (tmp_path / "none" / "wandb").exists()
    metrics = train(compose_train(tmp_path / "fdr", ["trainer.fast_dev_run=true"]), str(tmp_path / "fdr"))
    assert metrics["global_step"] == 1 and (tmp_path / "fdr" / "train_metrics.json").is_file()


@pytest.mark.parametrize(
    "name, expect",
    [
        ("fdr", {"trainer.fast_dev_run": True, "callbacks.fid.num_samples": 0}),
        ("overfit", {"trainer.overfit_batches": 2, "callbacks.fid.num_samples": 0}),
        ("limit", {"trainer.max_steps": 200, "trainer.limit_val_batches": 1, "callbacks.fid.num_samples": 0}),
        ("profiler", {"trainer.profiler._target_": "lightning.pytorch.profilers.SimpleProfiler"}),
    ],
)
def test_debug_configs_compose_what_they_promise(tmp_path, name, expect):
    """debug=... are @package _global_ bundles (the template's debug group): no W&B logger, no FID."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from .helpers import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"debug={name}"])
    for key, value in expect.items():
        assert OmegaConf.select(cfg, key) == value, key
    assert "wandb" not in (cfg.logger or {})


def test_debug_fdr_runs_one_step_without_a_logger(tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from .helpers import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["debug=fdr", "trainer.accelerator=cpu"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    metrics = train(cfg, str(tmp_path))
    assert metrics["global_step"] == 1 and not (tmp_path / "wandb").exists()


@pytest.mark.slow
def test_nonfinite_skip_under_ddp_skips_on_every_rank_instead_of_hanging(tmp_path):
    """nonfinite=skip with the loss NaN on rank 1 only: both ranks skip the batch together (rank 0 says another rank's
    loss went non-finite), so the importance sampler's all_gather and DDP's all-reduce never wait on a rank that
    returned early; the run ends normally."""
    started = time.time()
    proc = run_cli(
        "train.py",
        *FAST,
        *NAN_AFTER_4,
        "+model.rank=1",
        "loss=elbo",  # importance-sampled t: an all_gather every step
        "nonfinite=skip",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "trainer.max_steps=6",
        "trainer.val_check_interval=100",
        f"hydra.run.dir={tmp_path / 'run'}",
        env=fault_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Skipping this batch" in proc.stderr and "another rank's loss" in proc.stderr
    assert time.time() - started < 200
    kept = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert kept["global_step"] == 6  # under DDP a skipped batch still counts as a step, with no update
    assert all(torch.isfinite(v).all() for v in kept["state_dict"].values() if v.is_floating_point())


def _two_nodes(script: str, args: list[str], port: int, cwd: Path) -> list[subprocess.CompletedProcess]:
    """Run src/<script> as 2 nodes x 1 process on localhost: two launches with NODE_RANK 0 and 1 and Lightning's
    rendezvous variables, as a cluster scheduler (or torchrun on each node) would start them."""
    procs = []
    for node in (0, 1):
        env = {**fault_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": str(node),
               "LOCAL_RANK": "0", "WORLD_SIZE": "2"}  # fmt: skip
        procs.append(
            subprocess.Popen(
                [sys.executable, str(REPO_ROOT / "src" / script), *args],
                cwd=cwd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


@pytest.mark.slow
def test_two_nodes_on_localhost_train_once_and_evaluate_like_one_process(tmp_path):
    """2 nodes x 1 process: one run (one set of checkpoints, one W&B run), and src/eval.py over the two nodes gives the
    single-process numbers."""
    import json

    run = tmp_path / "run"
    train_args = [
        *RUN, "trainer=cpu", "trainer.devices=1", "trainer.num_nodes=2", "trainer.strategy=ddp",
        "trainer.max_steps=4", "trainer.val_check_interval=2", "callbacks.model_checkpoint.every_n_train_steps=2",
        "schedule.timesteps=40", "logger=wandb", f"hydra.run.dir={run}",
    ]  # fmt: skip
    for result in _two_nodes("train.py", train_args, 29531, REPO_ROOT):
        assert result.returncode == 0, result.stderr[-3000:]
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["last.ckpt", "step_0000002.ckpt", "step_0000004.ckpt"]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1
    assert json.loads((run / "train_metrics.json").read_text())["global_step"] == 4
    common = [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "num_examples=5", "fid.num_samples=0",
              "wandb.enabled=false", "trainer.accelerator=cpu"]  # fmt: skip
    single = tmp_path / "eval1"
    result = run_cli("eval.py", *common, f"hydra.run.dir={single}", env=fault_env())
    assert result.returncode == 0, result.stderr[-3000:]
    nodes = tmp_path / "eval2"
    for result in _two_nodes("eval.py", [*common, "trainer.num_nodes=2", f"hydra.run.dir={nodes}"], 29533, REPO_ROOT):
        assert result.returncode == 0, result.stderr[-3000:]
    one, two = (json.loads((d / "metrics.json").read_text()) for d in (single, nodes))
    assert two["num_examples"] == one["num_examples"] == 5
    assert two["bpd"] == pytest.approx(one["bpd"], rel=1e-6) and two["bpd_se"] == pytest.approx(one["bpd_se"], rel=1e-6)


def test_fused_adamw_under_bf16_mixed_trains_and_clips_gradients(tmp_path):
    """`trainer=gpu optimizer.fused=true` (bf16-mixed, fused AdamW, the default gradient_clip_val=1): Lightning refuses
    to clip for a fused optimizer under any mixed precision (fp16's scaler unscales inside the fused step); bf16 has
    no scaler, so the module clips the true gradients, to the same norm as in 32-bit precision."""
    small = ["model.model_channels=16", "data.batch_size=16", "trainer.max_steps=1", "schedule.timesteps=100"]
    fused = ["trainer.precision=bf16-mixed", "optimizer.fused=true", "optimizer.foreach=null"]
    cfg = compose_train(tmp_path / "run", [*small, *fused, "trainer.val_check_interval=100"])
    assert cfg.trainer.gradient_clip_val == 1.0
    metrics = train(cfg, str(tmp_path / "run"))  # before: RuntimeError "does not allow for gradient clipping"
    assert metrics["global_step"] == 1 and np.isfinite(metrics["train/loss"])

    from diffusion_elbo.builders import build_module

    module, _ = build_module(compose_train(tmp_path / "m", small))
    module.trainer = L.Trainer(precision="bf16-mixed", accelerator="cpu", logger=False, enable_progress_bar=False)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3, fused=True)
    for p in module.parameters():
        p.grad = torch.full_like(p, 3.0)
    module.configure_gradient_clipping(optimizer, 0.5, "norm")
    grads = [p.grad for p in module.parameters()]
    assert torch.nn.utils.get_total_norm(grads).item() == pytest.approx(0.5, rel=1e-5)
    module.configure_gradient_clipping(optimizer, 1e-3, "value")
    assert all(g.abs().max().item() <= 1e-3 for g in grads)


# a 2-D Gaussian and a small MLP: a few training steps take well under a second
TINY = ["data=gaussian", "data.dim=2", "model=mlp", "model.hidden_dim=32", "schedule.timesteps=50",
        "trainer.val_check_interval=100", "callbacks.model_checkpoint.every_n_train_steps=100"]  # fmt: skip


def _resolved(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def test_a_resume_may_change_the_lr_but_not_the_model_or_the_noise_process(tmp_path):
    """The policy of docs/faults.md on the checkpoint's config against the new one, key by key."""
    saved = _resolved(compose_train(tmp_path, TINY))
    new = _resolved(
        compose_train(
            tmp_path,
            [*TINY, "optimizer.lr=1e-5", "schedule.timesteps=200", "parametrization=eps", "trainer.max_steps=10",
             "data.batch_size=7", "optimizer.foreach=false", "sampler.steps=20"],
        )
    )  # fmt: skip
    changes = compare_resume_config(saved, new)
    assert [str(c) for c in changes.refused] == [
        "parametrization: checkpoint v, now eps",
        "schedule.timesteps: checkpoint 50, now 200",
    ]
    assert [str(c) for c in changes.applied] == ["optimizer.lr: checkpoint 0.001, now 1e-05"]
    assert [c.key for c in changes.kept] == ["optimizer.foreach"]
    assert {"data.batch_size", "trainer.max_steps", "sampler.steps"} <= {c.key for c in changes.allowed}
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    with pytest.raises(CheckpointError) as err:
        check_resume_config(saved, new, path=ckpt)
    msg = str(err.value)
    assert "schedule.timesteps: checkpoint 50, now 200" in msg and "parametrization: checkpoint v, now eps" in msg
    assert "e.g. parametrization=v schedule.timesteps=50" in msg and str(tmp_path / "run" / ".hydra") in msg
    # another schedule altogether: its name, and the keys only one of the two schedules has
    cosine = compare_resume_config(saved, _resolved(compose_train(tmp_path, [*TINY, "schedule=cosine"])))
    assert (
        "schedule._target_: checkpoint diffusion_elbo.core.schedules.SigmoidBetas, now diffusion_elbo.core.schedules."
        "CosineBetas" in [str(c) for c in cosine.refused]
    )
    assert "schedule.tau: checkpoint 1.0, now (not set)" in [str(c) for c in cosine.refused]
    assert compare_resume_config(saved, saved) == ResumeChanges([], [], [], [])
    # an augmentation added, or one whose labels would mean something else; how often it applies may change
    augmented = _resolved(compose_train(tmp_path, [*TINY, "augment=geometric"]))
    assert [c.key for c in compare_resume_config(saved, augmented).refused] == ["augment"]
    assert [c.key for c in compare_resume_config(augmented, saved).refused] == ["augment"]
    shifted = compare_resume_config(augmented, _resolved(compose_train(tmp_path, [*TINY, "augment=geometric",
                                                                                  "augment.translate=2"])))  # fmt: skip
    assert [str(c) for c in shifted.refused] == ["augment.translate: checkpoint 1, now 2"]
    rarer = compare_resume_config(augmented, _resolved(compose_train(tmp_path, [*TINY, "augment=geometric",
                                                                                "augment.p=0.3"])))  # fmt: skip
    assert not rarer.refused and [c.key for c in rarer.allowed] == ["augment.p"]


def test_a_resume_with_a_new_lr_trains_at_it_and_a_new_noise_process_is_refused(tmp_path, caplog):
    """Before, `ckpt_path=last optimizer.lr=1e-5` trained on at the checkpoint's lr (Lightning restores the optimizer
    and scheduler state after configure_optimizers) while the new checkpoint recorded 1e-5, and schedule.timesteps
    or parametrization changed with no word."""
    base = [*TINY, "lr_scheduler.warmup_steps=10"]
    train(compose_train(tmp_path, [*base, "trainer.max_steps=3"]), str(tmp_path))
    before = (tmp_path / "checkpoints" / "last.ckpt").read_bytes()
    for change, named in [
        ("schedule.timesteps=200", "schedule.timesteps: checkpoint 50, now 200"),
        ("parametrization=eps", "parametrization: checkpoint v, now eps"),
    ]:
        with pytest.raises(CheckpointError, match="another model, noise process or data") as err:
            train(compose_train(tmp_path, [*base, "trainer.max_steps=5", "ckpt_path=last", change]), str(tmp_path))
        assert named in str(err.value)
    assert (tmp_path / "checkpoints" / "last.ckpt").read_bytes() == before and loss_steps(tmp_path) == [0, 1, 2]

    new_lr = [*base, "ckpt_path=last", "optimizer.lr=1e-5"]
    with caplog.at_level("INFO", logger="diffusion_elbo"):
        train(compose_train(tmp_path, [*new_lr, "trainer.max_steps=5"]), str(tmp_path))
    assert "resume: optimizer.lr 0.001 -> 1e-05 applied" in caplog.text
    last = _last(tmp_path)
    group = last["optimizer_states"][0]["param_groups"][0]
    assert last["lr_schedulers"][0]["base_lrs"] == [1e-5] and group["initial_lr"] == 1e-5
    assert group["lr"] == pytest.approx(1e-5 * 6 / 10)  # the warm-up goes on at its step 5, towards the new peak
    assert last["diffusion_elbo_config"]["optimizer"]["lr"] == 1e-5
    # resumed again with the run's (new) config: nothing to apply, the lr stays
    caplog.clear()
    with caplog.at_level("INFO", logger="diffusion_elbo"):
        train(compose_train(tmp_path, [*new_lr, "trainer.max_steps=6"]), str(tmp_path))
    assert "applied" not in caplog.text and _last(tmp_path)["lr_schedulers"][0]["base_lrs"] == [1e-5]
    assert loss_steps(tmp_path) == list(range(6))


def test_a_run_folder_has_one_owner_and_a_finished_run_is_never_overwritten(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    for run in (a, b):
        train(compose_train(run, [*TINY, "trainer.max_steps=2"]), str(run))
    files = ("checkpoints/last.ckpt", "loss_curve.csv", "train_metrics.json")
    before = {name: (a / name).read_bytes() for name in files}
    other = b / "checkpoints" / "last.ckpt"
    with pytest.raises(RunProtected, match=f"holds a finished training run .*ckpt_path={other} is another run's"):
        train(compose_train(a, [*TINY, "trainer.max_steps=4", f"ckpt_path={other}"]), str(a))
    with pytest.raises(RunProtected, match="at step 2 and trainer.max_steps=2: the run is finished"):
        train(compose_train(a, [*TINY, "trainer.max_steps=2", "ckpt_path=last"]), str(a))
    with (
        hold_run_dir(a),
        pytest.raises(RunProtected, match=f"{a} is in use by another training job \\(pid {os.getpid()}"),
    ):
        train(compose_train(a, [*TINY, "trainer.max_steps=4", "ckpt_path=last"]), str(a))
    assert {name: (a / name).read_bytes() for name in files} == before
    # a DDP rank > 0 of the job that holds the folder is not refused
    monkeypatch.setenv("LOCAL_RANK", "1")
    with hold_run_dir(a), hold_run_dir(a):
        pass
    monkeypatch.delenv("LOCAL_RANK")
    # the run's own last.ckpt with a larger trainer.max_steps trains it longer
    assert train(compose_train(a, [*TINY, "trainer.max_steps=4", "ckpt_path=last"]), str(a))["global_step"] == 4
    assert loss_steps(a) == [0, 1, 2, 3]


def test_the_run_lock_is_released_when_its_process_is_killed(tmp_path):
    hold = (
        "import sys, time\n"
        "from diffusion_elbo.run_dir import hold_run_dir\n"
        "with hold_run_dir(sys.argv[1]):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "held\n"
        with pytest.raises(RunProtected, match=f"in use by another training job \\(pid {proc.pid} on "):
            check_run_dir_free(tmp_path)
    finally:
        proc.kill()
        proc.wait()
    check_run_dir_free(tmp_path)  # the OS released the lock with the process: nothing stale
    with hold_run_dir(tmp_path):
        pass


@pytest.mark.slow
def test_a_run_started_in_the_same_second_gets_its_own_folder_and_a_held_folder_is_refused(tmp_path):
    """`python src/train.py` twice in one second: both wrote to runs/<that second>. Here every folder name the run
    could be given in the next minute is taken beforehand, so it must write to <name>_1. Then a resume that changes the
    noise process, and a job into a folder another job holds, are refused before Hydra writes its .hydra/ there, and
    write no failure.json."""
    from datetime import datetime, timedelta

    runs = tmp_path / "train" / "runs"
    now = datetime.now()
    taken = {(now + timedelta(seconds=s)).strftime("%Y-%m-%d_%H-%M-%S") for s in range(60)}
    for name in taken:
        (runs / name).mkdir(parents=True)
    result = run_cli("train.py", *FAST, *TINY, "trainer.max_steps=2", f"paths.log_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    new = [p for p in runs.iterdir() if p.name not in taken]
    assert len(new) == 1 and new[0].name.endswith("_1") and new[0].name[:-2] in taken, new
    assert json.loads((new[0] / "train_metrics.json").read_text())["global_step"] == 2
    assert all(not any((runs / name).iterdir()) for name in taken)
    # a resume into it with another noise process: refused before Hydra replaces the run's .hydra/ config
    own = (new[0] / ".hydra" / "overrides.yaml").read_text()
    result = run_cli(
        "train.py", *FAST, *TINY, "trainer.max_steps=4", f"hydra.run.dir={new[0]}", "ckpt_path=last",
        "schedule.timesteps=200",
    )  # fmt: skip
    assert result.returncode == 2 and "schedule.timesteps: checkpoint 50, now 200" in result.stderr
    assert (new[0] / ".hydra" / "overrides.yaml").read_text() == own and not (new[0] / "failure.json").exists()

    held = tmp_path / "held"
    with hold_run_dir(held):
        result = run_cli("train.py", *FAST, *TINY, f"hydra.run.dir={held}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: {held} is in use by another training job (pid {os.getpid()}" in result.stderr
    assert sorted(p.name for p in held.iterdir()) == [".run.lock"]
