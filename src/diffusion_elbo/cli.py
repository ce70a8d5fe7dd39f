"""Shared plumbing of the ``src/*.py`` entry points."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diffusion_elbo.records import write_json

# the config groups ship inside the package (package data), so a non-editable install finds them too; conf/ at the
# repository root is a link to this folder
CONFIG_PATH = str(Path(__file__).resolve().parent / "conf")

log = logging.getLogger(__name__)


class UserError(Exception):
    """An error caused by the user's input (config, files); shown without a traceback."""


class RunProtected(UserError):
    """A job refused because it would overwrite a run (its folder in use by another job, a run there this job would
    replace, a finished run resumed with nothing left to train): the job writes nothing there, not even its
    failure.json, which would mark that run as failed."""


class JobFailedError(Exception):
    """One job of a multirun failed on bad input: an Exception (not SystemExit), so Hydra records it and runs the
    remaining jobs, then exits non-zero at the end of the sweep."""


FAILURE_FILE = "failure.json"


def _root_cause(exc: BaseException) -> BaseException:
    while isinstance(exc, InstantiationException) and exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    OmegaConfBaseException,
    UserError,
)


def _sweep_overrides(sweep_dir: str | None) -> list[str]:
    """The multirun's own task overrides, sweeps unexpanded (``schedule=linear,cosine``): from ``multirun.yaml``,
    which Hydra's sweeper writes into the sweep directory before it launches any job, so every launcher's job reads
    the same list (a submitit or SLURM worker has another ``sys.argv``); the command line when there is no file."""
    if sweep_dir:
        path = Path(sweep_dir) / "multirun.yaml"
        if path.is_file():
            task = OmegaConf.select(OmegaConf.load(path), "hydra.overrides.task", default=None)
            if task is not None:
                return [str(o) for o in task]
    return [a for a in sys.argv[1:] if "=" in a and not a.startswith("-")]


# characters Hydra's override grammar reads in an unquoted value (besides ``/``): a folder named with these alone can be
# pasted into ``ckpt_path=<run>/checkpoints/last.ckpt`` as it is; ``=`` and ``,`` (a sweep) cannot
_UNSAFE_IN_OVERRIDE = re.compile(r"[^A-Za-z0-9_.+@-]+")


def _name_part(text: str) -> str:
    """``text`` with each run of characters an unquoted override value cannot hold turned into one ``_``
    (``[1,2]`` -> ``1_2``, ``hydra/launcher`` -> ``hydra_launcher``)."""
    return _UNSAFE_IN_OVERRIDE.sub("_", text).strip("_")


def swept_dirname(
    task_overrides: list[str],
    job_num: int | str,
    sweep_dir: str | None = None,
    sweeper_params=None,
    kv_sep: str = "-",
    item_sep: str = "+",
) -> str:
    """Readable sweep subdirectory: only the swept overrides of this job (``schedule-cosine``,
    ``optimizer.lr-0.001+model.dropout-0.1``), the sweep read with Hydra's own override grammar
    (:func:`_sweep_overrides`), and the keys of a sweeper's own search space (``hydra.sweeper.params``, e.g. Optuna's);
    the job number when nothing was swept by hand. ``kv_sep`` and ``item_sep`` are Hydra's
    ``hydra.job.config.override_dirname`` settings; with the defaults (not ``=`` and ``,``, which Hydra's grammar
    reads as an assignment and a sweep) the folder's path can be pasted into an override as it is:
    ``python src/eval.py ckpt_path=<sweep>/schedule-cosine/checkpoints/last.ckpt``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(_sweep_overrides(sweep_dir))
    except Exception:  # overrides this parser cannot read: fall back to the job number
        return str(job_num)
    swept = {o.key_or_group for o in parsed if o.is_sweep_override()} | set(sweeper_params or {})
    parts = []
    for override in task_overrides:
        key, _, value = override.partition("=")
        key = key.lstrip("+~")
        if key in swept:
            parts.append(f"{_name_part(key)}{kv_sep}{_name_part(value)}")
    return item_sep.join(parts) if parts else str(job_num)


# the estimators of likelihood=elbo: the exact bound, and a continuous-time model's own beside it
ELBO_ESTIMATORS = ("elbo", "continuous")


def likelihood_name(likelihood) -> str:
    """The ``likelihood`` node (its estimators by name) as folders and records name it: ``elbo``, ``ode``, ``both``
    (the two), or the estimators' names joined by ``+`` (``elbo+iw``)."""
    if likelihood is None or isinstance(likelihood, str):
        return likelihood or "elbo"
    names = [str(k) for k in likelihood if likelihood[k] is not None]
    shown = [n for n in names if n not in ELBO_ESTIMATORS]
    if "elbo" in names:
        shown = ["both"] if shown == ["ode"] else ["elbo", *shown]
    return "+".join(shown) or "elbo"


