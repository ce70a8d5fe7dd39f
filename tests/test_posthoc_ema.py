"""Post-hoc EMA (Karras et al. 2024, EDM2 sec. 3): the power-function profile against the EMA recursion, the
least-squares reconstruction against stored and classic profiles and a toy model's weights, and the callback's
snapshots on one run and on a run resumed half-way."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn

from diffusion_elbo.core.posthoc_ema import (
    Snapshot,
    combine,
    ema_profile,
    gamma_from_sigma_rel,
    power_ema_decay,
    power_profile,
    sigma_rel_from_gamma,
    solve_coefficients,
)
from diffusion_elbo.lightning.posthoc_ema import PostHocEMA, read_snapshots


def _run_recursion(steps: int, decays) -> torch.Tensor:
    """The EMA of theta_k = e_k (the k-th unit vector) after ``steps`` updates with decay decays(k): its entries are
    the profile's weights, whatever the recursion does."""
    ema = torch.zeros(steps, dtype=torch.float64)
    for k in range(1, steps + 1):
        theta = torch.zeros(steps, dtype=torch.float64)
        theta[k - 1] = 1.0
        ema = decays(k) * ema + (1 - decays(k)) * theta
    return ema


@pytest.mark.parametrize("sigma_rel", [0.05, 0.1, 0.2])
def test_the_power_profile_closed_form_is_the_ema_recursion_step_by_step(sigma_rel):
    gamma = gamma_from_sigma_rel(sigma_rel)
    assert sigma_rel_from_gamma(gamma) == pytest.approx(sigma_rel, rel=1e-12)
    simulated = _run_recursion(300, lambda k: power_ema_decay(k, gamma))
    torch.testing.assert_close(power_profile(300, gamma), simulated, rtol=1e-10, atol=1e-14)
    assert float(simulated.sum()) == pytest.approx(1.0, abs=1e-12)
    # the profile's relative width is sigma_rel (EDM2 eq. 123; a discrete profile of 300 steps, within 1%)
    k = torch.arange(1, 301, dtype=torch.float64)
    mean = float((simulated * k).sum())
    std = math.sqrt(float((simulated * (k - mean) ** 2).sum()))
    assert std / 300 == pytest.approx(sigma_rel, rel=0.01)
    classic = _run_recursion(300, lambda k: 0.0 if k == 1 else 0.99)
    torch.testing.assert_close(ema_profile(300, 0.99, warmup=False), classic, rtol=1e-10, atol=1e-14)
    warm = _run_recursion(300, lambda k: 0.0 if k == 1 else min(0.99, k / (9 + k)))  # update n = k - 1
    torch.testing.assert_close(ema_profile(300, 0.99), warm, rtol=1e-10, atol=1e-14)
    # EDM2's published pair: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94
    assert gamma_from_sigma_rel(0.05) == pytest.approx(16.97, abs=0.01)
    assert gamma_from_sigma_rel(0.10) == pytest.approx(6.94, abs=0.01)


def _snapshots(last: int, every: int, sigma_rels=(0.05, 0.1)) -> list[Snapshot]:
    return [Snapshot(s, gamma_from_sigma_rel(r)) for s in range(every, last + 1, every) for r in sigma_rels]


def test_the_reconstruction_gives_back_a_stored_profile_exactly_and_a_classic_ema_closely():
    snapshots = _snapshots(2000, 100)
    stored = snapshots[-3]  # sigma_rel 0.05 at step 1900, asked for at step 2000
    fit = solve_coefficients(snapshots, power_profile(stored.step, stored.gamma, 2000))
    assert fit.residual < 1e-9
    one_hot = torch.zeros(len(snapshots), dtype=torch.float64)
    one_hot[len(snapshots) - 3] = 1.0
    torch.testing.assert_close(fit.coefficients, one_hot, rtol=0, atol=1e-6)
    # a width between the stored ones, and the default run's EMA (callbacks.ema: decay 0.999 with its warm-up)
    between = solve_coefficients(snapshots, power_profile(2000, gamma_from_sigma_rel(0.08))).residual
    classic = solve_coefficients(snapshots, ema_profile(2000, 0.999)).residual
    assert between < 0.02 and classic < 0.05, (between, classic)
    with pytest.raises(ValueError, match="no snapshots"):
        solve_coefficients([], power_profile(10, 1.0))


