"""callbacks.cpu_budget: the CPU time of the training steps, logged, and a stop at a budget of CPU-minutes that a resumed
run continues."""

from __future__ import annotations

import time

import lightning as L
import pytest
import torch
from torch import nn

from diffusion_elbo.lightning.callbacks import CPUBudget


class _Busy(L.LightningModule):
    """Each step spends at least 20 ms of CPU time (a busy loop), so the budget's arithmetic is checkable."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(2, 1)
        self.logged: list[float] = []
        self.batches = 0

    def training_step(self, batch, batch_idx):
        start = time.process_time()
        while time.process_time() - start < 0.02:
            pass
        return self.net(batch[0]).pow(2).mean()

    def on_train_batch_end(self, *args) -> None:
        self.batches += 1
        if "train/cpu_minutes" in self.trainer.callback_metrics:  # logged once an optimizer step is taken
            self.logged.append(float(self.trainer.callback_metrics["train/cpu_minutes"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 2)), batch_size=4)


def _fit(budget: CPUBudget, root, max_steps: int = 50, ckpt_path=None) -> tuple[L.Trainer, _Busy]:
    module = _Busy()
    trainer = L.Trainer(max_steps=max_steps, default_root_dir=root, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[budget], enable_checkpointing=ckpt_path is None)  # fmt: skip
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer, module


def test_training_stops_once_its_steps_have_cost_the_budget_in_cpu_time(tmp_path):
    """0.1 CPU-s: at least 20 ms a step, so the stop comes after at most 5 steps; the logged count grows every step and
    ends at or above the budget."""
    budget = CPUBudget(minutes=0.1 / 60)
    trainer, module = _fit(budget, tmp_path)
    assert 1 <= trainer.global_step <= 5
    assert budget.spent_s >= 0.1 and budget.spent_s >= 0.02 * trainer.global_step
    assert module.logged == sorted(module.logged) and module.logged[-1] == pytest.approx(budget.spent_s / 60)


def test_without_a_budget_the_count_is_logged_and_training_runs_its_steps(tmp_path):
    budget = CPUBudget()
    trainer, module = _fit(budget, tmp_path, max_steps=6)
    assert trainer.global_step == 6 and len(module.logged) == 6
    assert module.logged[0] >= 0.02 / 60 and module.logged[-1] >= 6 * 0.02 / 60


def test_a_resumed_run_continues_the_count_from_its_checkpoint(tmp_path):
    budget = CPUBudget(minutes=10)
    _fit(budget, tmp_path, max_steps=3)
    ckpt = next(tmp_path.rglob("*.ckpt"))
    assert torch.load(ckpt, weights_only=False)["callbacks"]["CPUBudget"]["spent_s"] == budget.spent_s
    resumed = CPUBudget(minutes=10)
    _fit(resumed, tmp_path / "resumed", max_steps=5, ckpt_path=ckpt)
    assert resumed.spent_s >= budget.spent_s + 2 * 0.02


@pytest.mark.parametrize("minutes", [0, -1.0])
def test_a_budget_that_is_not_positive_is_refused(minutes):
    with pytest.raises(ValueError, match=f"callbacks.cpu_budget.minutes={minutes!r} must be > 0"):
        CPUBudget(minutes=minutes)


def test_under_gradient_accumulation_every_micro_batch_counts_and_the_stop_follows_an_optimizer_step(tmp_path):
    """accumulate_grad_batches=3: the budget is reached inside a step's micro-batches at the earliest, and the run
    stops only once that step is taken (batch count a multiple of 3), with every micro-batch's time counted."""
    budget = CPUBudget(minutes=0.03 / 60)  # 30 ms: reached inside the first step (at its second micro-batch or before)
    module = _Busy()
    trainer = L.Trainer(max_steps=20, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[budget],
                        accumulate_grad_batches=3)  # fmt: skip
    trainer.fit(module)
    assert trainer.global_step == 1 and module.batches == 3  # three micro-batches, one optimizer step
    assert budget.spent_s >= 3 * 0.02


def test_the_budget_counts_last_and_a_run_that_spent_it_is_not_resumed(tmp_path):
    """build_callbacks puts the budget after every other callback (callbacks=posthoc_ema's per-step averages are then
    counted); a resume from a checkpoint past its budget is refused like one at max_steps."""
    from diffusion_elbo.builders import build_callbacks
    from diffusion_elbo.training import RunProtected, check_steps_left

    from .helpers import compose_train

    cfg = compose_train(tmp_path, ["callbacks=posthoc_ema", "callbacks.cpu_budget.minutes=2"])
    assert isinstance(build_callbacks(cfg)[-1], CPUBudget)
    spent = {"global_step": 5, "callbacks": {"CPUBudget": {"spent_s": 121.0}}}
    with pytest.raises(RunProtected, match=r"spent 2.02 CPU-minutes and callbacks.cpu_budget.minutes=2.*minutes=4"):
        check_steps_left(cfg, spent, tmp_path / "last.ckpt")
    check_steps_left(cfg, {**spent, "callbacks": {"CPUBudget": {"spent_s": 100.0}}}, tmp_path / "last.ckpt")


def test_a_run_that_spends_its_budget_ends_as_finished_not_as_cut_short(tmp_path, caplog):
    """last.ckpt is written at the final step with the log line of a finished run: no "resume with" (a resume past the
    budget is refused)."""
    import logging

    from diffusion_elbo.lightning.callbacks import LastCheckpoint

    budget = CPUBudget(minutes=0.05 / 60)
    trainer = L.Trainer(max_steps=50, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False,
                        callbacks=[LastCheckpoint(str(tmp_path / "checkpoints")), budget])  # fmt: skip
    with caplog.at_level(logging.INFO, logger="diffusion_elbo.lightning.callbacks"):
        trainer.fit(_Busy())
    assert budget.exhausted and trainer.global_step < 50 and (tmp_path / "checkpoints" / "last.ckpt").is_file()
    ended = [r for r in caplog.records if "run ended" in r.getMessage()]
    assert [r.levelname for r in ended] == ["INFO"] and "at its CPU budget" in ended[0].getMessage()
    assert "resume with" not in ended[0].getMessage()
