"""The discrete-data oracle table: exact -ELBO of the Bayes-optimal denoiser on i.i.d. K-level data against the true
NLL, for K = 17 and 256, linear and cosine schedules, T = 100 and 1000, under the small, large and analytic reverse
variances. Each row is what

    python src/eval.py data=discrete_toy model=discrete_oracle data.num_bins=K schedule=S schedule.timesteps=T \
        variance=V num_examples=N

writes to metrics.json (the per-t profile left out). Writes benchmarks/DISCRETE_ORACLE.json and .md.

    python benchmarks/discrete_oracle.py [--num-examples 500]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bounds import evaluate  # noqa: E402  (benchmarks/bounds.py: one src/eval.py run in this process)
from run import machine, machine_line  # noqa: E402  (benchmarks/run.py: the machine description)

KEYS = ("bpd", "bpd_se", "true_nll_bpd", "true_nll_bpd_se", "gap_bpd", "gap_bpd_se", "terms_nats_per_dim")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-examples", type=int, default=500)
    parser.add_argument("--levels", type=int, nargs="+", default=[17, 256])
    parser.add_argument("--timesteps", type=int, nargs="+", default=[100, 1000])
    parser.add_argument(
        "--variances", nargs="+", default=["small", "large", "analytic"], help="rows to (re)measure; others are kept"
    )
    args = parser.parse_args()
    out = Path(__file__).with_name("DISCRETE_ORACLE.json")
    rows = {}  # (K, schedule, T, variance) -> row; rows not re-measured are kept from the last run
    if out.is_file():
        rows = {(r["K"], r["schedule"], r["T"], r["variance"]): r for r in json.loads(out.read_text())["rows"]}
    for k in args.levels:
        for schedule in ("linear", "cosine"):
            for T in args.timesteps:
                for variance in args.variances:
                    overrides = [
                        "data=discrete_toy",
                        "model=discrete_oracle",
                        f"data.num_bins={k}",
                        f"schedule={schedule}",
                        f"schedule.timesteps={T}",
                        f"variance={variance}",
                        f"num_examples={args.num_examples}",
                    ]
                    start = time.perf_counter()
                    m = evaluate(overrides)
                    row = {"K": k, "schedule": schedule, "T": T, "variance": variance}
                    row["command"] = "python src/eval.py " + " ".join(overrides)
                    row.update({key: m[key] for key in KEYS})
                    row["seconds"] = round(time.perf_counter() - start, 1)
                    rows[(k, schedule, T, variance)] = row
                    print(f"K={k} {schedule} T={T} {variance}: gap {m['gap_bpd']:.4f} ± {m['gap_bpd_se']:.4f}")
    out.write_text(json.dumps({"machine": machine(), "rows": list(rows.values())}, indent=1) + "\n")
    lines = [
        "# Discrete-data oracle: exact -ELBO against the true NLL",
        "",
        f"{machine_line(machine())} i.i.d. K-level data (16 dims, `data.probs` null: the default bimodal distribution), "
        f"{args.num_examples} test points, the Bayes-optimal denoiser; -ELBO - NLL paired per example (bits/dim).",
        "",
        "| K | schedule | T | true NLL (bpd) | gap small | gap large | gap analytic | analytic closes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for k, schedule, T in sorted({key[:3] for key in rows}, key=lambda key: (key[0], key[1] != "linear", key[2])):
        small, large, analytic = (rows.get((k, schedule, T, v)) for v in ("small", "large", "analytic"))
        if None in (small, large, analytic):
            continue
        gaps = " | ".join(f"{r['gap_bpd']:.3f} ± {r['gap_bpd_se']:.3f}" for r in (small, large, analytic))
        closes = 1 - analytic["gap_bpd"] / small["gap_bpd"]
        lines.append(
            f"| {k} | {schedule} | {T} | {small['true_nll_bpd']:.3f} ± {small['true_nll_bpd_se']:.3f} | {gaps} | "
            f"{closes:.0%} of small's gap |"
        )
    Path(__file__).with_name("DISCRETE_ORACLE.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
