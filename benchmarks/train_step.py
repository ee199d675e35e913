"""Training-step throughput, MFU and peak memory of a named model under each speed lever, side by side.

One step = forward + backward + clipping + AdamW, on random latents and class ids, with the flow
objective, built from the same pieces the trainer uses (autocast, in-place compile of each block,
activation checkpointing, SDPA kernel choice, fused AdamW on GPU). All rows of one run share the
process and the device, so they compare with each other; the first row is the reference.

    python benchmarks/train_step.py --model dit-xl/2 --batch 64 \
        --levers fp32,tf32,bf16,bf16+compile,bf16+compile+ckpt
    python benchmarks/train_step.py --model dit-s/4 --input-size 16 --channels 3 --batch 32 --device cpu \
        --levers fp32,bf16,fp32+compile,fp32+ckpt
    python benchmarks/train_step.py --model dit-s/2 --batch 32 --device cpu --levers bf16 --reference diffusers

With ``--reference diffusers`` every lever runs twice, on our model and on the diffusers model the
converter builds from it (``ldmkit.models.convert``: same configuration, same weights, checked to
compute the same function before timing), and the table gains the ratio ours / diffusers. The two
implementations' steps are interleaved (ours, diffusers, diffusers, ours, ...) in one process per lever
and each is reported as its median step time, so that the slow drifts of a shared machine hit both
alike ("step spread" is (slowest - fastest) / median of a row's steps). Peak memory is per row: allocated
CUDA memory, or on CPU the peak RSS of a separate process that runs only that row's warm-up steps.

Conditioning: DiT and MDT are class-conditional; with a reference, PixArt, mmDiT and the U-Net are
text-conditional (their diffusers counterparts take no class labels): ``--text-len`` tokens of width
``--text-dim`` (and a pooled vector of the same width for mmDiT), as a frozen encoder would give.

A lever spec joins a precision (fp32 | tf32 | bf16 | fp16) with any of: compile, ckpt (activation
checkpointing), math (PyTorch's unfused attention instead of SDPA's fused kernels).
Prints a Markdown table to paste into benchmarks/RESULTS.md with the machine's name.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ldmkit.conditioning import Conditioning
from ldmkit.diffusion.flow import FlowMatching
from ldmkit.models import PRESETS, build_model
from ldmkit.models.flops import forward_flops_per_image
from ldmkit.train.distributed import fsdp_units
from ldmkit.train.telemetry import peak_memory_gib, peak_tflops, reset_peak_memory

# architectures whose diffusers counterpart takes no class labels: benchmarked with text
TEXT_REFERENCE = ("pixart", "mmdit", "unet")


def overrides(args: argparse.Namespace) -> dict:
    return {"depth": args.depth, "hidden_size": args.hidden_size, "num_heads": args.num_heads}


def arch_of(args: argparse.Namespace) -> str:
    if args.model.lower() not in PRESETS:
        raise SystemExit(f"unknown model {args.model!r}; see `ldmkit models`")
    return PRESETS[args.model.lower()]["arch"]


def uses_text(args: argparse.Namespace) -> bool:
    return args.reference == "diffusers" and arch_of(args) in TEXT_REFERENCE


def build_ours(args: argparse.Namespace) -> torch.nn.Module:
    text = uses_text(args)
    data = {"context_dim": args.text_dim, "num_classes": 0} if text else {"num_classes": args.num_classes}
    if text and arch_of(args) == "mmdit":
        data["pooled_dim"] = args.text_dim  # SD3's transformer requires a pooled vector
    if args.reference == "diffusers" and arch_of(args) == "dit":
        data["time_freq_shift"] = 1  # diffusers' DiT sinusoid (same cost, identical function)
    return build_model(args.model, in_channels=args.channels, input_size=args.input_size, **data,
                       **overrides(args))


def make_inputs(args: argparse.Namespace, batch: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, args.channels, args.input_size, args.input_size, generator=g).to(device)
    if uses_text(args):
        text = torch.randn(batch, args.text_len, args.text_dim, generator=g).to(device)
        pooled = torch.randn(batch, args.text_dim, generator=g).to(device) if arch_of(args) == "mmdit" else None
        return x0, Conditioning(text=text, text_pooled=pooled)
    ids = torch.randint(0, args.num_classes, (batch,), generator=g).to(device)
    return x0, Conditioning(class_ids=ids)


def diffusers_call(dm: torch.nn.Module) -> Callable:
    """``f(x_t, t, cond)`` calling a diffusers model with ldmkit's conventions (diffusers time = 1000 t)."""
    name = type(dm).__name__
    if name == "DiTTransformer2DModel":
        return lambda x, t, c: dm(x, timestep=1000 * t, class_labels=c.class_ids).sample
    if name == "SD3Transformer2DModel":
        from ldmkit.models.convert_mmdit import diffusers_forward

        return lambda x, t, c: diffusers_forward(dm, x, t, c)
    if name == "PixArtTransformer2DModel":
        no_micro = {"resolution": None, "aspect_ratio": None}
        return lambda x, t, c: dm(x, encoder_hidden_states=c.text, timestep=1000 * t,
                                  added_cond_kwargs=no_micro).sample
    if name == "UNet2DConditionModel":
        return lambda x, t, c: dm(x, 1000 * t, encoder_hidden_states=c.text).sample
    raise SystemExit(f"no diffusers call for {name}")


