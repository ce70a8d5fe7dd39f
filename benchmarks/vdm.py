"""Continuous-time diffusion (VDM) results of docs/continuous.md, written to ``benchmarks/vdm/<name>.{json,md}``.

    python benchmarks/vdm.py oracle
    python benchmarks/vdm.py curve --run default=<run dir> --run vdm=<run dir> ... [--steps 2000 4000 ...]
    python benchmarks/vdm.py variance --ckpt <continuous checkpoint>
    python benchmarks/vdm.py fid --ckpt default-2k=<ckpt> --ckpt vdm-2k=<ckpt> ...
    python benchmarks/vdm.py spacing --ckpt vdm-6k=<ckpt> ... [--grid 50:time 50:logsnr 200:time ...] [--append]

``oracle``: the Gaussian closed form of the continuous-time bound against Monte Carlo estimates for every schedule shape
with the same endpoints, and the T-step bound's closed form as T grows. ``curve``: test-split bound (and its three
terms) of each run's checkpoints against steps, through the ``src/eval.py`` path: the chain's exact T-step bound for
every model, and a continuous model's own bound beside it. ``variance``: the spread of the one-sample training
estimator of a trained continuous model under its learned schedule and under fixed shapes with the same endpoints
(the network, conditioned on the noise level, is unchanged; the expected bound is the same for all of them).
``spacing``: classifier FID of DDIM samples on timesteps evenly spaced in t or in log-SNR (``fid.sampler.spacing``), with how
many of the steps fall in the noisy half (log SNR < 0), where a sample's shape is decided.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "vdm"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import machine, machine_line  # noqa: E402


def _write(name: str, payload: dict, lines: list[str], caption: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    m = machine()
    (OUT / f"{name}.json").write_text(json.dumps({"machine": m, **payload}, indent=1) + "\n")
    (OUT / f"{name}.md").write_text("\n".join([f"# {name}", "", f"{machine_line(m)} {caption}", "", *lines]) + "\n")
    print("\n".join(lines))


def oracle() -> None:
    from diffusion_elbo.core.logsnr import CosineLogSNR, LearnedLogSNR, LinearLogSNR, alpha_sigma, float64_gamma
    from diffusion_elbo.core.vdm import continuous_terms, gaussian_continuous_terms, gaussian_oracle_x0

    mean, std, n, d, lo, hi = 0.5, 0.8, 20000, 16, -13.3, 5.0

    def model(z, gamma):
        x0 = gaussian_oracle_x0(z, gamma, mean, std)
        alpha, sigma = (v.view(-1, 1).to(z) for v in alpha_sigma(gamma.double()))
        return (z - alpha * x0) / sigma

    shaped = LearnedLogSNR(lo, hi, hidden=16, seed=3).double()
    with torch.no_grad():
        shaped.w3.fill_(2.0)
        shaped.w2.mul_(3.0)
    closed = gaussian_continuous_terms(mean, std, lo, hi)
    g = torch.Generator().manual_seed(0)
    x = mean + std * torch.randn(n, d, generator=g, dtype=torch.float64)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    eps = torch.randn(n, d, generator=g, dtype=torch.float64)
    rows, lines = (
        [],
        [
            f"Gaussian data N({mean}, {std}^2), {d} dims, {n} draws, the Bayes-optimal denoiser; gamma_min = {lo}, "
            f"gamma_max = {hi}. Closed form of the continuous-time bound: {closed['total']:.5f} nats/dim "
            f"(reconstruction {closed['reconstruction']:.5f}, prior {closed['prior']:.5f}, diffusion "
            f"{closed['diffusion']:.5f}).",
            "",
            "| schedule shape | Monte Carlo bound (nats/dim) | minus closed form | in SE | one-sample std (nats/dim) |",
            "|---|---|---|---|---|",
        ],
    )
    for name, schedule in (
        ("linear", LinearLogSNR(lo, hi)),
        ("cosine", CosineLogSNR(lo, hi)),
        ("learned net (reshaped)", shaped),
    ):
        with torch.no_grad():
            total = (
                continuous_terms(model, schedule, x0=x, u=u, eps=eps, parametrization="eps", num_bins=None).total / d
            )
        value, sd = float(total.mean()), float(total.std())
        se = sd / math.sqrt(n)
        rows.append({"shape": name, "bound": value, "se": se, "closed_form": closed["total"], "one_sample_std": sd})
        diff = value - closed["total"]
        lines.append(f"| {name} | {value:.4f} ± {se:.4f} | {diff:+.4f} | {diff / se:+.2f} | {sd:.3f} |")
    lines += ["", "T-step bound of the linear schedule in closed form, minus the continuous one (nats/dim):", ""]
    lines += ["| T | T-step bound | minus continuous |", "|---|---|---|"]
    for steps in (10, 100, 1000, 10000):
        gamma = float64_gamma(LinearLogSNR(lo, hi), torch.arange(steps + 1, dtype=torch.float64) / steps)
        snr = torch.exp(-gamma)
        mmse = std**2 / (1 + snr * std**2)
        value = float(0.5 * ((snr[:-1] - snr[1:]) * mmse[1:]).sum()) + closed["reconstruction"] + closed["prior"]
        rows.append({"timesteps": steps, "t_step_bound": value, "continuous": closed["total"]})
        lines.append(f"| {steps} | {value:.5f} | {value - closed['total']:+.5f} |")
    _write("oracle", {"rows": rows}, lines, "Closed forms and Monte Carlo estimates.")


def _curve_line(row: dict) -> str:
    terms = row["terms_bpd"]
    own = f"{row['continuous_bpd']:.3f} ± {row['continuous_bpd_se']:.3f}" if "continuous_bpd" in row else ""
    return (
        f"| {row['model']} | {row['step']} | {row['bpd']:.3f} ± {row['bpd_se']:.3f} | {terms['reconstruction']:.3f} | "
        f"{terms['prior']:.4f} | {terms['denoising']:.3f} | {own} |"
    )


def _same_command(stored: str | None, command: str) -> bool:
    """Whether a kept row was evaluated with ``command``: the same overrides, where ``continuous_strata=`` is the name
    ``likelihood.continuous.strata=`` had before the likelihood group built objects (2026-12-05)."""
    return stored is not None and stored.replace("continuous_strata=", "likelihood.continuous.strata=") == command


def curve(runs: list[str], steps: list[int], num_examples: int | None, strata: int, append: bool = False) -> None:
    """``append``: keep the rows of ``curve.json`` whose model is not among ``runs`` (their run directories may be
    gone; each kept row's metrics.json and command stay under ``curve/``)."""
    from bounds import evaluate

    labels = {spec.split("=", 1)[0] for spec in runs}
    previous = json.loads((OUT / "curve.json").read_text())["rows"] if append and (OUT / "curve.json").is_file() else []
    rows = [row for row in previous if row["model"] not in labels]
    lines = [
        "| model | step | -ELBO, chain T-step (bpd) | reconstruction | prior | denoising | own continuous bound |",
        "|---|---|---|---|---|---|---|",
        *map(_curve_line, rows),
    ]
    for spec in runs:
        label, run_dir = spec.split("=", 1)
        for step in steps:
            ckpt = Path(run_dir) / "checkpoints" / f"step_{step:07d}.ckpt"
            if not ckpt.is_file():
                continue
            overrides = [
                f"ckpt_path={ckpt}",
                "fid.num_samples=0",
                "wandb.enabled=false",
                f"likelihood.continuous.strata={strata}",
            ]
            if num_examples:
                overrides.append(f"num_examples={num_examples}")
            keep = OUT / "curve" / f"{label}-{step}"
            kept = keep / "metrics.json"
            command = "python src/eval.py " + " ".join(overrides)
            if kept.is_file() and _same_command(json.loads(kept.read_text()).get("command"), command):
                m = json.loads(kept.read_text())  # this row was evaluated before with the same command
            else:
                m = evaluate(overrides, keep=keep)
            to_bpd = 1 / math.log(2)
            terms = {k: v * to_bpd for k, v in m["terms_nats_per_dim"].items()}
            row = {"model": label, "step": step, "bpd": m["bpd"], "bpd_se": m["bpd_se"], "terms_bpd": terms}
            if "continuous" in m:
                row["continuous_bpd"], row["continuous_bpd_se"] = m["continuous"]["bpd"], m["continuous"]["bpd_se"]
            rows.append(row)
            lines.append(_curve_line(row))
    _write(
        "curve",
        {"rows": rows},
        lines,
        "Test split (180 digits), bits/dim; the chain's exact T-step bound under each checkpoint's own reverse variance "
        "(`small`; `learned_range` for learned_range + hybrid; T = 1000 for the discrete models, the continuous "
        "models discretized at 1000 steps), and a continuous model's own continuous-time bound (64 stratified times "
        "per example).",
    )


def fid(checkpoints: list[str]) -> None:
    """Classifier FID (2000 DDIM-50 samples against the train split) of each ``label=ckpt``, through src/eval.py."""
    from bounds import evaluate

    rows, lines = [], ["| model | checkpoint step | FID (2000 samples, DDIM 50) |", "|---|---|---|"]
    for spec in checkpoints:
        label, ckpt = spec.split("=", 1)
        overrides = [f"ckpt_path={ckpt}", "num_examples=1", "fid.num_samples=2000", "wandb.enabled=false"]
        keep = OUT / "fid" / label
        kept = keep / "metrics.json"
        command = "python src/eval.py " + " ".join(overrides)
        if kept.is_file() and json.loads(kept.read_text()).get("command") == command:
            m = json.loads(kept.read_text())
        else:
            m = evaluate(overrides, keep=keep)
        step = int(Path(ckpt).stem.split("_")[-1]) if "step_" in ckpt else None
        rows.append({"model": label, "ckpt": ckpt, "step": step, "fid": m["fid"]})
        lines.append(f"| {label} | {step} | {m['fid']:.3f} |")
    _write(
        "fid",
        {"rows": rows},
        lines,
        "Classifier FID (features of the project's digits classifier, 99.4% test accuracy).",
    )


def spacing(checkpoints: list[str], grids: list[str], seeds: list[int], append: bool) -> None:
    """Classifier FID (2000 DDIM samples, eta 0) of each ``label=ckpt`` on each ``steps:spacing`` grid and sampling
    seed, through src/eval.py (``fid.sampler.steps``, ``fid.sampler.spacing``, ``seed``). Every grid starts from the same x_T for a
    given seed, so the grids are compared pairwise."""
    from bounds import evaluate

    from diffusion_elbo.checkpoints import load_for_eval
    from diffusion_elbo.core import spaced_timesteps

    path = OUT / "spacing.json"
    rows = json.loads(path.read_text())["rows"] if append and path.is_file() else []
    for spec in checkpoints:
        label, ckpt = spec.split("=", 1)
        loaded = load_for_eval(ckpt)
        log_snr = loaded.schedule.log_snr()
        for grid in grids:
            steps, kind = grid.split(":")
            visited = torch.tensor(spaced_timesteps(loaded.schedule, int(steps), kind))
            for seed in seeds:
                overrides = [f"ckpt_path={ckpt}", "num_examples=1", "fid.num_samples=2000", f"fid.sampler.steps={steps}",
                             f"fid.sampler.spacing={kind}", f"seed={seed}", "wandb.enabled=false"]  # fmt: skip
                m = evaluate(overrides, keep=OUT / "spacing" / f"{label}-{steps}-{kind}-seed{seed}")
                # a row is replaced only by the same checkpoint, grid and seed under the same feature classifier:
                # FIDs of other classifiers stay, in their own group of the table
                key = (label, int(steps), kind, seed, m["fid_classifier_accuracy"])
                rows = [
                    r
                    for r in rows
                    if (r["model"], r["steps"], r["spacing"], r.get("seed", 0), r["classifier_accuracy"]) != key
                ]
                rows.append(
                    {
                        "model": label,
                        "ckpt": ckpt,
                        "step": loaded.global_step,
                        "steps": int(steps),
                        "spacing": kind,
                        "seed": seed,
                        "noisy_half_steps": int((log_snr[visited - 1] < 0).sum()),
                        "fid": m["fid"],
                        "fid_sampler": m["fid_sampler"],
                        "classifier_accuracy": m["fid_classifier_accuracy"],
                    }
                )
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["classifier_accuracy"], r["model"], r["step"], r["steps"], r["spacing"], r["noisy_half_steps"])
        cells.setdefault(key, []).append(r)
    lines = [
        "| classifier | model | checkpoint step | DDIM steps | spacing | steps at log SNR < 0 | FID (2000 samples) | "
        "per sampling seed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (accuracy, model, step, steps, kind, noisy), group in cells.items():
        fids = torch.tensor([r["fid"] for r in group], dtype=torch.float64)
        spread = f" ± {float(fids.std()):.3f}" if len(group) > 1 else ""
        per_seed = ", ".join(
            f"{r.get('seed', 0)}: {r['fid']:.3f}" for r in sorted(group, key=lambda r: r.get("seed", 0))
        )
        lines.append(
            f"| {accuracy:.4f} | {model} | {step} | {steps} | {kind} | {noisy} | {float(fids.mean()):.3f}{spread} | "
            f"{per_seed} |"
        )
    _write(
        "spacing",
        {"rows": rows},
        lines,
        "Classifier FID (features of the project's digits classifier) of DDIM (eta 0) samples of each checkpoint's EMA "
        "weights against the train split; mean ± std over sampling seeds, each seed's x_T shared by every grid. "
        "`time`: timesteps evenly spaced in t (DDIM's), `logsnr`: evenly spaced in log-SNR (`sampler.spacing`). "
        "`classifier`: the feature classifier's test accuracy, which tells the cached classifiers apart: it is "
        "trained once per machine and cached; before CLASSIFIER_VERSION 3 it differed from one machine to the next "
        "(its dropout drew from the caller's RNG), so compare FIDs only between rows with the same classifier.",
    )


def variance(ckpt: str, num_examples: int, repeats: int) -> None:
    from diffusion_elbo.checkpoints import load_for_eval
    from diffusion_elbo.core.logsnr import CosineLogSNR, LinearLogSNR
    from diffusion_elbo.core.timesteps import low_discrepancy_uniform
    from diffusion_elbo.core.vdm import continuous_terms

    loaded = load_for_eval(ckpt)
    module = loaded.module
    loaded.datamodule.setup("test")
    x = torch.stack([loaded.datamodule.split("test")[i][0] for i in range(num_examples)]).float()
    lo, hi = (float(v) for v in module.logsnr.endpoints())
    shapes = {"learned (trained)": module.logsnr, "linear": LinearLogSNR(lo, hi), "cosine": CosineLogSNR(lo, hi)}
    rows, lines = (
        [],
        [
            f"Checkpoint `{ckpt}` (step {loaded.global_step}); {num_examples} test digits x {repeats} draws; "
            f"endpoints gamma_min = {lo:.3f}, gamma_max = {hi:.3f} for every shape. bits/dim.",
            "",
            "| schedule shape | t in the batch | mean (one-sample) | std of one-sample estimate | std of a batch mean |",
            "|---|---|---|---|---|",
        ],
    )
    to_bpd = 1 / (x[0].numel() * math.log(2))
    for name, schedule in shapes.items():
        for kind in ("iid", "low_discrepancy"):
            g = torch.Generator().manual_seed(0)
            totals, batch_means = [], []
            for _ in range(repeats):
                if kind == "iid":
                    u = torch.rand(num_examples, generator=g, dtype=torch.float64)
                else:
                    u = low_discrepancy_uniform(num_examples, generator=g)
                eps = torch.randn(x.shape, generator=g)
                with torch.no_grad():
                    total = continuous_terms(
                        module.time.gamma_denoiser(module.network), schedule, x0=x, u=u, eps=eps, parametrization=module.parametrization,
                        num_bins=module.num_bins,
                    ).total.double() * to_bpd  # fmt: skip
                totals.append(total)
                batch_means.append(total.mean())
            allv, means = torch.cat(totals), torch.stack(batch_means)
            row = {
                "shape": name,
                "t_sampling": kind,
                "mean_bpd": float(allv.mean()),
                "se": float(allv.std()) / math.sqrt(allv.numel()),
                "one_sample_std_bpd": float(allv.std()),
                "batch_mean_std_bpd": float(means.std()),
            }
            rows.append(row)
            lines.append(
                f"| {name} | {kind} | {row['mean_bpd']:.3f} ± {row['se']:.3f} | {row['one_sample_std_bpd']:.3f} | "
                f"{row['batch_mean_std_bpd']:.4f} |"
            )
    _write("variance", {"ckpt": ckpt, "rows": rows}, lines, "Spread of the training estimator.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("oracle")
    c = sub.add_parser("curve")
    c.add_argument("--run", action="append", required=True, help="label=<run dir> (its checkpoints/step_*.ckpt)")
    c.add_argument("--steps", type=int, nargs="+", default=[600, 2000, 4000, 6000, 8000, 10000])
    c.add_argument("--num-examples", type=int, default=None)
    c.add_argument("--strata", type=int, default=64)
    c.add_argument("--append", action="store_true", help="keep curve.json's rows of the other models")
    f = sub.add_parser("fid")
    f.add_argument("--ckpt", action="append", required=True, help="label=<checkpoint>")
    sp = sub.add_parser("spacing")
    sp.add_argument("--ckpt", action="append", required=True, help="label=<checkpoint>")
    sp.add_argument("--grid", nargs="+", default=["50:time", "50:logsnr"], help="steps:spacing (time | logsnr)")
    sp.add_argument("--seeds", type=int, nargs="+", default=[0], help="sampling seeds (x_T of each FID sample)")
    sp.add_argument("--append", action="store_true", help="keep spacing.json's other rows")
    v = sub.add_parser("variance")
    v.add_argument("--ckpt", required=True)
    v.add_argument("--num-examples", type=int, default=180)
    v.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.what == "oracle":
        oracle()
    elif args.what == "curve":
        curve(args.run, args.steps, args.num_examples, args.strata, args.append)
    elif args.what == "fid":
        fid(args.ckpt)
    elif args.what == "spacing":
        spacing(args.ckpt, args.grid, args.seeds, args.append)
    else:
        variance(args.ckpt, args.num_examples, args.repeats)


if __name__ == "__main__":
    main()
