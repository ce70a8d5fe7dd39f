"""The post-hoc EMA job (``src/posthoc_ema.py``): rebuild a run's EMA of any length from the snapshots that
:class:`~diffusion_elbo.lightning.posthoc_ema.PostHocEMA` wrote while it trained (Karras et al. 2024, EDM2 sec. 3), as
a checkpoint that ``src/eval.py`` and ``src/sample.py`` take like any other."""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

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
    averaged parameters in its ``state_dict`` (with ``step``: the run's ``step_<step>.ckpt`` where it has one).
    ``reconstruction.json`` in the job's folder lists the coefficients'
    step, the fit's relative residual and the file of each."""
    from diffusion_elbo.config import ConfigError, wandb_mode_problems

    if problems := wandb_mode_problems(cfg):
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
    run_dir = Path(str(cfg.run_dir)).resolve()
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
    # the template (buffers, config, loop state) is the run's checkpoint at that step where it kept one
    template = checkpoints / f"step_{step:07d}.ckpt"
    if cfg.step is None or not template.is_file():
        if cfg.step is not None:
            log.warning(
                "%s not found: the rebuilt checkpoints take their buffers and loop state from %s", template, last
            )
        template = last
    checkpoint = read_checkpoint(template)
    checkpoint["global_step"] = step
    written, records, labels = [], {}, []
    for label, target in targets:
        fit = solve_coefficients(snapshots, target)
        averaged = combine(states, fit.coefficients)
        state = dict(checkpoint["state_dict"])
        missing = sorted(set(averaged) - set(state))
        if missing:
            raise CheckpointError(f"the snapshots hold parameters that {template} does not: {missing[:5]}")
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
                "(e.g. narrower or wider than the stored sigma_rels, or a step long before the first snapshot); train "
                "with a sigma_rels list that brackets it", label, 100 * fit.residual,
            )  # fmt: skip
        records[label] = {"path": str(out), "step": step, "residual": fit.residual,
                          "coefficients": fit.coefficients.tolist()}  # fmt: skip
        written.append(out)
        labels.append(label)
    write_metrics(records, output_dir, name="reconstruction.json")
    if OmegaConf.select(cfg, "evaluate.enabled", default=False):
        reference = checkpoints / ("last.ckpt" if cfg.step is None else f"step_{step:07d}.ckpt")
        evaluate_widths(
            cfg,
            [(None, reference), *zip(labels, written, strict=True)],
            output_dir,
            train_config=checkpoint["diffusion_elbo_config"],
            step=step,
        )
    return written


