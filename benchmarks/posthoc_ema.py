"""Issue 31's measurement: the test bound and the classifier FID of a run's EMA rebuilt at several widths (post-hoc
EMA) against the run's own fixed EMA, at one training step.

    python benchmarks/posthoc_ema.py --run <run dir trained with callbacks=posthoc_ema> --step 3000 \
        --fixed <run>/checkpoints/step_0003000.ckpt --label default-3k

For each target (each ``--sigma-rel``, and ``--decay``, the fixed EMA's own profile rebuilt from the snapshots) the
post-hoc job writes a checkpoint; each checkpoint and the fixed one get the exact T-step bound on the whole test split
(``src/eval.py``, in bits/dim with its standard error) and the classifier FID of ``--num-samples`` DDIM-50 samples from
each of ``--seeds`` seeds (the same x_T for every checkpoint). Writes benchmarks/posthoc_ema/<label>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import machine  # noqa: E402  (benchmarks/run.py: machine description)


def test_bound(ckpt: Path) -> dict:
    """The exact T-step bound on the test split by ``src/eval.py`` (its metrics.json), FID off."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "src" / "eval.py"), f"ckpt_path={ckpt}", "fid.num_samples=0", "wandb.enabled=false"],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"eval of {ckpt} failed:\n{result.stderr[-3000:]}")
    metrics = json.loads((ckpt.parent.parent / "eval" / f"{ckpt.stem}-trained" / "metrics.json").read_text())
    return {"bpd": metrics["bpd"], "bpd_se": metrics["bpd_se"], "num_examples": metrics["num_examples"]}


def fids(ckpt: Path, num_samples: int, seeds: int, cache_dir: str) -> list[float]:
    from diffusion_elbo.checkpoints import load_for_eval
    from diffusion_elbo.core.samplers import DDIMSampler
    from diffusion_elbo.fid import make_fid
    from diffusion_elbo.lightning.callbacks import compute_fid

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = load_for_eval(ckpt, device)
    fid = make_fid(run.datamodule, cache_dir=cache_dir, device=device)
    sampler = DDIMSampler(steps=50, spacing=OmegaConf.select(OmegaConf.create(run.config), "sampler.spacing") or "time")
    return [
        compute_fid(
            run.module, fid, num_samples=num_samples, rank=0, world_size=1, sampler=sampler, batch_size=500, seed=seed
        )
        for seed in range(seeds)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--step", type=int, required=True)
    parser.add_argument("--fixed", required=True, help="the run's checkpoint at --step (its fixed EMA)")
    parser.add_argument("--label", required=True)
    parser.add_argument("--sigma-rel", type=float, nargs="+", default=[0.03, 0.05, 0.08, 0.1, 0.12, 0.16, 0.2])
    parser.add_argument("--decay", type=float, default=0.999)
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--cache-dir", default=str(ROOT / "data" / "cache"))
    args = parser.parse_args()

    from diffusion_elbo.posthoc import run_posthoc_ema

    out_dir = ROOT / "benchmarks" / "posthoc_ema"
    out_dir.mkdir(parents=True, exist_ok=True)
    job = out_dir / f".{args.label}-job"
    cfg = OmegaConf.create({"run_dir": args.run, "sigma_rel": args.sigma_rel, "decay": args.decay, "step": args.step})
    written = run_posthoc_ema(cfg, str(job))
    fits = json.loads((job / "reconstruction.json").read_text())
    rows = []
    for name, ckpt in [("fixed EMA", Path(args.fixed)), *((p.stem, p) for p in written)]:
        target = name.removeprefix("posthoc_").split("_step_")[0]
        row = {"checkpoint": name, "residual": fits.get(target, {}).get("residual"), **test_bound(ckpt)}
        row["fids"] = fids(ckpt, args.num_samples, args.seeds, args.cache_dir)
        row["fid"], row["fid_sd"] = statistics.mean(row["fids"]), statistics.stdev(row["fids"])
        rows.append(row)
        print(json.dumps(row), flush=True)
        (out_dir / f"{args.label}.json").write_text(
            json.dumps({"machine": machine(), "run": args.run, "step": args.step, "rows": rows}, indent=1) + "\n"
        )


if __name__ == "__main__":
    main()
