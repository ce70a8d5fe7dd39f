"""float32 against float64 evaluation of the same -ELBO draws (issue: float64 coefficients).

The Gaussian oracle (x0 ~ N(0.5, 0.8^2 I), 16 dims) is evaluated at every t = 1..T with the same x0 and the same
noise, once in float64 and once in float32. The difference is the bias that float32 arithmetic adds to a bits/dim
number; it should be far below any standard error we report. Writes ``benchmarks/PRECISION.json``.

    python benchmarks/precision.py [--label before|after]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from diffusion_elbo.core import make_schedule, nats_to_bits_per_dim, prior_kl_nats
from diffusion_elbo.core.elbo import term_nats
from diffusion_elbo.models import GaussianOracle

OUT = Path(__file__).with_name("PRECISION.json")


def per_t_bpd(schedule_name: str, timesteps: int, dtype: torch.dtype, num_examples: int = 64, dim: int = 16) -> dict:
    """-ELBO in bits/dim of ``num_examples`` oracle examples, every t evaluated with a fixed noise draw, in
    ``dtype``; also the t = 1 term alone."""
    schedule = make_schedule(schedule_name, timesteps)
    model = GaussianOracle(schedule, 0.5, 0.8, "eps")
    gen = torch.Generator().manual_seed(0)
    x0_64 = 0.5 + 0.8 * torch.randn(num_examples, dim, generator=gen, dtype=torch.float64)
    x0 = x0_64.to(dtype)
    total = prior_kl_nats(schedule, x0).double()
    first = None
    for t_value in range(1, timesteps + 1):
        noise = torch.randn(num_examples, dim, generator=gen, dtype=torch.float64).to(dtype)
        t = torch.full((num_examples,), t_value, dtype=torch.long)
        term, _ = term_nats(model, schedule, x0, t, parametrization="eps", variance="small", num_bins=None, noise=noise)
        total = total + term.double()
        if t_value == 1:
            first = term.double()
    to_bpd = lambda nats: float(nats_to_bits_per_dim(nats.mean() / dim))  # noqa: E731
    return {"bpd": to_bpd(total), "t1_bpd": to_bpd(first)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--label", default="after")
    args = parser.parse_args()
    rows = []
    for name in ("linear", "cosine"):
        r64 = per_t_bpd(name, 1000, torch.float64)
        r32 = per_t_bpd(name, 1000, torch.float32)
        rows.append(
            {
                "schedule": name,
                "T": 1000,
                "bpd_float64": r64["bpd"],
                "bpd_float32": r32["bpd"],
                "bias_bpd": r32["bpd"] - r64["bpd"],
                "bias_t1_bpd": r32["t1_bpd"] - r64["t1_bpd"],
            }
        )
        print(f"{name}: float32 - float64 = {rows[-1]['bias_bpd']:+.2e} bpd (t = 1: {rows[-1]['bias_t1_bpd']:+.2e})")
    results = json.loads(OUT.read_text()) if OUT.is_file() else {}
    results[args.label] = {"rows": rows, "torch": torch.__version__, "note": "oracle, 64 examples x 16 dims"}
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    assert all(math.isfinite(r["bias_bpd"]) for r in rows)


if __name__ == "__main__":
    main()