def evaluate_widths(
    cfg: DictConfig,
    checkpoints: list[tuple[str | None, Path]],
    output_dir: str,
    *,
    train_config: dict,
    step: int,
) -> dict:
    """Each checkpoint's bound on ``evaluate.split`` (``evaluate.num_examples`` examples) and classifier FID
    (``evaluate.fid_samples`` DDIM samples from each of ``evaluate.fid_seeds`` seeds) by the eval job, into
    ``evaluation.json`` and ``posthoc_ema.png``: the bound and the FID against sigma_rel, the run's own checkpoint
    (label None: its fixed EMA, when it trained with one) as a line. Every checkpoint sees the same examples with the
    same noise and the same x_T per FID seed, so each width is also compared with the run's checkpoint pairwise:
    ``bpd_minus_run`` (mean per-example difference, with its standard error ``bpd_minus_run_se``) and
    ``fid_minus_run`` (mean over seeds of the per-seed difference, with its sd). Each evaluation lands in
    ``<run>/eval/<checkpoint>-trained`` as ``src/eval.py`` puts it. With ``wandb.enabled`` the table and the plot
    also go into the training run's own W&B run (:func:`log_widths_to_wandb`).

    A job run again in the same folder keeps each row of its ``evaluation.json`` whose checkpoint (by
    :func:`~diffusion_elbo.checkpoints.fingerprint`) and eval overrides are unchanged, so a stopped evaluation goes on
    where it stopped, and adding a width costs only that width."""
    from diffusion_elbo.checkpoints import fingerprint
    from diffusion_elbo.evaluation.job import run_eval
    from diffusion_elbo.records import paired_difference

    done = Path(output_dir) / "evaluation.json"
    previous = json.loads(done.read_text()) if done.is_file() else {}
    keys = [label or "run" for label, _ in checkpoints]
    results, folders = {}, {}
    for label, ckpt in checkpoints:
        if not ckpt.is_file():
            log.warning("%s not found: no reference for the plot", ckpt)
            continue
        key = label or "run"
        folders[key] = ckpt.parent.parent / "eval" / f"{ckpt.stem}-trained"
        overrides, digest = eval_overrides(cfg, ckpt), fingerprint(read_checkpoint(ckpt))
        if kept_row(previous.get(key), overrides, digest, folders[key] / "per_example.csv"):
            log.info("%s: evaluated before with the same checkpoint and settings (%s): row kept", key, done)
            metrics = previous[key]
        else:
            metrics = run_eval(compose_eval(overrides), folders[key])
        results[key] = {"path": str(ckpt), "bpd": metrics["bpd"], "bpd_se": metrics["bpd_se"]}
        results[key].update({k: metrics[k] for k in ("fid", "fid_sd", "fids") if k in metrics})
        results[key].update({"eval_overrides": overrides, "fingerprint": digest,
                             "per_example_sha256": file_sha256(folders[key] / "per_example.csv")})  # fmt: skip
        if key != "run" and "run" in results:
            diff, se = paired_difference(folders[key] / "per_example.csv", folders["run"] / "per_example.csv")
            results[key].update({"bpd_minus_run": diff, "bpd_minus_run_se": se})
            results[key].update(paired_fid(results[key], results["run"]))
        # after each checkpoint, with the earlier job's rows of those still to come: a stop loses neither
        pending = {k: previous[k] for k in keys if k in previous and k not in results}
        write_metrics({**results, **pending}, output_dir, name="evaluation.json")
    write_metrics(results, output_dir, name="evaluation.json")
    png = plot_widths(results, Path(output_dir) / "posthoc_ema.png")
    if OmegaConf.select(cfg, "wandb.enabled", default=False) and checkpoints:
        log_widths_to_wandb(results, png, checkpoints[0][1].parent.parent, train_config, step, cfg.wandb.mode)
    return results


def paired_fid(row: dict, run: dict) -> dict:
    """``row``'s FID minus ``run``'s, paired by sampling seed (the same seed gives both the same x_T): the mean of the
    per-seed differences (``fid_minus_run``) and, from two seeds on, their sd (``fid_minus_run_sd``); {} where either
    has no FID. A row's seeds are its ``fids``, or its one ``fid`` where one seed was drawn."""

    def seeds(r: dict) -> list[float] | None:
        return list(r["fids"]) if "fids" in r else [r["fid"]] if r.get("fid") is not None else None

    mine, theirs = seeds(row), seeds(run)
    if not (mine and theirs):
        return {}
    d = [a - b for a, b in zip(mine, theirs, strict=True)]
    return {"fid_minus_run": statistics.mean(d), **({"fid_minus_run_sd": statistics.stdev(d)} if len(d) > 1 else {})}


def file_sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def kept_row(row: dict | None, overrides: list[str], digest: str, per_example: Path) -> bool:
    """Whether an earlier job's ``row`` still holds for a checkpoint: the same eval overrides, the same checkpoint
    (:func:`~diffusion_elbo.checkpoints.fingerprint`), numbers where numbers belong (JSON writes NaN as null), and its
    per-example bounds still the file it paired with (another evaluation of the checkpoint, e.g. ``src/eval.py``,
    writes to the same ``<run>/eval/`` folder)."""
    if not row or (row.get("eval_overrides"), row.get("fingerprint")) != (overrides, digest):
        return False
    numbers = [row.get("bpd"), row.get("bpd_se"), *(row.get("fids") or [])]
    if not all(isinstance(v, int | float) for v in numbers):
        return False
    return per_example.is_file() and row.get("per_example_sha256") == file_sha256(per_example)


WANDB_COLUMNS = ("checkpoint", "sigma_rel", "bpd", "bpd_se", "bpd_minus_run", "bpd_minus_run_se", "fid", "fid_sd",
                 "fid_minus_run", "fid_minus_run_sd")  # fmt: skip


