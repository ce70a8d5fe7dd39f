"""Benchmark suite: each item compares two things measured in the same run, alternating, so machine noise
cancels; results go to benchmarks/RESULTS.md with the machine, versions and date.

    python benchmarks/run.py                      # all items on the digits default (CPU or GPU)
    python benchmarks/run.py --items overhead eval
    python benchmarks/run.py --ckpt outputs/train/runs/<run>/checkpoints/last.ckpt   # sampling quality (item 3)
    python benchmarks/gpu.py --out benchmarks/gpu/<device>.json   # the GPU path (CIFAR-10 UNet of Ho et al.)

Items: 1 overhead (Lightning step vs a bare PyTorch loop doing the same work), 2 eval (exact ELBO throughput
vs the network's raw forward throughput, and a naive loop over t), 3 sampling (DDIM 50/100 vs ancestral 1000:
time per sample and classifier FID), 4 data (time waiting for data as a share of step time),
5 options (bf16-mixed, channels_last, fused AdamW, torch.compile keep the loss curve). The GPU path has its own
script, benchmarks/gpu.py (throughput, MFU, loss curves, evaluation, sampling, the ODE, on a CUDA machine).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

import diffusion_elbo
from diffusion_elbo.builders import build_module
from diffusion_elbo.core import q_sample, training_target, weighted_mse
from diffusion_elbo.core.elbo import exact_elbo, term_nats

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = tempfile.mkdtemp(prefix="bench-")
    return cfg


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def per_second(fn, count: int, device: torch.device) -> float:
    """``count`` over the seconds one call of ``fn`` takes, the device synchronized on both sides."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return count / (time.perf_counter() - start)


