"""The probability-flow ODE likelihood beside the bound, through the ``src/eval.py`` path (``likelihood=both``).

    python benchmarks/ode_likelihood.py oracle
    python benchmarks/ode_likelihood.py checkpoints --table digits10k --ckpt fixed-10k=<ckpt> [--ckpt ...] [--render-only]
        [--variances small analytic]

``oracle``: the Bayes-optimal models, whose likelihood is known: Gaussian data (mean 0.5, std 0.8, 16 dims, 1000 test
points) at linear and cosine T = 1000, where the ODE must give the true NLL; and i.i.d. 17-level data (``discrete_toy``,
16 dims, 1000 points), where it gives a dequantization bound on the discrete NLL (uniform and truncated-normal). ``checkpoints``: each
checkpoint's test -ELBO under its variances (small, analytic, and learned_range where trained) and the ODE's bits/dim on
the same examples, with NFE and time per example. Each writes ``benchmarks/ode/<table>.json`` and ``.md``; every row's
metrics.json and per_example.csv (columns bpd, ode_bpd) are kept under ``benchmarks/ode/<table>/<row>/``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "ode"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bounds import evaluate  # noqa: E402  (benchmarks/bounds.py: one src/eval.py run, its files kept)
from run import machine, machine_line  # noqa: E402

KEYS = (
    "bpd",
    "bpd_se",
    "true_nll_bpd",
    "gap_bpd",
    "gap_bpd_se",
    "ode_bpd",
    "ode_bpd_se",
    "ode_gap_bpd",
    "ode_gap_bpd_se",
    "elbo_minus_ode_bpd",
    "elbo_minus_ode_bpd_se",
    "ode_nfe",
    "ode_seconds_per_example",
    "ode_t_start",
    "ode_dequantization",
    "num_examples",
)


def _row(label: str, m: dict, **extra) -> dict:
    return {"row": label, **extra, **{k: m[k] for k in KEYS if k in m}}


def oracle_table() -> None:
    rows = []
    for name in ("linear", "cosine"):
        overrides = ["data=gaussian", "model=gaussian_oracle", f"schedule={name}", "schedule.timesteps=1000",
                     "data.mean=0.5", "data.std=0.8", "likelihood=both"]  # fmt: skip
        label = f"gaussian-{name}-1000"
        rows.append(_row(label, evaluate(overrides, OUT / "oracle" / label), data="gaussian", schedule=name))
    for name in ("linear", "cosine"):
        for deq in ("uniform", "truncated_normal"):
            overrides = ["data=discrete_toy", "model=discrete_oracle", f"schedule={name}", "schedule.timesteps=1000",
                         "likelihood=both", "likelihood.ode.dequantization_samples=4", f"likelihood.ode.dequantization={deq}"]  # fmt: skip
            label = f"discrete17-{name}-1000-{deq}"
            m = evaluate(overrides, OUT / "oracle" / label)
            rows.append(_row(label, m, data="discrete_toy K=17", schedule=name))
    header = (
        "| data | schedule | true NLL | -ELBO - true NLL | ODE - true NLL | dequantization | NFE | s / example |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- |\n"
    )
    lines = [
        f"| {r['data']} | {r['schedule']} T = 1000 | {r['true_nll_bpd']:.4f} | {r['gap_bpd']:+.4f} ± {r['gap_bpd_se']:.4f} "
        f"| {r['ode_gap_bpd']:+.5f} ± {r['ode_gap_bpd_se']:.5f} | {r['ode_dequantization']} "
        f"| {r['ode_nfe']:.0f} | {r['ode_seconds_per_example']:.4f} |"
        for r in rows
    ]
    _write("oracle", rows, header + "\n".join(lines), "Bayes-optimal models, 1000 test points, bits/dim (paired).")


def checkpoints_table(
    table: str, ckpts: list[str], render_only: bool = False, variances: tuple[str, ...] = ("small", "analytic")
) -> None:
    """``render_only``: the table from the kept metrics.json files of an earlier run, nothing re-evaluated (a row
    whose kept metrics.json has the same command is never re-evaluated);
    ``variances``: the reverse variances whose bound is shown (learned_range is added where the model learned it)."""
    rows = []
    for spec in ckpts:
        label, path = spec.split("=", 1)
        from diffusion_elbo.checkpoints import read_checkpoint

        trained = read_checkpoint(path)["diffusion_elbo_config"].get("variance", "small")
        shown_variances = list(dict.fromkeys([*variances] + (["learned_range"] if trained == "learned_range" else [])))
        runs = [
            # the ODE (which does not depend on the variance) once per checkpoint, beside its first bound
            (variance, variance, ["both" if i == 0 else "elbo"])
            for i, variance in enumerate(shown_variances)
        ]
        # and again under the tighter truncated-normal dequantization (the ELBO does not change)
        runs.append(("ode-truncated_normal", "(ODE, truncated-normal)", ["ode", "truncated_normal"]))
        for name, shown, how in runs:
            keep = OUT / table / f"{label}-{name}"
            overrides = [f"ckpt_path={path}", f"likelihood={how[0]}", "fid.num_samples=0"]
            overrides += [f"variance={name}"] if how[0] != "ode" else [f"likelihood.ode.dequantization={how[1]}"]
            kept = json.loads((keep / "metrics.json").read_text()) if (keep / "metrics.json").is_file() else {}
            if render_only or kept.get("command") == "python src/eval.py " + " ".join(overrides):
                m = kept  # this row was evaluated with these overrides before: not again
            else:
                m = evaluate(overrides, keep)
            rows.append(_row(f"{label}-{name}", m, model=label, variance=shown))
    header = "| model | variance | test -ELBO (bpd) | ODE (bpd) | -ELBO - ODE (paired) | NFE | s / example |\n"
    header += "| --- | --- | --- | --- | --- | --- | --- |\n"
    lines = []
    for r in rows:
        ode = f"{r['ode_bpd']:.3f} ± {r['ode_bpd_se']:.3f}" if "ode_bpd" in r else ""
        paired = (
            f"{r['elbo_minus_ode_bpd']:+.3f} ± {r['elbo_minus_ode_bpd_se']:.3f}" if "elbo_minus_ode_bpd" in r else ""
        )
        nfe = f"{r['ode_nfe']:.0f}" if "ode_nfe" in r else ""
        sec = f"{r['ode_seconds_per_example']:.3f}" if "ode_seconds_per_example" in r else ""
        bound = f"{r['bpd']:.3f} ± {r['bpd_se']:.3f}" if "bpd" in r else ""
        lines.append(f"| {r['model']} | {r['variance']} | {bound} | {ode} | {paired} | {nfe} | {sec} |")
    note = (
        "Test split; the ODE's number for K-level data is a dequantization bound on the discrete NLL (uniform unless "
        "the row says truncated-normal) "
        f"(start time t0 = {rows[0].get('ode_t_start', float('nan')):.2f}, dopri5, rtol = atol = 1e-5, 1 Rademacher probe)."
    )
    _write(table, rows, header + "\n".join(lines), note)


def _write(name: str, rows: list[dict], table: str, note: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1) + "\n")
    (OUT / f"{name}.md").write_text(f"# {name}\n\n{machine_line(machine())} {note}\n\n{table}\n")
    print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("oracle")
    c = sub.add_parser("checkpoints")
    c.add_argument("--table", required=True)
    c.add_argument("--ckpt", action="append", required=True, help="label=path/to.ckpt")
    c.add_argument("--render-only", action="store_true", help="remake the table from the kept metrics.json files")
    c.add_argument(
        "--variances",
        nargs="+",
        default=["small", "analytic"],
        choices=["small", "large", "analytic", "learned_range"],
        help="the reverse variances to bound with (--render-only: the ones the table was made with)",
    )
    args = parser.parse_args()
    if args.command == "oracle":
        oracle_table()
    else:
        checkpoints_table(args.table, args.ckpt, args.render_only, tuple(args.variances))


if __name__ == "__main__":
    main()