def eval_run_dir(ckpt_path: str | None, variance: str | None, likelihood, default: str) -> str:
    """Where ``src/eval.py`` writes: for a checkpoint of a training run (``<run>/checkpoints/<name>.ckpt``) the run's
    own ``<run>/eval/<name>-<variance>`` (``-ode``/``-both`` appended for those likelihoods; ``trained`` when the
    checkpoint's own variance is used), so the results sit with the run and its sweep report finds them. Hydra's
    ``.hydra/`` of the eval goes inside that folder and the run's own is left alone. ``default`` otherwise."""
    if not ckpt_path:
        return default
    ckpt = Path(str(ckpt_path))
    if ckpt.parent.name != "checkpoints":  # a checkpoint outside a run directory
        return default
    name = f"{ckpt.stem}-{variance or 'trained'}"
    if likelihood_name(likelihood) != "elbo":
        name += f"-{likelihood_name(likelihood)}"
    return str(ckpt.parent.parent / "eval" / name)


def _shown_path(path: str | Path) -> str:
    """``path`` as a user types it: relative to the current directory when inside it (Hydra resolves a relative
    ``hydra.run.dir`` against it), else absolute."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def resume_command(run_dir: str | Path, overrides: list[str] | None = None) -> str:
    """The shell command that resumes the training run in ``run_dir``: the run's own overrides (``overrides``, by
    default this job's), its folder as ``hydra.run.dir`` (without it Hydra would make a new, empty folder) and
    ``ckpt_path=last`` (the newest complete checkpoint in ``<run_dir>/checkpoints``)."""
    script = sys.argv[0] if sys.argv[0].endswith(".py") else "src/train.py"
    if overrides is None:
        overrides = [str(o) for o in HydraConfig.get().overrides.task] if HydraConfig.initialized() else []
    keep = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in ("ckpt_path", "hydra.run.dir")]
    return shlex.join(["python", _shown_path(script), *keep, f"hydra.run.dir={_shown_path(run_dir)}", "ckpt_path=last"])


def run_dir_chosen() -> bool:
    """Whether this job's folder was named by the user (``hydra.run.dir=...``, or ``hydra.sweep.dir=...`` in a
    multirun) rather than made new from the date and time; True outside Hydra (``train(cfg, output_dir)``)."""
    if not HydraConfig.initialized():
        return True
    hydra_cfg = HydraConfig.get()
    key = "hydra.sweep.dir" if hydra_cfg.mode == RunMode.MULTIRUN else "hydra.run.dir"
    return any(str(o).split("=", 1)[0].lstrip("+~") == key for o in hydra_cfg.overrides.hydra)


TRAINER_TARGET = "lightning.pytorch.Trainer"  # conf/trainer/default.yaml


def check_trainer_overrides(args: list[str]) -> None:
    """Refuse ``trainer.<name>=...`` on the command line where the Trainer takes no ``name`` (``trainer.max_step``),
    naming the closest argument, with status 2. Hydra would refuse it too, advising ``+trainer.max_step``, which then
    fails inside Lightning; every Trainer argument is a key of ``trainer/``, so no ``+`` is ever needed there."""
    from diffusion_elbo.config import constructor_parameters, not_an_argument

    found = constructor_parameters(TRAINER_TARGET)
    if found is None:
        return
    owner, params = found
    named = [n for n in params if n != "self"]
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        group, _, name = arg.split("=", 1)[0].lstrip("+~").partition(".")
        if group == "trainer" and name and "." not in name and name not in params:
            print(f"error: {not_an_argument('trainer', name, named, owner)}", file=sys.stderr)
            raise SystemExit(2)


# keys renamed when the sampler, likelihood and loss groups began to build objects (2026-12-05): old -> new
RENAMED_KEYS = {
    "fid.steps": "fid.sampler.steps",
    "fid.eta": "fid.sampler.eta",
    "fid.spacing": "fid.sampler.spacing",
    "callbacks.fid.steps": "callbacks.fid.sampler.steps",
    "callbacks.fid.eta": "callbacks.fid.sampler.eta",
    "callbacks.fid.spacing": "callbacks.fid.sampler.spacing",
    "callbacks.sample_grid.steps": "sampler.steps",
    "callbacks.sample_grid.eta": "sampler.eta",
    "callbacks.sample_grid.spacing": "sampler.spacing",
    "callbacks.toy2d_metrics.steps": "callbacks.toy2d_metrics.sampler.steps",
    "callbacks.toy2d_metrics.spacing": "callbacks.toy2d_metrics.sampler.spacing",
    "continuous_strata": "likelihood.continuous.strata",
    "loss.name": "loss (the group's option: loss=simple, loss=elbo, ...)",
}


def check_renamed_keys(args: list[str]) -> None:
    """Refuse, with status 2, a key of the command line that was renamed (:data:`RENAMED_KEYS`, and ``ode.<key>``, now
    ``likelihood.ode.<key>``), naming the new one: Hydra would say only that the key is not in the config."""
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        key = arg.split("=", 1)[0].lstrip("+~")
        new = RENAMED_KEYS.get(key) or (
            f"likelihood.{key} (with likelihood=ode or both)" if key.startswith("ode.") else None
        )
        if new is not None:
            print(f"error: {key} is now {new}: the key was renamed on 2026-12-05 (docs/extending.md)", file=sys.stderr)
            raise SystemExit(2)


class SweepChecks(Callback):
    """Hydra callback: refuses, before any job runs, a multirun whose launcher cannot host the jobs' DDP processes."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        launcher = str(OmegaConf.select(config, "hydra.launcher._target_", default=""))
        devices = OmegaConf.select(config, "trainer.devices", default=1)
        nodes = OmegaConf.select(config, "trainer.num_nodes", default=1) or 1
        many = devices not in (1, "1", None) or int(nodes) > 1
        if "joblib" in launcher.lower() and many:
            # Hydra turns a callback's Exception into a warning and goes on; SystemExit stops the sweep here
            print(
                f"error: hydra/launcher=joblib runs the sweep's jobs inside worker processes, which cannot start the DDP "
                f"processes of trainer.devices={devices} (num_nodes={nodes}). Drop hydra/launcher=joblib (the basic "
                "launcher runs one job at a time, each on all its devices), or use hydra/launcher=submitit_local or "
                f"submitit_slurm with hydra.launcher.tasks_per_node={devices} (one task per device).",
                file=sys.stderr,
            )
            raise SystemExit(2)


