"""A Python process with the third-party libraries already imported, which forks one child per command the tests run.

Why: a command such as ``python src/train.py <overrides>`` spends about 10 s of CPU importing torch, Lightning,
Hydra and SciPy before it reads its config, longer than most test commands then run. The suite starts about
a hundred of them, so on CI's 2 cores that import was a quarter of the suite's wall time.

What a child does is what ``python src/<script>.py <args>`` does: it runs the script file as ``__main__`` in a process
of its own, with the given argv, environment, working directory and sys.path (the script's folder first, then
PYTHONPATH), with its stdout and stderr in files, default signal handlers and fresh random seeds, and exits with the
script's status (an uncaught exception prints its traceback and exits 1). Only modules of third-party packages are
imported beforehand, never the project's own: a missing import in ``src/`` still fails here as it would for a user.
Processes the script starts itself (DDP ranks, Hydra launchers' workers) are ordinary fresh processes.

Each child leads its own process group, so a timeout kills the command with everything it started. The zygote uses
no threads (it forks), serves concurrent requests, and exits when the test process that started it is gone.
``DIFFUSION_ELBO_TESTS_FRESH_PROCESSES=1`` turns it off: every command then starts a fresh interpreter.

Protocol on a Unix socket, one connection per command: the client sends one JSON line ``{"argv", "env", "cwd",
"stdout", "stderr"}``; the zygote answers ``{"pid": ...}`` at once and ``{"returncode": ...}`` when the child ends
(negative for a signal, as in :mod:`subprocess`).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import select
import signal
import socket
import sys

# Third-party modules a project command imports (all that take time); a missing optional one is skipped. Not W&B: its
# import makes a temporary media folder that the first child to exit would delete for all the others.
PREIMPORT = (
    "numpy",
    "torch",
    "lightning",
    "lightning.pytorch",
    "lightning.fabric",
    "torchmetrics",
    "hydra",
    "hydra.core.hydra_config",
    "omegaconf",
    "scipy",
    "scipy.stats",
    "scipy.signal",
    "matplotlib",
    "PIL.Image",
    "rich",
    "sklearn.datasets",
    "torchdiffeq",
    "yaml",
)


# The signals whose disposition a command inherits: a fresh interpreter keeps those its parent ignores ignored (a
# command started by a shell that ignores SIGINT, or by a test that does) and has the defaults for the rest. The
# client says which it ignores at each command, since that can change between commands (this process started at the
# first one). Its PYTHONPATH entries as it started (a command gets its own instead).
INHERITED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
STARTUP_PYTHONPATH = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]


def _preimport() -> None:
    for name in PREIMPORT:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def _read_line(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _send(conn: socket.socket, payload: dict) -> None:
    with contextlib.suppress(OSError):  # a client that gave up (its timeout) or died has no use for it
        conn.sendall(json.dumps(payload).encode() + b"\n")


def _become_the_command(request: dict) -> None:
    """In the forked child: set up the process as ``python <argv>`` would have it, then run the script."""
    os.setpgid(0, 0)
    ignored = set(request.get("ignored_signals", []))
    for sig in INHERITED_SIGNALS:
        # Python's own start-up: KeyboardInterrupt on SIGINT unless it was ignored, the OS default for the others
        default = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
        signal.signal(sig, signal.SIG_IGN if int(sig) in ignored else default)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # Python ignores SIGPIPE at start-up (and raises BrokenPipeError)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, fd)
        os.close(out)
    os.close(null)
    script = os.path.abspath(request["argv"][0])
    pythonpath = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    rest = [p for p in sys.path[1:] if p not in pythonpath and p not in STARTUP_PYTHONPATH]
    sys.path[:] = [os.path.dirname(script), *pythonpath, *rest]
    sys.argv = [script, *request["argv"][1:]]
    import random

    import numpy as np
    import torch

    random.seed()  # a fresh interpreter seeds these from the OS; a fork would share the zygote's state
    np.random.seed()  # noqa: NPY002 (the legacy global state a fresh interpreter seeds)
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    # Lightning reads the process's rank from RANK / LOCAL_RANK / SLURM_PROCID when it is imported: read it again here
    from lightning.fabric.utilities.rank_zero import _get_rank, rank_zero_only

    rank_zero_only.rank = _get_rank() or 0
    import runpy

    runpy.run_path(script, run_name="__main__")
    sys.exit(0)  # the interpreter's own shutdown follows (non-daemon threads joined, atexit, buffers flushed)


def serve(path: str) -> None:
    # a signal to the zygote (the test run interrupted, its client closing) ends it through the finally below, which
    # takes the running commands with it: they lead process groups of their own, so a terminal's Ctrl-C misses them
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))
    _preimport()
    parent = os.getppid()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(16)
    print("ready", flush=True)
    waiting: dict[int, socket.socket] = {}
    child = False
    try:
        while os.getppid() == parent:
            readable, _, _ = select.select([server], [], [], 0.02 if waiting else 1.0)
            if readable:
                conn, _ = server.accept()
                request = json.loads(_read_line(conn))
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    child = True
                    for other in (server, conn, *waiting.values()):
                        other.close()
                    _become_the_command(request)  # does not return: it ends in the interpreter's exit
                _send(conn, {"pid": pid})
                waiting[pid] = conn
            while waiting:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                conn = waiting.pop(pid, None)
                if conn is not None:
                    _send(conn, {"returncode": os.waitstatus_to_exitcode(status)})
                    conn.close()
    finally:
        if not child:  # the zygote ends (its test process gone, a signal, an error): its commands end with it
            for pid in waiting:
                with contextlib.suppress(OSError):
                    os.killpg(pid, signal.SIGKILL)


if __name__ == "__main__":
    serve(sys.argv[1])
