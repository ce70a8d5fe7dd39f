"""The training ladder: fast runs per model x data pair, resume, EMA, outputs, loggers."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict
from PIL import Image

from diffusion_elbo.builders import build_datamodule, build_schedule, resolve_wandb_mode
from diffusion_elbo.checkpoints import load_for_eval
from diffusion_elbo.training import sweep_group_and_name, train

from .helpers import CONF_DIR, SMALL_UNET, compose_train, write_fake_mnist


def read_csv_metrics(output_dir: Path) -> list[dict]:
    (path,) = output_dir.glob("csv/version_*/metrics.csv")
    with open(path) as f:
        return list(csv.DictReader(f))


def column(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]


@pytest.mark.parametrize(
    "overrides",
    [
        ["data=digits", "model=unet"],
        ["data=toy2d", "model=mlp", "data.name=moons"],
        ["data=gaussian", "model=mlp", "data.dim=4", "parametrization=v", "loss=elbo"],
        ["data=digits", "model=unet", "parametrization=x0", "loss=x0_mse_weighted", "schedule=cosine"],
    ],
    ids=["unet-digits", "mlp-toy2d", "mlp-gaussian-elbo", "unet-digits-x0"],
)
def test_short_run_logs_finite_loss_and_all_elbo_terms(tmp_path, overrides):
    cfg = compose_train(tmp_path, [*overrides, "schedule.timesteps=200"])
    metrics = train(cfg, str(tmp_path))
    assert metrics["global_step"] == 6
    for key in (
        "train/loss",
        "train/elbo_bpd",
        "train/prior_bpd",
        "val/elbo_bpd",
        "val/reconstruction_bpd",
        "val/prior_bpd",
        "val/denoising_bpd",
        "val/elbo_bpd_se",
    ):
        assert key in metrics and torch.isfinite(torch.tensor(metrics[key])), key
    # KL terms are non-negative; the prior term depends only on the data: check it against its closed form on the
    # examples the validation saw (limit_val_batches=1: the first validation batch)
    assert metrics["val/prior_bpd"] >= 0 and metrics["val/denoising_bpd"] >= 0
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    x0 = next(iter(datamodule.val_dataloader()))[0].double().flatten(1)
    ab = float(build_schedule(cfg).alpha_bar[-1])
    prior = 0.5 * (ab * x0**2 - ab - math.log1p(-ab))  # KL(N(sqrt(ab) x0, 1 - ab) || N(0, 1)) per dim
    assert metrics["val/prior_bpd"] == pytest.approx(prior.mean().item() / math.log(2), rel=1e-4)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert json.loads((tmp_path / "train_metrics.json").read_text())["global_step"] == 6


def test_image_runs_write_sample_grids_and_eval_reloads_ema_weights(tmp_path):
    cfg = compose_train(tmp_path, ["schedule.timesteps=100", "callbacks.ema.decay=0.5", "callbacks.ema.sigma_rel=null"])
    train(cfg, str(tmp_path))
    grids = sorted((tmp_path / "samples").glob("step_*.png"))
    assert [g.name for g in grids] == ["step_0000003.png", "step_0000006.png"]
    assert Image.open(grids[-1]).size[0] >= 16  # a grid of 4 digits, enlarged
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    # Lightning's weight averaging: state_dict holds the EMA weights, current_model_state the raw ones.
    ema, raw = ckpt["state_dict"], ckpt["current_model_state"]
    diffs = [not torch.equal(ema[k], raw[k]) for k in ema if k.startswith("net.")]
    assert any(diffs)
    run = load_for_eval(tmp_path / "checkpoints" / "last.ckpt")
    key = next(k for k, d in zip([k for k in ema if k.startswith("net.")], diffs, strict=True) if d)
    torch.testing.assert_close(run.module.state_dict()[key], ema[key])
    assert run.global_step == 6 and run.datamodule.num_bins == 17


def test_resume_continues_at_saved_step_with_lr_schedule_and_ema(tmp_path):
    common = [
        *SMALL_UNET,
        "schedule.timesteps=100",
        "lr_scheduler.warmup_steps=10",
        "trainer.val_check_interval=5",
        "callbacks.model_checkpoint.every_n_train_steps=5",
    ]
    straight = tmp_path / "straight"
    train(compose_train(straight, [*common, "trainer.max_steps=10"]), str(straight))

    resumed = tmp_path / "resumed"
    train(compose_train(resumed, [*common, "trainer.max_steps=5"]), str(resumed))
    first = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)
    assert first["global_step"] == 5
    metrics = train(compose_train(resumed, [*common, "trainer.max_steps=10", "ckpt_path=last"]), str(resumed))
    assert metrics["global_step"] == 10
    # The LR warm-up continued from step 5 rather than restarting: same LR per step as the straight run.
    lr_straight = dict(column(read_csv_metrics(straight), "lr-AdamW"))
    lr_resumed = {}
    for version in sorted(resumed.glob("csv/version_*/metrics.csv")):
        with open(version) as f:
            lr_resumed.update({int(r["step"]): float(r["lr-AdamW"]) for r in csv.DictReader(f) if r.get("lr-AdamW")})
    assert max(lr_resumed) == 9 and lr_resumed == pytest.approx(lr_straight)
    # EMA kept averaging across the restart: 10 updates in all.
    last = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)
    assert int(last["averaging_state"]["n_averaged"]) == 10


def test_a_run_outside_a_terminal_logs_its_progress_over_all_steps_with_an_eta(tmp_path, caplog):
    """No terminal (a batch job's log): the bars are off, and progress lines count the run's steps, not an epoch's
    batches, with the time left."""
    overrides = [*SMALL_UNET, "trainer.max_steps=4", "trainer.enable_progress_bar=true",
                 "callbacks.progress_bar.log_every_s=0"]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="diffusion_elbo.progress"):
        train(compose_train(tmp_path, [*overrides, "callbacks.progress_bar.interactive=false"]), str(tmp_path))
    lines = [r.getMessage() for r in caplog.records if r.name == "diffusion_elbo.progress"]
    assert [line.split(" (")[0] for line in lines] == [f"train: {step}/4 steps" for step in range(1, 5)]
    assert all(", elapsed " in line and ", ETA " in line and "train/loss" in line for line in lines), lines
    assert lines[-1].startswith("train: 4/4 steps (100.0%)") and ", ETA 0:00" in lines[-1]


def test_importance_sampler_history_survives_checkpoints(tmp_path):
    cfg = compose_train(
        tmp_path,
        [
            "data=gaussian",
            "model=mlp",
            "data.dim=4",
            "loss=elbo",
            "schedule=cosine",
            "schedule.timesteps=10",
            "trainer.max_steps=12",
        ],
    )
    train(cfg, str(tmp_path))
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["importance_sampler"]
    assert int(state["counts"].sum()) == 100  # full history: 10 timesteps x 10 values
    assert torch.isfinite(state["losses"]).all()


def test_fake_mnist_trains_with_the_mnist_unet(tmp_path):
    root = tmp_path / "mnist"
    write_fake_mnist(root)
    cfg = compose_train(
        tmp_path / "run",
        [
            "data=mnist",
            f"data.root={root}",
            "data.num_val=16",
            "model=unet_mnist",
            "model.model_channels=32",
            "model.num_groups=8",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "data.batch_size=8",
            "schedule.timesteps=100",
        ],
    )
    metrics = train(cfg, str(tmp_path / "run"))
    assert metrics["global_step"] == 2 and metrics["val/elbo_bpd"] > 0


def test_loss_curve_has_one_row_per_optimizer_step_with_its_full_loss(tmp_path):
    """trainer.accumulate_grad_batches=2: loss_curve.csv has steps 0, 1, 2 once each (not -1, 0, 0, 1, 1), and a step's
    loss is the mean of its batches' losses, not half of each (Lightning hands the hooks the loss divided by 2)."""
    from types import SimpleNamespace

    from diffusion_elbo.lightning.callbacks import LossJournal

    journal = LossJournal(str(tmp_path / "unit" / "loss_curve.csv"))
    trainer = SimpleNamespace(global_step=0, accumulate_grad_batches=2)
    journal.on_train_start(trainer, None)
    for batch, (loss, step_after) in enumerate([(1.0, 0), (3.0, 1), (5.0, 1), (7.0, 2)]):
        trainer.global_step = step_after
        journal.on_train_batch_end(trainer, None, {"loss": torch.tensor(loss / 2)}, None, batch)
    assert (tmp_path / "unit" / "loss_curve.csv").read_text() == "step,loss\n0,2\n1,6\n"

    cfg = compose_train(
        tmp_path / "run",
        [
            "trainer.accumulate_grad_batches=2",
            "trainer.max_steps=3",
            "trainer.limit_val_batches=0",
            "data.batch_size=8",
            "logger=none",
        ],
    )
    assert train(cfg, str(tmp_path / "run"))["global_step"] == 3
    with open(tmp_path / "run" / "loss_curve.csv") as f:
        assert [int(row["step"]) for row in csv.DictReader(f)] == [0, 1, 2]


def test_model_summary_counts_the_networks_flops(tmp_path):
    """The model summary's FLOPs column is the network's cost on one example (it showed 0 without an example input)."""
    from lightning.pytorch.utilities.model_summary import ModelSummary

    from diffusion_elbo.builders import build_module

    module, _ = build_module(compose_train(tmp_path, []))
    summary = ModelSummary(module, max_depth=1)
    assert summary.total_flops > 0 and summary.flop_counts["net"]


def test_more_cpu_processes_than_cores_start_with_a_warning(monkeypatch, caplog):
    """trainer.devices=4 on the CPU of a 2-core machine says so (the processes share the cores) instead of nothing."""
    import lightning as L

    from diffusion_elbo import training

    monkeypatch.setattr(training, "usable_cores", lambda: 2)
    for devices, warned in ((4, True), (2, False)):
        caplog.clear()
        trainer = L.Trainer(
            accelerator="cpu", devices=devices, strategy="ddp", logger=False, enable_checkpointing=False
        )
        with caplog.at_level("WARNING", logger="diffusion_elbo.training"):
            training.warn_if_processes_exceed_cores(trainer)
        assert ("trainer.devices=4 starts 4 training processes" in caplog.text) == warned, caplog.text
        assert ("2 core(s)" in caplog.text) == warned


def test_wandb_offline_run_files_are_written(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc credentials
    cfg = compose_train(
        tmp_path / "run", [*SMALL_UNET, "logger=wandb", "trainer.max_steps=3", "schedule.timesteps=100"]
    )
    train(cfg, str(tmp_path / "run"))
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("run-*.wandb"))  # the real client's run file, which `wandb sync` uploads


def test_wandb_mode_is_online_only_with_credentials(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert resolve_wandb_mode("auto") == "offline"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert resolve_wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("auto") == "disabled"
    assert resolve_wandb_mode("offline") == "offline"


def test_multirun_jobs_share_a_wandb_group_named_after_the_sweep(tmp_path):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["schedule=cosine"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.sweep.dir = str(tmp_path / "multiruns" / "2026-01-01_00-00-00")
        cfg.hydra.runtime.output_dir = str(tmp_path / "multiruns" / "2026-01-01_00-00-00" / "schedule=cosine")
        cfg.hydra.job.name = "train"
    HydraConfig.instance().set_config(cfg)
    try:
        assert sweep_group_and_name() == ("train-2026-01-01_00-00-00", "schedule=cosine")
    finally:
        HydraConfig.instance().cfg = None


def test_fake_cifar10_and_image_folder_train_with_a_small_unet(tmp_path):
    import pickle

    import numpy as np

    rng = np.random.RandomState(0)
    batches = tmp_path / "cifar" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(batches / name, "wb") as f:
            pickle.dump({b"data": rng.randint(0, 256, (8, 3072), dtype=np.uint8), b"labels": list(range(8))}, f)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(12):
        Image.fromarray(rng.randint(0, 256, (20 + i, 18, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    small_unet = [
        "model.model_channels=16",
        "model.channel_mult=[1,2]",
        "model.num_groups=8",
        "data.batch_size=4",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "schedule.timesteps=50",
    ]
    for name, data in [
        (
            "cifar",
            [
                "data=cifar10",
                f"data.root={tmp_path / 'cifar'}",
                "data.num_val=8",
                "data.download=false",
                "model.attention_resolutions=[16]",
            ],
        ),
        (
            "folder",
            [
                "data=image_folder",
                f"data.root={folder}",
                "data.image_size=16",
                "data.val_fraction=0.25",
                "data.test_fraction=0.25",
                "model.attention_resolutions=[8]",
            ],
        ),
    ]:
        metrics = train(compose_train(tmp_path / name, [*data, *small_unet]), str(tmp_path / name))
        assert metrics["global_step"] == 2 and math.isfinite(metrics["val/elbo_bpd"])


def test_tensorboard_logger_writes_event_files(tmp_path):
    train(
        compose_train(tmp_path, [*SMALL_UNET, "logger=tensorboard", "trainer.max_steps=3", "schedule.timesteps=100"]),
        str(tmp_path),
    )
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))


def test_a_crash_while_writing_a_checkpoint_keeps_the_last_good_one(tmp_path, monkeypatch):
    from diffusion_elbo.lightning.callbacks import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def crash(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_ranks_draw_different_noise_and_resume_restores_the_generator(tmp_path, monkeypatch):
    from diffusion_elbo.builders import build_module
    from diffusion_elbo.lightning.module import DiffusionModule

    module, _ = build_module(compose_train(tmp_path, ["schedule.timesteps=100"]))
    rank0 = torch.randn(8, generator=module.generator)
    monkeypatch.setattr(DiffusionModule, "global_rank", property(lambda self: 1))
    module._generator = None
    rank1 = torch.randn(8, generator=module.generator)
    assert not torch.equal(rank0, rank1)
    # a checkpoint carries the generator state: loading it continues the same stream
    state = {"generator_state": module.generator.get_state()}
    expected = torch.randn(8, generator=module.generator)
    module.on_load_checkpoint(state)
    assert torch.equal(torch.randn(8, generator=module.generator), expected)


def test_fast_path_options_train_and_keep_checkpoints_plain(tmp_path):
    cfg = compose_train(
        tmp_path, ["channels_last=true", "optimizer.fused=true", "optimizer.foreach=null", "schedule.timesteps=100"]
    )
    metrics = train(cfg, str(tmp_path))
    assert math.isfinite(metrics["train/loss"])
    keys = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"].keys()
    assert all(k.startswith("net.") for k in keys) and not any("_orig_mod" in k for k in keys)


@pytest.mark.slow
def test_torch_compile_trains_the_same_weights_layout(tmp_path):
    cfg = compose_train(
        tmp_path,
        [
            "compile=true",
            "data=toy2d",
            "model=mlp",
            "model.hidden_dim=32",
            "schedule.timesteps=50",
            "trainer.max_steps=3",
        ],
    )
    metrics = train(cfg, str(tmp_path))
    assert math.isfinite(metrics["train/loss"])
    keys = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"].keys()
    assert not any("_orig_mod" in k for k in keys)


def test_wandb_run_holds_min_summaries_the_schedule_summary_tags_and_model_artifacts(tmp_path, monkeypatch):
    """What reaches W&B, read back from the offline run file: val/elbo_bpd's summary is its minimum over the run and
    it is plotted against the global step; the schedule summary is in the config and summary (not a step-0 point),
    its plot under schedule/plot, not the key "schedule" whose fields would sit among the schedule/ scalars; Lightning's
    own epoch and learning rate under train/; the top-level tags=[...]; checkpoints as model artifacts with
    logger.wandb.log_model=true."""
    import wandb

    from tests.wandb_records import of_type, read_records

    wandb.finish()  # a run left open by an earlier test in this process would take this run's records
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    run_dir = tmp_path / "run"
    cfg = compose_train(
        run_dir,
        ["logger=wandb", "trainer.max_steps=4", "trainer.val_check_interval=2", "schedule.timesteps=100",
         "tags=[digits,smoke]", "logger.wandb.log_model=true"],
    )  # fmt: skip
    train(cfg, str(run_dir))
    wandb.finish()  # the run file is complete once the run ends (a script's exit does this)
    found = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(found) == 1, sorted(str(p) for p in run_dir.rglob("*") if "wandb" in str(p))[:20]
    path = found[0]
    records = read_records(path)
    metrics = {m.name: m for m in of_type(records, "metric") if m.name}
    assert metrics["val/elbo_bpd"].summary.min and metrics["val/elbo_bpd"].step_metric == "trainer/global_step"
    config = {u.key: u.value_json for c in of_type(records, "config") for u in c.update}
    assert json.loads(config["schedule_summary"])["schedule/timesteps"] == 100
    summary = {u.key or "/".join(u.nested_key): u.value_json for s in of_type(records, "summary") for u in s.update}
    assert float(summary["schedule/alpha_bar_T"]) > 0
    history_keys = {i.key or "/".join(i.nested_key) for h in of_type(records, "history") for i in h.item}
    assert "schedule/alpha_bar_T" not in history_keys and "val/elbo_bpd" in history_keys
    images = {k.removesuffix("/_type") for k in summary if k.endswith("/_type") and "images" in summary[k]}
    assert "schedule/plot" in images and "schedule" not in images  # its fields apart from the schedule/ scalars
    assert {"train/epoch", "train/lr-AdamW"} <= history_keys and not {"epoch", "lr-AdamW"} & history_keys
    # the per-t profile and rate-distortion as a table with line plots (custom charts) after each validation
    tables = {k.rsplit("/", 1)[0] for k in history_keys if k.startswith("profile/") and k.endswith("/_type")}
    assert tables == {"profile/table", "profile/term_vs_t_table", "profile/rate_distortion_table"}, tables
    (run,) = of_type(records, "run")
    assert list(run.tags) == ["digits", "smoke"]
    artifacts = of_type(records, "artifact")
    assert any(a.type == "model" for a in artifacts)  # beside the tables (run_table artifacts)


def test_wandb_credentials_are_looked_up_for_the_configured_server(tmp_path, monkeypatch):
    """A self-hosted server (WANDB_BASE_URL) is online with its own netrc entry; api.wandb.ai's does not count."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for key in ("WANDB_MODE", "WANDB_API_KEY", "NETRC"):
        monkeypatch.delenv(key, raising=False)
    (tmp_path / ".netrc").write_text("machine wandb.example.com\n  login user\n  password abc\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert resolve_wandb_mode("auto") == "offline"  # no entry for api.wandb.ai
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")
    assert resolve_wandb_mode("auto") == "online"
    elsewhere = tmp_path / "other.netrc"
    elsewhere.write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    elsewhere.chmod(0o600)
    monkeypatch.setenv("NETRC", str(elsewhere))  # the netrc file the client would read
    assert resolve_wandb_mode("auto") == "offline"
    monkeypatch.delenv("WANDB_BASE_URL")
    assert resolve_wandb_mode("auto") == "online"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "runs"),
    [
        ([], ((1, 180), (2, 180), (1, 7), (3, 7))),
        (["schedule=learned", "loss=vdm", "model.model_channels=16"], ((1, 180), (3, 180))),
    ],
)
def test_validation_numbers_are_the_same_on_1_2_and_3_processes(tmp_path, overrides, runs):
    """val/elbo_bpd, its terms and SEs, and the per-t profile on 1, 2 and 3 gloo processes agree to 1e-6 relative:
    every example draws its timesteps and noise from its own seed, and the val split is sharded without padding
    (180 digits: 90/90 on 2, and 60/60/60 on 3 for the learned schedule; 3 processes of 7 examples are uneven,
    3/2/2, tested with val_examples=7)."""
    from tests.helpers import REPO_ROOT, run_python

    results = {}
    for world, examples in runs:
        out = tmp_path / f"w{world}-{examples}.json"
        proc = run_python(
            REPO_ROOT / "tests" / "validate_world.py", str(world), str(out), f"data.val_examples={examples}",
            "data.eval_batch_size=32", *overrides, env={"PYTHONPATH": str(REPO_ROOT)},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[(world, examples)] = json.loads(out.read_text())
    for (world, examples), got in results.items():
        ref = results[(1, examples)]
        if world > 1:
            for key, value in ref["metrics"].items():
                assert got["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (world, key)
            for key, values in ref["profile"].items():
                assert got["profile"][key] == pytest.approx(values, rel=1e-6, abs=1e-9), (world, key)
    if (1, 7) in results:  # a subset is a number of examples: 7 give another number than 180
        assert results[(1, 7)]["metrics"]["val/elbo_bpd"] != results[(1, 180)]["metrics"]["val/elbo_bpd"]
