"""Preemption as a cluster delivers it: a signal sent to every process of a (DDP) training job at once.

:func:`preempt` starts ``src/train.py`` in its own process group (as a scheduler's job, or a terminal's foreground
job), waits until it has trained a few steps, sends the signal to the whole group (SLURM and Kubernetes send SIGTERM
to every process; Ctrl-C sends SIGINT to the process group) and reports how the job ended. Used by the reliability
test and by ``benchmarks/preemption.py``, which repeats it enough times to catch a hang that happens 1 time in 5.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# a 2-D MLP on Gaussian data, two CPU DDP processes of one thread each: steps of a few ms, so the signal lands at a
# random point of a step, of its all-reduce, of logging or of a checkpoint write
DDP_RUN = [
    "trainer=ddp",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "data=gaussian",
    "data.dim=2",
    "model=mlp",
    "model.hidden_dim=32",
    "schedule.timesteps=50",
    "logger=csv",
    "trainer.max_steps=100000",
    "trainer.val_check_interval=50",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=5",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "callbacks.model_checkpoint.every_n_train_steps=20",
    "callbacks.sample_grid.num_samples=0",
    "callbacks.fid.num_samples=0",
    "callbacks.toy2d_metrics.num_samples=0",
    "val_strata=2",
]


@dataclass
class Preempted:
    """How one preempted job ended."""

    signal: str
    delay_s: float  # after the first logged step, when the signal was sent
    returncode: int | None  # None: still running when given up on (hung)
    exit_s: float  # from the signal to the exit of the job's first process
    all_exit_s: float  # ... to the exit of its last process
    leftover: bool  # a process of the job's group alive 10 s after the first exited (killed then)
    last_ckpt_step: int | None
    logged_steps: int  # rows of loss_curve.csv: steps 0..logged_steps-1 trained
    stop_steps: list[int]  # the step each process said it stopped at

    @property
    def ok(self) -> bool:
        """The job exited, left no process, last.ckpt holds the last trained step, and the ranks that said where they
        stopped (StopOnSignal's log line; Lightning's own handling says nothing) agree with it."""
        agreed = all(step == self.last_ckpt_step for step in self.stop_steps)
        exited = self.returncode is not None and not self.leftover
        return exited and agreed and self.last_ckpt_step is not None and self.logged_steps == self.last_ckpt_step

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def _logged_steps(run_dir: Path) -> int:
    curve = run_dir / "loss_curve.csv"
    return max(0, len(curve.read_text().splitlines()) - 1) if curve.is_file() else 0


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def preempt(
    run_dir: Path,
    signum: int,
    *,
    overrides: list[str] = (),
    after_steps: int = 5,
    delay_s: float = 0.0,
    timeout_s: float = 120.0,
    env: dict | None = None,
) -> Preempted:
    """Train in ``run_dir`` (``DDP_RUN`` + ``overrides``), send ``signum`` to the job's process group ``delay_s``
    seconds after ``after_steps`` steps are logged, and wait up to ``timeout_s`` for the job to end."""
    import torch

    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", **(env or {})}
    with open(run_dir / "stdout.txt", "w") as out, open(run_dir / "stderr.txt", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "src" / "train.py"), *DDP_RUN, *overrides, f"hydra.run.dir={run_dir}"],
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=err,
            start_new_session=True,  # its own process group, as a batch job's
            # a job started from a non-interactive shell inherits SIGINT ignored; a terminal's foreground job does not
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        pgid = proc.pid
        try:
            deadline = time.monotonic() + 300
            while _logged_steps(run_dir) < after_steps:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the job ended or never trained: {(run_dir / 'stderr.txt').read_text()[-3000:]}"
                    )
                time.sleep(0.05)
            time.sleep(delay_s)
            sent = time.monotonic()
            os.killpg(pgid, signum)
            try:
                returncode = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                returncode = None
            exit_s = time.monotonic() - sent
            gone = time.monotonic() + 10.0  # the other ranks' exit
            while _group_alive(pgid) and time.monotonic() < gone:
                time.sleep(0.1)
            leftover = _group_alive(pgid)
            if leftover:
                (run_dir / "leftover.txt").write_text(
                    subprocess.run(
                        ["ps", "-o", "pid,stat,args", "-g", str(pgid)], capture_output=True, text=True
                    ).stdout
                )
            all_exit_s = time.monotonic() - sent
        finally:
            if _group_alive(pgid):
                os.killpg(pgid, signal.SIGKILL)
            proc.wait()
    last = run_dir / "checkpoints" / "last.ckpt"
    log = (run_dir / "train.log").read_text() if (run_dir / "train.log").is_file() else ""
    return Preempted(
        signal=signal.Signals(signum).name,
        delay_s=delay_s,
        returncode=returncode,
        exit_s=round(exit_s, 2),
        all_exit_s=round(all_exit_s, 2),
        leftover=leftover,
        last_ckpt_step=int(torch.load(last, weights_only=False)["global_step"]) if last.is_file() else None,
        logged_steps=_logged_steps(run_dir),
        stop_steps=[int(m) for m in re.findall(r"stopping at step (\d+) on SIG", log)],
    )
