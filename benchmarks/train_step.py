"""Training-step throughput, MFU and peak memory of a named model under each speed lever, side by side.

One step = forward + backward + clipping + AdamW, on random latents and class ids, with the flow
objective, built from the same pieces the trainer uses (autocast, in-place compile of each block,
activation checkpointing, SDPA kernel choice, fused AdamW on GPU). All rows of one run share the
process and the device, so they compare with each other; the first row is the reference.

    python benchmarks/train_step.py --model dit-xl/2 --batch 64 \
        --levers fp32,tf32,bf16,bf16+compile,bf16+compile+ckpt
    python benchmarks/train_step.py --model dit-s/4 --input-size 16 --channels 3 --batch 32 --device cpu \
        --levers fp32,bf16,fp32+compile,fp32+ckpt

A lever spec joins a precision (fp32 | tf32 | bf16 | fp16) with any of: compile, ckpt (activation
checkpointing), math (PyTorch's unfused attention instead of SDPA's fused kernels).
Prints a Markdown table to paste into benchmarks/RESULTS.md with the machine's name.
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
from ldmkit.train.telemetry import forward_flops_per_image, peak_tflops


def overrides(args: argparse.Namespace) -> dict:
    return {"depth": args.depth, "hidden_size": args.hidden_size, "num_heads": args.num_heads}


def train_flops_per_image(args: argparse.Namespace) -> float:
    """Model FLOPs of one trained image (3 x forward), counted on a meta-device copy."""
    with torch.device("meta"):
        model = build_model(args.model, in_channels=args.channels, input_size=args.input_size,
                            num_classes=args.num_classes, **overrides(args))
        x = torch.empty(1, args.channels, args.input_size, args.input_size)
        cond = Conditioning(class_ids=torch.zeros(1, dtype=torch.long))
        return 3 * forward_flops_per_image(model, x, torch.empty(1), cond)


def run(args: argparse.Namespace, device: torch.device, spec: str, flops: float) -> dict:
    parts = spec.split("+")
    precision, levers = parts[0], set(parts[1:])
    unknown = levers - {"compile", "ckpt", "math"}
    if precision not in ("fp32", "tf32", "bf16", "fp16") or unknown:
        raise SystemExit(f"bad lever spec {spec!r}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        torch.backends.cudnn.allow_tf32 = precision == "tf32"
    torch.manual_seed(0)
    with device:  # initialise on the device itself (fast for large models on a GPU)
        model = build_model(args.model, in_channels=args.channels, input_size=args.input_size,
                            num_classes=args.num_classes, **overrides(args))
    if "ckpt" in levers:
        model.set_grad_checkpointing(True)
    if "compile" in levers:
        for block in model.blocks:
            block.compile()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95),
                            **({"fused": True} if device.type == "cuda" else {"foreach": True}))
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    objective = FlowMatching()
    x0 = torch.randn(args.batch, args.channels, args.input_size, args.input_size, device=device)
    cond = Conditioning(class_ids=torch.randint(0, args.num_classes, (args.batch,), device=device))
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def step() -> None:
        attention = sdpa_kernel([SDPBackend.MATH]) if "math" in levers else nullcontext()
        with attention, torch.autocast(device.type, dtype=low, enabled=low is not None):
            loss, _, _ = objective.loss(model, x0, cond)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)

    compile_start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warmup_s = time.perf_counter() - compile_start
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start

    images_per_s = args.batch * args.iters / elapsed
    peak = peak_tflops(device, "fp32" if precision == "tf32" else precision, precision == "tf32")
    achieved = flops * images_per_s / 1e12
    return {
        "spec": spec, "images_per_s": images_per_s, "steps_per_s": args.iters / elapsed,
        "ms_per_step": 1000 * elapsed / args.iters, "tflops": achieved,
        "mfu": achieved / peak if peak else None, "warmup_s": warmup_s,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dit-xl/2")
    p.add_argument("--input-size", type=int, default=32, help="latent side (32 = 256 px with an f8 VAE)")
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--depth", type=int, help="override the preset's depth")
    p.add_argument("--hidden-size", type=int, help="override the preset's width")
    p.add_argument("--num-heads", type=int, help="override the preset's heads")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation happens here)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--levers", default="fp32+math,fp32,tf32,bf16,bf16+compile,bf16+compile+ckpt",
                   help="comma-separated lever specs; the first row is the reference")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    sizes = {k: v for k, v in overrides(args).items() if v is not None}
    print(f"{args.model}{f' {sizes}' if sizes else ''}, latents {args.channels}x{args.input_size}x{args.input_size}, batch {args.batch}, "
          f"{name}, torch {torch.__version__}")
    flops = train_flops_per_image(args)
    rows = []
    for spec in args.levers.split(","):
        rows.append(run(args, device, spec, flops))
        print(f"  {spec}: {rows[-1]['images_per_s']:.1f} images/s", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ref = rows[0]["images_per_s"]
    print(f"\nmodel FLOPs per trained image: {flops / 1e9:.1f} GFLOPs (3 x forward, real FLOPs)")
    print("| levers | images/s | steps/s | ms/step | speed-up | TFLOP/s | MFU | peak GiB | warm-up s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "n/a"
        print(f"| {r['spec']} | {r['images_per_s']:.1f} | {r['steps_per_s']:.2f} | {r['ms_per_step']:.1f} | "
              f"{r['images_per_s'] / ref:.2f}x | {r['tflops']:.3g} | {mfu} | {mem} | {r['warmup_s']:.1f} |")


if __name__ == "__main__":
    main()