def build(args: argparse.Namespace, impl: str, device: torch.device) -> tuple[torch.nn.Module, Callable, list]:
    """(module, f(x_t, t, cond), units to compile one by one) for ``impl`` = ours | diffusers."""
    torch.manual_seed(0)
    with device:  # initialise on the device itself (fast for large models on a GPU)
        model = build_ours(args)
    if impl == "ours":
        return model, model, fsdp_units(model)
    from ldmkit.models.convert import to_diffusers

    dm = to_diffusers(model).train()
    for module in dm.modules():  # diffusers' DiT drops labels inside the model; ldmkit's trainer does it
        if hasattr(module, "dropout_prob"):  # outside, so neither benchmarked step drops any
            module.dropout_prob = 0.0
    del model
    gc.collect()
    units = list(getattr(dm, "transformer_blocks", None) or [*dm.down_blocks, dm.mid_block, *dm.up_blocks])
    return dm, diffusers_call(dm), units


def check_parity(args: argparse.Namespace, device: torch.device) -> float:
    """Relative max |ours - diffusers| of one fp32 forward with perturbed weights (the zero-initialised
    output layers would make any two models agree): the two rows must time the same function."""
    from ldmkit.models.convert import to_diffusers

    torch.manual_seed(0)
    with device:
        ours = build_ours(args)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:  # not fixed tables (DiT's pos_embed), which diffusers rebuilds itself
                p.add_(0.02 * torch.randn_like(p))
    ref = to_diffusers(ours).eval()  # eval: no label dropout in diffusers' DiT
    f_ours, f_ref = ours.eval(), diffusers_call(ref)
    x, cond = make_inputs(args, 2, device, seed=1)
    t = torch.tensor([0.3, 0.8], device=device)
    with torch.no_grad():
        a, b = f_ours(x, t, cond), f_ref(x, t, cond)
    if not b.abs().max() > 0:
        raise SystemExit("parity check: the reference output is all zeros; perturb the weights first")
    return ((a - b).abs().max() / b.abs().max()).item()


def train_flops_per_image(args: argparse.Namespace) -> float:
    """Model FLOPs of one trained image (3 x forward), counted on a meta-device copy."""
    with torch.device("meta"):
        model = build_ours(args)
    x, cond = make_inputs(args, 1, torch.device("meta"))
    return 3 * forward_flops_per_image(model, x, torch.empty(1, device="meta"), cond)


