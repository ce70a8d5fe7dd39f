"""Shared plumbing of the ``src/*.py`` entry points."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from omegaconf import DictConfig
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
