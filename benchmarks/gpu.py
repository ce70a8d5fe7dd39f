"""The GPU path on a CUDA machine, in one call: the CIFAR-10 UNet of Ho et al. (35.7M parameters) trained through the
project's own Lightning path, its evaluation and sampling, the continuous-time model and the ODE likelihood.

    python benchmarks/gpu.py --out benchmarks/gpu/h200.json          # about 6 minutes on an H200
    python benchmarks/gpu.py --quick --out /tmp/gpu.json             # a small CPU rehearsal of the same code

Every training run is `train()`'s own set-up (the module, data module, the default callbacks of a user's run, a CSV
logger) on ``data=image_folder`` over generated 32x32 RGB images (no CIFAR-10 on the machine); only validation,
sample grids and FID are off. Items, each written to ``--out`` as soon as it is measured (a run cut off by its time
limit keeps what it had):

- ``train``: images/s at batch 128 in fp32 (the Trainer's 32-true; cuDNN's TF32 convolutions are torch's default),
  bf16-mixed, and bf16 + torch.compile + channels_last + fused AdamW; MFU against the measured and the datasheet bf16
  peak; the share of step time spent waiting for data.
- ``loss_curves``: fp32 against bf16 + compile over the same 1000 steps (same seed, data order, t and noise): the mean
  loss over the last 200 steps, and their difference in standard errors.
- ``bare``: the fast settings in a bare PyTorch loop on tensors already on the GPU (no data loading, no callbacks),
  so the Lightning path's cost is a ratio measured in the same run.
- ``eval``: exact-ELBO rows/s (``exact_elbo``, the ``src/eval.py`` evaluator) against the network's raw forward at
  the same batch of rows.
- ``sampling``: DDIM-50 images/s, fp32 and under bf16 autocast.
- ``vdm``: a continuous-time model (learned log-SNR, the bound + v-MSE) trained briefly under bf16-mixed; its bound
  on a fixed set of examples (same t and noise per example) in float32 and under bf16 autocast (the terms stay
  float32); then ``src/eval.py likelihood=ode`` on 64 examples: NFE and seconds per example.
- ``inception``: the ``fid.features=inception`` path through torch-fidelity, where it imports, with a weights file
  given by ``weights_path`` (the real weights cannot be downloaded there: a file of the extractor's own
  initialisation tests the path; its FID is not comparable with published numbers).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import StepTimer, compose_train, machine, per_second, sync

# dense bf16 tensor-core peaks (no sparsity) by the vendors' datasheets, FLOP/s
PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}
HO_ET_AL_IMAGES_PER_S = 21 * 128  # 21 steps/s at batch 128 on a TPU v3-8 (Ho et al. 2020, Appendix B)


def make_images(root: Path, n: int, size: int, seed: int = 0) -> None:
    """``n`` RGB PNGs of smooth random colour fields (low-frequency noise, bilinearly upsampled), not white noise."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        low = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        image = Image.fromarray(low).resize((size, size), resample=Image.Resampling.BILINEAR)
        image.save(root / f"{i:05d}.png")


def nvidia_smi() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    info = machine()
    info["nvidia_smi"] = nvidia_smi()
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        info["tf32_cudnn"] = torch.backends.cudnn.allow_tf32
    return info