# ----------------------------------------------------------------------------------------- 1 overhead
class StepTimer(L.Callback):
    """Wall time between consecutive train-batch ends (data, forward, backward, step, EMA, logging)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.data_wait: list[float] = []
        self._last = None
        self._end = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._end is not None:
            self.data_wait.append(time.perf_counter() - self._end)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        sync(pl_module.device)
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = self._end = now


def lightning_steps(steps: int, overrides: list[str], all_callbacks: bool = False) -> tuple[list[float], list[float]]:
    """Step times of the Lightning module; with ``all_callbacks`` under the default callback set of a user's run
    (sample grid and FID only at validations, which this timing leaves out; the loss journal, last-checkpoint and
    checkpoint callbacks, schedule summary and the rest included), else only EMA and the LR monitor, the bare loop's
    own work."""
    cfg = compose_train(
        [
            *overrides,
            "logger=csv",
            f"trainer.max_steps={steps}",
            "trainer.val_check_interval=100000",
            "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false",
            "callbacks.sample_grid.num_samples=0",
            "callbacks.fid.num_samples=0",
            "callbacks.model_checkpoint.every_n_train_steps=100000",
            "callbacks.model_checkpoint.save_last=false",
        ]
    )
    module, datamodule = build_module(cfg)
    timer = StepTimer()
    from hydra.utils import instantiate

    from diffusion_elbo.builders import build_callbacks, build_loggers

    callbacks = build_callbacks(cfg)
    if not all_callbacks:
        callbacks = [c for c in callbacks if type(c).__name__ in ("EMA", "LearningRateMonitor")]
    callbacks.append(timer)
    trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=build_loggers(cfg, cfg.paths.output_dir),
        default_root_dir=cfg.paths.output_dir,
        limit_val_batches=0,
        # the user's run keeps its ModelCheckpoint (it writes nothing in these steps); the lean one has none
        enable_checkpointing=all_callbacks,
    )
    trainer.fit(module, datamodule=datamodule)
    return timer.times, timer.data_wait


def bare_steps(steps: int, overrides: list[str]) -> tuple[list[float], list[float]]:
    """The same work without Lightning: same UNet, data, AdamW, loss, clipping, LR warm-up and EMA."""
    from hydra.utils import instantiate
    from torch.optim.swa_utils import AveragedModel

    cfg = compose_train([*overrides, "logger=csv"])
    L.seed_everything(int(cfg.seed), workers=True)
    module, datamodule = build_module(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net, schedule = module.net.to(device).train(), module.schedule.to(device)
    optimizer = module.optimizer_factory(params=net.parameters())
    scheduler = module.lr_scheduler_factory(optimizer=optimizer)
    ema = AveragedModel(net, multi_avg_fn=instantiate(cfg.callbacks.ema).update_fn, use_buffers=False)
    generator = torch.Generator(device=device).manual_seed(0)
    datamodule.setup("fit")
    times, waits, done, last = [], [], 0, None
    while done < steps:
        end = time.perf_counter()
        for x0, _ in datamodule.train_dataloader():
            waits.append(time.perf_counter() - end)
            x0 = x0.to(device)
            t = torch.randint(1, schedule.T + 1, (x0.shape[0],), generator=generator, device=device)
            eps = torch.randn(x0.shape, generator=generator, device=device)
            out = net(q_sample(schedule, x0, t=t, noise=eps), t)
            target = training_target("eps", schedule, x0=x0, t=t, eps=eps)
            loss = weighted_mse(schedule.gather("snr", t), "eps", schedule=schedule, t=t, out=out, target=target).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            ema.update_parameters(net)
            float(loss)  # Lightning reads the loss every step for its progress bar and logs
            sync(device)
            now = time.perf_counter()
            if last is not None:
                times.append(now - last)
            last = end = now
            done += 1
            if done == steps:
                break
    return times, waits


def bench_overhead(rounds: int, steps: int, overrides: list[str]) -> dict:
    lit, full, bare, lit_wait, bare_wait = [], [], [], [], []
    for _ in range(rounds):  # alternate so drifts in machine speed hit all three equally
        t, w = lightning_steps(steps, overrides)
        lit += t[5:]
        lit_wait += w[5:]
        t, _ = lightning_steps(steps, overrides, all_callbacks=True)
        full += t[5:]
        t, w = bare_steps(steps, overrides)
        bare += t[5:]
        bare_wait += w[5:]
    lit_med, full_med, bare_med = statistics.median(lit), statistics.median(full), statistics.median(bare)
    return {
        "lightning_step_ms": 1e3 * lit_med,
        "default_callbacks_step_ms": 1e3 * full_med,
        "bare_step_ms": 1e3 * bare_med,
        "overhead": lit_med / bare_med - 1,
        "overhead_default_callbacks": full_med / bare_med - 1,
        "lightning_data_wait_share": statistics.median(lit_wait) / lit_med,
        "bare_data_wait_share": statistics.median(bare_wait) / bare_med,
        "steps_measured": len(lit),
    }


# --------------------------------------------------------------------------------------------- 2 eval
def raw_throughput_by_batch(net, device, sizes=(64, 256, 1024, 4096), repeats: int = 3) -> dict[int, float]:
    """Raw forward rows/s of the network at several batch sizes (the best size differs by device)."""
    out = {}
    with torch.no_grad():
        for rows in sizes:
            x = torch.randn(rows, 1, 8, 8, device=device)
            t = torch.randint(1, 1000, (rows,), device=device)
            net(x, t)
            best = 0.0
            for _ in range(repeats):
                sync(device)
                start = time.perf_counter()
                net(x, t)
                sync(device)
                best = max(best, rows / (time.perf_counter() - start))
            out[rows] = best
    return out


def bench_eval(rounds: int, overrides: list[str], batch: int, timesteps: int, rows: int | None = None) -> dict:
    cfg = compose_train([*overrides, f"schedule.timesteps={timesteps}"])
    module, datamodule = build_module(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net, schedule = module.net.to(device).eval(), module.schedule.to(device)
    datamodule.setup("fit")
    x0 = torch.stack([datamodule.val_set[i][0] for i in range(batch)]).to(device)
    by_batch = raw_throughput_by_batch(net, device)
    rows = rows or max(by_batch, key=by_batch.get)  # the fastest network batch on this device
    probe = x0.repeat(math.ceil(rows / batch), *([1] * (x0.ndim - 1)))[:rows]
    t_probe = torch.randint(1, timesteps + 1, (rows,), device=device)
    g = torch.Generator(device=device).manual_seed(0)

    def raw() -> float:
        with torch.no_grad():
            return per_second(lambda: net(probe, t_probe), rows, device)

    def exact() -> float:
        return per_second(
            lambda: exact_elbo(
                net, schedule, x0, parametrization="eps", num_bins=datamodule.num_bins, max_batch=rows, generator=g
            ),
            batch * timesteps,
            device,
        )

    def naive() -> float:
        sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            for step in range(1, timesteps + 1):
                t = torch.full((batch,), step, device=device)
                term_nats(
                    net,
                    schedule,
                    x0,
                    t,
                    parametrization="eps",
                    variance="small",
                    num_bins=datamodule.num_bins,
                    generator=g,
                )
        sync(device)
        return batch * timesteps / (time.perf_counter() - start)

    raw(), exact()  # warm-up
    r, e, n = [], [], []
    for _ in range(rounds):
        r.append(raw())
        e.append(exact())
        n.append(naive())
    raw_med, exact_med, naive_med = statistics.median(r), statistics.median(e), statistics.median(n)
    return {
        "raw_forward_rows_per_s": raw_med,
        "exact_elbo_rows_per_s": exact_med,
        "naive_loop_rows_per_s": naive_med,
        "exact_vs_raw": exact_med / raw_med,
        "naive_vs_raw": naive_med / raw_med,
        "rows_per_call": rows,
        "examples": batch,
        "timesteps": timesteps,
        "raw_rows_per_s_by_batch": by_batch,
    }


# ----------------------------------------------------------------------------------------- 3 sampling
def bench_sampling(ckpt: str, num_samples: int, cache_dir: str) -> dict:
    from diffusion_elbo.checkpoints import load_for_eval
    from diffusion_elbo.core.samplers import AncestralSampler, DDIMSampler
    from diffusion_elbo.fid import compute_fid, make_fid

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = load_for_eval(ckpt, device)
    fid = make_fid(run.datamodule, cache_dir=cache_dir, device=device)
    out = {"num_samples": num_samples, "classifier_accuracy": fid.classifier_accuracy, "global_step": run.global_step}
    grid = [("ddim50", DDIMSampler(steps=50)), ("ddim100", DDIMSampler(steps=100)), ("ddpm1000", AncestralSampler())]
    for name, sampler in grid:
        sync(device)
        start = time.perf_counter()
        value = compute_fid(
            run.module, fid, num_samples=num_samples, rank=0, world_size=1, sampler=sampler, batch_size=500, seed=0
        )
        sync(device)
        out[name] = {"ms_per_sample": 1e3 * (time.perf_counter() - start) / num_samples, "fid": value}
    return out


# ---------------------------------------------------------------------------------------- 5 options
def loss_curve(overrides: list[str], steps: int) -> list[float]:
    from diffusion_elbo.training import train

    cfg = compose_train(
        [
            *overrides,
            "logger=csv",
            f"trainer.max_steps={steps}",
            "trainer.val_check_interval=100000",
            "trainer.enable_progress_bar=false",
            "callbacks.sample_grid.num_samples=0",
            "callbacks.fid.num_samples=0",
            "callbacks.model_checkpoint.every_n_train_steps=100000",
        ]
    )
    train(cfg, cfg.paths.output_dir)
    lines = (Path(cfg.paths.output_dir) / "loss_curve.csv").read_text().splitlines()[1:]
    return [float(line.split(",")[1]) for line in lines]


def bench_options(steps: int, overrides: list[str], options: dict[str, list[str]]) -> dict:
    """Mean loss over the last half of a short run for each option against the fp32 eager baseline; the
    seeds are the same, so the curves differ only by the option (and its numerics)."""
    base = loss_curve(overrides, steps)
    half = len(base) // 2
    ref = statistics.mean(base[half:])
    noise = statistics.stdev(base[half:]) / math.sqrt(len(base) - half)
    out = {"baseline_mean_loss": ref, "baseline_se": noise}
    for name, extra in options.items():
        try:
            curve = loss_curve([*overrides, *extra], steps)
            out[name] = {
                "mean_loss": statistics.mean(curve[half:]),
                "diff_in_se": (statistics.mean(curve[half:]) - ref) / noise,
            }
        except Exception as exc:  # an option this machine cannot run
            out[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
    return out


# ---------------------------------------------------------------------------------------------- report
def machine() -> dict:
    info = {
        "date": dt.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "diffusion_elbo": diffusion_elbo.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def machine_line(m: dict) -> str:
    """The results files' one-line description of a :func:`machine`."""
    return (
        f"Machine: {m.get('gpu', 'no GPU')}, CPU {m['cpu']} with {m['threads']} threads; torch {m['torch']}, "
        f"lightning {m['lightning']}, python {m['python']}, diffusion-elbo {m['diffusion_elbo']}; {m['date']}."
    )


