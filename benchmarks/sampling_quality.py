"""Sample quality against the number of sampling steps under each reverse variance (issue 8's table).

    python benchmarks/sampling_quality.py --ckpt fixed=outputs/.../last.ckpt --ckpt learned=outputs/.../last.ckpt \
        --seed-spread 4

For every checkpoint: ancestral sampling on respaced chains under ``small``, ``large``, ``analytic`` (and
``learned_range`` when the model learned its variance), and DDIM with eta = 0, deterministic and with the analytic
variance's noise (Analytic-DDIM), at each of ``--steps``. Every cell is the classifier FID of ``--num-samples``
samples against the training split, drawn from the same seed (the same x_T for every cell, so differences between
cells are not sampling noise in x_T), with the time per sample. "capped x_1 noise" rows cap the noise of the step
that produces x_1 at half a grey level (``sampler.cap_final_noise``). Writes benchmarks/SAMPLING.md and .json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import machine, machine_line, sync  # noqa: E402  (benchmarks/run.py: machine description, device sync)


def cells(learns_variance: bool) -> list[tuple[type, str, bool, str]]:
    """(sampler class, variance, cap_final_noise, label) rows of one checkpoint's table. ``small`` adds noise of
    sqrt(beta_1) = 0.01 at the step to x_1 at any step count, below the cap, so it has no capped row."""
    from diffusion_elbo.core.samplers import AncestralSampler, DDIMSampler

    variances = ["large", "analytic"] + (["learned_range"] if learns_variance else [])
    rows = [(AncestralSampler, "small", False, "ancestral")]
    for variance in variances:
        rows += [
            (AncestralSampler, variance, False, "ancestral"),
            (AncestralSampler, variance, True, "ancestral, capped x_1 noise"),
        ]
    rows += [
        (DDIMSampler, "none", False, "DDIM eta=0"),
        (DDIMSampler, "analytic", False, "Analytic-DDIM eta=0"),
        (DDIMSampler, "analytic", True, "Analytic-DDIM eta=0, capped x_1 noise"),
    ]
    return rows


def measure(label: str, ckpt: str, steps: list[int], num_samples: int, analytic_examples: int, cache_dir: str) -> dict:
    from diffusion_elbo.checkpoints import load_for_eval
    from diffusion_elbo.core.reverse import learns_variance
    from diffusion_elbo.fid import compute_fid, make_fid
    from diffusion_elbo.sampling import sampling_analytic_table

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = load_for_eval(ckpt, device)
    fid = make_fid(run.datamodule, cache_dir=cache_dir, device=device)
    cfg = {"ckpt_path": ckpt, "seed": 0, "analytic": {"num_examples": analytic_examples}, "batch_size": 256}
    table = sampling_analytic_table(OmegaConf.create({**cfg, "max_batch": 512}), run, device)  # as src/sample.py
    out = {
        "label": label,
        "ckpt": ckpt,
        "global_step": run.global_step,
        "trained_variance": run.variance.value,
        "loss": run.module.objective.name,
        "classifier_accuracy": fid.classifier_accuracy,
        "rows": [],
    }
    for sampler, variance, cap, kind in cells(learns_variance(run.variance)):
        row = {"sampler": kind, "variance": variance, "cap_final_noise": cap, "fid": {}, "ms_per_sample": {}}
        for n in steps:
            chosen = table if variance == "analytic" else (None if variance == "none" else variance)
            sync(device)
            start = time.perf_counter()
            value = compute_fid(
                run.module, fid, num_samples=num_samples, rank=0, world_size=1, sampler=sampler(steps=n, cap_final_noise=cap), batch_size=500,
                seed=0, variance=chosen,
            )  # fmt: skip
            sync(device)
            row["fid"][n] = value
            row["ms_per_sample"][n] = 1e3 * (time.perf_counter() - start) / num_samples
            print(f"{label} | {kind} | {variance} | {n} steps: FID {value:.3f}", flush=True)
        out["rows"].append(row)
    return out


def seed_spread(ckpt: str, steps: int, num_samples: int, seeds: int, cache_dir: str) -> dict:
    """The FID noise floor: DDIM eta=0 at ``steps`` from seeds 0..seeds-1 (other x_T, same model). Differences
    between cells of one table are smaller than this spread suggests (they share x_T), but not much smaller."""
    from diffusion_elbo.checkpoints import load_for_eval
    from diffusion_elbo.core.samplers import DDIMSampler
    from diffusion_elbo.fid import compute_fid, make_fid

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = load_for_eval(ckpt, device)
    fid = make_fid(run.datamodule, cache_dir=cache_dir, device=device)
    fids = [
        compute_fid(
            run.module,
            fid,
            num_samples=num_samples,
            rank=0,
            world_size=1,
            sampler=DDIMSampler(steps=steps),
            batch_size=500,
            seed=seed,
        )
        for seed in range(seeds)
    ]
    print(
        f"{ckpt}: DDIM eta=0, {steps} steps over {seeds} seeds: {statistics.mean(fids):.3f} ± {statistics.stdev(fids):.3f}"
    )
    return {"sampler": "DDIM eta=0", "steps": steps, "fids": fids, "sd": statistics.stdev(fids)}


def write(results: dict, path: Path) -> None:
    m = results["machine"]
    lines = [
        "# Sample quality against sampling steps, under each reverse variance",
        "",
        machine_line(m) + " "
        f"Classifier FID of {results['num_samples']} samples against the training split (lower is better); every "
        "cell starts from the same x_T. `python benchmarks/sampling_quality.py` "
        + " ".join(f"--ckpt {c['label']}=..." for c in results["checkpoints"]),
        "",
    ]
    for c in results["checkpoints"]:
        lines += [
            f"## {c['label']}: trained with loss={c['loss']}, variance={c['trained_variance']}, "
            f"step {c['global_step']} (feature classifier test accuracy {c['classifier_accuracy']:.4f})",
            "",
            "| sampler | variance | " + " | ".join(f"{n} steps" for n in results["steps"]) + " |",
            "|---|---|" + "---|" * len(results["steps"]),
        ]
        for row in c["rows"]:
            fids = " | ".join(f"{row['fid'][n]:.2f}" for n in results["steps"])
            lines.append(f"| {row['sampler']} | {row['variance']} | {fids} |")
        times = c["rows"][0]["ms_per_sample"]
        lines += ["", "Time per sample: " + ", ".join(f"{n} steps {times[n]:.1f} ms" for n in results["steps"]), ""]
        if c.get("seed_spread"):
            sp = c["seed_spread"]
            lines += [
                f"FID noise: {sp['sampler']} at {sp['steps']} steps from {len(sp['fids'])} seeds (other x_T): "
                + ", ".join(f"{v:.2f}" for v in sp["fids"])
                + f" (sd {sp['sd']:.2f})",
                "",
            ]
    path.write_text("\n".join(lines))
    path.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", action="append", required=True, help="label=path of a trained digits checkpoint")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--analytic-examples", type=int, default=256)
    parser.add_argument("--cache-dir", default=str(ROOT / "data" / "cache"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "SAMPLING.md"))
    parser.add_argument("--append", action="store_true", help="keep the checkpoints already in --out's .json")
    parser.add_argument("--seed-spread", type=int, default=0, help="FID noise: DDIM at max steps over N seeds")
    parser.add_argument("--spread-only", action="store_true", help="with --append: add only the seed spread")
    args = parser.parse_args()
    results = {"machine": machine(), "num_samples": args.num_samples, "steps": args.steps, "checkpoints": []}
    previous = Path(args.out).with_suffix(".json")
    if args.append and previous.is_file():
        kept = json.loads(previous.read_text())
        if kept["num_samples"] != args.num_samples or kept["steps"] != args.steps:
            parser.error(f"--append: {previous} used other --num-samples/--steps; rerun without --append")
        for c in kept["checkpoints"]:  # JSON keys are strings: back to step counts
            for row in c["rows"]:
                row["fid"] = {int(k): v for k, v in row["fid"].items()}
                row["ms_per_sample"] = {int(k): v for k, v in row["ms_per_sample"].items()}
        results["checkpoints"] = kept["checkpoints"]
    for spec in args.ckpt:
        label, _, path = spec.partition("=")
        if not path:
            parser.error(f"--ckpt {spec!r}: write it as label=path")
        if args.spread_only:
            (entry,) = [c for c in results["checkpoints"] if c["label"] == label] or [None]
            if entry is None or args.seed_spread < 2:
                parser.error(f"--spread-only needs --append, --seed-spread >= 2 and {label!r} already in {previous}")
            entry["seed_spread"] = seed_spread(
                path, max(args.steps), args.num_samples, args.seed_spread, args.cache_dir
            )
            write(results, Path(args.out))
            continue
        results["checkpoints"] = [c for c in results["checkpoints"] if c["label"] != label]
        entry = measure(label, path, args.steps, args.num_samples, args.analytic_examples, args.cache_dir)
        results["checkpoints"].append(entry)
        if args.seed_spread >= 2:
            entry["seed_spread"] = seed_spread(
                path, max(args.steps), args.num_samples, args.seed_spread, args.cache_dir
            )
        write(results, Path(args.out))  # after each checkpoint, so a long run leaves its finished part
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