def bf16_matmul_peak(device: torch.device, n: int = 8192, repeats: int = 10) -> float:
    """Measured bf16 matrix-product rate (FLOP/s) on random data: the ceiling MFU is also reported against."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


def train_flops_per_image(net: torch.nn.Module, shape: tuple[int, ...], device: torch.device) -> dict:
    """FLOPs of one forward and of forward + backward per image (torch's FlopCounterMode: matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(4, *shape, device=device)
    t = torch.randint(1, 1001, (4,), device=device)
    with FlopCounterMode(display=False) as forward:
        net(x, t)
    with FlopCounterMode(display=False) as both:
        net(x, t).pow(2).mean().backward()
    net.zero_grad(set_to_none=True)
    return {"forward": forward.get_total_flops() / 4, "train": both.get_total_flops() / 4}


# ----------------------------------------------------------------------------------------------- training
def base_overrides(root: Path, args: argparse.Namespace) -> list[str]:
    """The CIFAR-10 recipe of Ho et al. (experiment=cifar10_ddpm) on the generated images, AdamW at weight decay 0
    (Adam's update) so that one optimizer class has both the foreach and the fused kernel."""
    overrides = [
        "experiment=cifar10_ddpm",
        "data=image_folder",
        f"data.root={root}",
        "data.image_size=32",
        f"data.batch_size={args.batch}",
        f"data.num_workers={args.workers}",
        "data.val_examples=256",
        "optimizer=adamw",
        "optimizer.lr=2e-4",
        "optimizer.weight_decay=0",
        f"trainer.accelerator={args.accelerator}",
        "logger=csv",
        "trainer.val_check_interval=100000",
        "trainer.enable_progress_bar=false",
        "callbacks.sample_grid.num_samples=0",
        "callbacks.fid.num_samples=0",
    ]
    if args.quick:
        overrides += [
            "model.model_channels=16",
            "model.num_groups=8",
            "model.channel_mult=[1,2]",
            "model.num_res_blocks=1",
        ]
    return overrides


VARIANTS = {
    "fp32": ["trainer.precision=32-true"],
    "bf16": ["trainer=gpu"],
    "bf16_compile_cl_fused": [
        "trainer=gpu",
        "compile=true",
        "channels_last=true",
        "optimizer.fused=true",
        "optimizer.foreach=null",
    ],
}


def lightning_run(overrides: list[str], steps: int, warmup: int) -> dict:
    """``steps`` training steps of the user's path (train()'s module, data and callbacks); images/s over the steps
    after ``warmup`` (compilation, cuDNN autotuning, the data workers' start), and the loss of every step."""
    import lightning as L
    from hydra.utils import instantiate

    from diffusion_elbo.builders import build_callbacks, build_loggers, build_module

    cfg = compose_train([*overrides, f"trainer.max_steps={steps}"])
    L.seed_everything(int(cfg.seed), workers=True)
    module, datamodule = build_module(cfg)
    timer = StepTimer()
    trainer = instantiate(
        cfg.trainer,
        callbacks=[*build_callbacks(cfg), timer],
        logger=build_loggers(cfg, cfg.paths.output_dir),
        default_root_dir=cfg.paths.output_dir,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    wall = time.perf_counter() - start
    lines = (Path(cfg.paths.output_dir) / "loss_curve.csv").read_text().splitlines()[1:]
    losses = [float(line.split(",")[1]) for line in lines]
    measured = timer.times[warmup:]
    batch = int(cfg.data.batch_size)
    return {
        "steps": steps,
        "warmup_steps": warmup,
        "images_per_s": batch * len(measured) / sum(measured),
        "images_per_s_median_step": batch / statistics.median(measured),
        "step_ms_median": 1e3 * statistics.median(measured),
        "data_wait_share": statistics.median(timer.data_wait[warmup:]) / statistics.median(measured),
        "first_steps_s": sum(timer.times[:warmup]),
        "fit_wall_s": wall,
        "losses": losses,
        "output_dir": cfg.paths.output_dir,
        "_module": module,
        "_datamodule": datamodule,
    }


def last_mean_and_se(losses: list[float], last: int) -> tuple[float, float]:
    tail = losses[-last:]
    return statistics.mean(tail), statistics.stdev(tail) / math.sqrt(len(tail))


def bare_loop(net: torch.nn.Module, device: torch.device, *, batch: int, steps: int, warmup: int) -> dict:
    """bf16 autocast + torch.compile + channels_last + fused AdamW on GPU-resident tensors: the same network, loss
    (eps MSE at uniform t on the linear schedule), clipping and EMA as the Lightning step, without data loading."""
    from diffusion_elbo.core.chain import NoiseSchedule
    from diffusion_elbo.core.schedules import linear_betas

    schedule = NoiseSchedule(linear_betas(1000)).to(device)
    net = net.to(device).train().to(memory_format=torch.channels_last)
    ema = [p.detach().clone() for p in net.parameters()]
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-4, weight_decay=0.0, fused=True)
    compiled = torch.compile(net)
    x0 = torch.rand(batch, 3, 32, 32, device=device) * 2 - 1
    times = []
    for step in range(steps):
        sync(device)
        start = time.perf_counter()
        t = torch.randint(1, 1001, (batch,), device=device)
        eps = torch.randn_like(x0)
        a = schedule.alpha_bar[t].float().view(-1, 1, 1, 1)  # (B, 1, 1, 1); the tables are float64
        x_t = (a.sqrt() * x0 + (1 - a).sqrt() * eps).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = compiled(x_t, t)
        loss = (out.float() - eps).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in net.parameters()], 1 - 0.9999)
        float(loss)  # the Lightning path reads the loss every step (logging, the loss journal)
        sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return {
        "steps_measured": len(times),
        "images_per_s": batch * len(times) / sum(times),
        "step_ms_median": 1e3 * statistics.median(times),
    }