def test_reconstructed_weights_of_a_toy_model_match_the_direct_average_of_its_trajectory():
    """theta_k of a toy linear model trained by SGD: the rebuilt average sum_i x_i snapshot_i against
    sum_k r_k theta_k computed directly from the whole trajectory, within the residual's bound."""
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(3, 2).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(64, 3, generator=g, dtype=torch.float64), torch.randn(64, 2, generator=g, dtype=torch.float64)
    gammas = [gamma_from_sigma_rel(0.05), gamma_from_sigma_rel(0.1)]
    averages = [{k: v.detach().clone() for k, v in model.state_dict().items()} for _ in gammas]
    trajectory, snapshots, states = [], [], []
    for step in range(1, 401):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        theta = {k: v.detach().clone() for k, v in model.state_dict().items()}
        trajectory.append(theta)
        for avg, gamma in zip(averages, gammas, strict=True):
            for k in avg:
                avg[k].lerp_(theta[k], 1 - power_ema_decay(step, gamma))
        if step % 50 == 0:
            snapshots += [Snapshot(step, gamma) for gamma in gammas]
            states += [{k: v.clone() for k, v in avg.items()} for avg in averages]
    target = power_profile(400, gamma_from_sigma_rel(0.08))
    fit = solve_coefficients(snapshots, target)
    rebuilt = combine(states, fit.coefficients)
    for key in rebuilt:
        direct = sum(w * theta[key] for w, theta in zip(target.tolist(), trajectory, strict=True))
        spread = torch.stack([t[key] for t in trajectory]).abs().max()
        error = (rebuilt[key] - direct).abs().max()
        assert error <= fit.residual * spread * math.sqrt(400) + 1e-12, (key, float(error), fit.residual)
        assert error < 1e-2 * spread


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self.net(x) - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        # one batch of 8 examples, repeated: every step sees the same data, so a resumed run's steps are the straight
        # run's whatever batch Lightning's resume starts from (the project's own data order is tested in test_training)
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)
        data = torch.utils.data.TensorDataset(x.repeat(8, 1), y.repeat(8, 1))
        return torch.utils.data.DataLoader(data, batch_size=8)


def _fit(root, max_steps: int, ckpt_path=None) -> None:
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        max_steps=max_steps, default_root_dir=root, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[PostHocEMA(sigma_rels=[0.05, 0.1], snapshot_every=4),
        L.pytorch.callbacks.ModelCheckpoint(dirpath=root / "checkpoints", save_last=True)],
    )  # fmt: skip
    trainer.fit(_Tiny(), ckpt_path=ckpt_path)


