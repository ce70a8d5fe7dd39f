"""Item 5 on a CUDA machine: training throughput of the CIFAR-10 UNet of Ho et al. (35.7M parameters,
batch 128, 32x32) in fp32 eager and in bf16 autocast + torch.compile, and the model FLOP utilisation."""

from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffusion_elbo.models import UNet

# dense bf16 tensor-core peaks (no sparsity), FLOP/s
PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def _step_fn(net, optimizer, bf16: bool):
    def step(x, t, target):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = (net(x, t).float() - target).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return step


def bench_gpu(batch: int = 128, steps: int = 50) -> dict:
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    x = torch.randn(batch, 3, 32, 32, device=device)
    t = torch.randint(1, 1001, (batch,), device=device)
    out = {"batch": batch, "gpu": torch.cuda.get_device_name()}
    for name, bf16, compiled in [("fp32_eager", False, False), ("bf16_compile", True, True)]:
        net = UNet(3, 32, 128, channel_mult=[1, 2, 2, 2], num_res_blocks=2, attention_resolutions=[16], dropout=0.1).to(
            device
        )
        optimizer = torch.optim.AdamW(net.parameters(), lr=2e-4, fused=True)
        step = _step_fn(torch.compile(net) if compiled else net, optimizer, bf16)
        for _ in range(10):  # warm-up (and compilation)
            step(x, t, x)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step(x, t, x)
        torch.cuda.synchronize()
        out[name] = {"images_per_s": batch * steps / (time.perf_counter() - start)}
    net = UNet(3, 32, 128, channel_mult=[1, 2, 2, 2], num_res_blocks=2, attention_resolutions=[16]).to(device)
    with FlopCounterMode(display=False) as counter:
        (net(x, t) - x).pow(2).mean().backward()
    flops_per_image = counter.get_total_flops() / batch
    peak = next((v for k, v in PEAKS.items() if k in out["gpu"]), None)
    out["train_flops_per_image"] = flops_per_image
    if peak:
        out["mfu_bf16_compile"] = out["bf16_compile"]["images_per_s"] * flops_per_image / peak
    out["ho_et_al_tpu_v3_8_images_per_s"] = 21 * 128
    return out