def make_step(args: argparse.Namespace, device: torch.device, spec: str, impl: str) -> Callable[[], None]:
    """One training step of ``impl`` (ours | diffusers) under the levers of ``spec``, as a closure."""
    parts = spec.split("+")
    precision, levers = parts[0], set(parts[1:])
    unknown = levers - {"compile", "ckpt", "math"}
    if precision not in ("fp32", "tf32", "bf16", "fp16") or unknown:
        raise SystemExit(f"bad lever spec {spec!r}")
    model, forward, units = build(args, impl, device)
    if "ckpt" in levers:
        if impl == "ours":
            model.set_grad_checkpointing(True)
        else:
            model.enable_gradient_checkpointing()
    if "compile" in levers:
        for unit in units:
            unit.compile()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95),
                            **({"fused": True} if device.type == "cuda" else {"foreach": True}))
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    objective = FlowMatching()
    x0, cond = make_inputs(args, args.batch, device)
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def step() -> None:
        attention = sdpa_kernel([SDPBackend.MATH]) if "math" in levers else nullcontext()
        with attention, torch.autocast(device.type, dtype=low, enabled=low is not None):
            loss, _, _ = objective.loss(forward, x0, cond)
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

    return step


def run(args: argparse.Namespace, device: torch.device, spec: str, impls: list[str]) -> dict[str, dict]:
    """Time ``impls`` under one lever spec in this process, their steps interleaved (A B A B ...), so that
    a slow drift of the machine hits every implementation alike; per-step times, median reported."""
    precision = spec.split("+")[0]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        torch.backends.cudnn.allow_tf32 = precision == "tf32"
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    steps, warmup_s, times, peak = {}, {}, {i: [] for i in impls}, {}
    for impl in impls:
        steps[impl] = make_step(args, device, spec, impl)
        start = time.perf_counter()
        for _ in range(args.warmup):  # compilation happens here
            steps[impl]()
        sync()
        warmup_s[impl] = time.perf_counter() - start
    for it in range(args.iters):
        for impl in impls if it % 2 == 0 else impls[::-1]:
            reset_peak_memory(device)
            start = time.perf_counter()
            steps[impl]()
            sync()
            times[impl].append(time.perf_counter() - start)
            if device.type == "cuda":
                peak[impl] = max(peak.get(impl, 0.0), peak_memory_gib(device))
    return {impl: {"seconds": times[impl], "warmup_s": warmup_s[impl], "peak_gib": peak.get(impl)}
            for impl in impls}


def cpu_peak_rss(args: argparse.Namespace, device: torch.device, spec: str, impl: str) -> float:
    """Peak RSS of a fresh process that builds ``impl`` and runs its warm-up steps (CPU memory per row)."""
    steps = make_step(args, device, spec, impl)
    for _ in range(max(args.warmup, 1)):
        steps()
    return peak_memory_gib(device)


