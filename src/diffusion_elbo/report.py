"""The ``src/report.py`` job: one table and one figure for all runs of a Hydra multirun.

For every run directory of the sweep it reads the final metrics (``train_metrics.json``, the newest eval of its
checkpoints under ``eval/``, and ``failure.json`` of a job that failed), the run's config and its last per-t ELBO
profile, and
writes ``report.csv``, ``report.md`` and ``report.png`` next to the sweep (logged to W&B too).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

COLUMNS = [
    "run",
    "status",
    "schedule",
    "timesteps",
    "parametrization",
    "variance",
    "loss",
    "global_step",
    "val/elbo_bpd",
    "val/elbo_bpd_se",
    "val/reconstruction_bpd",
    "val/prior_bpd",
    "val/denoising_bpd",
    "val/fid",
    "val/fid_classifier_accuracy",
    "val/energy_distance",
    "val/energy_distance_se",
    "test/bpd",
    "test/bpd_se",
    "test/variance",
    "test/ode_bpd",
    "test/ode_bpd_se",
    "test/elbo_minus_ode_bpd",
    "test/fid",
    "test/eval",
    "failure",
]


def _choice(run_dir: Path, cfg, group: str) -> str | None:
    """The option of config ``group`` a run was given (``schedule=cosine``, ``loss=vdm``, or a plugin's): Hydra's record
    of the choices in the run's .hydra/hydra.yaml, else the group's ``name`` key (schedules and losses of runs written
    before their groups built objects), else its ``_target_``'s class name."""
    hydra_yaml = run_dir / ".hydra" / "hydra.yaml"
    if hydra_yaml.is_file():
        chosen = OmegaConf.select(OmegaConf.load(hydra_yaml), f"hydra.runtime.choices.{group}")
        if chosen is not None:
            return str(chosen)
    name = OmegaConf.select(cfg, f"{group}.name")
    if name is not None:
        return str(name)
    target = OmegaConf.select(cfg, f"{group}._target_")
    return None if target is None else str(target).rsplit(".", 1)[-1]


def collect_runs(sweep_dir: str | Path) -> list[dict]:
    """One row per training run directory (a folder with ``.hydra/config.yaml``) under ``sweep_dir``."""
    rows = []
    for config_path in sorted(Path(sweep_dir).glob("*/.hydra/config.yaml")):
        run_dir = config_path.parent.parent
        cfg = OmegaConf.load(config_path)
        if cfg.get("task_name") != "train":  # e.g. this report's own job directory
            continue
        row: dict = {
            "run": run_dir.name,
            "schedule": _choice(run_dir, cfg, "schedule"),
            "timesteps": OmegaConf.select(cfg, "schedule.timesteps"),
            "parametrization": cfg.get("parametrization"),
            "variance": cfg.get("variance"),
            "loss": _choice(run_dir, cfg, "loss"),
        }
        train_metrics = run_dir / "train_metrics.json"
        failure = run_dir / "failure.json"
        if failure.is_file():  # written by the job that failed (diffusion_elbo.cli.write_failure)
            record = json.loads(failure.read_text())
            row["status"] = "failed"
            # one line: the message's first, or for a list of problems (ConfigError's "invalid config:\n  - ...") its
            # problems joined
            lines = [line.strip().removeprefix("- ") for line in str(record.get("message", "")).splitlines()]
            message = lines[0] if len(lines) < 2 else f"{lines[0]} " + "; ".join(line for line in lines[1:] if line)
            row["failure"] = f"{record.get('error')}: {message}"[:300]
        else:
            row["status"] = "finished" if train_metrics.is_file() else "incomplete"
        if train_metrics.is_file():
            row.update(json.loads(train_metrics.read_text()))
        eval_metrics = latest_eval(run_dir)
        if eval_metrics is not None:
            m = json.loads(eval_metrics.read_text())
            row["test/eval"] = str(eval_metrics.parent.relative_to(run_dir))
            row.update(
                {
                    "test/bpd": m.get("bpd"),
                    "test/bpd_se": m.get("bpd_se"),
                    "test/variance": m.get("variance"),  # src/eval.py may use another variance than training
                    # likelihood=ode|both: the probability-flow ODE's bits/dim, and -ELBO minus it (paired)
                    "test/ode_bpd": m.get("ode_bpd"),
                    "test/ode_bpd_se": m.get("ode_bpd_se"),
                    "test/elbo_minus_ode_bpd": m.get("elbo_minus_ode_bpd"),
                    "test/fid": m.get("fid"),
                }
            )
        profiles = sorted((run_dir / "profiles").glob("step_*.csv"))
        row["_profile"] = profiles[-1] if profiles else None
        rows.append(row)
    return rows


def latest_eval(run_dir: Path) -> Path | None:
    """The newest eval of a run: ``<run>/eval/<ckpt>-<variance>/metrics.json`` (where src/eval.py writes for the
    run's checkpoints), or a ``metrics.json`` in the run directory itself (older evals); None if there is none."""
    found = [p for p in (run_dir / "eval").glob("*/metrics.json")] + [
        p for p in [run_dir / "metrics.json"] if p.is_file()
    ]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_report(rows: list[dict], out_dir: str | Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = [c for c in COLUMNS if any(r.get(c) is not None for r in rows)]
    with open(out_dir / "report.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for r in rows:
            writer.writerow([_fmt(r.get(c)) for c in columns])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    return {"csv": out_dir / "report.csv", "md": out_dir / "report.md", "png": _figure(rows, out_dir / "report.png")}


def _figure(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_fid = any(r.get("val/fid") is not None for r in rows)
    fig, axes = plt.subplots(1, 3 if has_fid else 2, figsize=(13 if has_fid else 9, 3.6), dpi=100)
    names = [r["run"] for r in rows]
    bpd = [r.get("val/elbo_bpd", math.nan) for r in rows]
    se = [r.get("val/elbo_bpd_se", 0.0) or 0.0 for r in rows]
    axes[0].bar(range(len(rows)), bpd, yerr=se, capsize=3)
    axes[0].set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
    axes[0].set_ylabel("validation -ELBO (bits/dim)")
    for r in rows:
        if r["_profile"] is None:
            continue
        with open(r["_profile"]) as f:
            data = list(csv.DictReader(f))
        axes[1].loglog(
            [float(d["t"]) for d in data],
            [max(float(d["term_bpd"]), 1e-12) for d in data],
            marker="o",
            ms=2,
            label=r["run"],
        )
    axes[1].set_xlabel("t")
    axes[1].set_ylabel("L_t (bits/dim)")
    axes[1].legend(fontsize=7)
    if has_fid:
        axes[2].bar(range(len(rows)), [r.get("val/fid", math.nan) for r in rows])
        axes[2].set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
        axes[2].set_ylabel("FID")
    fig.suptitle("sweep report")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def _log_to_wandb(rows: list[dict], paths: dict[str, Path], sweep_dir: Path, cfg: DictConfig) -> None:
    import wandb

    from diffusion_elbo.builders import resolve_wandb_mode

    mode = resolve_wandb_mode(cfg.wandb.mode)
    if mode == "disabled":
        return
    columns = [c for c in COLUMNS if any(r.get(c) is not None for r in rows)]
    run = wandb.init(
        project=cfg.wandb.project,
        group=f"train-{sweep_dir.name}",
        job_type="report",
        name=f"report-{sweep_dir.name}",
        mode=mode,
        dir=str(paths["csv"].parent),
    )
    run.log(
        {
            "sweep/table": wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows]),
            "sweep/figure": wandb.Image(str(paths["png"])),
        }
    )
    run.finish()


def run_report(cfg: DictConfig, output_dir: str) -> dict[str, Path]:
    sweep_dir = Path(cfg.sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(
            f"sweep_dir={sweep_dir} is not a directory; pass the multirun folder "
            "(outputs/train/multiruns/<date>_<time>)"
        )
    rows = collect_runs(sweep_dir)
    if not rows:
        raise FileNotFoundError(f"sweep_dir={sweep_dir} has no runs (no */.hydra/config.yaml below it)")
    for row in rows:
        if row["status"] == "failed":
            log.warning("run %s failed: %s", row["run"], row["failure"])
    paths = write_report(rows, sweep_dir)
    if cfg.wandb.enabled:
        _log_to_wandb(rows, paths, sweep_dir, cfg)
    log.info("report of %d runs: %s", len(rows), ", ".join(str(p) for p in paths.values()))
    print(f"report: {paths['md']}")
    return paths