def register_resolvers() -> None:
    """OmegaConf resolvers the configs use; called by the src/*.py entry points before Hydra starts."""
    OmegaConf.register_new_resolver("swept_dirname", swept_dirname, replace=True)
    OmegaConf.register_new_resolver("eval_run_dir", eval_run_dir, replace=True)


def process_rank() -> int:
    """This process's global rank: Lightning's, once its strategy set it up, else from the launcher's environment
    variables (0 in a single process)."""
    from lightning.pytorch.utilities import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def failure_path(output_dir: str | Path, rank: int = 0) -> Path:
    """``<run dir>/failure.json`` of the job (rank 0), ``failure.rank<r>.json`` of a process r > 0 of a DDP run."""
    return Path(output_dir) / (FAILURE_FILE if rank == 0 else f"failure.rank{rank}.json")


def write_failure(
    output_dir: str | Path, exc: BaseException, *, rank: int | None = None, step: int | None = None
) -> Path:
    """Why this process stopped (error type, message, the traceback's last lines, its rank and the training step when
    known), so a sweep report and a person browsing the runs see it without the logs: ``failure.json`` for rank 0 (the
    job), ``failure.rank<r>.json`` for another rank of a DDP run, which rank 0 reads to name the cause
    (:func:`rank_failures`). A record this process already wrote keeps its step when ``step`` is not given."""
    rank = process_rank() if rank is None else rank
    path = failure_path(output_dir, rank)
    if step is None:
        step = _own_record(path).get("step")
    lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
    record = {
        "status": "failed",
        "error": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(lines)[-4000:],
        "rank": rank,
        "step": step,
        "pid": os.getpid(),
    }
    write_json(path, record, indent=1)
    return path


