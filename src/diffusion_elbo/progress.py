"""Progress of long jobs where no bar can be drawn: when the output is not a terminal (a batch job, `nohup`, a pipe),
progress bars are off, and these lines in the log say how far a job is and how long it has left."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger(__name__)


def interactive() -> bool:
    """Whether progress bars can be drawn: stdout and stderr are terminals."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def format_seconds(seconds: float) -> str:
    """``1:02:03``, ``2:03``: a duration as tqdm writes it."""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class ProgressLog:
    """Logs ``<what>: <done>/<total> <unit> (<percent>), elapsed <m:ss>, ETA <m:ss>[, <extra>]`` at most once every
    ``every_s`` seconds, and at the end. The ETA assumes the remaining work goes at the rate so far.

    ``enabled``: None logs only where no bar is drawn (:func:`interactive` is False)."""

    def __init__(
        self, what: str, total: float, unit: str, *, every_s: float = 30.0, enabled: bool | None = None
    ) -> None:
        self.what, self.total, self.unit, self.every_s = what, float(total), unit, float(every_s)
        self.enabled = not interactive() if enabled is None else enabled
        self.started = self.last = time.monotonic()
        self.start_done = 0.0

    def restart(self, done: float) -> None:
        """Count the rate from ``done`` on (a resumed run: the steps before it took no time here)."""
        self.started = self.last = time.monotonic()
        self.start_done = float(done)

    def line(self, done: float, extra: str = "") -> str:
        elapsed = time.monotonic() - self.started
        rate = (done - self.start_done) / elapsed if elapsed > 0 else 0.0
        left = format_seconds((self.total - done) / rate) if rate > 0 else "?"
        percent = 100.0 * done / self.total if self.total > 0 else 100.0
        text = (
            f"{self.what}: {done:.0f}/{self.total:.0f} {self.unit} ({percent:.1f}%), elapsed {format_seconds(elapsed)}, "
            f"ETA {left}"
        )
        return f"{text}, {extra}" if extra else text

    def update(self, done: float, extra: str = "") -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last >= self.every_s or done >= self.total:
            self.last = now
            log.info(self.line(done, extra))
