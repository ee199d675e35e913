"""Training-step throughput and peak memory of a named model, side by side across settings.

One full step = forward + backward + AdamW step, on random latents and class ids, with the flow
objective. Each configuration runs in the same process on the same device, so the rows of one run are
comparable; the reference row is fp32 with PyTorch's math attention (no fused kernel).

    python benchmarks/train_step.py --model dit-xl/2 --input-size 32 --channels 4 --batch 32
    python benchmarks/train_step.py --model dit-s/4 --input-size 16 --channels 3 --batch 64 --device cpu

Prints a Markdown table (paste it into benchmarks/RESULTS.md with the machine's name).
"""

from __future__ import annotations

import argparse
import platform
import time
from contextlib import nullcontext

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ldmkit.conditioning import Conditioning
from ldmkit.diffusion.flow import FlowMatching
from ldmkit.models import build_model


def run(model_name: str, input_size: int, channels: int, batch: int, num_classes: int,
        device: torch.device, precision: str, attention: str, warmup: int, iters: int) -> dict:
    torch.manual_seed(0)
    with device:  # initialise on the device itself (fast for large models on a GPU)
        model = build_model(model_name, in_channels=channels, input_size=input_size,
                            num_classes=num_classes)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95),
                            fused=True if device.type == "cuda" else None)
    objective = FlowMatching()
    x0 = torch.randn(batch, channels, input_size, input_size, device=device)
    cond = Conditioning(class_ids=torch.randint(0, num_classes, (batch,), device=device))
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else nullcontext())
    backends = {"math": [SDPBackend.MATH],
                "sdpa": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                         SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]}[attention]

    def step() -> float:
        with sdpa_kernel(backends), autocast:
            loss, _, _ = objective.loss(model, x0, cond)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iters):
        loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    n_params = sum(p.numel() for p in model.parameters())
    return {"precision": precision, "attention": attention, "images_per_s": batch * iters / elapsed,
            "ms_per_step": 1000 * elapsed / iters, "peak_gib": peak, "params_m": n_params / 1e6,
            "loss": loss}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dit-xl/2")
    p.add_argument("--input-size", type=int, default=32, help="latent side (32 = 256 px with an f8 VAE)")
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--configs", default="fp32:math,fp32:sdpa,tf32:sdpa,bf16:sdpa",
                   help="comma-separated precision:attention pairs (precision: fp32 | tf32 | bf16; "
                        "attention: math | sdpa); the first is the reference")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"{args.model}, latents {args.channels}x{args.input_size}x{args.input_size}, batch {args.batch}, "
          f"{name}, torch {torch.__version__}")
    rows = []
    for spec in args.configs.split(","):
        precision, attention = spec.split(":")
        if device.type == "cuda":  # tf32: fp32 storage, TF32 tensor-core matmuls
            torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
            torch.backends.cudnn.allow_tf32 = precision == "tf32"
        rows.append(run(args.model, args.input_size, args.channels, args.batch, args.num_classes,
                        device, precision, attention, args.warmup, args.iters))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ref = rows[0]["images_per_s"]
    print("| precision | attention | images/s | ms/step | speed-up | peak GiB | params (M) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['precision']} | {r['attention']} | {r['images_per_s']:.1f} | {r['ms_per_step']:.1f} | "
              f"{r['images_per_s'] / ref:.2f}x | {r['peak_gib']:.2f} | {r['params_m']:.1f} |")


if __name__ == "__main__":
    main()
