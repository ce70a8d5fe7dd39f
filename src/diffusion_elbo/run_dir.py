"""One owner per run folder: a lock held by the job that trains there, a new folder of its own for each run, and a
run's folder never taken over by another run."""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, read_write

from diffusion_elbo.cli import RunProtected, UserError, resume_command

log = logging.getLogger(__name__)

LOCK_FILE = ".run.lock"

# where launchers put a process's rank before the Trainer exists: Lightning's subprocess launcher (LOCAL_RANK of the
# processes it starts, NODE_RANK of each node), torchrun (RANK), SLURM (SLURM_PROCID), submitit_local
RANK_ENV = ("RANK", "SLURM_PROCID", "NODE_RANK", "LOCAL_RANK", "SUBMITIT_LOCAL_GLOBALID")


def launching_process() -> bool:
    """Whether this process is its job's first (global rank 0), read from the environment: the other ranks of a
    DDP job run the same script in the same folder (Lightning restarts ``src/train.py`` with the job's
    ``hydra.run.dir``), and must not be refused the folder their own job holds."""
    return all(os.environ.get(key, "0") in ("", "0") for key in RANK_ENV)


def _own_resume_command(out: Path) -> str:
    """The command that resumes the run in ``out`` with its own overrides (its ``.hydra/overrides.yaml``)."""
    overrides_file = out / ".hydra" / "overrides.yaml"
    overrides = [str(o) for o in OmegaConf.load(overrides_file)] if overrides_file.is_file() else None
    return resume_command(out, overrides)


def _lock_or_refuse(fd: int, out: Path) -> None:
    """``flock`` the open lock file ``fd`` of folder ``out``, or raise :class:`RunProtected` naming its owner. On a
    file system without ``flock`` (Lustre mounted without ``-o flock``: ENOSYS) the job goes on unprotected, with a
    warning, rather than not starting."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a process that has not written its id yet"
    except OSError as exc:
        log.warning("%s cannot be locked (%s): this run's folder is not protected from a second job", out, exc)
        return
    raise RunProtected(
        f"{out} is in use by another training job ({owner}): a run folder has one owner at a time, and a second job "
        "there would interleave its loss curve with that job's and overwrite its checkpoints. Wait for that job to end "
        f"(or stop it; resume it then with `{_own_resume_command(out)}`), or start this run in a folder of its own "
        "(drop hydra.run.dir=... for a new one)."
    )


@contextmanager
def hold_run_dir(output_dir: str | Path) -> Iterator[None]:
    """Hold ``<output_dir>/.run.lock`` for the length of the job (an exclusive ``flock``; the OS releases it when the
    process ends, however it ends, so a crash never leaves a stale lock). A second job into the folder is refused at
    once, naming the folder, the process that holds it and the fix. Only the job's first process takes it
    (:func:`launching_process`); the others go on at once."""
    if not launching_process():
        yield
        return
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _lock_or_refuse(fd, out)
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race with a job opening it)


def check_run_dir_free(output_dir: str | Path) -> None:
    """Raise :class:`RunProtected` if a job holds ``output_dir``'s lock now (a probe: the lock is not kept)."""
    path = Path(output_dir) / LOCK_FILE
    if not path.is_file():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        _lock_or_refuse(fd, Path(output_dir))
    finally:
        os.close(fd)


def check_output_dir(output_dir: str | Path, ckpt_path: str | None) -> None:
    """Refuse to start in a folder that already holds a run, unless this job resumes that run from one of its own
    checkpoints (``ckpt_path=last``, or a file in ``<run>/checkpoints``): a new run, or another run's checkpoint
    resumed there, would overwrite its ``last.ckpt`` and cut its loss curve back to the other checkpoint's step."""
    out = Path(output_dir)
    previous = sorted((out / "checkpoints").glob("*.ckpt")) + [p for p in [out / "train_metrics.json"] if p.exists()]
    if not previous:
        return
    if ckpt_path is None:
        raise RunProtected(
            f"{out} already holds a training run ({previous[0].name}); it is not overwritten. Resume it with "
            f"`{_own_resume_command(out)}`, or start a new run in another directory (drop hydra.run.dir=... or pick a new "
            "one)."
        )
    if ckpt_path != "last" and Path(ckpt_path).resolve().parent != (out / "checkpoints").resolve():
        finished = " finished" if (out / "train_metrics.json").exists() else ""
        raise RunProtected(
            f"{out} holds a{finished} training run of its own ({previous[0].name}), and ckpt_path={ckpt_path} is "
            "another run's checkpoint: resuming it here would overwrite that run's last.ckpt and cut its loss curve "
            "back. Resume the checkpoint's own run in its own folder (hydra.run.dir=<that run's folder> "
            "ckpt_path=last), or continue from it in a new folder (drop hydra.run.dir=...). This folder's run "
            f"resumes with `{_own_resume_command(out)}`."
        )