# ------------------------------------------------------------------------------------------ evaluation
def eval_throughput(net: torch.nn.Module, schedule, x0: torch.Tensor, rows: int, repeats: int = 3) -> dict:
    """Exact-ELBO rows/s (examples x timesteps) against the raw forward at ``rows`` per call, float32 as src/eval.py."""
    from diffusion_elbo.core.elbo import exact_elbo

    device = x0.device
    net = net.eval()
    probe = x0.repeat(math.ceil(rows / x0.shape[0]), 1, 1, 1)[:rows]
    t_probe = torch.randint(1, schedule.T + 1, (rows,), device=device)

    def raw() -> float:
        with torch.no_grad():
            return per_second(lambda: net(probe, t_probe), rows, device)

    def exact() -> float:
        run = lambda: exact_elbo(net, schedule, x0, parametrization="eps", num_bins=256, max_batch=rows)  # noqa: E731
        return per_second(run, x0.shape[0] * schedule.T, device)

    raw(), exact()
    r, e = [], []
    for _ in range(repeats):
        r.append(raw())
        e.append(exact())
    return {
        "rows_per_call": rows,
        "examples": x0.shape[0],
        "timesteps": schedule.T,
        "raw_forward_rows_per_s": statistics.median(r),
        "exact_elbo_rows_per_s": statistics.median(e),
        "exact_vs_raw": statistics.median(e) / statistics.median(r),
    }


def sampling_throughput(module, num_samples: int, device: torch.device) -> dict:
    """DDIM-50 images/s of ``module.sample`` (the sample.py and FID path), float32 and under bf16 autocast."""
    from diffusion_elbo.core.samplers import DDIMSampler

    module = module.to(device).eval()
    out = {"num_samples": num_samples, "steps": 50}
    for name, amp in [("fp32", False), ("bf16_autocast", True)]:
        g = torch.Generator(device=device).manual_seed(0)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            module.sample(8, DDIMSampler(steps=50), generator=g)  # warm-up
            sync(device)
            start = time.perf_counter()
            x = module.sample(num_samples, DDIMSampler(steps=50), generator=g)
            sync(device)
        out[name] = {"images_per_s": num_samples / (time.perf_counter() - start), "finite": bool(x.isfinite().all())}
    return out