def write_results(results: dict, path: Path) -> None:
    m = results["machine"]
    lines = [
        "# Benchmark results",
        "",
        machine_line(m),
        "Each item compares two things measured in the same run, alternating; numbers are medians.",
        "",
    ]
    if "overhead" in results:
        o = results["overhead"]
        lines += [
            "## 1. Framework overhead (target: Lightning at most 5% slower than a bare loop)",
            "",
            "| | ms / step |",
            "|---|---|",
            f"| Lightning module (EMA, logging, LR schedule, clipping) | {o['lightning_step_ms']:.1f} |",
            *(
                [f"| the same with the default callback set of a user's run | {o['default_callbacks_step_ms']:.1f} |"]
                if "default_callbacks_step_ms" in o
                else []
            ),
            f"| bare PyTorch loop, same work | {o['bare_step_ms']:.1f} |",
            "",
            f"Overhead: **{100 * o['overhead']:+.1f}%** over {o['steps_measured']} steps per side"
            + (
                f"; with the default callbacks **{100 * o['overhead_default_callbacks']:+.1f}%**."
                if "overhead_default_callbacks" in o
                else "."
            ),
            "",
        ]
    if "eval" in results:
        e = results["eval"]
        lines += [
            "## 2. Exact ELBO evaluation (target: >= 90% of the network's raw forward throughput)",
            "",
            f"{e['examples']} examples x T={e['timesteps']}, {e['rows_per_call']} rows per network call.",
            "",
            "| | rows / s | vs raw forward |",
            "|---|---|---|",
            f"| raw forward at the same batch | {e['raw_forward_rows_per_s']:.0f} | 1.00 |",
            f"| `exact_elbo` (batched over t and examples) | {e['exact_elbo_rows_per_s']:.0f} | **{e['exact_vs_raw']:.2f}** |",
            f"| naive loop, one t at a time ({e['examples']} rows per call) | {e['naive_loop_rows_per_s']:.0f} | {e['naive_vs_raw']:.2f} |",
            "",
            "Raw forward rows/s by network batch size (the evaluator uses the fastest): "
            + ", ".join(f"{k}: {v:.0f}" for k, v in e["raw_rows_per_s_by_batch"].items())
            + ".",
            "",
        ]
    if "sampling" in results:
        s = results["sampling"]
        lines += [
            "## 3. Sampling: time per sample and quality",
            "",
            f"Checkpoint at step {s['global_step']}; classifier FID over {s['num_samples']} samples against the train "
            f"split (feature classifier test accuracy {s['classifier_accuracy']:.4f}).",
            "",
            "| sampler | ms / sample | FID |",
            "|---|---|---|",
        ]
        for name in ("ddim50", "ddim100", "ddpm1000"):
            lines.append(f"| {name} | {s[name]['ms_per_sample']:.1f} | {s[name]['fid']:.3f} |")
        lines.append("")
    if "overhead" in results:
        o = results["overhead"]
        lines += [
            "## 4. Data loading",
            "",
            f"Time waiting for the next batch as a share of step time: Lightning {100 * o['lightning_data_wait_share']:.1f}%, "
            f"bare loop {100 * o['bare_data_wait_share']:.1f}%.",
            "",
        ]
    if "options" in results:
        p = results["options"]
        lines += [
            "## 5. Fast-path options keep the loss curve",
            "",
            f"Mean training loss over steps 60-120 of a 120-step run with the same seed (inside the LR warm-up: the weights move little, so this shows the options run and agree early on; long-run curves need a GPU run); baseline fp32 eager {p['baseline_mean_loss']:.4f} "
            f"(standard error {p['baseline_se']:.4f}).",
            "",
            "| option | mean loss | difference in baseline SEs |",
            "|---|---|---|",
        ]
        for name, v in p.items():
            if isinstance(v, dict):
                lines.append(
                    f"| {name} | {v.get('mean_loss', float('nan')):.4f} | {v['diff_in_se']:+.1f} |"
                    if "error" not in v
                    else f"| {name} | {v['error']} | |"
                )
        lines.append("")
    lines += [
        "## 6. GPU",
        "",
        "`python benchmarks/gpu.py --out benchmarks/gpu/<device>.json` measures the GPU path on a CUDA machine: the "
        "CIFAR-10 UNet's training images/s and MFU in fp32, bf16 and bf16 + compile + channels_last + fused AdamW, their "
        "loss curves, exact-ELBO and DDIM throughput, the continuous-time bound under bf16 and the ODE likelihood. "
        "Results: benchmarks/gpu/*.md.",
        "",
    ]
    path.write_text("\n".join(lines))
    (path.with_suffix(".json")).write_text(json.dumps(results, indent=2, default=float))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--items",
        nargs="+",
        default=["overhead", "eval", "sampling", "options"],
        choices=["overhead", "eval", "sampling", "options"],
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--ckpt", default=None, help="a trained digits checkpoint for item 3")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--cache-dir", default=str(ROOT / "data" / "cache"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args()

    overrides = ["trainer.accelerator=auto"]
    out = Path(args.out)
    # items not run this time keep their last results (RESULTS.json beside the page)
    previous = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else {}
    results = {**previous, "machine": machine()}
    if "overhead" in args.items:
        results["overhead"] = bench_overhead(args.rounds, args.steps, overrides)
        print("overhead", results["overhead"], flush=True)
    if "eval" in args.items:
        results["eval"] = bench_eval(args.rounds, overrides, batch=64, timesteps=256)
        print("eval", results["eval"], flush=True)
    if "sampling" in args.items and args.ckpt:
        results["sampling"] = bench_sampling(args.ckpt, args.num_samples, args.cache_dir)
        print("sampling", results["sampling"], flush=True)
    if "options" in args.items:
        options = {
            "bf16-mixed": ["trainer.precision=bf16-mixed"],
            "channels_last": ["channels_last=true"],
            "fused AdamW": ["optimizer.fused=true", "optimizer.foreach=null"],
            "torch.compile": ["compile=true"],
        }
        results["options"] = bench_options(120, [*overrides, "schedule.timesteps=1000"], options)
        print("options", results["options"], flush=True)
    write_results(results, Path(args.out))
    print(f"results: {args.out}")


if __name__ == "__main__":
    sys.exit(main())
