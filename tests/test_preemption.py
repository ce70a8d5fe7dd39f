"""SIGTERM and SIGINT sent to every process of a 2-process DDP job (a scheduler's preemption, Ctrl-C in a terminal):
every rank stops at the same step, last.ckpt holds it, the job exits within seconds and leaves no process behind,
and the run resumes from there. benchmarks/preemption.py repeats this 20 times per signal (benchmarks/faults/)."""

from __future__ import annotations

import json
import signal

import pytest

from .helpers import run_cli
from .preemption import DDP_RUN, REPO_ROOT, preempt


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_every_ddp_process_stops_all_at_one_step_then_resumes(tmp_path, signum):
    run_dir = tmp_path / "run"
    result = preempt(run_dir, signum, after_steps=8, timeout_s=90)
    stderr = (run_dir / "stderr.txt").read_text()[-3000:]
    assert result.returncode is not None, f"hung: {result}\n{stderr}"
    # SIGTERM exits cleanly (Lightning's convention for a preempted job); Ctrl-C as an interrupted run
    assert result.returncode == (0 if signum == signal.SIGTERM else 1), stderr
    assert result.exit_s < 30 and not result.leftover, result
    assert len(result.stop_steps) == 2 and len(set(result.stop_steps)) == 1, result  # both ranks, the same step
    assert result.last_ckpt_step == result.stop_steps[0] == result.logged_steps, result
    assert (run_dir / "train.log").read_text().count(": saved ") == 1  # rank 0's line alone, not one per rank
    if signum == signal.SIGTERM:
        return
    # resumed as printed, to 5 steps more: the loss curve has no gap and no repeat
    target = result.last_ckpt_step + 5
    overrides = [o for o in DDP_RUN if not o.startswith("trainer.max_steps")]
    proc = run_cli(
        "train.py", *overrides, f"trainer.max_steps={target}", f"hydra.run.dir={run_dir}", "ckpt_path=last",
        timeout=300, env={"PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [int(line.split(",")[0]) for line in (run_dir / "loss_curve.csv").read_text().splitlines()[1:]]
    assert steps == list(range(target))
    assert json.loads((run_dir / "train_metrics.json").read_text())["global_step"] == target