def in_subprocess(**job: Any) -> Any:
    """Run ``job`` (a row's timing or memory) in a fresh process: no compile caches or memory shared."""
    cmd = [sys.executable, __file__, *sys.argv[1:], "--job", json.dumps(job)]
    out = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{job} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dit-xl/2")
    p.add_argument("--input-size", type=int, default=32, help="latent side (32 = 256 px with an f8 VAE)")
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--text-len", type=int, default=77, help="text tokens (text-conditional rows)")
    p.add_argument("--text-dim", type=int, default=768, help="text token (and pooled) width")
    p.add_argument("--depth", type=int, help="override the preset's depth")
    p.add_argument("--hidden-size", type=int, help="override the preset's width")
    p.add_argument("--num-heads", type=int, help="override the preset's heads")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation happens here)")
    p.add_argument("--iters", type=int, default=10, help="timed steps per implementation (median reported)")
    p.add_argument("--levers", default="fp32+math,fp32,tf32,bf16,bf16+compile,bf16+compile+ckpt",
                   help="comma-separated lever specs; the first row is the reference")
    p.add_argument("--reference", choices=["none", "diffusers"], default="none",
                   help="also time the equivalent diffusers model under every lever")
    p.add_argument("--job", help=argparse.SUPPRESS)  # internal: one row's timing or memory, as JSON
    args = p.parse_args()
    device = torch.device(args.device)
    if args.job:
        job = json.loads(args.job)
        if job["kind"] == "time":
            print(json.dumps(run(args, device, job["spec"], job["impls"])))
        else:
            print(json.dumps(cpu_peak_rss(args, device, job["spec"], job["impl"])))
        return

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    sizes = {k: v for k, v in overrides(args).items() if v is not None}
    conditioning = (f"text {args.text_len}x{args.text_dim}" if uses_text(args)
                    else f"{args.num_classes} classes")
    print(f"{args.model}{f' {sizes}' if sizes else ''}, latents {args.channels}x{args.input_size}x{args.input_size}, "
          f"batch {args.batch}, {conditioning}, {name}, torch {torch.__version__}")
    impls = ["ours"]
    if args.reference == "diffusers":
        import diffusers

        if arch_of(args) not in ("dit", *TEXT_REFERENCE):
            raise SystemExit(f"--reference diffusers: {arch_of(args)} has no diffusers counterpart (docs/models.md)")

        impls.append("diffusers")
        print(f"diffusers {diffusers.__version__}; fp32 forward of perturbed weights, relative max difference "
              f"ours vs diffusers: {check_parity(args, device):.1e}")
    flops = train_flops_per_image(args)
    specs = args.levers.split(",")
    rows: dict[tuple[str, str], dict] = {}
    for spec in specs:
        timed = in_subprocess(kind="time", spec=spec, impls=impls)
        for impl in impls:
            r = timed[impl]
            ms = 1000 * statistics.median(r["seconds"])
            ips = args.batch / (ms / 1000)
            achieved = flops * ips / 1e12
            peak = peak_tflops(device, "fp32" if spec.startswith("tf32") else spec.split("+")[0],
                               spec.startswith("tf32"))
            if device.type == "cpu":
                r["peak_gib"] = in_subprocess(kind="memory", spec=spec, impl=impl)
            spread = 100 * (max(r["seconds"]) - min(r["seconds"])) / statistics.median(r["seconds"])
            rows[spec, impl] = {**r, "ms": ms, "images_per_s": ips, "tflops": achieved,
                                "mfu": achieved / peak if peak else None, "spread": spread}
            print(f"  {spec} {impl}: {ips:.1f} images/s", flush=True)

    ref = rows[specs[0], "ours"]["images_per_s"]
    print(f"\nmodel FLOPs per trained image: {flops / 1e9:.2f} GFLOPs (3 x forward, real FLOPs); "
          f"median of {args.iters} steps" + (", the implementations' steps interleaved" if len(impls) > 1 else ""))
    memory = "peak GiB" if device.type == "cuda" else "peak RSS GiB"
    header = f"| levers | model | images/s | ms/step | step spread | speed-up | TFLOP/s | MFU | {memory} | warm-up s |"
    if len(impls) > 1:
        header += " ours / diffusers |"
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for spec in specs:
        for impl in impls:
            r = rows[spec, impl]
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            line = (f"| {spec} | {impl} | {r['images_per_s']:.1f} | {r['ms']:.1f} | {r['spread']:.0f}% | "
                    f"{r['images_per_s'] / ref:.2f}x | {r['tflops']:.3g} | {mfu} | {r['peak_gib']:.2f} | "
                    f"{r['warmup_s']:.1f} |")
            if len(impls) > 1:
                ratio = r["images_per_s"] / rows[spec, "diffusers"]["images_per_s"]
                line += f" {ratio:.2f}x |" if impl == "ours" else " |"
            print(line)


if __name__ == "__main__":
    main()
