"""The post-hoc EMA job (``src/posthoc_ema.py``): rebuild a run's EMA of any length from the snapshots that
:class:`~diffusion_elbo.lightning.posthoc_ema.PostHocEMA` wrote while it trained (Karras et al. 2024, EDM2 sec. 3), as
a checkpoint that ``src/eval.py`` and ``src/sample.py`` take like any other."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, ListConfig

from diffusion_elbo.checkpoints import CheckpointError, read_checkpoint
from diffusion_elbo.core.posthoc_ema import (
    combine,
    ema_profile,
    gamma_from_sigma_rel,
    power_profile,
    solve_coefficients,
)
from diffusion_elbo.lightning.callbacks import AtomicCheckpointIO
from diffusion_elbo.lightning.posthoc_ema import SNAPSHOT_DIR, read_snapshots
from diffusion_elbo.records import write_metrics

log = logging.getLogger(__name__)

# a relative residual of the rebuilt profile above this is said in the log: the average is then another one than asked
POOR_FIT = 0.05


def _as_list(value) -> list[float]:
    if value is None:
        return []
    return [float(v) for v in value] if isinstance(value, ListConfig | list | tuple) else [float(value)]


def run_posthoc_ema(cfg: DictConfig, output_dir: str) -> list[Path]:
    """For each ``sigma_rel`` (and each classic ``decay``), the least-squares combination of the run's snapshots
    (:func:`~diffusion_elbo.core.posthoc_ema.solve_coefficients`) at the last snapshot's step, written as
    ``<run>/checkpoints/posthoc_sigma_rel_<s>.ckpt`` (or ``posthoc_decay_<d>.ckpt``): the run's ``last.ckpt`` with the
    averaged parameters in its ``state_dict``. ``reconstruction.json`` in the job's folder lists the coefficients'
    step, the fit's relative residual and the file of each."""
    run_dir = Path(str(cfg.run_dir))
    checkpoints = run_dir / "checkpoints"
    last = checkpoints / "last.ckpt"
    if not last.is_file():
        raise CheckpointError(
            f"{last} not found: run_dir={run_dir} must be a training run's folder (with checkpoints/)"
        )
    snapshots, states = read_snapshots(checkpoints / SNAPSHOT_DIR)
    step = max(s.step for s in snapshots) if cfg.step is None else int(cfg.step)
    kept = [i for i, s in enumerate(snapshots) if s.step <= step]
    if not kept:
        raise ValueError(f"step={step} precedes the first snapshot (step {snapshots[0].step})")
    snapshots, states = [snapshots[i] for i in kept], [states[i] for i in kept]
    targets = [(f"sigma_rel_{s:.3f}", power_profile(step, gamma_from_sigma_rel(s))) for s in _as_list(cfg.sigma_rel)]
    targets += [(f"decay_{d:g}", ema_profile(step, d)) for d in _as_list(cfg.decay)]
    if not targets:
        raise ValueError("name what to rebuild: sigma_rel=0.08 (or a list, sigma_rel=[0.05,0.1]) and/or decay=0.999")
    checkpoint = read_checkpoint(last)
    written, records = [], {}
    for label, target in targets:
        fit = solve_coefficients(snapshots, target)
        averaged = combine(states, fit.coefficients)
        state = dict(checkpoint["state_dict"])
        missing = sorted(set(averaged) - set(state))
        if missing:
            raise CheckpointError(f"the snapshots hold parameters that {last} does not: {missing[:5]}")
        state.update({k: v.to(state[k].dtype) for k, v in averaged.items()})
        at = (
            "" if cfg.step is None else f"_step_{step:07d}"
        )  # a rebuild as of an earlier step keeps the last's name free
        out = checkpoints / f"posthoc_{label}{at}.ckpt"
        provenance = {"target": label, "step": step, "residual": fit.residual}
        AtomicCheckpointIO().save_checkpoint({**checkpoint, "state_dict": state, "posthoc_ema": provenance}, out)
        log.info("%s: %d snapshots up to step %d, relative residual of the profile %.2e -> %s", label,
                 len(snapshots), step, fit.residual, out)  # fmt: skip
        if fit.residual > POOR_FIT:
            log.warning(
                "%s: the snapshots' profiles miss the target's by %.0f%% (relative L2): it lies outside what they span "
                "(e.g. wider than the widest stored sigma_rel, or a step long before the first snapshot); train with "
                "a sigma_rels list that brackets it", label, 100 * fit.residual,
            )  # fmt: skip
        records[label] = {"path": str(out), "step": step, "residual": fit.residual,
                          "coefficients": fit.coefficients.tolist()}  # fmt: skip
        written.append(out)
    write_metrics(records, output_dir, name="reconstruction.json")
    return written
