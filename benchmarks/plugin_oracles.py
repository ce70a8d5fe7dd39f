"""The example plugins (examples/plugins/plugins.py) against the closed-form oracles, in one run:

- the Laplace log-SNR schedule: the Gaussian oracle's continuous-time bound beside logsnr_linear's and the closed form
  (which depends on the endpoints only), and the 1000-step chain bound of each (which does not), for b = 1, 2, 4;
- the importance-weighted bound for K = 1, 8, 64 on the Gaussian oracle (linear, T = 100): bits/dim, paired against
  the exact ELBO and the true NLL;
- DPM-Solver++(2M) against DDIM: each sample's RMS distance to its exact probability-flow image on the Gaussian oracle
  (affine in closed form), at 5, 10, 20, 50 steps, three schedules, both grids.

    python benchmarks/plugin_oracles.py     # writes benchmarks/plugin_oracles.json
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "plugins"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import plugins  # noqa: E402  (examples/plugins/plugins.py, as a user's PYTHONPATH=. imports it)
from run import machine  # noqa: E402

from diffusion_elbo.core import make_schedule  # noqa: E402
from diffusion_elbo.core.gaussian_data import flow_image, gaussian_nll_nats  # noqa: E402
from diffusion_elbo.core.logsnr import LinearLogSNR  # noqa: E402
from diffusion_elbo.core.parametrization import Parametrization  # noqa: E402
from diffusion_elbo.core.samplers import Chain, DDIMSampler  # noqa: E402
from diffusion_elbo.core.vdm import gaussian_continuous_terms  # noqa: E402
from diffusion_elbo.evaluation.estimators import (  # noqa: E402
    EvalRun,
    EvalSubject,
    ExactELBO,
    bpd_and_se,
    evaluate_continuous,
    evaluate_elbo,
)
from diffusion_elbo.models import GaussianOracle  # noqa: E402

OUT = ROOT / "benchmarks" / "plugin_oracles.json"
LN2 = math.log(2.0)


def paired(a: torch.Tensor, b: torch.Tensor) -> dict:
    d = a - b
    return {"mean": float(d.mean()), "se": float(d.std() / math.sqrt(d.numel()))}


def gaussian_dataset(n: int, dim: int, mean: float, std: float, seed: int):
    x0 = mean + std * torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    return x0, [(x,) for x in x0]


def schedules(n: int = 1000, strata: int = 64) -> dict:
    """Continuous-time and 1000-step chain bounds of the Gaussian oracle (N(0, 1), 16 dims) per schedule."""
    mean, std = 0.0, 1.0
    x0, dataset = gaussian_dataset(n, 16, mean, std, seed=0)
    closed = gaussian_continuous_terms(mean, std, -13.3, 5.0)["total"] / LN2
    rows = {}
    cases = {"logsnr_linear": LinearLogSNR(-13.3, 5.0)}
    cases.update({f"laplace_b{b:g}": plugins.LaplaceLogSNR(-13.3, 5.0, mu=0.0, b=b) for b in (1.0, 2.0, 4.0)})
    for name, logsnr in cases.items():
        oracle = GaussianOracle(logsnr.discretize(1000), mean, std, parametrization="x0")
        continuous = evaluate_continuous(
            oracle.x0_at_log_snr, logsnr, dataset, parametrization="x0", num_bins=None, strata=strata, seed=0,
            device=torch.device("cpu"),
        )  # fmt: skip
        chain = evaluate_elbo(
            oracle, oracle.schedule, dataset, parametrization="x0", variance="small", decoder_variance="beta",
            num_bins=None, seed=0, device=torch.device("cpu"),
        )  # fmt: skip
        bpd, se = bpd_and_se(continuous.total / 16)
        chain_bpd, chain_se = bpd_and_se(chain.total / 16)
        rows[name] = {
            "continuous_bpd": bpd,
            "continuous_bpd_se": se,
            "continuous_minus_closed_form_in_se": (bpd - closed) / se,
            "chain1000_bpd": chain_bpd,
            "chain1000_bpd_se": chain_se,
        }
        print(f"{name}: continuous {bpd:.4f} ± {se:.4f} (closed form {closed:.4f}); chain {chain_bpd:.4f}", flush=True)
    true_bpd, _ = bpd_and_se(gaussian_nll_nats(x0, mean, std) / 16)
    return {"num_examples": n, "strata": strata, "closed_form_bpd": closed, "true_nll_bpd": true_bpd, "rows": rows}


def importance_weighted(n: int = 1000, ks=(1, 8, 64)) -> dict:
    mean, std, dim = 0.0, 1.0, 4
    schedule = make_schedule("linear", 100)
    oracle = GaussianOracle(schedule, mean, std, parametrization="x0")
    x0, dataset = gaussian_dataset(n, dim, mean, std, seed=1)
    subject = EvalSubject(
        network=oracle, model=oracle, mean_model=oracle, schedule=schedule, parametrization="x0",
        trained_variance="small", variance="small", decoder_variance="clipped", num_bins=None,
    )  # fmt: skip
    run = EvalRun(seed=0, device=torch.device("cpu"), batch_size=256)
    elbo = ExactELBO().evaluate(subject, dataset, run)
    true_bpd = gaussian_nll_nats(x0, mean, std) / dim / LN2
    rows = {}
    for k in ks:
        estimate = plugins.ImportanceWeightedBound(k=k).evaluate(subject, dataset, run)
        column = estimate.columns["iw_bpd"]
        rows[str(k)] = {
            "iw_bpd": estimate.metrics["iw_bpd"],
            "iw_bpd_se": estimate.metrics["iw_bpd_se"],
            "elbo_minus_iw_bpd": paired(elbo.columns["bpd"], column),
            "iw_minus_true_nll_bpd": paired(column, true_bpd),
        }
        print(f"IW K={k}: {rows[str(k)]}", flush=True)
    return {
        "data": "N(0, 1), 4 dims",
        "schedule": "linear, T = 100",
        "num_examples": n,
        "elbo_bpd": elbo.metrics["bpd"],
        "elbo_bpd_se": elbo.metrics["bpd_se"],
        "true_nll_bpd": float(true_bpd.mean()),
        "rows": rows,
    }


def samplers(n: int = 4000) -> dict:
    mean, std = 0.5, 0.8
    x_T = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
    rows = []
    for name in ("linear", "cosine", "sigmoid"):
        schedule = make_schedule(name, 1000)
        oracle = GaussianOracle(schedule, mean, std, parametrization="x0")
        chain = Chain(denoise=oracle, schedule=schedule, parametrization=Parametrization.X0)
        exact = flow_image(x_T, *map(float, schedule.signal_noise(torch.tensor([schedule.T]))), mean=mean, std=std)
        for spacing in ("time", "logsnr"):
            for steps in (5, 10, 20, 50):
                row = {"schedule": name, "spacing": spacing, "steps": steps}
                for label, sampler in (
                    ("dpmpp2m", plugins.DPMSolverPP2M(steps=steps, spacing=spacing)),
                    ("ddim", DDIMSampler(steps=steps, spacing=spacing)),
                ):
                    x = sampler.sample(chain, x_T.shape, x_T=x_T)
                    row[f"{label}_rms_error"] = float((x - exact).pow(2).mean().sqrt())
                rows.append(row)
                print(row, flush=True)
    return {"data": "N(0.5, 0.8^2), 4 dims", "num_samples": n, "rows": rows}


def main() -> None:
    result = {
        "machine": machine(),
        "command": "python benchmarks/plugin_oracles.py",
        "schedule": schedules(),
        "importance_weighted_bound": importance_weighted(),
        "sampler": samplers(),
    }
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