def log_widths_to_wandb(results: dict, png: Path, run_dir: Path, train_config: dict, step: int, mode: str) -> None:
    """The evaluation in the training run's own W&B run (same id, resumed), under ``posthoc_ema/step_<N>/``: a table
    of every checkpoint's row (``table``), the plot (``plot``) and each value as a summary
    (``posthoc_ema/step_<N>/<checkpoint>/<key>``), so rebuilds as of several steps sit side by side. Nothing is logged
    for a run trained without W&B."""
    import wandb

    from diffusion_elbo.evaluation.job import resume_training_wandb_run

    run = resume_training_wandb_run(run_dir, train_config, mode)
    if run is None:
        return
    prefix = f"posthoc_ema/step_{step}"
    try:
        rows = []
        for key, row in results.items():
            sigma_rel = float(key.removeprefix("sigma_rel_")) if key.startswith("sigma_rel_") else None
            rows.append([key, sigma_rel, *(row.get(c) for c in WANDB_COLUMNS[2:])])
        # summaries only, no history row: the job may run beside the training that logs the run's history
        values = {
            f"{prefix}/{key}/{c}": row[c]
            for key, row in results.items()
            for c in WANDB_COLUMNS[2:]
            if isinstance(row.get(c), int | float)
        }
        run.summary.update({f"{prefix}/table": wandb.Table(columns=list(WANDB_COLUMNS), data=rows),
                            f"{prefix}/plot": wandb.Image(str(png)), **values})  # fmt: skip
    finally:
        run.finish()


def eval_overrides(cfg: DictConfig, ckpt: Path) -> list[str]:
    """The eval job's overrides for ``ckpt`` from the post-hoc job's ``evaluate`` node (a null is Hydra's ``null``)."""

    def value(key: str, default=None) -> str:
        v = OmegaConf.select(cfg, f"evaluate.{key}", default=default)
        return "null" if v is None else str(v)

    return [
        f"ckpt_path={ckpt}",
        f"split={value('split', 'val')}",
        f"num_examples={value('num_examples')}",
        f"fid.num_samples={value('fid_samples', 2000)}",
        f"fid.seeds={value('fid_seeds', 1)}",
        f"seed={value('seed', 0)}",
        "wandb.enabled=false",
        *(OmegaConf.select(cfg, "evaluate.overrides", default=None) or []),
    ]


def compose_eval(overrides: list[str]) -> DictConfig:
    """The eval job's config with ``overrides``, composed by the running Hydra app, or from the package's conf/ when
    none runs (the job called as a function)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from diffusion_elbo.cli import CONFIG_PATH, register_resolvers

    register_resolvers()
    if GlobalHydra.instance().is_initialized():
        return compose("eval", overrides=overrides)
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        return compose("eval", overrides=overrides)


def plot_widths(results: dict, path: Path) -> Path:
    """Each rebuilt sigma_rel's bound and FID as its paired difference from the run's own checkpoint (zero, dashed),
    with the paired standard error (bound) or sd over seeds (FID); the values themselves where nothing is paired. A
    panel for the FID only where there is one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = sorted((float(k.removeprefix("sigma_rel_")), v) for k, v in results.items() if k.startswith("sigma_rel_"))
    panels = [(key, name) for key, name in (("bpd", "bound (bits/dim)"), ("fid", "classifier FID"))
              if any(v.get(key) is not None for _, v in widths)]  # fmt: skip
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.5 * max(len(panels), 1), 3.5), dpi=100, squeeze=False)
    for ax, (key, name) in zip(axes[0], panels, strict=False):
        paired = all(f"{key}_minus_run" in v for _, v in widths)
        value = f"{key}_minus_run" if paired else key
        spread = (f"{key}_minus_run_se" if key == "bpd" else f"{key}_minus_run_sd") if paired else None
        points = [(s, v[value], (v.get(spread) if spread else v.get(f"{key}_se", v.get(f"{key}_sd"))) or 0.0)
                  for s, v in widths if v.get(value) is not None]  # fmt: skip
        ax.errorbar([x for x, _, _ in points], [y for _, y, _ in points], yerr=[e for _, _, e in points], marker="o")
        if paired:
            ax.axhline(0.0, color="gray", linestyle="--", label="the run's own checkpoint")
            name = f"{name}: rebuilt - run's (paired)"
        elif results.get("run", {}).get(key) is not None:
            ax.axhline(results["run"][key], color="gray", linestyle="--", label="the run's own checkpoint")
        ax.legend()
        ax.set_xlabel("sigma_rel")
        ax.set_ylabel(name)
    fig.suptitle("post-hoc EMA: the rebuilt average against its width")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