def claim_new_dir(path: str | Path) -> Path:
    """A new, empty folder at ``path``, or at ``<path>_1``, ``<path>_2``, ... when that one exists: made with
    ``mkdir``, which fails when the folder exists, so two processes never claim the same one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    candidate, n = path, 0
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1
            candidate = path.with_name(f"{path.name}_{n}")


def _check_resume_config_early(config: DictConfig, run_dir: Path, ckpt_path: str) -> None:
    """:func:`~diffusion_elbo.resume.check_resume_config` and ``check_steps_left`` before Hydra writes this job's
    config into the run's ``.hydra/`` (a refused resume replaced the run's own config.yaml with the values it
    refused). Raises
    :class:`RunProtected`; anything it cannot read here is left to ``train``, which checks again."""
    from omegaconf.errors import OmegaConfBaseException

    from diffusion_elbo.checkpoints import CheckpointError, read_checkpoint
    from diffusion_elbo.resume import check_resume_config
    from diffusion_elbo.training import check_steps_left, find_resume_checkpoint

    path = find_resume_checkpoint(run_dir / "checkpoints") if ckpt_path == "last" else Path(ckpt_path)
    if path is None or not path.is_file():
        return
    try:
        checkpoint = read_checkpoint(path)
        task = OmegaConf.masked_copy(config, [key for key in config if key != "hydra"])  # the job's own config
        new = OmegaConf.to_container(task, resolve=True, throw_on_missing=False)
    except (CheckpointError, OmegaConfBaseException):
        return
    try:
        check_resume_config(checkpoint["diffusion_elbo_config"], new, path=path, log_changes=False)
    except CheckpointError as exc:
        raise RunProtected(str(exc)) from None
    check_steps_left(task, checkpoint, path)


class RunDirGuard(Callback):
    """Hydra callback of ``src/train.py``, before Hydra writes anything into the run folder (its ``.hydra/`` and log):

    - the default folder, named by the second the run started (``runs/2026-12-04_14-30-00``), is made new for this
      run: a second run started in the same second gets ``runs/2026-12-04_14-30-00_1`` (both shared one folder:
      interleaved loss curves, one run's checkpoints over the other's);
    - a folder named by the user (``hydra.run.dir=...``) that another job holds, that holds a run this job would
      overwrite (:func:`check_output_dir`), or whose run this job resumes with another model or noise process
      (:func:`~diffusion_elbo.resume.check_resume_config`) or with no steps left, is refused with status 2 before Hydra overwrites that
      run's ``.hydra/config.yaml``. ``train`` checks again under the lock (:func:`hold_run_dir`), which settles
      races.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        overrides = OmegaConf.select(config, "hydra.overrides.hydra", default=None) or []
        if not any(str(o).split("=", 1)[0].lstrip("+~") == "hydra.run.dir" for o in overrides):
            wanted = Path(str(config.hydra.run.dir))
            claimed = claim_new_dir(wanted)
            if claimed != wanted:
                with read_write(config.hydra.run):
                    config.hydra.run.dir = str(claimed)
                log.info("%s was taken by a run started in the same second: this run writes to %s", wanted, claimed)
            return
        if not launching_process():  # a DDP rank of the job that holds the folder
            return
        HydraConfig.instance().set_config(config)  # as Hydra's run_job does next: the messages give this job's command
        ckpt_path = OmegaConf.select(config, "ckpt_path", default=None)
        try:
            check_run_dir_free(config.hydra.run.dir)
            check_output_dir(config.hydra.run.dir, ckpt_path)
            if ckpt_path is not None:
                _check_resume_config_early(config, Path(config.hydra.run.dir), str(ckpt_path))
        except UserError as exc:
            # Hydra turns a callback's Exception into a warning and goes on; SystemExit stops the job here
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