def _own_record(path: Path) -> dict:
    """The failure record at ``path`` if this process wrote it, else {}."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) and record.get("pid") == os.getpid() else {}


def rank_failures(output_dir: str | Path, *, since: float, wait_s: float = 10.0, skip_errors=()) -> list[dict]:
    """The failure records of the ranks > 0 of a DDP run written at or after ``since`` (this attempt's start; older
    ones are an earlier attempt's), waiting up to ``wait_s`` seconds for the first: a rank writes its record while it
    stops, and its peers may notice it is gone a moment before. Records whose error is in ``skip_errors`` (a rank that
    only saw another die) are left out. Sorted by rank."""
    deadline = time.monotonic() + wait_s
    while True:
        records = []
        for path in sorted(Path(output_dir).glob("failure.rank*.json")):
            try:
                if path.stat().st_mtime < since:
                    continue
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(record, dict) and record.get("error") not in skip_errors:
                records.append({**record, "file": path.name})
        if records or time.monotonic() >= deadline:
            return sorted(records, key=lambda r: r.get("rank", 0))
        time.sleep(0.2)


def clear_failure(output_dir: str | Path) -> None:
    """Remove ``<run dir>/failure.json`` (and the ranks' ``failure.rank<r>.json``) of an earlier attempt of a run that
    has now finished (resumed to its end), so the sweep report and a person browsing the runs see it as finished; the
    log keeps what it said."""
    for rank_record in Path(output_dir).glob("failure.rank*.json"):
        rank_record.unlink(missing_ok=True)
    path = Path(output_dir) / FAILURE_FILE
    if not path.is_file():
        return
    try:
        said = json.loads(path.read_text()).get("message", "")
    except (OSError, ValueError):
        said = "(unreadable)"
    log.info("the run finished: removing %s of an earlier attempt, which said: %s", path, said[:500])
    path.unlink(missing_ok=True)


def run_job(job: Callable[[DictConfig, str], Any], cfg: DictConfig) -> Any:
    """Run ``job(cfg, output_dir)`` in the Hydra run directory. Any failure writes ``failure.json`` there. A user
    error (bad value, missing file) exits with status 2 and its message only, so the fix is the first thing the user
    reads; inside a multirun it is raised as :class:`JobFailedError` instead, so the other jobs still run and the
    sweep exits non-zero at its end (Hydra re-raises a job's Exception then, while a SystemExit would end the sweep
    at once)."""
    hydra_cfg = HydraConfig.get()
    output_dir = hydra_cfg.runtime.output_dir
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        return job(cfg, output_dir)
    except (InstantiationException, *USER_ERRORS) as exc:
        cause = _root_cause(exc)
        if not isinstance(cause, RunProtected):
            write_failure(output_dir, cause)
        if not isinstance(cause, USER_ERRORS):
            raise
        # the traceback goes to the run's log file; the terminal gets the message and the fix
        log.debug("traceback", exc_info=cause)
        log.error("%s: %s", type(cause).__name__, cause)
        print(f"error: {cause}", file=sys.stderr)
        if multirun:
            raise JobFailedError(f"{type(cause).__name__}: {cause}") from None
        raise SystemExit(2) from None
    except Exception as exc:
        path = write_failure(output_dir, exc)
        # the run's log gets the error too (Hydra prints the traceback to the terminal only); under DDP each rank's
        # lines go to the same log, so a rank > 0 says which it is
        rank = process_rank()
        log.error("%s%s: %s (recorded in %s)", f"rank {rank}: " if rank else "", type(exc).__name__, exc, path.name)
        raise
