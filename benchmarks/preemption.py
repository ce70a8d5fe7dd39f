"""Preemption of a 2-process CPU DDP run, repeated: SIGTERM and SIGINT sent to every process of the job at a random
moment, and how each trial ended (issue 30, item 1). Writes ``benchmarks/faults/preemption[-<label>].{json,md}``.

    python benchmarks/preemption.py --trials 20                       # the project's handling (StopOnSignal)
    python benchmarks/preemption.py --trials 6 --label lightning \\
        --override '~callbacks.stop_on_signal'                        # Lightning's own, as before the fix

A trial is ``ok`` when the job exits (within ``--timeout-s``), both ranks stopped at the same step, last.ckpt holds
that step, the loss curve ends there, and no process of the job is alive 10 s after its first exited.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "faults"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import machine, machine_line  # noqa: E402

from tests.preemption import DDP_RUN, preempt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20, help="per signal")
    parser.add_argument("--signals", nargs="+", default=["SIGTERM", "SIGINT"])
    parser.add_argument("--label", default="")
    parser.add_argument("--override", action="append", default=[], help="extra train.py overrides")
    parser.add_argument("--timeout-s", type=float, default=90.0, help="a job still running then counts as hung")
    parser.add_argument("--max-delay-s", type=float, default=2.0, help="signal at U(0, this) s after step 5")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    trials = []
    with tempfile.TemporaryDirectory(prefix="preempt-") as tmp:
        for i in range(args.trials):
            for name in args.signals:
                delay = round(rng.uniform(0.0, args.max_delay_s), 2)
                result = preempt(
                    Path(tmp) / f"{name}-{i}", getattr(signal, name), overrides=args.override, after_steps=5,
                    delay_s=delay, timeout_s=args.timeout_s,
                )  # fmt: skip
                trials.append(result.as_dict())
                print(json.dumps(trials[-1]), flush=True)

    rows = []
    for name in args.signals:
        mine = [t for t in trials if t["signal"] == name]
        exits = [t["all_exit_s"] for t in mine if t["returncode"] is not None]
        rows.append(
            {
                "signal": name,
                "trials": len(mine),
                "ok": sum(t["ok"] for t in mine),
                "hung": sum(t["returncode"] is None for t in mine),
                "leftover": sum(t["leftover"] for t in mine),
                "ranks_disagree": sum(len(set(t["stop_steps"])) > 1 for t in mine),
                "ckpt_behind": sum(
                    t["last_ckpt_step"] is not None and t["last_ckpt_step"] < t["logged_steps"] for t in mine
                ),
                "returncodes": sorted({t["returncode"] for t in mine if t["returncode"] is not None}),
                "exit_s_median": round(statistics.median(exits), 2) if exits else None,
                "exit_s_max": round(max(exits), 2) if exits else None,
            }
        )
    name = "preemption" + (f"-{args.label}" if args.label else "")
    m = machine()
    payload = {"machine": m, "command": " ".join(sys.argv), "run": DDP_RUN + args.override, "summary": rows,
               "trials": trials}  # fmt: skip
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n")
    lines = [
        "| signal | trials | ok | hung | process left | ranks disagree | last.ckpt behind | exit codes | exit s (median, max) |",
        "|---|---|---|---|---|---|---|---|---|",
        *(
            f"| {r['signal']} | {r['trials']} | {r['ok']} | {r['hung']} | {r['leftover']} | {r['ranks_disagree']} | "
            f"{r['ckpt_behind']} | {', '.join(map(str, r['returncodes']))} | {r['exit_s_median']}, {r['exit_s_max']} |"
            for r in rows
        ),
    ]
    caption = (
        f"2 CPU DDP processes (gloo), signal sent to the whole process group at U(0, {args.max_delay_s}) s after step "
        f"5; hung = still running after {args.timeout_s:.0f} s. `{' '.join(sys.argv)}`"
    )
    (OUT / f"{name}.md").write_text("\n".join([f"# {name}", "", f"{machine_line(m)} {caption}", "", *lines]) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
