"""The bits/dim tables of docs/results.md, each row evaluated through the ``src/eval.py`` path and its metrics.json kept
under ``benchmarks/bounds/<table>/<row>/`` (the per-t profile left out; per_example.csv kept so paired differences
can be recomputed with ``diffusion_elbo.evaluation.paired_difference``).

    python benchmarks/bounds.py gaussian
    python benchmarks/bounds.py checkpoints --table digits --ckpt fixed-2k=<ckpt> --ckpt learned-2k=<ckpt> ...

``gaussian``: the Gaussian oracle (mean 0.5, std 0.8, 16 dims, 1000 test points, ``small``) at linear/cosine,
T = 100/1000, with the closed-form expectation. ``checkpoints``: each checkpoint under every reverse variance it
supports (small, large, analytic, and learned_range where trained), with paired differences against the first
checkpoint's analytic row. Each writes ``benchmarks/bounds/<table>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "bounds"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import machine, machine_line  # noqa: E402  (benchmarks/run.py: the machine description)


def evaluate(overrides: list[str], keep: Path | None = None) -> dict:
    """metrics.json of ``src/eval.py <overrides>``, composed and run in this process; with ``keep``, metrics.json
    (without the per-t profile) and per_example.csv are copied there."""
    from hydra import compose, initialize_config_dir

    from diffusion_elbo.evaluation import run_eval, write_metrics

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("eval", overrides=overrides)
    with tempfile.TemporaryDirectory() as out:
        metrics = run_eval(cfg, out)
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            small = {k: v for k, v in metrics.items() if k != "per_t_nats_per_dim"}
            small["command"] = "python src/eval.py " + " ".join(overrides)
            write_metrics(small, keep)
            shutil.copy(Path(out) / "per_example.csv", keep / "per_example.csv")
    return metrics


def gaussian_table() -> None:
    from diffusion_elbo.core import make_schedule
    from diffusion_elbo.core.gaussian_data import oracle_expected_terms

    rows = []
    from diffusion_elbo.core.analytic import oracle_analytic_variance_table

    grid = [(n, T, d, "small") for d in ("clipped", "beta") for n in ("linear", "cosine") for T in (100, 1000)]
    grid += [(n, 1000, "clipped", "analytic") for n in ("linear", "cosine")]  # sigma_1 is e_1 there: no convention
    for name, T, decoder, variance in grid:
        overrides = [
            "data=gaussian",
            "model=gaussian_oracle",
            f"schedule={name}",
            f"schedule.timesteps={T}",
            "data.mean=0.5",
            "data.std=0.8",
            f"decoder_variance={decoder}",
            f"variance={variance}",
        ]
        label = f"{name}-{T}-{decoder}" if variance == "small" else f"{name}-{T}-{variance}"
        m = evaluate(overrides, OUT / "gaussian" / label)
        s = make_schedule(name, T)
        table = oracle_analytic_variance_table(s, 0.8) if variance == "analytic" else variance
        closed = oracle_expected_terms(s, 0.5, std=0.8, variance=table, decoder_variance=decoder)
        rows.append(
            {
                "schedule": name,
                "T": T,
                "variance": variance,
                "decoder_variance": decoder if variance == "small" else "",
                **{k: m[k] for k in ("bpd", "bpd_se", "true_nll_bpd", "gap_bpd", "gap_bpd_se")},
                "closed_bpd": closed.total / math.log(2),
                "closed_true_nll_bpd": closed.true_nll / math.log(2),
            }
        )
    lines = [
        "| schedule | T | variance | decoder_variance | -ELBO (bpd) | true NLL (bpd) | gap |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *(
            f"| {r['schedule']} | {r['T']} | {r['variance']} | {r['decoder_variance']} | {r['bpd']:.3f} ± {r['bpd_se']:.3f} [{r['closed_bpd']:.3f}] | "
            f"{r['true_nll_bpd']:.3f} [{r['closed_true_nll_bpd']:.3f}] | {r['gap_bpd']:.3f} ± {r['gap_bpd_se']:.3f} "
            f"[{r['closed_bpd'] - r['closed_true_nll_bpd']:.3f}] |"
            for r in rows
        ),
    ]
    _write("gaussian", rows, lines, "Gaussian oracle; closed-form expectations in brackets.")


def checkpoint_table(
    table: str,
    checkpoints: list[tuple[str, str]],
    fid_samples: int,
    decoder_variance: str | None = None,
    *,
    reuse: tuple[str, ...] = (),
) -> None:
    """Every checkpoint's rows; the models named in ``reuse`` keep their rows (and kept per_example.csv) from the
    table's existing JSON, so one model can be re-measured when another's checkpoint is no longer at hand."""
    from diffusion_elbo.checkpoints import read_checkpoint

    rows = []
    if reuse:
        kept = json.loads((OUT / f"{table}.json").read_text())["rows"]
        for label in reuse:
            mine = [r for r in kept if r["model"] == label]
            if not mine:
                raise SystemExit(f"--reuse {label}: no rows of that model in {OUT / table}.json")
            for r in mine:  # the paired columns are recomputed below
                rows.append({k: v for k, v in r.items() if not k.startswith(("paired", "vs_own"))})
    for label, ckpt in checkpoints:
        learned = read_checkpoint(ckpt)["diffusion_elbo_config"].get("variance") == "learned_range"
        for variance in ("small", "large", "analytic", *(["learned_range"] if learned else [])):
            fid = fid_samples if variance == "small" else 0  # DDIM samples do not depend on the reverse variance
            overrides = [f"ckpt_path={ckpt}", f"variance={variance}", f"fid.num_samples={fid}"]
            if decoder_variance is not None:
                overrides.append(f"decoder_variance={decoder_variance}")
            m = evaluate(overrides, OUT / table / f"{label}-{variance}")
            row = {"model": label, "variance": variance, "bpd": m["bpd"], "bpd_se": m["bpd_se"]}
            row["terms_nats_per_dim"] = m["terms_nats_per_dim"]
            if "fid" in m:
                row["fid"], row["fid_classifier_accuracy"] = m["fid"], m["fid_classifier_accuracy"]
            rows.append(row)
    pair_rows(table, rows)
    lines = [
        "| model | variance | test -ELBO (bpd) | paired vs | difference (bpd) | FID |",
        "| --- | --- | --- | --- | --- | --- |",
        *(
            f"| {r['model']} | {r['variance']} | {r['bpd']:.3f} ± {r['bpd_se']:.3f} | {r.get('paired_vs', '')} | "
            + (f"{r['paired_diff_bpd']:+.3f} ± {r['paired_diff_se']:.3f}" if "paired_diff_bpd" in r else "")
            + f" | {r['fid']:.2f} |"
            if "fid" in r
            else f"| {r['model']} | {r['variance']} | {r['bpd']:.3f} ± {r['bpd_se']:.3f} | {r.get('paired_vs', '')} | "
            + (f"{r['paired_diff_bpd']:+.3f} ± {r['paired_diff_se']:.3f}" if "paired_diff_bpd" in r else "")
            + " | |"
            for r in rows
        ),
    ]
    _write(table, rows, lines, "Exact test-set -ELBO, all T terms; paired differences over the same examples.")


def pair_rows(table: str, rows: list[dict]) -> None:
    """Paired differences from the rows' per_example.csv: every row against the analytic row of the first
    checkpoint with the same training length (label suffix), and learned_range rows also against their own model's
    analytic row (the learned variance against the best t-only variance for the same mean)."""
    from diffusion_elbo.evaluation import paired_difference

    def csv(row: dict, variance: str | None = None) -> Path:
        return OUT / table / f"{row['model']}-{variance or row['variance']}" / "per_example.csv"

    for row in rows:
        suffix = row["model"].rsplit("-", 1)[-1]
        reference = next((r for r in rows if r["model"].endswith(suffix) and r["variance"] == "analytic"), None)
        if reference is not None and reference is not row:
            row["paired_vs"] = f"{reference['model']}-analytic"
            row["paired_diff_bpd"], row["paired_diff_se"] = paired_difference(csv(row), csv(reference))
        if row["variance"] == "learned_range":
            row["vs_own_analytic_bpd"], row["vs_own_analytic_se"] = paired_difference(csv(row), csv(row, "analytic"))


def _write(table: str, rows: list[dict], lines: list[str], caption: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    m = machine()
    (OUT / f"{table}.json").write_text(json.dumps({"machine": m, "rows": rows}, indent=1) + "\n")
    (OUT / f"{table}.md").write_text("\n".join([f"# {table}", "", f"{machine_line(m)} {caption}", "", *lines]) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("gaussian")
    ckpts = sub.add_parser("checkpoints")
    ckpts.add_argument("--table", required=True)
    ckpts.add_argument("--ckpt", action="append", required=True, help="label=path; labels end in -<steps>")
    ckpts.add_argument("--fid-samples", type=int, default=2000)
    ckpts.add_argument("--decoder-variance", default=None, help="clipped | beta (default: each checkpoint's own)")
    ckpts.add_argument(
        "--reuse", action="append", default=[], help="a model label whose rows are kept from the existing table"
    )
    args = parser.parse_args()
    if args.command == "gaussian":
        gaussian_table()
    else:
        checkpoints = [tuple(c.split("=", 1)) for c in args.ckpt]
        checkpoint_table(args.table, checkpoints, args.fid_samples, args.decoder_variance, reuse=tuple(args.reuse))


if __name__ == "__main__":
    main()
