"""Post-hoc EMA as a Lightning callback (Karras et al. 2024, EDM2 sec. 3): power-function EMAs of the weights kept
during training, snapshots of them written beside the checkpoints, and the average of any length rebuilt afterwards
by ``src/posthoc_ema.py``. The math is :mod:`diffusion_elbo.core.posthoc_ema`."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from diffusion_elbo.core.posthoc_ema import Snapshot, gamma_from_sigma_rel, power_ema_decay

log = logging.getLogger(__name__)

SNAPSHOT_DIR = "posthoc_ema"
SNAPSHOT_NAME = re.compile(r"step_(\d+)\.pt$")


class PostHocEMA(L.Callback):
    """Power-function EMAs of the network's parameters, one per ``sigma_rels`` (EDM2 uses 0.05 and 0.10), updated
    after every optimizer step on every process (each rank holds the same averages: the parameters are the same after
    DDP's all-reduce, so nothing is gathered and no state lives on rank 0 alone), with a snapshot of all of them every
    ``snapshot_every`` steps and at the end, written by rank 0 to ``<checkpoints>/posthoc_ema/step_<k>.pt`` (atomically,
    as the checkpoints are). The averages ride in the checkpoints (this callback's state), so a resumed run continues
    them exactly.

    A snapshot holds ``{"step", "gammas", "sigma_rels", "averages": [{name: tensor}, ...]}``, the parameters by their
    ``state_dict`` names (float32)."""

    def __init__(self, sigma_rels: Sequence[float] = (0.05, 0.10), snapshot_every: int = 500) -> None:
        sigma_rels = [float(s) for s in sigma_rels]
        if not sigma_rels:
            raise ValueError("sigma_rels=[] must name at least one EMA width, e.g. [0.05, 0.10]")
        self.gammas = [gamma_from_sigma_rel(s) for s in sigma_rels]  # each checks its sigma_rel
        if not isinstance(snapshot_every, int) or isinstance(snapshot_every, bool) or snapshot_every < 1:
            raise ValueError(f"snapshot_every={snapshot_every!r} must be an integer >= 1 (optimizer steps)")
        self.sigma_rels = sigma_rels
        self.snapshot_every = snapshot_every
        self.step = 0  # the optimizer steps folded into the averages
        self.averages: list[dict[str, torch.Tensor]] = []
        self._loaded: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------------------------ state
    @staticmethod
    def _parameters(pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        return {name: p for name, p in pl_module.named_parameters() if p.requires_grad}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and not self.averages:
            params = self._parameters(pl_module)
            self.averages = [{k: p.detach().float().clone() for k, p in params.items()} for _ in self.gammas]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A resumed run takes its checkpoint's averages here: Lightning restores callbacks after ``setup``."""
        if self._loaded is None:
            return
        state, self._loaded = self._loaded, None
        params = self._parameters(pl_module)
        self.step = int(state["step"])
        self.averages = [{k: v.to(params[k].device) for k, v in avg.items()} for avg in state["averages"]]

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "sigma_rels": self.sigma_rels, "averages": self.averages}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if [float(s) for s in state_dict["sigma_rels"]] != self.sigma_rels:
            raise ValueError(
                f"callbacks.posthoc_ema.sigma_rels={self.sigma_rels} differ from the checkpoint's "
                f"{state_dict['sigma_rels']}: resume with the checkpoint's widths (the averages cannot be converted)"
            )
        self._loaded = state_dict  # applied in on_train_start, once the module's parameters are on their device

    # --------------------------------------------------------------------------------------------- updates
    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step <= self.step:  # no optimizer step since the last update (gradient accumulation, a skipped step)
            return
        params = self._parameters(pl_module)
        names = list(params)
        current = [params[k].detach().float() for k in names]
        for average, gamma in zip(self.averages, self.gammas, strict=True):
            weight = 1.0 - power_ema_decay(step, gamma)  # 1 at step 1: the average starts at theta_1
            torch._foreach_lerp_([average[k] for k in names], current, weight)
        self.step = step
        if step % self.snapshot_every == 0:
            self._write_snapshot(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.step and self.step % self.snapshot_every:
            self._write_snapshot(trainer)  # the last step, whatever the interval

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """A run stopped by a signal (StopOnSignal raises at a step boundary) or an error: the averages are whole as of
        the last completed step, so that step gets its snapshot too; a failure to write it is logged, not raised over
        the run's own exception."""
        try:
            self.on_train_end(trainer, pl_module)
        except Exception as err:  # e.g. the disk that ended the run is still full
            log.warning("post-hoc EMA: no snapshot of step %d after the run stopped: %s", self.step, err)

    def _write_snapshot(self, trainer: L.Trainer) -> None:
        if not trainer.is_global_zero:
            return
        from diffusion_elbo.lightning.callbacks import AtomicCheckpointIO

        path = snapshot_dir(trainer) / f"step_{self.step:07d}.pt"
        snapshot = {
            "step": self.step,
            "gammas": self.gammas,
            "sigma_rels": self.sigma_rels,
            "averages": [{k: v.detach().cpu() for k, v in avg.items()} for avg in self.averages],
        }
        AtomicCheckpointIO().save_checkpoint(snapshot, path)


def snapshot_dir(trainer: L.Trainer) -> Path:
    """``<checkpoints>/posthoc_ema``: beside the run's checkpoints (the ModelCheckpoint's folder)."""
    callback = trainer.checkpoint_callback
    checkpoints = getattr(callback, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints"
    return Path(checkpoints) / SNAPSHOT_DIR


def read_snapshots(folder: str | Path) -> tuple[list[Snapshot], list[dict[str, torch.Tensor]]]:
    """Every snapshot in ``folder``, in step order: one :class:`Snapshot` and one parameter dict per stored average."""
    files = sorted(
        (int(m.group(1)), path) for path in Path(folder).glob("step_*.pt") if (m := SNAPSHOT_NAME.search(path.name))
    )
    if not files:
        raise FileNotFoundError(
            f"{folder} holds no post-hoc EMA snapshots (step_*.pt): train with callbacks=default,posthoc_ema "
            "(or +callbacks.posthoc_ema=...) to write them"
        )
    snapshots, states = [], []
    for _, path in files:
        data = torch.load(path, map_location="cpu", weights_only=True)
        for gamma, average in zip(data["gammas"], data["averages"], strict=True):
            snapshots.append(Snapshot(step=int(data["step"]), gamma=float(gamma)))
            states.append(average)
    return snapshots, states
