"""Issue 31's measurement: the test bound and the classifier FID of a run's EMA rebuilt at several widths (post-hoc
EMA) against the run's own fixed EMA, at one training step.

    python benchmarks/posthoc_ema.py --run <run dir trained with callbacks=posthoc_ema> --step 3000 --label default-3k

or, to choose a width on the val split by the bound alone (no FID) as of the run's last step, then measure it on test:

    python benchmarks/posthoc_ema.py --run <run> --label <name>-val --split val --num-samples 0
    python benchmarks/posthoc_ema.py --run <run> --label <name>-test --sigma-rel <the best> --seeds 1

``--decay 0.99 ...`` adds classic EMAs (the EMA callback's, with its warm-up) to the widths: the one setting to put in
a recipe's ``callbacks.ema.decay`` when a post-hoc choice wins.

It is the post-hoc job itself (``src/posthoc_ema.py`` with ``evaluate.enabled``): each ``--sigma-rel`` is rebuilt
from the snapshots as of ``--step`` (default: the last snapshot) into a checkpoint, and each of them and the run's own
``step_<N>.ckpt`` (``last.ckpt`` without ``--step``: its fixed EMA) get the exact T-step bound on the whole ``--split``
(test) and the classifier FID of ``--num-samples`` DDIM-50 samples
from each of ``--seeds`` seeds. Every checkpoint sees the same examples with the same noise and the same x_T per seed,
so each width is also given as a paired difference from the fixed EMA (bound: mean and standard error of the
per-example differences; FID: mean and sd of the per-seed differences). Writes benchmarks/posthoc_ema/<label>.json
and <label>.md. The job's folder (benchmarks/posthoc_ema/.<label>-job/) gets evaluation.json after each checkpoint:
``--report-only`` writes the result from it, e.g. of a run stopped part-way.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import machine  # noqa: E402  (benchmarks/run.py: machine description)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--step", type=int, help="rebuild as of this step (default: the run's last snapshot)")
    parser.add_argument("--split", choices=["val", "test"], default="test", help="where the bound is measured")
    parser.add_argument("--label", required=True)
    parser.add_argument("--sigma-rel", type=float, nargs="*", default=[0.03, 0.05, 0.08, 0.1, 0.14, 0.2])
    parser.add_argument("--decay", type=float, nargs="*", default=[], help="also classic EMA decays (with warm-up)")
    parser.add_argument("--num-samples", type=int, default=2000, help="FID samples per seed (0: no FID)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--cache-dir", default=str(ROOT / "data" / "cache"))
    parser.add_argument("--report-only", action="store_true", help="write the result from the job's folder as it is")
    args = parser.parse_args()
    # the job's progress (a line per checkpoint, the eval's every 30 s) in the terminal or log, as src/posthoc_ema.py
    # shows it: a table takes hours
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")

    from diffusion_elbo.posthoc import run_posthoc_ema

    out_dir = ROOT / "benchmarks" / "posthoc_ema"
    out_dir.mkdir(parents=True, exist_ok=True)
    job = out_dir / f".{args.label}-job"
    cfg = OmegaConf.create(
        {
            "run_dir": args.run,
            "sigma_rel": args.sigma_rel,
            "decay": args.decay or None,
            "step": args.step,
            "evaluate": {
                "enabled": True,
                "split": args.split,
                "num_examples": None,
                "fid_samples": args.num_samples,
                "fid_seeds": args.seeds,
                "seed": 0,
                "overrides": [f"fid.cache_dir={args.cache_dir}"],
            },
        }
    )
    if not args.report_only:
        run_posthoc_ema(cfg, str(job))
    fits = json.loads((job / "reconstruction.json").read_text())
    rows = json.loads((job / "evaluation.json").read_text())
    for label, row in rows.items():
        row["residual"] = fits.get(label, {}).get("residual")
    widths = {k: v for k, v in rows.items() if k != "run"}
    complete = sorted(rows) == sorted(["run", *fits])
    keys = ("bpd", "fid") if args.num_samples else ("bpd",)
    best = {  # of the widths asked for: none while the table is partial
        key: min(widths, key=lambda k, key=key: widths[k][key]) for key in keys if complete and widths
    }
    earlier = out_dir / f"{args.label}.json"
    result = {  # a report of an earlier evaluation keeps the machine (date, threads) that evaluated it
        "machine": json.loads(earlier.read_text())["machine"] if args.report_only and earlier.is_file() else machine(),
        "run": args.run,
        "step": args.step if args.step is not None else next(iter(fits.values()))["step"],
        "split": args.split,
        "fid": {"samples": args.num_samples, "seeds": args.seeds, "sampler": "DDIM-50"},
        "complete": complete,
        "rows": rows,
        "best": {
            key: {
                "checkpoint": label,
                "gain_over_fixed_ema": -rows[label][f"{key}_minus_run"],
                "spread": rows[label].get(f"{key}_minus_run_se" if key == "bpd" else f"{key}_minus_run_sd"),
            }
            for key, label in best.items()
            if f"{key}_minus_run" in rows[label]
        },
    }
    (out_dir / f"{args.label}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / f"{args.label}.md").write_text(table(result))
    print(table(result))


def table(result: dict) -> str:
    """The result as a markdown table: each checkpoint's bound and FID, and its paired difference from the fixed EMA."""
    fid, split = result["fid"], result.get("split", "test")
    with_fid = bool(fid["samples"])
    lines = [
        f"Step {result['step']} of `{result['run']}`: the exact bound on the {split} split (bits/dim ± SE)"
        + (
            f" and the classifier FID ({fid['sampler']}, {fid['samples']} samples, "
            + (f"mean ± sd over {fid['seeds']} seeds" if fid["seeds"] > 1 else "one sampling seed")
            + "); the differences are paired (the same examples and noise, the same x_T per seed)."
            if with_fid
            else "; the differences are paired (the same examples and noise)."
        ),
        *([] if result.get("complete", True) else ["", "**Partial**: the rows below are those evaluated so far."]),
        "",
        f"| EMA | fit residual | {split} bound | bound - fixed EMA |"
        + (" FID | FID - fixed EMA |" if with_fid else ""),
        "|---|---|---|---|" + ("---|---|" if with_fid else ""),
    ]
    for label, row in result["rows"].items():
        name = (
            "the run's fixed EMA"
            if label == "run"
            else label.replace("sigma_rel_", "sigma_rel ").replace("decay_", "decay ")
        )
        residual = "" if row.get("residual") is None else f"{100 * row['residual']:.1f}%"
        diff = "" if "bpd_minus_run" not in row else f"{row['bpd_minus_run']:+.4f} ± {row['bpd_minus_run_se']:.4f}"
        fid_value = (
            "" if "fid" not in row else f"{row['fid']:.3f}" + (f" ± {row['fid_sd']:.3f}" if "fid_sd" in row else "")
        )
        fid_diff = (
            ""
            if "fid_minus_run" not in row
            else f"{row['fid_minus_run']:+.3f}"
            + (f" ± {row['fid_minus_run_sd']:.3f}" if "fid_minus_run_sd" in row else "")
        )
        lines.append(
            f"| {name} | {residual} | {row['bpd']:.4f} ± {row['bpd_se']:.4f} | {diff} |"
            + (f" {fid_value} | {fid_diff} |" if with_fid else "")
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