def test_the_callback_writes_snapshots_that_a_resumed_run_continues_exactly(tmp_path):
    """14 steps straight against 8, a resume from last.ckpt and 6 more, snapshots every 4 steps and at the end: the
    same averages (the raw weights too)."""
    _fit(tmp_path / "straight", 14)
    _fit(tmp_path / "resumed", 8)
    _fit(tmp_path / "resumed", 14, ckpt_path=tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    straight, straight_states = read_snapshots(tmp_path / "straight" / "checkpoints" / "posthoc_ema")
    resumed, resumed_states = read_snapshots(tmp_path / "resumed" / "checkpoints" / "posthoc_ema")
    assert [s.step for s in straight] == [4, 4, 8, 8, 12, 12, 14, 14] == [s.step for s in resumed]
    assert straight[0].gamma == pytest.approx(gamma_from_sigma_rel(0.05))
    for a, b in zip(straight_states, resumed_states, strict=True):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)
    raw = [torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
           for run in ("straight", "resumed")]  # fmt: skip
    torch.testing.assert_close(raw[0], raw[1], rtol=1e-6, atol=1e-7)
    assert not torch.equal(straight_states[-1]["net.weight"], raw[0]["net.weight"])  # an average, not the last weights

    # a run stopped at a step boundary by an exception (as StopOnSignal stops one) snapshots that step too
    class _Stop(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 6:
                raise KeyboardInterrupt

    L.seed_everything(0, verbose=False)
    stopped = tmp_path / "stopped"
    posthoc = PostHocEMA(sigma_rels=[0.05, 0.1], snapshot_every=4)
    trainer = L.Trainer(max_steps=14, default_root_dir=stopped, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[posthoc, _Stop()])  # fmt: skip
    with pytest.raises(SystemExit):  # Lightning turns the interrupt into an exit
        trainer.fit(_Tiny())
    names = sorted(p.name for p in (stopped / "checkpoints" / "posthoc_ema").iterdir())
    assert names == ["step_0000004.pt", "step_0000006.pt"]
    with pytest.raises(ValueError, match="sigma_rel=0.5 must be in"):
        PostHocEMA(sigma_rels=[0.5])
    with pytest.raises(ValueError, match="snapshot_every=0"):
        PostHocEMA(snapshot_every=0)


def test_the_ema_callback_with_sigma_rel_is_the_power_function_ema_the_snapshots_keep(tmp_path):
    """``callbacks.ema.sigma_rel``: its update is EDM2's power-function EMA, whose average of theta_1..theta_T is the
    closed-form profile's weighted sum (the classic decay's is :func:`ema_profile`'s); trained beside the post-hoc
    callback, its final average is that callback's stored average of the same width. A width out of range is refused
    naming the setting."""
    from diffusion_elbo.core.posthoc_ema import ema_profile
    from diffusion_elbo.lightning.callbacks import EMA, ema_multi_avg_fn

    thetas = torch.randn(30, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gamma = gamma_from_sigma_rel(0.1)
    for update, profile in ((ema_multi_avg_fn(0.999, True, gamma), power_profile(30, gamma)),
                            (ema_multi_avg_fn(0.9, True), ema_profile(30, 0.9))):  # fmt: skip
        average = thetas[0].clone()  # AveragedModel's first update copies theta_1, then n = 1, 2, ... updates
        for n in range(1, 30):
            update([average], [thetas[n]], torch.tensor(n))
        torch.testing.assert_close(average, profile.to(thetas) @ thetas)

    L.seed_everything(0, verbose=False)
    model = _Tiny()
    trainer = L.Trainer(max_steps=14, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False,
                        callbacks=[PostHocEMA(sigma_rels=[0.1], snapshot_every=7), EMA(sigma_rel=0.1)])  # fmt: skip
    trainer.fit(model)
    snapshots, states = read_snapshots(tmp_path / "checkpoints" / "posthoc_ema")
    assert [s.step for s in snapshots] == [7, 14]
    for key, value in model.state_dict().items():  # the EMA callback put its average into the model at the end
        torch.testing.assert_close(value, states[-1][key], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"sigma_rel=0.3 must be in"):
        EMA(sigma_rel=0.3)


def test_the_job_writes_a_checkpoint_per_width_whose_weights_are_the_rebuilt_average(tmp_path):
    """``src/posthoc_ema.py``'s job on a run's snapshots: a stored width comes back as the stored average itself, a
    width in between as the combination, each in a copy of last.ckpt; reconstruction.json has the fit of each."""
    import json

    from omegaconf import OmegaConf

    from diffusion_elbo.config import ConfigError
    from diffusion_elbo.posthoc import run_posthoc_ema

    _fit(tmp_path / "run", 12)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=False)
    torch.save({**checkpoint, "diffusion_elbo_config": {"seed": 0}}, last)  # as src/train.py writes it
    cfg = OmegaConf.create({"run_dir": str(tmp_path / "run"), "sigma_rel": [0.05, 0.08], "decay": 0.9, "step": None})
    written = run_posthoc_ema(cfg, str(tmp_path / "job"))
    assert [p.name for p in written] == ["posthoc_sigma_rel_0.050.ckpt", "posthoc_sigma_rel_0.080.ckpt",
                                         "posthoc_decay_0.9.ckpt"]  # fmt: skip
    snapshots, states = read_snapshots(tmp_path / "run" / "checkpoints" / "posthoc_ema")
    assert snapshots[-2].step == 12 and snapshots[-2].gamma == pytest.approx(gamma_from_sigma_rel(0.05))
    stored = torch.load(written[0], weights_only=False)
    torch.testing.assert_close(stored["state_dict"]["net.weight"], states[-2]["net.weight"], rtol=1e-5, atol=1e-6)
    assert stored["global_step"] == checkpoint["global_step"] and stored["posthoc_ema"]["step"] == 12
    with pytest.raises(ConfigError, match="wandb.mode='ofline' is not a W&B mode; choose one of auto"):
        run_posthoc_ema(OmegaConf.merge(cfg, {"wandb": {"mode": "ofline"}}), str(tmp_path / "refused"))
    assert not (tmp_path / "refused").exists()
    fits = json.loads((tmp_path / "job" / "reconstruction.json").read_text())
    assert fits["sigma_rel_0.050"]["residual"] < 1e-9 and fits["sigma_rel_0.080"]["residual"] < 0.05
    with pytest.raises(FileNotFoundError, match="no post-hoc EMA snapshots"):
        read_snapshots(tmp_path / "elsewhere")

    # as of an earlier step: the run's checkpoint of that step is the template, and the step is the checkpoint's
    torch.save({**checkpoint, "diffusion_elbo_config": {"seed": 0}, "marker": "step 8"},
               tmp_path / "run" / "checkpoints" / "step_0000008.ckpt")  # fmt: skip
    written = run_posthoc_ema(OmegaConf.merge(cfg, {"step": 8, "decay": None}), str(tmp_path / "job8"))
    early = torch.load(written[0], weights_only=False)
    assert written[0].name == "posthoc_sigma_rel_0.050_step_0000008.ckpt"
    assert early["marker"] == "step 8" and early["global_step"] == 8 and early["posthoc_ema"]["step"] == 8
    assert (snapshots[2].step, snapshots[2].gamma) == (8, snapshots[-2].gamma)  # stored: comes back as itself
    torch.testing.assert_close(early["state_dict"]["net.weight"], states[2]["net.weight"], rtol=1e-5, atol=1e-6)


def test_a_checkpoints_fingerprint_is_what_its_evaluation_depends_on():
    """The same weights and config give the same fingerprint whatever the loop state; a changed weight, dtype or
    config gives another."""
    from diffusion_elbo.checkpoints import fingerprint

    state = {"net.weight": torch.arange(6.0).reshape(2, 3), "step": torch.tensor(3), "flag": torch.tensor(True)}
    base = {"state_dict": state, "diffusion_elbo_config": {"seed": 0}, "optimizer_states": [1], "global_step": 7}
    same = {"state_dict": {k: v.clone() for k, v in state.items()}, "diffusion_elbo_config": {"seed": 0},
            "optimizer_states": [2], "global_step": 9}  # fmt: skip
    assert fingerprint(base) == fingerprint(same)
    nudged = {**same, "state_dict": {**state, "net.weight": state["net.weight"] + 1e-6}}
    widened = {**same, "state_dict": {**state, "net.weight": state["net.weight"].double()}}
    reshaped = {**same, "state_dict": {**state, "net.weight": state["net.weight"].reshape(3, 2)}}
    other = {**same, "diffusion_elbo_config": {"seed": 1}}
    assert len({fingerprint(c) for c in (base, nudged, widened, reshaped, other)}) == 5
    conj = {**same, "state_dict": {**state, "z": torch.tensor([1 + 2j]).conj()}}
    assert fingerprint(conj) == fingerprint({**same, "state_dict": {**state, "z": torch.tensor([1 - 2j])}})


def test_an_earlier_row_is_kept_only_for_the_same_checkpoint_settings_and_per_example_file(tmp_path):
    """The rerun's rule (:func:`posthoc.kept_row`): any change of the eval overrides, of the checkpoint, or of the
    per-example file it paired with (another evaluation writes to the same folder), or a number JSON turned into null,
    and the checkpoint is evaluated again."""
    from diffusion_elbo.posthoc import file_sha256, kept_row

    csv = tmp_path / "per_example.csv"
    csv.write_text("index,bpd\n0,2.5\n1,2.4\n")
    row = {"eval_overrides": ["seed=0"], "fingerprint": "abc", "bpd": 2.45, "bpd_se": 0.05, "fids": [1.0, 1.2],
           "per_example_sha256": file_sha256(csv)}  # fmt: skip
    assert kept_row(row, ["seed=0"], "abc", csv)
    assert not kept_row(None, ["seed=0"], "abc", csv)
    assert not kept_row(row, ["seed=1"], "abc", csv)
    assert not kept_row(row, ["seed=0"], "abd", csv)
    assert not kept_row({**row, "bpd_se": None}, ["seed=0"], "abc", csv)
    assert not kept_row({**row, "fids": [1.0, None]}, ["seed=0"], "abc", csv)
    assert not kept_row(row, ["seed=0"], "abc", tmp_path / "missing.csv")
    csv.write_text("index,bpd\n0,2.5\n1,2.3\n")  # e.g. src/eval.py on the same checkpoint since
    assert not kept_row(row, ["seed=0"], "abc", csv)


def test_the_fid_is_paired_by_seed_with_an_sd_from_two_seeds_and_a_difference_from_one():
    """:func:`posthoc.paired_fid`: the mean and sd of the per-seed differences (not the difference of the means' sd);
    one seed still pairs (the same x_T), without an sd; no FID on either side, no difference."""
    from diffusion_elbo.posthoc import paired_fid

    two = paired_fid({"fid": 1.2, "fids": [1.0, 1.4]}, {"fid": 0.9, "fids": [0.8, 1.0]})
    assert two["fid_minus_run"] == pytest.approx(0.3)
    assert two["fid_minus_run_sd"] == pytest.approx(0.1 * math.sqrt(2))  # d = 0.2, 0.4
    assert paired_fid({"fid": 8.285}, {"fid": 7.115}) == {"fid_minus_run": pytest.approx(1.17)}
    assert paired_fid({"bpd": 2.0}, {"fid": 7.1}) == {} and paired_fid({"fid": 7.1}, {"fid": None}) == {}
    with pytest.raises(ValueError):  # a seed missing on one side is not paired with another seed's x_T
        paired_fid({"fids": [1.0, 1.4]}, {"fid": 0.9})


def test_resuming_never_picks_a_rebuilt_posthoc_checkpoint(tmp_path):
    """src/train.py's resume takes the run's newest checkpoint; a post-hoc EMA's file holds averaged weights at the
    same step, so it is never a candidate, even where last.ckpt is unreadable."""
    from diffusion_elbo.training import find_resume_checkpoint

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in ("step_0000010.ckpt", "posthoc_sigma_rel_0.100_step_0000010.ckpt", "posthoc_sigma_rel_0.100.ckpt"):
        torch.save({"state_dict": {}, "global_step": 10, "diffusion_elbo_config": {"seed": 0}}, folder / name)
    (folder / "last.ckpt").write_bytes(b"cut off")
    assert find_resume_checkpoint(folder) == folder / "step_0000010.ckpt"


def test_the_evaluation_of_the_jobs_default_config_is_the_eval_jobs_with_its_settings(tmp_path):
    """``evaluate.enabled=true`` as the job's yaml has it (num_examples null: the whole split) composes the eval job's
    config with each setting, nulls as nulls."""
    from hydra import compose, initialize_config_dir

    from diffusion_elbo.cli import CONFIG_PATH, register_resolvers
    from diffusion_elbo.posthoc import compose_eval, eval_overrides

    register_resolvers()
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        job = compose("posthoc_ema", overrides=[f"run_dir={tmp_path}", "evaluate.enabled=true", "evaluate.fid_seeds=3",
                                                'evaluate.overrides=["max_batch=64"]'])  # fmt: skip
    cfg = compose_eval(eval_overrides(job, tmp_path / "a.ckpt"))
    assert cfg.num_examples is None and cfg.split == "val" and cfg.ckpt_path == str(tmp_path / "a.ckpt")
    assert (cfg.fid.num_samples, cfg.fid.seeds, cfg.seed, cfg.max_batch) == (2000, 3, 0, 64)
    assert cfg.wandb.enabled is False


def test_the_cli_rebuilds_widths_as_a_multirun_and_refuses_a_bad_width_or_folder_by_name(tmp_path):
    """``python src/posthoc_ema.py -m run_dir=... sigma_rel=0.05,0.08``: one job per width, each with its checkpoint and
    its reconstruction.json; a width outside (0, 0.2887] or a folder that is no training run exits with status 2 and
    the fix, writing no checkpoint."""
    import json

    from .helpers import run_cli

    run = tmp_path / "run"
    _fit(run, 12)
    last = run / "checkpoints" / "last.ckpt"
    torch.save({**torch.load(last, weights_only=False), "diffusion_elbo_config": {"seed": 0}}, last)
    result = run_cli(
        "posthoc_ema.py", "-m", f"run_dir={run}", "sigma_rel=0.05,0.08", f"hydra.sweep.dir={tmp_path / 'sweep'}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    fits = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/reconstruction.json"))]
    assert sorted(label for fit in fits for label in fit) == ["sigma_rel_0.050", "sigma_rel_0.080"]
    written = sorted(p.name for p in (run / "checkpoints").glob("posthoc_*.ckpt"))
    assert written == ["posthoc_sigma_rel_0.050.ckpt", "posthoc_sigma_rel_0.080.ckpt"]

    for i, (args, message) in enumerate(
        [
            ([f"run_dir={run}", "sigma_rel=0.5"], "sigma_rel=0.5 must be in (0, 1/sqrt(12)"),
            ([f"run_dir={tmp_path / 'nothing'}"], "must be a training run's folder"),
        ]
    ):
        result = run_cli("posthoc_ema.py", *args, f"hydra.run.dir={tmp_path / f'bad{i}'}")
        assert result.returncode == 2 and message in result.stderr, result.stderr[-3000:]
        assert "Traceback" not in result.stderr
    assert sorted(p.name for p in (run / "checkpoints").glob("posthoc_*.ckpt")) == written


