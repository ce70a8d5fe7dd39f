"""Shared plumbing of the ``src/*.py`` entry points."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# conf/ at the repository root, next to src/
CONFIG_PATH = str(Path(__file__).resolve().parents[2] / "conf")

log = logging.getLogger(__name__)


class UserError(Exception):
    """An error caused by the user's input (config, files); shown without a traceback."""


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


def swept_dirname(task_overrides: list[str], job_num: int | str) -> str:
    """Readable sweep subdirectory: only the swept overrides of this job (``schedule=cosine``), parsed with
    Hydra's own override grammar from the command line; the job number when nothing was swept by hand."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(
            [a for a in sys.argv[1:] if "=" in a and not a.startswith("-")]
        )
    except Exception:  # an argv this parser cannot read: fall back to the job number
        return str(job_num)
    swept = {o.key_or_group for o in parsed if o.is_sweep_override()}
    parts = [o for o in task_overrides if o.split("=", 1)[0].lstrip("+~") in swept]
    return ",".join(parts).replace("/", "_") if parts else str(job_num)


def register_resolvers() -> None:
    """OmegaConf resolvers the configs use; called by the src/*.py entry points before Hydra starts."""
    OmegaConf.register_new_resolver("swept_dirname", swept_dirname, replace=True)


def run_job(job: Callable[[DictConfig, str], Any], cfg: DictConfig) -> Any:
    """Run ``job(cfg, output_dir)`` in the Hydra run directory; a user error (bad value, missing file)
    exits with status 2 and its message only, so the fix is the first thing the user reads."""
    output_dir = HydraConfig.get().runtime.output_dir
    try:
        return job(cfg, output_dir)
    except (InstantiationException, *USER_ERRORS) as exc:
        cause = _root_cause(exc)
        if not isinstance(cause, USER_ERRORS):
            raise
        # the traceback goes to the run's log file; the terminal gets the message and the fix
        log.debug("traceback", exc_info=cause)
        log.error("%s: %s", type(cause).__name__, cause)
        print(f"error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None
