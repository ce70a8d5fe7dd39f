"""Fault injection for the reliability tests: objects a config can name with _target_ (tests/ on PYTHONPATH)."""

from __future__ import annotations

import errno
import io
import os
import signal

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig

from diffusion_elbo.data import GaussianDataModule
from diffusion_elbo.lightning.callbacks import AtomicCheckpointIO
from diffusion_elbo.models import MLPDenoiser


class KillMidWrite(AtomicCheckpointIO):
    """Dies by SIGKILL in the middle of writing its ``kill_on_save``-th checkpoint (half a file on disk)."""

    def __init__(self, kill_on_save: int = 2) -> None:
        super().__init__()
        self.kill_on_save = kill_on_save
        self.saves = 0

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        self.saves += 1
        if self.saves == self.kill_on_save:
            original = torch.save

            def partial_then_die(obj, f, *args, **kwargs):
                f.write(b"PK\x03\x04 half a checkpoint")
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)

            torch.save = partial_then_die
            try:
                return super().save_checkpoint(checkpoint, path, storage_options)
            finally:
                torch.save = original
        return super().save_checkpoint(checkpoint, path, storage_options)


class _FillsUp(io.RawIOBase):
    """A writable file that takes ``room`` bytes, then raises ``OSError(ENOSPC)`` as a full disk does."""

    def __init__(self, file, room: int) -> None:
        super().__init__()
        self.file, self.room = file, room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


class DiskFullOnSave(AtomicCheckpointIO):
    """The disk fills up ``room`` bytes into its ``full_on_save``-th checkpoint: ``torch.save`` meets the
    ``OSError(ENOSPC)`` a full disk gives and reacts as it does then (it raises its own ``RuntimeError``)."""

    def __init__(self, full_on_save: int = 2, room: int = 1000) -> None:
        super().__init__()
        self.full_on_save, self.room = full_on_save, room
        self.saves = 0

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        self.saves += 1
        if self.saves != self.full_on_save:
            return super().save_checkpoint(checkpoint, path, storage_options)
        original = torch.save

        def save_until_full(obj, f, *args, **kwargs):
            return original(obj, _FillsUp(f, self.room), *args, **kwargs)

        torch.save = save_until_full
        try:
            return super().save_checkpoint(checkpoint, path, storage_options)
        finally:
            torch.save = original


class SignalAtStep(L.Callback):
    """Sends ``signum`` to its own process after training step ``step`` (a scheduler's SIGTERM, a crash)."""

    def __init__(self, step: int, signum: int = signal.SIGTERM, rank: int | None = None) -> None:
        self.step, self.signum, self.rank = step, signum, rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and (self.rank is None or trainer.global_rank == self.rank):
            if self.signum == signal.SIGINT:
                # as in a terminal: a process started in the background by a non-interactive shell (CI) inherits
                # SIGINT ignored, and Python then never raises KeyboardInterrupt
                signal.signal(signal.SIGINT, signal.default_int_handler)
            os.kill(os.getpid(), self.signum)


class NaNAfter(torch.nn.Module):
    """A denoiser whose output turns NaN after ``calls`` training-mode forward passes (on the DDP rank ``rank`` only,
    when given)."""

    def __init__(self, calls: int, rank: int | None = None, **mlp_kwargs) -> None:
        super().__init__()
        self.net = MLPDenoiser(**mlp_kwargs)
        self.calls, self.seen, self.rank = calls, 0, rank

    def forward(self, x_t, t):
        out = self.net(x_t, t)
        if self.rank is not None and int(os.environ.get("LOCAL_RANK", "0")) != self.rank:
            return out
        if self.training:
            self.seen += 1
            if self.seen > self.calls:
                return out * float("nan")
        return out


class RaiseAtStep(L.Callback):
    """Raises ``RuntimeError`` after training step ``step`` (any bug that stops a run); with ``job_num``, only in that
    job of a Hydra multirun (``hydra.job.num``), so one job of a sweep fails and the others run."""

    def __init__(self, step: int, job_num: int | None = None) -> None:
        self.step, self.job_num = step, job_num

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.job_num is not None and HydraConfig.get().job.num != self.job_num:
            return
        if trainer.global_step == self.step:
            raise RuntimeError(f"injected failure after step {self.step}")


class NaNData(GaussianDataModule):
    """Gaussian data whose every 5th example holds a NaN (broken data: a corrupt file, a division by zero)."""

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        x0 = super().sample(n, generator)
        x0[::5, 0] = float("nan")
        return x0
