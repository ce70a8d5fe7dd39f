"""Helpers shared by the training and CLI tests."""

from __future__ import annotations

import contextlib
import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = str(REPO_ROOT / "conf")

# Small and fast: a few steps, tiny validation, few samples; no W&B unless a test asks for it.
FAST = [
    "trainer.accelerator=cpu",
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "callbacks.sample_grid.num_samples=4",
    "sampler.steps=5",
    "callbacks.model_checkpoint.every_n_train_steps=3",
    "callbacks.fid.num_samples=0",
    "callbacks.toy2d_metrics.num_samples=200",
    "callbacks.toy2d_metrics.sampler.steps=5",
    "val_strata=4",
    "logger=csv",
]

# A small UNet and batch on digits, for tests of mechanics that do not depend on the network's size (resume, seeds,
# faults, callbacks, loggers): each step costs several times less than the default's. The default recipe itself is
# trained by tests/test_cli.py's short digits run and the CLI tests that run FAST alone.
SMALL_UNET = ["model.model_channels=16", "data.batch_size=32"]


def compose_train(output_dir: Path, overrides: list[str] = ()) -> DictConfig:
    """The train config as `python src/train.py <FAST> <overrides>` would compose it, writing to output_dir."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*FAST, *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def run_cli(
    script: str, *args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run src/<script> in a process of its own, as a user would: ``python src/<script> <args>`` (``env`` adds
    environment variables)."""
    return run_python(REPO_ROOT / "src" / script, *args, cwd=cwd, timeout=timeout, env=env)


