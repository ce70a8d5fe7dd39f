"""The test harness's zygote (tests/zygote.py) runs a script as a fresh ``python <script>`` would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import popen_python, run_python

PROBE = """
import json, os, random, signal, sys
import numpy as np
import torch
print(json.dumps({
    "argv": sys.argv, "cwd": os.getcwd(), "path0": sys.path[0], "probe_env": os.environ.get("PROBE_ENV"),
    "pythonpath_first": sys.path[1] if len(sys.path) > 1 else None, "name": __name__, "file": __file__,
    "main_file": sys.modules["__main__"].__file__, "threads": torch.get_num_threads(),
    "sigint": signal.getsignal(signal.SIGINT) is signal.default_int_handler,
    "sigterm": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, "random": random.random(),
    "np_random": float(np.random.rand()), "stdin": sys.stdin.read(),
}))
print("to stderr", file=sys.stderr)
sys.exit(int(sys.argv[1]))
"""


def _fresh(script, *args, cwd, env):
    return subprocess.run(
        [sys.executable, str(script), *args], cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_a_forked_command_sees_what_a_fresh_interpreter_sees(tmp_path):
    script = tmp_path / "probe" / "probe.py"
    script.parent.mkdir()
    script.write_text(PROBE)
    extra = tmp_path / "extra"
    env = {"PROBE_ENV": "x y", "PYTHONPATH": str(extra), "OMP_NUM_THREADS": "1"}
    # SIGINT ignored by this process, then not (or the other way round): a command inherits it as it is at its start,
    # not as it was when the zygote started (at this worker's first command, under whichever test ran it)
    before = signal.getsignal(signal.SIGINT)
    seen_sigint = []
    try:
        for disposition in (signal.SIG_IGN, signal.default_int_handler)[:: 1 if before == signal.SIG_IGN else -1]:
            signal.signal(signal.SIGINT, disposition)
            forked = [run_python(script, "3", "a b", cwd=tmp_path, env=env) for _ in range(2)]
            fresh = _fresh(script, "3", "a b", cwd=tmp_path, env=env)
            got = [json.loads(r.stdout) for r in (*forked, fresh)]
            for result, seen in zip((*forked, fresh), got, strict=True):
                assert result.returncode == 3 and result.stderr == "to stderr\n"
                assert seen["argv"] == [str(script), "3", "a b"] and seen["cwd"] == str(tmp_path)
                assert seen["path0"] == str(script.parent) and seen["pythonpath_first"] == str(extra)
                assert seen["probe_env"] == "x y" and seen["threads"] == 1 and seen["stdin"] == ""
                assert seen["name"] == "__main__" and seen["file"] == seen["main_file"] == str(script)
                # the signal dispositions a fresh interpreter gets from this process
                assert (seen["sigint"], seen["sigterm"]) == (got[2]["sigint"], got[2]["sigterm"]), disposition
            seen_sigint.append(got[2]["sigint"])
            # seeded from the OS in each process, as a fresh interpreter does, not copied from the zygote
            assert got[0]["random"] != got[1]["random"] and got[0]["np_random"] != got[1]["np_random"]
    finally:
        signal.signal(signal.SIGINT, before)
    assert sorted(seen_sigint) == [False, True]  # both dispositions were seen


def test_an_uncaught_exception_exits_1_with_its_traceback_and_a_timeout_kills_the_command(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text("raise ValueError('boom')\n")
    result = run_python(script, cwd=tmp_path)
    assert result.returncode == 1 and "ValueError: boom" in result.stderr and "Traceback" in result.stderr
    sleeper = tmp_path / "sleep.py"
    sleeper.write_text(
        "import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\ntime.sleep(60)\n"
    )
    started = time.time()
    with pytest.raises(subprocess.TimeoutExpired):
        run_python(sleeper, cwd=tmp_path, timeout=2)
    assert time.time() - started < 10
    # a wait that timed out can be waited on again, as a Popen can
    proc = popen_python(sleeper, cwd=tmp_path)
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=0.5)
    assert proc.poll() is None
    proc.kill_group()
    proc.communicate(timeout=10)
    assert proc.returncode == -9