# ---------------------------------------------------------------------------------------------- VDM
def vdm_section(root: Path, args: argparse.Namespace, device: torch.device, record) -> None:
    from diffusion_elbo.core.distributions import nats_to_bits_per_dim
    from diffusion_elbo.evaluation import evaluate_continuous, run_eval

    overrides = [
        *base_overrides(root, args),
        "trainer=gpu" if device.type == "cuda" else "trainer.precision=bf16-mixed",
        "schedule=learned",
        "loss=vdm",
        "parametrization=v",
        "loss.aux_weight=4",
        "model.dropout=0.1",
        "schedule.gamma_max=8",
        "optimizer.lr=1e-3",
        "lr_scheduler.warmup_steps=100",
    ]
    run = lightning_run(overrides, args.vdm_steps, warmup=min(20, args.vdm_steps // 2))
    module, datamodule = run.pop("_module"), run.pop("_datamodule")
    run.pop("losses")
    record("vdm", {"train": run})
    datamodule.setup("fit")
    dataset = datamodule.val_set
    n = min(args.parity_examples, len(dataset))
    subset = torch.utils.data.Subset(dataset, range(n))
    results = {}
    for name, amp in [("fp32", False), ("bf16_autocast", True)]:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            summary = evaluate_continuous(
                **module.to(device).bound_inputs(), dataset=subset, strata=8, seed=0, device=device, batch_size=128
            )
        results[name] = summary
    d = results["fp32"].num_dims
    per_example = {k: nats_to_bits_per_dim(v.total / d) for k, v in results.items()}
    diff = per_example["bf16_autocast"] - per_example["fp32"]
    parity = {
        "examples": n,
        "strata": 8,
        "fp32_bpd": float(per_example["fp32"].mean()),
        "bf16_autocast_bpd": float(per_example["bf16_autocast"].mean()),
        "mean_diff_bpd": float(diff.mean()),
        "max_abs_diff_bpd": float(diff.abs().max()),
        "diff_se_bpd": float(diff.std() / math.sqrt(n)),
    }
    record("vdm", {"train": run, "bound_parity": parity})
    ckpt = Path(run["output_dir"]) / "checkpoints" / "last.ckpt"
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        cfg = compose(
            "eval",
            overrides=[
                f"ckpt_path={ckpt}",
                "likelihood=ode",
                f"num_examples={args.ode_examples}",
                f"batch_size={args.ode_examples}",
                f"device={device.type}",
                "wandb.enabled=false",
                "fid.num_samples=0",
            ],
        )
    out_dir = Path(tempfile.mkdtemp(prefix="gpu-ode-"))
    start = time.perf_counter()
    metrics = run_eval(cfg, out_dir)
    ode = {k: v for k, v in metrics.items() if k.startswith("ode_")}
    ode["wall_s"] = time.perf_counter() - start
    record("vdm", {"train": run, "bound_parity": parity, "ode": ode})


# ------------------------------------------------------------------------------------------ inception
def inception_section(module, datamodule, args: argparse.Namespace, device: torch.device) -> dict:
    try:
        import torch_fidelity  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError as exc:
        return {"ran": False, "missing": str(exc)}
    from unittest import mock

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from diffusion_elbo.core.samplers import DDIMSampler
    from diffusion_elbo.fid import compute_fid, make_fid

    cache = Path(tempfile.mkdtemp(prefix="gpu-fid-"))
    weights = cache / "inception-own-init.pth"
    # the extractor's own initialisation saved as a weights file: no download (there is no network), and a real
    # file for the feature_extractor_weights_path route that clusters without internet use
    with (
        mock.patch("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", return_value={}),
        mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", return_value=None),
    ):
        extractor = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(extractor.state_dict(), weights)
    start = time.perf_counter()
    fid = make_fid(datamodule, features="inception", cache_dir=cache, weights_path=str(weights), device=device)
    reference_s = time.perf_counter() - start
    start = time.perf_counter()
    value = compute_fid(
        module.to(device).eval(),
        fid,
        num_samples=args.fid_samples,
        rank=0,
        world_size=1,
        sampler=DDIMSampler(steps=50),
        batch_size=500,
        seed=0,
    )
    return {
        "ran": True,
        "weights": "the extractor's own initialisation (not pt_inception-2015-12-05): tests the path only",
        "num_samples": args.fid_samples,
        "fid": value,
        "reference_seconds": reference_s,
        "sample_and_fid_seconds": time.perf_counter() - start,
    }


# ---------------------------------------------------------------------------------------------- report
def render(results: dict) -> str:
    """The results file as a markdown table, the form benchmarks/RESULTS.md and the README quote."""
    m = results["machine"]
    lines = [
        f"# GPU path: {m.get('gpu', 'CPU rehearsal')}",
        "",
        f"{m.get('nvidia_smi') or ''}; torch {m['torch']} (CUDA {m.get('cuda')}, cuDNN {m.get('cudnn')}), lightning "
        f"{m['lightning']}, python {m['python']}, diffusion-elbo {m['diffusion_elbo']}; {m['date']}. Written by "
        "`python benchmarks/gpu.py` (its docstring says how each number is made); raw numbers in the .json beside.",
        "",
    ]
    flops, peak = results.get("flops", {}), results.get("peak", {}).get("bf16_matmul_8192_flops")
    if flops:
        lines += [
            f"CIFAR-10 UNet of Ho et al.: {flops['parameters'] / 1e6:.1f}M parameters, "
            f"{flops['forward'] / 1e9:.2f} GFLOP per forward and {flops['train'] / 1e9:.2f} GFLOP per training image "
            "(forward + backward, FlopCounterMode)"
            + (
                f"; measured bf16 matrix-product peak {peak / 1e12:.0f} TFLOP/s (8192^3, random data)." if peak else "."
            ),
            "",
        ]
    train = results.get("train", {})
    if train:
        lines += [
            "## Training throughput (batch 128, the Lightning path with the default callbacks)",
            "",
            "| settings | images/s | step (ms, median) | MFU (datasheet 989 TFLOP/s) | MFU (measured peak) | "
            "data wait | x Ho et al.'s TPU v3-8 |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in train.items():
            lines.append(
                f"| {name} | {r['images_per_s']:.0f} | {r['step_ms_median']:.1f} | "
                f"{100 * r.get('mfu_datasheet', float('nan')):.1f}% | {100 * r.get('mfu_measured_peak', float('nan')):.1f}% "
                f"| {100 * r['data_wait_share']:.1f}% | {r['vs_ho_et_al_tpu_v3_8']:.2f} |"
            )
        lines.append("")
    bare = results.get("bare")
    if bare:
        lines += [
            f"Bare PyTorch loop at the fast settings on GPU-resident tensors: {bare['images_per_s']:.0f} images/s"
            + (
                f"; the Lightning path reaches {100 * bare['lightning_vs_bare']:.0f}% of it."
                if "lightning_vs_bare" in bare
                else "."
            ),
            "",
        ]
    cost = results.get("callback_cost")
    if cost:
        lines += [
            f"The fast path for {cost['steps']} steps (median step after step {cost['measured_after_step']}) with the "
            f"default callbacks: {cost['default_callbacks']['images_per_s']} images/s; with only EMA and the LR monitor: "
            f"{cost['ema_and_lr_monitor_only']['images_per_s']} (the callbacks are not where the gap to the bare loop is).",
            "",
        ]
    curves = results.get("loss_curves")
    if curves:
        lines += [
            f"## Loss curve: bf16 + compile + channels_last + fused AdamW against fp32 ({curves['steps']} steps, same seed)",
            "",
            f"Mean loss over the last {curves['last']} steps: fp32 {curves['fp32_mean']:.5f} ± {curves['fp32_se']:.5f}, "
            f"fast path {curves['fast_mean']:.5f} ± {curves['fast_se']:.5f}; difference {curves['diff_in_se']:+.2f} "
            "standard errors (target: within 2).",
            "",
        ]
    ev = results.get("eval")
    if ev:
        lines += [
            "## Exact-ELBO evaluation (float32, as src/eval.py)",
            "",
            "| rows per call | raw forward rows/s | exact ELBO rows/s | ratio |",
            "|---|---|---|---|",
        ]
        for rows, r in ev.items():
            lines.append(
                f"| {rows} | {r['raw_forward_rows_per_s']:.0f} | {r['exact_elbo_rows_per_s']:.0f} | {r['exact_vs_raw']:.3f} |"
            )
        lines.append("")
    sampling = results.get("sampling")
    if sampling:
        lines += [
            f"## DDIM-{sampling['steps']} sampling ({sampling['num_samples']} images)",
            "",
            f"fp32: {sampling['fp32']['images_per_s']:.0f} images/s; bf16 autocast: "
            f"{sampling['bf16_autocast']['images_per_s']:.0f} images/s.",
            "",
        ]
    vdm = results.get("vdm")
    if vdm:
        lines += ["## Continuous time (learned log-SNR, bound + v-MSE) and the ODE likelihood", ""]
        t = vdm["train"]
        lines.append(f"Training under bf16-mixed: {t['images_per_s']:.0f} images/s over {t['steps']} steps.")
        p = vdm.get("bound_parity")
        if p:
            lines.append(
                f"Bound on {p['examples']} validation images ({p['strata']} stratified t each, the same t and noise): "
                f"float32 {p['fp32_bpd']:.4f} bits/dim, bf16 autocast {p['bf16_autocast_bpd']:.4f}; mean difference "
                f"{p['mean_diff_bpd']:+.5f} ± {p['diff_se_bpd']:.5f}, largest per example {p['max_abs_diff_bpd']:.4f}."
            )
        o = vdm.get("ode")
        if o:
            lines.append(
                f"ODE likelihood (src/eval.py likelihood=ode, dopri5 at 1e-5, batch {o['ode_num_examples']}): "
                f"{o['ode_bpd']:.3f} bits/dim, NFE {o['ode_nfe']:.0f}, {o['ode_seconds_per_example']:.3f} s per example."
            )
        lines.append("")
    inc = results.get("inception")
    if inc:
        lines += ["## fid.features=inception", ""]
        if inc.get("ran"):
            lines.append(
                f"Ran end to end through torch-fidelity with weights_path set ({inc['weights']}): {inc['num_samples']} "
                f"DDIM-50 samples in {inc['sample_and_fid_seconds']:.1f} s, the reference statistics of the train split "
                f"in {inc['reference_seconds']:.1f} s; FID {inc['fid']:.2f} (not comparable: not the Inception weights)."
            )
        else:
            lines.append(f"Not run: {inc['missing']}.")
        lines.append("")
    if results.get("calls"):
        lines += ["## Device calls", "", *[f"{k}. {v}" for k, v in results["calls"].items()], ""]
    errors = {k: v for k, v in results.items() if k.endswith(("_error", "_skipped"))}
    if errors:
        lines += ["## Not measured", "", *[f"- {k}: {v}" for k, v in errors.items()], ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the results .json (a .md beside it is written at the end)")
    parser.add_argument("--render", action="store_true", help="only write the .md of an existing --out .json")
    parser.add_argument("--quick", action="store_true", help="small sizes on the CPU: a rehearsal of the code paths")
    parser.add_argument("--items", nargs="*", default=["train", "bare", "eval", "sampling", "vdm", "inception"])
    parser.add_argument("--deadline-s", type=float, default=None, help="start no further item after this many seconds")
    args = parser.parse_args()
    if args.render:
        results = json.loads(Path(args.out).read_text())
        Path(args.out).with_suffix(".md").write_text(render(results))
        return
    cuda = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda" if cuda else "cpu")
    args.accelerator = "gpu" if cuda else "cpu"
    q = args.quick
    args.batch = 16 if q else 128
    args.workers = 2 if q else 12
    args.images = 200 if q else 10000
    args.curve_steps = 8 if q else 1000
    args.short_steps = 6 if q else 150
    args.vdm_steps = 6 if q else 300
    args.parity_examples = 8 if q else 256
    args.ode_examples = 2 if q else 64
    args.fid_samples = 16 if q else 2000
    if q:
        VARIANTS["bf16_compile_cl_fused"] = [v for v in VARIANTS["bf16_compile_cl_fused"] if v != "compile=true"]
        VARIANTS["bf16"] = ["trainer.precision=bf16-mixed"]
        VARIANTS["bf16_compile_cl_fused"][0] = "trainer.precision=bf16-mixed"

    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    results: dict = {"quick": q, "machine": environment()}

    def record(key: str, value) -> None:
        results[key] = value
        out_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"== {key}: {json.dumps(value, default=str)[:600]}", flush=True)

    began = time.perf_counter()

    def due(key: str) -> bool:
        """Whether item ``key`` was asked for and the deadline leaves time to start it."""
        elapsed = time.perf_counter() - began
        if args.deadline_s is not None and elapsed > args.deadline_s:
            record(key + "_skipped", f"not started: {elapsed:.0f} s had passed (--deadline-s {args.deadline_s})")
            return False
        return key.split("_")[0] in args.items

    @contextlib.contextmanager
    def section(key: str):
        start = time.perf_counter()
        try:
            yield
        except Exception as exc:  # keep going: one broken item must not cost the others their device time
            traceback.print_exc()
            record(key + "_error", f"{type(exc).__name__}: {str(exc)[:400]}")
        print(f"-- {key} took {time.perf_counter() - start:.1f} s", flush=True)

    root = Path(tempfile.mkdtemp(prefix="gpu-images-"))
    make_images(root, args.images, 32)
    record("data", {"images": args.images, "size": 32, "root": str(root)})
    if cuda:
        with section("peak"):
            record("peak", {"bf16_matmul_8192_flops": bf16_matmul_peak(device)})

    from diffusion_elbo.builders import build_module

    cfg = compose_train(base_overrides(root, args))
    net = build_module(cfg)[0].net.to(device)
    flops = train_flops_per_image(net, (3, 32, 32), device)
    flops["parameters"] = sum(p.numel() for p in net.parameters())
    record("flops", flops)
    datasheet = next((v for k, v in PEAKS.items() if k in results["machine"].get("gpu", "")), None)
    measured = results.get("peak", {}).get("bf16_matmul_8192_flops")

    trained = None
    if "train" in args.items:
        train, curves = {}, {}
        for name, extra in VARIANTS.items():
            steps = args.short_steps if name == "bf16" else args.curve_steps
            if not due(f"train_{name}"):
                continue
            with section(f"train_{name}"):
                run = lightning_run([*base_overrides(root, args), *extra], steps, warmup=min(50, steps // 3))
                module, datamodule = run.pop("_module"), run.pop("_datamodule")
                curves[name] = run.pop("losses")
                if datasheet:
                    run["mfu_datasheet"] = run["images_per_s"] * flops["train"] / datasheet
                if measured:
                    run["mfu_measured_peak"] = run["images_per_s"] * flops["train"] / measured
                run["vs_ho_et_al_tpu_v3_8"] = run["images_per_s"] / HO_ET_AL_IMAGES_PER_S
                train[name] = run
                record("train", train)
                if name == "bf16_compile_cl_fused" or trained is None:
                    trained = (module, datamodule)
        if "fp32" in curves and "bf16_compile_cl_fused" in curves:
            last = min(200, len(curves["fp32"]) // 2)
            m0, se0 = last_mean_and_se(curves["fp32"], last)
            m1, se1 = last_mean_and_se(curves["bf16_compile_cl_fused"], last)
            record(
                "loss_curves",
                {
                    "steps": len(curves["fp32"]),
                    "last": last,
                    "fp32_mean": m0,
                    "fp32_se": se0,
                    "fast_mean": m1,
                    "fast_se": se1,
                    "diff_in_se": (m1 - m0) / math.sqrt(se0**2 + se1**2),
                    "first_10_fp32": curves["fp32"][:10],
                    "first_10_fast": curves["bf16_compile_cl_fused"][:10],
                },
            )
            pairs = zip(curves["fp32"], curves["bf16_compile_cl_fused"], strict=False)
            (out_path.parent / (out_path.stem + "_curves.csv")).write_text(
                "step,fp32,bf16_compile_cl_fused\n"
                + "".join(f"{i},{a:.6g},{b:.6g}\n" for i, (a, b) in enumerate(pairs))
            )
    if trained is None:
        cfg = compose_train([*base_overrides(root, args), "trainer.max_steps=1"])
        module, datamodule = build_module(cfg)
        datamodule.setup("fit")
        trained = (module.to(device), datamodule)
    module, datamodule = trained
    module = module.to(device)
    datamodule.setup("fit")
    if due("eval"):
        with section("eval"):
            x0 = torch.stack([datamodule.val_set[i][0] for i in range(2 if q else 8)]).to(device)
            sizes = (256,) if q else (1024, 4096)
            record("eval", {str(r): eval_throughput(module.net.float(), module.schedule, x0, r) for r in sizes})
    if due("sampling"):
        with section("sampling"):
            record("sampling", sampling_throughput(module, 16 if q else 1000, device))
    if due("inception"):
        with section("inception"):
            record("inception", inception_section(module, datamodule, args, device))
    if due("vdm"):
        with section("vdm"):
            vdm_section(root, args, device, record)
    if due("bare"):
        with section("bare"):
            cfg = compose_train(base_overrides(root, args))
            bare_net = build_module(cfg)[0].net
            if q:  # no compile on the CPU rehearsal: torch.compile of a UNet takes minutes on 2 cores
                torch.compile, original = (lambda m: m), torch.compile
            try:
                bare = bare_loop(bare_net, device, batch=args.batch, steps=args.short_steps, warmup=20 if not q else 3)
            finally:
                if q:
                    torch.compile = original
            fast = results.get("train", {}).get("bf16_compile_cl_fused")
            if fast:
                bare["lightning_vs_bare"] = fast["images_per_s"] / bare["images_per_s"]
            record("bare", bare)
    shutil.rmtree(root, ignore_errors=True)
    out_path.with_suffix(".md").write_text(render(results))
    print(json.dumps({k: v for k, v in results.items() if k != "machine"}, indent=1, default=str)[-6000:])


if __name__ == "__main__":
    main()