def run_python(
    script: str | Path, *args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """``python <script> <args>`` in a process of its own, waited for (``env`` adds environment variables); see
    :func:`popen_python`."""
    proc = popen_python(script, *args, cwd=cwd, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # the command and everything it started go, as subprocess.run's kill does
        proc.kill_group()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def popen_python(script: str | Path, *args: str, cwd: Path | None = None, env: dict | None = None):
    """``python <script> <args>`` started in a process of its own, with its stdout and stderr captured as text: a
    :class:`subprocess.Popen`-like handle (``pid``, ``poll``, ``wait``, ``communicate``, ``send_signal``, ``kill``).
    The process is forked from this test process's zygote (tests/zygote.py), which has the third-party libraries
    imported already; it is a fresh interpreter where DIFFUSION_ELBO_TESTS_FRESH_PROCESSES=1."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0", **(env or {})}
    cwd = Path(cwd or REPO_ROOT)
    argv = [str(cwd / script), *args]
    if os.environ.get("DIFFUSION_ELBO_TESTS_FRESH_PROCESSES") == "1":
        return _FreshProcess(
            [sys.executable, *argv], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,  # its own process group, as a forked one's: a timeout kills what it started
        )  # fmt: skip
    return _zygote().start(argv, cwd=cwd, env=env)


class _FreshProcess(subprocess.Popen):
    def kill_group(self) -> None:
        import signal

        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)


class _Zygote:
    """Client of tests/zygote.py: one per test process, started at its first command."""

    def __init__(self) -> None:
        import atexit
        import tempfile

        self.dir = Path(tempfile.mkdtemp(prefix="zygote-"))
        self.socket = str(self.dir / "s")
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "tests" / "zygote.py"), self.socket], stdout=subprocess.PIPE, text=True
        )
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"tests/zygote.py did not start (exit status {self.proc.wait()})")
        self.count = 0
        atexit.register(self.close)

    def close(self) -> None:
        """SIGTERM first: the zygote then kills the commands still running before it exits."""
        import shutil

        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def start(self, argv: list[str], *, cwd: Path, env: dict) -> _ForkedProcess:
        import json
        import socket

        self.count += 1
        out, err = self.dir / f"{self.count}.out", self.dir / f"{self.count}.err"
        import signal

        # what an exec'd child inherits from this process now: its ignored signals stay ignored
        ignored = [int(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
                   if signal.getsignal(s) == signal.SIG_IGN]  # fmt: skip
        request = {"argv": argv, "env": env, "cwd": str(cwd), "stdout": str(out), "stderr": str(err),
                   "ignored_signals": ignored}  # fmt: skip
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(self.socket)
        conn.sendall(json.dumps(request).encode() + b"\n")
        proc = _ForkedProcess([sys.executable, *argv], conn, out, err)
        proc.pid = json.loads(proc._line(None))["pid"]
        return proc


class _ForkedProcess:
    """A command forked by the zygote, seen as :class:`subprocess.Popen` sees its child."""

    def __init__(self, args: list[str], conn, out: Path, err: Path) -> None:
        self.args, self.pid, self.returncode = args, None, None
        self._conn, self._buffer, self._out, self._err = conn, b"", out, err

    def _line(self, timeout: float | None) -> bytes:
        """The zygote's next line (b"" if it closed the connection); TimeoutExpired if none comes within ``timeout``.
        Read from the socket itself, with a buffer of its own: both lines may arrive in one read, and a timed-out
        socket file could not be read again."""
        import select

        while b"\n" not in self._buffer:
            if not select.select([self._conn], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired(self.args, timeout, _read(self._out), _read(self._err))
            chunk = self._conn.recv(65536)
            if not chunk:
                return b""
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def _status(self, timeout: float | None) -> None:
        import json

        if self.returncode is not None:
            return
        line = self._line(timeout)
        if not line:
            raise RuntimeError(f"the test zygote ended before the command {self.args} did")
        self.returncode = json.loads(line)["returncode"]
        self._conn.close()

    def poll(self) -> int | None:
        if self.returncode is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._status(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._status(timeout)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self._status(timeout)
        out, err = _read(self._out), _read(self._err)
        self._out.unlink(missing_ok=True)
        self._err.unlink(missing_ok=True)
        return out, err

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        import signal

        self.send_signal(signal.SIGKILL)

    def kill_group(self) -> None:
        """The command and every process it started (it leads its own process group)."""
        import signal

        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


_ZYGOTE: _Zygote | None = None


def _zygote() -> _Zygote:
    global _ZYGOTE
    if _ZYGOTE is None or _ZYGOTE.proc.poll() is not None:
        _ZYGOTE = _Zygote()
    return _ZYGOTE


def write_fake_mnist(root: Path, n_train: int = 64, n_test: int = 32, seed: int = 0) -> None:
    """Tiny MNIST in the IDX format (gzipped), with blob-like digits so training has signal."""
    rng = np.random.RandomState(seed)
    root.mkdir(parents=True, exist_ok=True)

    def images(n: int) -> bytes:
        data = (rng.rand(n, 28, 28) > 0.8).astype(np.uint8) * 255
        return (
            np.array([0, 0, 8, 3], dtype=np.uint8).tobytes()
            + np.array([n, 28, 28], dtype=">i4").tobytes()
            + data.tobytes()
        )

    def labels(n: int) -> bytes:
        return (
            np.array([0, 0, 8, 1], dtype=np.uint8).tobytes()
            + np.array([n], dtype=">i4").tobytes()
            + rng.randint(0, 10, n).astype(np.uint8).tobytes()
        )

    for name, payload in [
        ("train-images-idx3-ubyte.gz", images(n_train)),
        ("train-labels-idx1-ubyte.gz", labels(n_train)),
        ("t10k-images-idx3-ubyte.gz", images(n_test)),
        ("t10k-labels-idx1-ubyte.gz", labels(n_test)),
    ]:
        with gzip.open(root / name, "wb") as f:
            f.write(payload)


def copy_of_checkpoint(ckpt: Path, run_dir: Path) -> Path:
    """A copy of ``ckpt`` as ``<run_dir>/checkpoints/last.ckpt`` (a run folder of its own, so caches, evals and samples
    written next to it stay this test's)."""
    import shutil

    target = run_dir / "checkpoints" / "last.ckpt"
    target.parent.mkdir(parents=True)
    shutil.copy2(ckpt, target)
    return target
