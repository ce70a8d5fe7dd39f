"""The default recipe at a short budget: sample quality of ``python src/train.py`` after a few thousand steps, and
what moves it (EMA length, learning rate, dropout, parametrization, schedule). Results go to
``benchmarks/short_run/<name>.{json,md}``.

    python benchmarks/short_run.py --name default_3k --steps 3000 --jobs 2 \\
        --variant default= --variant lr1e-3=optimizer.lr=1e-3 --variant ema0.995=callbacks.ema.decay=0.995

Each variant is ``label=override,override,...`` (empty: the default as a user runs it). Every (variant, seed) trains
with ``src/train.py`` in its own process (``--jobs`` at a time, ``OMP_NUM_THREADS=cores/jobs`` each, so runs in one
table get the same CPU share), then ``src/eval.py`` computes the classifier FID of its last checkpoint (EMA weights):
2000 DDIM-50 samples against the train split, as in ``benchmarks/vdm/fid.md``. The last validation bound
(``val/elbo_bpd``, the 180 val digits) is read from the run's CSV log. A finished (variant, seed) is kept in
``<out>/<name>/runs.json`` and not rerun while its command is unchanged.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean, stdev

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "short_run"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import machine, machine_line  # noqa: E402

WARM = """
import os
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from diffusion_elbo.fid import make_fid
with initialize_config_dir(config_dir=os.path.abspath("conf"), version_base="1.3"):
    cfg = compose("train", overrides=["logger=none"])
dm = instantiate(cfg.data)
dm.setup("fit")
make_fid(dm, cache_dir=cfg.paths.cache_dir)
"""


def _last_val(run_dir: Path) -> float | None:
    files = sorted(run_dir.glob("csv/version_*/metrics.csv"))
    if not files:
        return None
    value = None
    with files[-1].open() as f:
        for row in csv.DictReader(f):
            if row.get("val/elbo_bpd"):
                value = float(row["val/elbo_bpd"])
    return value


def _job(label: str, overrides: list[str], seed: int, steps: int, runs_dir: Path, threads: int) -> dict:
    run_dir = runs_dir / f"{label}-s{seed}"
    train = [
        sys.executable,
        "src/train.py",
        *overrides,
        f"seed={seed}",
        f"trainer.max_steps={steps}",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run(train, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    train_s = time.perf_counter() - start
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    evaluate = [
        sys.executable,
        "src/eval.py",
        f"ckpt_path='{ckpt}'",
        "num_examples=1",
        "fid.num_samples=2000",
        "wandb.enabled=false",
    ]
    subprocess.run(evaluate, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = json.loads(next((run_dir / "eval").glob("last-*/metrics.json")).read_text())
    return {
        "label": label,
        "seed": seed,
        "steps": steps,
        "overrides": overrides,
        "command": "python src/train.py " + " ".join(train[2:-1]),
        "train_minutes": train_s / 60,
        "threads": threads,
        "fid": metrics["fid"],
        "val_elbo_bpd": _last_val(run_dir),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True)
    p.add_argument("--variant", action="append", required=True, help="label=override,override,... (may be empty)")
    p.add_argument("--seeds", type=int, nargs="+", default=[42])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--runs-dir", default="outputs/short_run", help="where the training runs go (not committed)")
    p.add_argument("--caption", default="")
    args = p.parse_args()

    out = OUT / args.name
    out.mkdir(parents=True, exist_ok=True)
    kept_path = out / "runs.json"
    kept = json.loads(kept_path.read_text()) if kept_path.is_file() else []
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    runs_dir = (ROOT / args.runs_dir / args.name).resolve()

    variants = []
    for spec in args.variant:
        label, _, rest = spec.partition("=")
        variants.append((label, [o for o in rest.split(",") if o]))

    # the FID classifier and reference statistics are trained once, before the jobs race for them
    subprocess.run([sys.executable, "-c", WARM], cwd=ROOT, check=True)

    from concurrent.futures import ThreadPoolExecutor

    todo = []
    for label, overrides in variants:
        for seed in args.seeds:
            done = [r for r in kept if r["label"] == label and r["seed"] == seed and r["steps"] == args.steps]
            if done and done[0]["overrides"] == overrides:
                continue
            todo.append((label, overrides, seed))
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(_job, *t, args.steps, runs_dir, threads) for t in todo]
        for f in futures:
            row = f.result()
            kept = [r for r in kept if not (r["label"] == row["label"] and r["seed"] == row["seed"])] + [row]
            kept_path.write_text(json.dumps(kept, indent=1) + "\n")
            print(f"{row['label']} seed {row['seed']}: FID {row['fid']:.3f}, val {row['val_elbo_bpd']}", flush=True)

    order = [label for label, _ in variants]
    rows = sorted((r for r in kept if r["label"] in order), key=lambda r: (order.index(r["label"]), r["seed"]))
    lines = [
        "| variant | overrides | seeds | FID (2000 samples, DDIM 50) | val -ELBO (bits/dim) | train minutes |",
        "|---|---|---|---|---|---|",
    ]
    for label, overrides in variants:
        mine = [r for r in rows if r["label"] == label]
        if not mine:
            continue
        fids = [r["fid"] for r in mine]
        fid = f"{mean(fids):.3f}" + (f" ± {stdev(fids):.3f}" if len(fids) > 1 else "")
        per_seed = ", ".join(f"{v:.3f}" for v in fids)
        vals = [r["val_elbo_bpd"] for r in mine if r["val_elbo_bpd"] is not None]
        lines.append(
            f"| {label} | `{' '.join(overrides) or '(none)'}` | {len(mine)} | {fid} ({per_seed}) | "
            f"{f'{mean(vals):.3f}' if vals else '-'} | {mean(r['train_minutes'] for r in mine):.1f} |"
        )
    m = machine()
    (out / "table.json").write_text(json.dumps({"machine": m, "steps": args.steps, "rows": rows}, indent=1) + "\n")
    caption = (
        f"{args.steps} training steps, batch 128, each run on {threads} thread(s) with {args.jobs} at a time. "
        "FID: classifier features, 2000 DDIM-50 samples of the EMA weights against the train split (lower is "
        "better; ± is the std over seeds). " + args.caption
    )
    (out / "table.md").write_text("\n".join([f"# {args.name}", "", f"{machine_line(m)} {caption}", "", *lines]) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
