"""The entry points as users run them: src/eval.py, src/train.py (single, multirun, DDP), src/sample.py."""

from __future__ import annotations

import csv
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_elbo.core import make_schedule
from diffusion_elbo.core.gaussian_data import oracle_expected_terms

from .helpers import FAST, REPO_ROOT, copy_of_checkpoint, run_cli
from .wandb_records import runs_in

LN2 = math.log(2.0)
# the training subprocess can build tests.faults callbacks
FAULTS_IMPORTABLE = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}


def metrics_path(stdout: str) -> Path:
    line = next(line for line in stdout.splitlines() if line.startswith("metrics: "))
    return Path(line.removeprefix("metrics: "))


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_eval_cli_oracle_matches_closed_form_and_bounds_true_nll(tmp_path, name):
    result = run_cli(
        "eval.py",
        "data=gaussian",
        "model=gaussian_oracle",
        f"schedule={name}",
        "schedule.timesteps=100",
        "data.mean=0.5",
        "data.std=0.8",
        "progress_every_s=0",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr
    # not a terminal: progress lines in the log say how far it is and how long it has left
    progress = [line for line in result.stdout.splitlines() if "eval -ELBO: " in line]
    assert progress and all(", ETA " in line for line in progress) and "1000/1000 examples done" in progress[-1]
    path = metrics_path(result.stdout)
    assert path == tmp_path / "metrics.json"
    m = json.loads(path.read_text())
    assert {"bpd", "bpd_se", "nats_per_dim", "terms_nats_per_dim", "num_examples", "true_nll_bpd"} <= set(m)
    terms = m["terms_nats_per_dim"]
    assert m["num_examples"] == 1000 and len(m["per_t_nats_per_dim"]) == 100
    closed = oracle_expected_terms(make_schedule(name, 100), 0.5, std=0.8)
    # the prior term (about alpha_bar_T E[x0^2] / 2) must match the closed form to its sampling error (~1% here)
    assert terms["prior"] == pytest.approx(closed.prior, rel=5e-2)
    assert m["decoder_variance"] == "clipped"
    assert abs(m["bpd"] - closed.total / LN2) < 4 * m["bpd_se"]
    assert m["true_nll_bpd"] == pytest.approx(closed.true_nll / LN2, abs=4 * m["true_nll_bpd_se"])
    assert m["gap_bpd"] > 5 * m["gap_bpd_se"]  # -ELBO >= true NLL, resolved well beyond noise


@pytest.mark.parametrize(
    "args, fragments",
    [
        # every bad key is named at once, in one error
        (
            ["parametrization=eps2", "schedule.timesteps=0", "data.std=-1", "variance=tiny", "batch_size=0",
             "fid.seeds=0"],
            ["parametrization='eps2' is not an option", "eps | x0 | v", "schedule.timesteps=0 must be >= 2",
             "data.std=-1", "variance='tiny'", "batch_size=0 must be >= 1", "fid.seeds=0 must be >= 1"],
        ),
        (["schedule=linear", "schedule.timesteps=10"], ["beta(s) outside (0, 1)", "t=10"]),
    ],
)  # fmt: skip
def test_eval_cli_bad_values_fail_at_start_with_clear_message(tmp_path, args, fragments):
    result = run_cli("eval.py", *args, f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize(
    "arg, message",
    [
        # Hydra alone would advise +trainer.max_step=5, which then fails inside Lightning's Trainer
        ("trainer.max_step=5", "error: trainer.max_step is not an argument of Trainer: did you mean trainer.max_steps"),
        ("callbacks.ema.decay=high", "error: invalid config:\n  - callbacks.ema.decay='high' must be float"),
    ],
)
def test_bad_trainer_and_callback_keys_fail_at_start_naming_the_key(tmp_path, arg, message):
    result = run_cli("train.py", *FAST, arg, f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert message in result.stderr and not (tmp_path / "checkpoints").exists()


def test_unknown_config_group_option_names_the_choices(tmp_path):
    result = run_cli("train.py", "model=unet_huge", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    assert "Could not find 'model/unet_huge'" in result.stderr and "unet_cifar10" in result.stderr


def test_missing_mnist_files_fail_at_once_saying_where_to_put_them(tmp_path):
    result = run_cli(
        "train.py",
        "data=mnist",
        "model=unet_mnist",
        f"data.root={tmp_path / 'nothing'}",
        "data.download=false",
        "logger=csv",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 2
    assert "train-images-idx3-ubyte" in result.stderr and str(tmp_path / "nothing") in result.stderr


def test_resume_without_the_run_folder_is_refused_with_the_command_that_resumes(tmp_path):
    """`ckpt_path=last` alone would start from scratch in a new folder: refused (status 2) before any work, giving
    the exact command for the newest run that has a checkpoint (its overrides and folder)."""
    old = tmp_path / "outputs" / "train" / "runs" / "2026-01-01_00-00-00"
    (old / "checkpoints").mkdir(parents=True)
    (old / "checkpoints" / "last.ckpt").write_bytes(b"")
    (old / ".hydra").mkdir()
    (old / ".hydra" / "overrides.yaml").write_text("- schedule=cosine\n- ckpt_path=last\n")
    result = run_cli("train.py", *FAST, "ckpt_path=last", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "none was given" in result.stderr
    command = "src/train.py schedule=cosine hydra.run.dir=outputs/train/runs/2026-01-01_00-00-00 ckpt_path=last`"
    assert re.search(r"`python \S*" + re.escape(command), result.stderr), result.stderr
    assert not list(tmp_path.glob("outputs/train/runs/*/checkpoints/step_*.ckpt"))


@pytest.mark.slow
def test_train_then_eval_and_sample_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("train.py", *FAST, "schedule.timesteps=100", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert (run_dir / ".hydra" / "config.yaml").is_file() and ckpt.is_file()

    result = run_cli(
        "eval.py",
        f"ckpt_path={ckpt}",
        "num_examples=32",
        f"hydra.run.dir={tmp_path / 'eval'}",
        "fid.num_samples=20",
        "fid.classifier_steps=50",
        f"fid.cache_dir={tmp_path / 'cache'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert m["num_examples"] == 32 and len(m["per_t_nats_per_dim"]) == 100 and m["split"] == "test"
    assert m["bpd"] > 0 and "true_nll_bpd" not in m
    assert m["fid"] > 0 and m["fid_num_samples"] == 20 and 0 <= m["fid_classifier_accuracy"] <= 1
    assert m["fid_sampler"] == "ddim-50"  # DDIM's evenly spaced timesteps, the checkpoint's own grid

    for sampler in (["sampler=ddpm", "sampler.steps=10"], ["sampler=ddim", "sampler.steps=5"]):
        out = tmp_path / sampler[0].replace("=", "-")
        result = run_cli(
            "sample.py", f"ckpt_path={ckpt}", *sampler, "num_samples=10", "progress_every_s=0", f"hydra.run.dir={out}"
        )
        assert result.returncode == 0, result.stderr[-3000:]
        progress = [line for line in result.stdout.splitlines() if "sampling (" in line and ", ETA " in line]
        assert progress and "(100.0%)" in progress[-1]
        samples = np.load(out / "samples.npz")["samples"]
        assert samples.shape == (10, 1, 8, 8) and np.isfinite(samples).all()
        assert str(np.load(out / "samples.npz")["spacing"]) == "time"
        assert np.abs(samples).max() <= 1.0  # clipped x0 on image data
        assert Image.open(out / "samples.png").size[0] > 8


def test_sample_cli_without_checkpoint_says_what_is_missing(tmp_path):
    result = run_cli("sample.py", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0 and "ckpt_path" in result.stderr


def test_truncated_checkpoint_is_named_with_the_fix(tmp_path):
    bad = tmp_path / "last.ckpt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    result = run_cli("eval.py", f"ckpt_path={bad}", f"hydra.run.dir={tmp_path / 'eval'}")
    assert result.returncode == 2
    assert "truncated or corrupt" in result.stderr and str(bad) in result.stderr


def test_a_checkpoint_of_ones_own_class_not_importable_here_says_to_set_pythonpath(tmp_path, trained_checkpoint):
    """A run trained with a loss of one's own (a module outside the package, found through PYTHONPATH at training),
    evaluated without that PYTHONPATH: the class and the fix are named, status 2, before anything is built."""
    import torch

    from tests.helpers import copy_of_checkpoint

    ckpt = copy_of_checkpoint(trained_checkpoint, tmp_path / "run")
    checkpoint = torch.load(ckpt, weights_only=False)
    checkpoint["diffusion_elbo_config"]["loss"]["_target_"] = "my_losses_not_on_the_path.MinSNRLoss"
    torch.save(checkpoint, ckpt)
    result = run_cli("eval.py", f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'eval'}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "my_losses_not_on_the_path.MinSNRLoss (loss)" in result.stderr and "PYTHONPATH" in result.stderr


@pytest.mark.slow
def test_two_process_cpu_ddp_run_trains_validates_and_checkpoints(tmp_path):
    result = run_cli(
        "train.py",
        *FAST,
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1.0",
        "schedule.timesteps=100",
        # FID with its samples split over the two ranks (rank 0 trains the classifier, rank 1 waits for it)
        "callbacks.fid.num_samples=40",
        "callbacks.fid.every_n_val=2",
        "callbacks.fid.classifier_steps=30",
        f"callbacks.fid.cache_dir={tmp_path / 'cache'}",
        "callbacks.fid.sampler.steps=5",
        # post-hoc EMA under DDP: every rank updates its averages, rank 0 alone writes the snapshots
        "callbacks=posthoc_ema",
        "callbacks.posthoc_ema.snapshot_every=2",
        f"hydra.run.dir={tmp_path / 'run'}",
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    m = json.loads((tmp_path / "run" / "train_metrics.json").read_text())
    assert m["global_step"] == 4 and math.isfinite(m["val/elbo_bpd"])
    snapshots = sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "posthoc_ema").iterdir())
    assert snapshots == ["step_0000002.pt", "step_0000004.pt"]  # no stray temporary file of a second writer
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    state = next(v for k, v in last["callbacks"].items() if k.startswith("PostHocEMA"))
    stored = torch.load(tmp_path / "run" / "checkpoints" / "posthoc_ema" / "step_0000004.pt", weights_only=True)
    assert state["step"] == 4 and all(
        torch.equal(state["averages"][i][k].cpu(), stored["averages"][i][k])
        for i in range(2)
        for k in stored["averages"][i]
    )
    assert m["val/fid"] > 0 and 0 <= m["val/fid_classifier_accuracy"] <= 1
    rows = (tmp_path / "run" / "csv" / "version_0" / "metrics.csv").read_text()
    assert "val/elbo_bpd" in rows
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_short_digits_run_beats_the_uniform_distribution(tmp_path):
    """After 150 steps of the default recipe the bound a user reads on the dashboard, val/elbo_bpd (all 180 val
    digits, the default 32 stratified timesteps per example: unbiased for the exact T-step bound), is below 3.6
    bits/dim: far under log2(17) = 4.09 (uniform over 17 levels) and Ho et al.'s recipe after 600 steps (4.096). This
    run gave 3.442 ± 0.023 (3.228 ± 0.022 after 200 steps, which cost 50 s more of CI), and the default's 600-step
    checkpoint 2.88 on all 180 test digits (benchmarks/vdm/curve.md)."""
    run_dir = tmp_path / "run"
    result = run_cli(
        "train.py",
        *FAST,
        "trainer.max_steps=150",
        "trainer.val_check_interval=150",
        "trainer.limit_val_batches=1.0",
        "val_strata=32",
        "lr_scheduler.warmup_steps=50",
        "callbacks.model_checkpoint.every_n_train_steps=150",
        f"hydra.run.dir={run_dir}",
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    m = json.loads((run_dir / "train_metrics.json").read_text())
    assert m["global_step"] == 150
    assert 0 < m["val/elbo_bpd_se"] < 0.1
    assert m["val/elbo_bpd"] + 4 * m["val/elbo_bpd_se"] < 3.6 < math.log2(17)
    print(f"val/elbo_bpd after 150 steps: {m['val/elbo_bpd']:.4f} ± {m['val/elbo_bpd_se']:.4f}")


@pytest.mark.slow
def test_a_sweep_runs_past_a_bad_job_records_why_and_exits_nonzero(tmp_path):
    """3 jobs, the middle one invalid (linear betas at T = 10 pass 1): the other two train, the bad one leaves
    failure.json with the reason, the report lists it as failed, and the multirun's exit status is non-zero."""
    result = run_cli(
        "train.py",
        "-m",
        "schedule=linear",  # linear betas (0.0001 to 0.02, scaled by 1000 / T) are invalid at T = 10
        "schedule.timesteps=100,10,200",
        *FAST,
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        f"hydra.sweep.dir={tmp_path}",
        timeout=900,
    )
    assert result.returncode != 0
    runs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert runs == ["schedule.timesteps-10", "schedule.timesteps-100", "schedule.timesteps-200"]
    for good in ("schedule.timesteps-100", "schedule.timesteps-200"):  # the job after the bad one ran too
        assert json.loads((tmp_path / good / "train_metrics.json").read_text())["global_step"] == 2
    failure = json.loads((tmp_path / "schedule.timesteps-10" / "failure.json").read_text())
    assert failure["status"] == "failed" and "outside (0, 1)" in failure["message"]
    result = run_cli(
        "report.py", f"sweep_dir={tmp_path}", "wandb.enabled=false", f"hydra.run.dir={tmp_path / 'report_job'}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "report.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert rows["schedule.timesteps-10"]["status"] == "failed"
    assert "outside (0, 1)" in rows["schedule.timesteps-10"]["failure"]
    assert rows["schedule.timesteps-100"]["status"] == rows["schedule.timesteps-200"]["status"] == "finished"


def test_sweep_folder_names_paste_into_an_override_as_they_are(tmp_path):
    """A job's folder is named by its swept overrides without '=' or ',' (an assignment and a sweep to Hydra's
    grammar), so ckpt_path=<job>/checkpoints/last.ckpt reads back as that one path; Optuna's own search space too."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from diffusion_elbo.cli import swept_dirname

    sweep = ["schedule=linear,cosine", "model.channel_mult=[1,2],[1,2,2]", "+loss.aux_weight=0,4", "seed=1"]
    OmegaConf.save({"hydra": {"overrides": {"task": sweep}}}, tmp_path / "multirun.yaml")
    job = ["schedule=cosine", "model.channel_mult=[1,2,2]", "+loss.aux_weight=4", "seed=1"]
    name = swept_dirname(job, 3, str(tmp_path))
    assert name == "schedule-cosine+model.channel_mult-1_2_2+loss.aux_weight-4"
    optuna = swept_dirname(["optimizer.lr=0.00123", "seed=1"], 0, str(tmp_path), {"optimizer.lr": "interval(0, 1)"})
    assert optuna == "optimizer.lr-0.00123"
    for folder in (name, optuna):
        path = tmp_path / folder / "checkpoints" / "last.ckpt"
        (override,) = OverridesParser.create().parse_overrides([f"ckpt_path={path}"])
        assert not override.is_sweep_override() and override.value() == str(path)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_every_job_of_a_sweep_has_its_own_folder_and_wandb_run_under_every_launcher(tmp_path, launcher):
    """Two jobs, the first failing after step 1 (its W&B run already started): each job's folder is named by its swept
    override (from multirun.yaml, not the worker's sys.argv) and holds one offline W&B run, with the id of its
    wandb_run_id.txt, its own name, config, history and exit code, in the sweep's group. joblib with one worker runs
    both jobs in one process, where the second used to write into the first's run (the basic launcher's case, tested
    with the evals below; Optuna's in the search test). Under submitit_local each job is a 2-process DDP run
    (tasks_per_node=2: submitit starts both ranks, Lightning none; each job once per rank, in its own folder), whose
    rank 0 alone writes the job's W&B run."""
    launcher_args = {
        "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=1"],
        "submitit_local": ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                           "hydra.launcher.tasks_per_node=2", "trainer=cpu", "trainer.devices=2",
                           "trainer.strategy=ddp"],
    }[launcher]  # fmt: skip
    result = run_cli(
        "train.py", "-m", *launcher_args, "schedule=linear,cosine", *FAST, "logger=wandb", "trainer.max_steps=2",
        "trainer.val_check_interval=2", "callbacks.model_checkpoint.every_n_train_steps=2", "schedule.timesteps=50",
        "+callbacks.fail._target_=tests.faults.RaiseAtStep", "+callbacks.fail.step=1", "+callbacks.fail.job_num=0",
        f"hydra.sweep.dir={tmp_path}", env=FAULTS_IMPORTABLE, timeout=900,
    )  # fmt: skip
    assert result.returncode != 0  # the failed job fails the sweep, at its end
    jobs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and (p / ".hydra").is_dir())
    assert jobs == ["schedule-cosine", "schedule-linear"], result.stderr[-3000:]
    assert "injected failure" in json.loads((tmp_path / "schedule-linear" / "failure.json").read_text())["message"]
    assert json.loads((tmp_path / "schedule-cosine" / "train_metrics.json").read_text())["global_step"] == 2
    for job, schedule, failed in [("schedule-linear", "linear", True), ("schedule-cosine", "cosine", False)]:
        runs = runs_in(tmp_path / job)
        assert len(runs) == 1, f"{job}: {len(runs)} W&B runs"
        run = runs[0]
        assert run.run_id == (tmp_path / job / "wandb_run_id.txt").read_text().strip()
        assert (run.name, run.group) == (job, f"train-{tmp_path.name}")
        # the group's option as typed (the node holds the class and its arguments), for a dashboard to group by
        assert run.config["choices"]["schedule"] == schedule and run.summary["schedule/timesteps"] == 50
        assert run.config["schedule"]["_target_"].endswith(f"{schedule.capitalize()}Betas")
        assert run.exit_code == int(failed)  # W&B shows the failed job's run as failed
        # its own history: the failed job stopped before step 2, the other trained and validated at step 2
        assert (max(run.steps) < 2 if failed else max(run.steps) == 2) and ("val/elbo_bpd" in run.summary) != failed
        if launcher == "submitit_local":
            assert _starts(tmp_path / job) == [f"job {job}: process 0 of 2 starts", f"job {job}: process 1 of 2 starts"]


@pytest.mark.slow
def test_a_sweep_over_three_schedules_gives_readable_runs_and_their_evals_land_in_them(tmp_path):
    """A 3-job sweep (basic launcher) gives one folder and one W&B run per job, each readable; src/eval.py
    ckpt_path=<job>/checkpoints/last.ckpt, the path pasted as it is (no quotes), writes <job>/eval/last-<variance>/,
    adds test/ summaries to that job's own W&B run (resumed by its id), leaves the job's .hydra/ as it was, and
    src/report.py lists every run with its schedule, bound and test/ columns."""
    result = run_cli(
        "train.py",
        "-m",
        "schedule=linear,cosine,sigmoid",
        *FAST,
        "logger=wandb",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "schedule.timesteps=100",
        f"hydra.sweep.dir={tmp_path}",
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert runs == ["schedule-cosine", "schedule-linear", "schedule-sigmoid"]
    for run in runs:
        m = json.loads((tmp_path / run / "train_metrics.json").read_text())
        assert m["global_step"] == 2 and math.isfinite(m["val/elbo_bpd"])

    evaluated = ["schedule-cosine", "schedule-linear"]
    before = {run: (tmp_path / run / ".hydra" / "config.yaml").read_bytes() for run in runs}
    for run, variance in zip(evaluated, ["null", "large"], strict=True):
        ckpt = tmp_path / run / "checkpoints" / "last.ckpt"
        result = run_cli(
            "eval.py", f"ckpt_path={ckpt}", f"variance={variance}", "num_examples=4", "fid.num_samples=0", cwd=tmp_path
        )
        assert result.returncode == 0, result.stderr[-3000:]
    for run in evaluated:  # the training run, then the eval resuming it: one W&B run id per job
        train_run, eval_run = runs_in(tmp_path / run)
        assert train_run.run_id == eval_run.run_id == (tmp_path / run / "wandb_run_id.txt").read_text().strip()
        assert train_run.config["choices"]["schedule"] == run.removeprefix("schedule-")
        assert (train_run.name, train_run.group) == (eval_run.name, eval_run.group) == (run, f"train-{tmp_path.name}")
        assert max(train_run.steps) == 2 and eval_run.summary["test/bpd"] > 0 and eval_run.summary["test/ckpt"]
    assert len({runs_in(tmp_path / run)[0].run_id for run in runs}) == 3
    assert json.loads((tmp_path / "schedule-cosine" / "eval" / "last-trained" / "metrics.json").read_text())["bpd"] > 0
    assert (tmp_path / "schedule-linear" / "eval" / "last-large" / ".hydra" / "config.yaml").is_file()
    assert before == {run: (tmp_path / run / ".hydra" / "config.yaml").read_bytes() for run in runs}
    assert not (tmp_path / "outputs").exists()  # nothing went to the default eval folder

    # the sweep report lists every run with its schedule and bound, next to the sweep
    result = run_cli(
        "report.py", f"sweep_dir={tmp_path}", "wandb.mode=offline", f"hydra.run.dir={tmp_path / 'report_job'}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "report.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == runs
    assert sorted(r["schedule"] for r in rows.values()) == ["cosine", "linear", "sigmoid"]
    assert {r["variance"] for r in rows.values()} == {"small"}  # the variance the val/ numbers are under
    assert all(float(r["val/elbo_bpd"]) > 0 for r in rows.values())
    assert (tmp_path / "report.png").is_file() and "schedule-cosine" in (tmp_path / "report.md").read_text()
    assert rows["schedule-linear"]["test/variance"] == "large" and rows["schedule-cosine"]["test/variance"] == "small"
    assert all(float(rows[run]["test/bpd"]) > 0 for run in evaluated) and not rows["schedule-sigmoid"]["test/bpd"]
    assert rows["schedule-linear"]["test/eval"] == "eval/last-large"
    assert list((tmp_path / "wandb").glob("offline-run-*"))  # the report's own W&B run, next to the sweep


def _starts(run_dir) -> list[str]:
    """The 'process r of w starts' lines of a job's log (every rank appends to it)."""
    return sorted(
        line.split(" - ", 1)[1] for line in (run_dir / "train.log").read_text().splitlines() if "starts" in line
    )


@pytest.mark.slow
def test_ddp_inside_a_sweep_runs_each_job_once_per_rank(tmp_path):
    """-m over two schedules with 2 CPU DDP processes per job: rank 1 of each job runs that job only (not the sweep
    loop again), in the job's own folder."""
    result = run_cli(
        "train.py",
        "-m",
        "schedule=linear,cosine",
        *FAST,
        "trainer=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "schedule.timesteps=50",
        f"hydra.sweep.dir={tmp_path}",
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (result.stdout + result.stderr).count("Launching 2 jobs") == 1
    for run in ("schedule-cosine", "schedule-linear"):
        assert _starts(tmp_path / run) == [f"job {run}: process 0 of 2 starts", f"job {run}: process 1 of 2 starts"]
        assert json.loads((tmp_path / run / "train_metrics.json").read_text())["global_step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["schedule-cosine", "schedule-linear"]


def test_joblib_with_ddp_is_refused_before_any_job_runs(tmp_path):
    result = run_cli(
        "train.py", "-m", "hydra/launcher=joblib", "schedule=linear,cosine", "trainer=cpu", "trainer.devices=2",
        "trainer.strategy=ddp", f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )  # fmt: skip
    assert result.returncode == 2
    assert "hydra/launcher=joblib" in result.stderr and "tasks_per_node=2" in result.stderr
    assert not (tmp_path / "sweep").exists()  # nothing ran


@pytest.mark.slow
def test_eval_on_1_and_3_processes_gives_the_same_numbers(tmp_path, trained_checkpoint):
    """src/eval.py trainer.devices=N: examples sharded without padding (7 examples: 3/2/2 on 3 processes), each with
    its own noise, so bpd, its terms and every example's value agree with one process to 1e-6; the ODE too (one example
    per solve). 3 processes: uneven shards and a rank that is neither first nor last (2 added nothing and cost 30 s)."""
    ckpt = copy_of_checkpoint(trained_checkpoint, tmp_path / "run")
    metrics, examples = {}, {}
    for world in (1, 3):
        out = tmp_path / f"eval{world}"
        result = run_cli(
            "eval.py", f"ckpt_path={ckpt}", "num_examples=7", "batch_size=3",
            # one example per ODE solve: examples solved together share the adaptive steps (a batch effect of 1e-4)
            "likelihood=both", "likelihood.ode.batch_size=1", "fid.num_samples=0", "wandb.enabled=false", "trainer.accelerator=cpu",
            f"trainer.devices={world}", f"hydra.run.dir={out}", timeout=900,
            # one thread per process in every run: the thread count changes the float32 rounding of the network, which
            # the adaptive ODE solver amplifies to ~5e-6 (1 process would otherwise use both cores, N processes one each)
            env={"OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        metrics[world] = json.loads((out / "metrics.json").read_text())
        with open(out / "per_example.csv") as f:
            examples[world] = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    for world in (3,):
        assert metrics[world]["num_examples"] == 7 and len(examples[world]) == 7
        for key in ("bpd", "bpd_se", "ode_bpd", "elbo_minus_ode_bpd"):
            assert metrics[world][key] == pytest.approx(metrics[1][key], rel=1e-6), (world, key)
        for key in ("reconstruction", "prior", "denoising"):
            assert metrics[world]["terms_nats_per_dim"][key] == pytest.approx(
                metrics[1]["terms_nats_per_dim"][key], rel=1e-6
            )
        assert metrics[world]["per_t_nats_per_dim"] == pytest.approx(metrics[1]["per_t_nats_per_dim"], rel=1e-6)
        for row, ref in zip(examples[world], examples[1], strict=True):
            assert row == pytest.approx(ref, rel=1e-6)


@pytest.mark.slow
def test_optuna_search_minimizes_the_metric_train_returns(tmp_path):
    """hparams_search=optuna: trials are named by their sampled values, each returns optimized_metric, and the
    sweeper's best value is the smallest val/elbo_bpd of the trials."""
    import yaml

    result = run_cli(
        "train.py", "-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=2",
        *FAST, "trainer.max_steps=2", "trainer.val_check_interval=2", "callbacks.model_checkpoint.every_n_train_steps=2",
        "schedule.timesteps=50", "logger=wandb", f"hydra.sweep.dir={tmp_path}", timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [p for p in tmp_path.iterdir() if (p / "train_metrics.json").is_file()]
    assert len(runs) == 2 and all("optimizer.lr-" in p.name and "+model.dropout-" in p.name for p in runs)
    for run in runs:  # each trial its own W&B run, with the values it was named by in its config
        (wandb_run,) = runs_in(run)
        sampled = dict(part.split("-", 1) for part in run.name.split("+"))
        assert wandb_run.name == run.name and wandb_run.exit_code == 0 and max(wandb_run.steps) == 2
        assert wandb_run.config["optimizer"]["lr"] == float(sampled["optimizer.lr"])
        assert wandb_run.config["model"]["dropout"] == float(sampled["model.dropout"])
    values = [json.loads((p / "train_metrics.json").read_text())["val/elbo_bpd"] for p in runs]
    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(min(values), rel=1e-6)