@pytest.mark.slow
def test_a_digits_run_with_posthoc_ema_rebuilds_widths_and_evaluates_them_against_its_own_checkpoint(
    tmp_path, monkeypatch
):
    """The user's path: train with callbacks=posthoc_ema, then the job with evaluate.enabled: one checkpoint per width,
    each evaluated by the eval job into the run's eval/ folder, evaluation.json and the plot; the run's EMA state is
    untouched (its last.ckpt is read, not written)."""
    import json

    from omegaconf import OmegaConf

    from diffusion_elbo.posthoc import run_posthoc_ema
    from diffusion_elbo.training import train

    from .helpers import SMALL_UNET, compose_train
    from .wandb_records import runs_in

    run = tmp_path / "run"
    cfg = compose_train(run, [*SMALL_UNET, "callbacks=posthoc_ema", "callbacks.posthoc_ema.snapshot_every=5",
                              "trainer.max_steps=10", "logger=wandb"])  # fmt: skip
    train(cfg, str(run))
    last = (run / "checkpoints" / "last.ckpt").read_bytes()
    job = OmegaConf.create(
        {
            "run_dir": str(run),
            "sigma_rel": [0.05, 0.1],
            "decay": None,
            "step": None,
            "evaluate": {
                "enabled": True,
                "split": "val",
                "num_examples": 8,
                "fid_samples": 16,
                "fid_seeds": 2,
                "seed": 0,
                "overrides": ["fid.classifier_steps=30", f"fid.cache_dir={tmp_path}"],
            },
            "wandb": {"enabled": True, "mode": "offline"},
        }
    )
    written = run_posthoc_ema(job, str(tmp_path / "job"))
    assert [p.name for p in written] == ["posthoc_sigma_rel_0.050.ckpt", "posthoc_sigma_rel_0.100.ckpt"]
    results = json.loads((tmp_path / "job" / "evaluation.json").read_text())
    assert set(results) == {"run", "sigma_rel_0.050", "sigma_rel_0.100"}
    assert all(math.isfinite(r["bpd"]) and r["bpd"] > 0 for r in results.values())
    # the paired comparisons: the same 8 examples with the same noise, and the same two x_T sets, for every checkpoint
    for label in ("sigma_rel_0.050", "sigma_rel_0.100"):
        r, run_row = results[label], results["run"]
        assert r["bpd_minus_run"] == pytest.approx(r["bpd"] - run_row["bpd"], abs=1e-6)
        assert 0 < r["bpd_minus_run_se"] < r["bpd_se"]  # the per-example bounds move together: pairing pays
        assert len(r["fids"]) == 2 and r["fid"] == pytest.approx(sum(r["fids"]) / 2)
        assert r["fid_minus_run"] == pytest.approx(r["fid"] - run_row["fid"])
    assert results["run"]["fids"][0] != results["run"]["fids"][1]  # two seeds, two sample sets
    assert (run / "eval" / "posthoc_sigma_rel_0.050-trained" / "metrics.json").is_file()
    assert (tmp_path / "job" / "posthoc_ema.png").stat().st_size > 0
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == last
    # the training run's own W&B run (same id), resumed by the job: the table, the plot and each value as a summary
    training, posthoc = runs_in(run)
    assert posthoc.run_id == training.run_id == (run / "wandb_run_id.txt").read_text().strip()
    assert posthoc.summary["posthoc_ema/step_10/table"]["_type"] == "table-file"
    assert posthoc.summary["posthoc_ema/step_10/plot"]["_type"] == "image-file"
    for label, row in results.items():
        for key in ("bpd", "fid", "bpd_minus_run"):
            if key in row:
                assert posthoc.summary[f"posthoc_ema/step_10/{label}/{key}"] == pytest.approx(row[key])

    # the job again in its folder (as after a stop): the rows already evaluated are kept, nothing is evaluated again
    evaluated = {p: p.stat().st_mtime_ns for p in (run / "eval").glob("*/metrics.json")}
    run_posthoc_ema(OmegaConf.merge(job, {"sigma_rel": [0.1]}), str(tmp_path / "job"))
    again = json.loads((tmp_path / "job" / "evaluation.json").read_text())
    assert again == {k: results[k] for k in ("run", "sigma_rel_0.100")}
    assert {p: p.stat().st_mtime_ns for p in evaluated} == evaluated

    # stopped while evaluating a width put first: the earlier rows still to come stay in evaluation.json
    import diffusion_elbo.evaluation.job

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(diffusion_elbo.evaluation.job, "run_eval", stop)
    with pytest.raises(KeyboardInterrupt):
        run_posthoc_ema(OmegaConf.merge(job, {"sigma_rel": [0.02, 0.1]}), str(tmp_path / "job"))
    assert json.loads((tmp_path / "job" / "evaluation.json").read_text()) == again
