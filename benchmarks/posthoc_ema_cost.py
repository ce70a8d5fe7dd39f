"""Issue 31: the cost per training step of the post-hoc EMA callback against the plain EMA callback, on the default
run's network (python benchmarks/posthoc_ema_cost.py; writes benchmarks/posthoc_ema/cost.json).

Alternating in one process, ``--rounds`` x ``--updates`` each: the EMA callback's update (one fused lerp over the
parameters, ``ema_multi_avg_fn``), the PostHocEMA callback's update (one fused lerp per stored width, two by
default; no snapshot is due), and a whole training step of the default recipe (forward, backward, AdamW) for scale.
Medians in ms."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import compose_train, machine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--updates", type=int, default=50)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    from diffusion_elbo.builders import build_module
    from diffusion_elbo.lightning.callbacks import ema_multi_avg_fn
    from diffusion_elbo.lightning.posthoc_ema import PostHocEMA

    module, datamodule = build_module(compose_train([]))
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    params = [p for p in module.parameters() if p.requires_grad]
    ema_params = [p.detach().clone() for p in params]
    ema_update = ema_multi_avg_fn(0.999, warmup=True)
    posthoc = PostHocEMA(sigma_rels=[0.05, 0.1], snapshot_every=10**9)
    posthoc.setup(None, module, "fit")
    trainer = SimpleNamespace(global_step=0, is_global_zero=True)

    def time_ema() -> float:
        start = time.perf_counter()
        for n in range(args.updates):
            ema_update(ema_params, params, torch.tensor(n + 1))
        return 1e3 * (time.perf_counter() - start) / args.updates

    def time_posthoc() -> float:
        start = time.perf_counter()
        for _ in range(args.updates):
            trainer.global_step += 1
            posthoc.on_train_batch_end(trainer, module)
        return 1e3 * (time.perf_counter() - start) / args.updates

    def time_step() -> float:
        start = time.perf_counter()
        for _ in range(args.steps):
            optimizer.zero_grad()
            loss = module.training_step(batch, 0)
            loss.backward()
            optimizer.step()
        return 1e3 * (time.perf_counter() - start) / args.steps

    import warnings

    warnings.filterwarnings("ignore")  # self.log without a trainer
    ema, post, step = [], [], []
    for _ in range(args.rounds):
        ema.append(time_ema())
        post.append(time_posthoc())
        step.append(time_step())
    result = {
        "machine": machine(),
        "parameters": sum(p.numel() for p in params),
        "ema_update_ms": statistics.median(ema),
        "posthoc_update_ms": statistics.median(post),
        "training_step_ms": statistics.median(step),
        "posthoc_over_ema": statistics.median(post) / statistics.median(ema),
        "posthoc_share_of_step": statistics.median(post) / statistics.median(step),
        "ema_share_of_step": statistics.median(ema) / statistics.median(step),
    }
    out = ROOT / "benchmarks" / "posthoc_ema" / "cost.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
