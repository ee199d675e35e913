"""Sampling throughput: ``ldmkit sample``'s path against diffusers' ``DiTPipeline`` on the same weights.

One class-conditional DiT (learned variance, 1000 classes, DDPM objective, DDIM sampling with classifier-free
guidance) is written as an ldmkit run and exported with ``ldmkit convert to-diffusers --pipeline``; the
export is a ``DiTPipeline`` folder. Both sides then sample the same labels from the same seed with the
same steps and guidance, decode with the same VAE, and are checked to give the same images before any
timing. Timing alternates the two sides, ``--reps`` times per batch size, in one process; the table gives
the median images/s of each and the ratio ldmkit / diffusers.

    python benchmarks/sample_speed.py                         # CPU: a small DiT, tiny VAE
    python benchmarks/sample_speed.py --preset dit-xl/2 --vae sd --device cuda --dtype bf16 \\
        --batch-sizes 1,8,64,256 --steps 50,250

The weights are random (perturbed from the initialisation so that every layer contributes): speed does not
depend on them, and parity is checked on the images they give. ``--vae sd`` builds the SD autoencoder's
architecture (random weights), for a realistic decoding cost; ``tiny`` keeps the decoder negligible.
Prints Markdown rows for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import diffusers  # noqa: E402

from ldmkit.autoencoders import build_autoencoder  # noqa: E402
from ldmkit.cli import main as ldmkit_main  # noqa: E402
from ldmkit.conditioning import Conditioning  # noqa: E402
from ldmkit.config import AutoencoderConfig, Config, from_dict, to_dict  # noqa: E402
from ldmkit.models import build_model  # noqa: E402
from ldmkit.models.flops import forward_flops_per_image  # noqa: E402
from ldmkit.sampling import SampleSettings, conditions_for, default_control, generate  # noqa: E402
from ldmkit.train.checkpoint import load_model, model_config, save_checkpoint  # noqa: E402

VAES = {
    # SD's KL-f8 autoencoder architecture (diffusers' AutoencoderKL defaults for SD 1.x)
    "sd": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, downsample=8),
    # a 2-level toy: decoding costs next to nothing, so the table measures the denoising loop
    "tiny": dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8, downsample=2),
}
# Sizes of dit-s/2 for the CPU: ``small`` (the default) and ``tiny`` (the script's test)
OWN = {"small": dict(hidden_size=256, depth=6, num_heads=4, patch_size=2),
       "tiny": dict(hidden_size=32, depth=2, num_heads=2, patch_size=2)}


def positive_ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",")]
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def preset_name(preset: str) -> str:
    return "dit-s/2" if preset in OWN else preset


def make_run(root: Path, args) -> Path:
    """An ldmkit run directory with one checkpoint of a DiT and a random VAE of ``args.vae``'s shape."""
    spec = dict(VAES[args.vae])
    down = spec.pop("downsample")
    levels = len(spec["block_out_channels"])
    torch.manual_seed(0)
    diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=args.image_size,
                            down_block_types=("DownEncoderBlock2D",) * levels,
                            up_block_types=("UpDecoderBlock2D",) * levels, **spec).save_pretrained(root / "vae")
    latent = args.image_size // down
    # DiTPipeline's shape: 1000 classes, a learned variance, diffusers' time embedding (frequency shift 1)
    model = build_model(preset_name(args.preset), in_channels=4, input_size=latent, num_classes=1000,
                        learn_sigma=True, time_freq_shift=1, **OWN.get(args.preset, {}))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # zero-initialised layers (adaLN-Zero, the final layer) must contribute
        for p in model.parameters():
            if p.requires_grad:  # not the fixed sin-cos position table, which diffusers recomputes
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    cfg = Config()
    cfg.data.image_size = args.image_size
    cfg.autoencoder = AutoencoderConfig(name="kl", path=str(root / "vae"), scale=0.18215, shift=0.0)
    cfg.diffusion.objective = "ddpm"
    cfg.diffusion.prediction = "eps"
    cfg.diffusion.learn_sigma = True
    cfg.model.name = preset_name(args.preset)
    cfg.sample.sampler = "ddim"
    cfg.sample.guidance = args.guidance
    state = model.state_dict()
    run = root / "run"
    save_checkpoint(run, 1, model_state=state, ema_state=state, model_json=model_config(model), optimizer_state={},
                    config=to_dict(cfg), train_state={"step": 1}, class_names=[f"class {i}" for i in range(1000)])
    return run


class Ldmkit:
    """What ``ldmkit sample`` runs: the EMA model, ``generate`` with the run's settings, the VAE decode."""

    def __init__(self, run: Path, device: torch.device) -> None:
        model, cfg_dict = load_model(run)
        self.cfg = from_dict(cfg_dict)
        self.model = model.to(device).eval()
        self.ae = build_autoencoder(self.cfg.autoencoder).to(device)
        self.device = device

    def __call__(self, labels: list[int], steps: int, seed: int) -> torch.Tensor:
        cfg = self.cfg
        control = default_control(len(labels), cfg.data.image_size)
        cond, uncond = conditions_for(control, class_ids=torch.tensor(labels), prompts=None, text=None)
        settings = SampleSettings.from_config(cfg, self.model).replace(steps=steps)
        size = cfg.data.image_size // self.ae.downsample
        x = generate(self.model, cond, (self.ae.channels, size, size), settings, uncond=uncond, seed=seed,
                     batch_size=len(labels), device=self.device)
        return (self.ae.decode(x).clamp(-1, 1) + 1) / 2


class Diffusers:
    def __init__(self, folder: Path, device: torch.device, guidance: float) -> None:
        self.pipe = diffusers.DiTPipeline.from_pretrained(str(folder)).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.guidance = guidance

    def __call__(self, labels: list[int], steps: int, seed: int) -> torch.Tensor:
        return self.pipe(class_labels=labels, guidance_scale=self.guidance, num_inference_steps=steps,
                         generator=torch.Generator().manual_seed(seed), output_type="pt").images


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small",
                   help="small (CPU default), tiny, or an ldmkit DiT preset, e.g. dit-xl/2")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--vae", choices=sorted(VAES), default="tiny")
    p.add_argument("--batch-sizes", type=positive_ints, default=[1, 8, 32])
    p.add_argument("--steps", type=positive_ints, default=[50])
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--reps", type=int, default=3, help="timed calls per side and setting, alternating")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast around both sides")
    p.add_argument("--tol", type=float, default=1e-4,
                   help="largest image difference (in [0, 1]) the parity check accepts before timing")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.reps < 1 or not args.guidance > 1.0 or args.image_size < 8 or not 0 < args.tol < 1:
        p.error("--reps must be >= 1, --guidance > 1 (the benchmark times guided sampling), --image-size >= 8, "
                "0 < --tol < 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16"
                else contextlib.nullcontext())

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run = make_run(root, args)
        if ldmkit_main(["convert", "to-diffusers", str(run), str(root / "hf"), "--pipeline"]) != 0:
            raise SystemExit("the export failed")
        exported = json.loads((root / "hf" / "model_index.json").read_text())["_class_name"]
        if exported != "DiTPipeline":
            raise SystemExit(f"the run exported as {exported}, not DiTPipeline")
        ours, theirs = Ldmkit(run, device), Diffusers(root / "hf", device, args.guidance)
        lat = args.image_size // ours.ae.downsample
        flops = forward_flops_per_image(ours.model.cpu(), torch.zeros(1, 4, lat, lat), torch.full((1,), 500.0),
                                        Conditioning(class_ids=torch.zeros(1, dtype=torch.long)))
        ours.model.to(device)

        # Same images first (fp32, 4 labels, 5 steps), or the timing compares different work.
        with torch.no_grad():
            labels = [0, 207, 360, 999]
            a, b = ours(labels, 5, seed=3), theirs(labels, 5, seed=3)
        diff = float((a.float().cpu() - b.float().cpu()).abs().max())
        if diff > args.tol:
            raise SystemExit(f"ldmkit and DiTPipeline disagree (max |diff| {diff:.2e}): not timing")

        rows = []
        total = len(args.steps) * len(args.batch_sizes) * args.reps * 2
        done = 0
        for steps in args.steps:
            for bs in args.batch_sizes:
                labels = [(7 * i) % 1000 for i in range(bs)]
                with torch.no_grad(), autocast:  # warm-up of both (kernels, allocator, compilation)
                    ours(labels, 2, seed=0), theirs(labels, 2, seed=0)
                times = {"ldmkit": [], "diffusers": []}
                for rep in range(args.reps):
                    for name, fn in (("ldmkit", ours), ("diffusers", theirs)) if rep % 2 == 0 else \
                            (("diffusers", theirs), ("ldmkit", ours)):
                        sync(device)
                        t0 = time.perf_counter()
                        with torch.no_grad(), autocast:
                            fn(labels, steps, seed=rep)
                        sync(device)
                        times[name].append(time.perf_counter() - t0)
                        done += 1
                        print(f"\r[{done}/{total}] steps {steps} batch {bs}: {name} {times[name][-1]:.2f} s",
                              end="", file=sys.stderr, flush=True)
                ours_s, theirs_s = statistics.median(times["ldmkit"]), statistics.median(times["diffusers"])
                ratios = [t / o for o, t in zip(times["ldmkit"], times["diffusers"])]
                tflops = 2 * bs * steps * flops / ours_s / 1e12  # two CFG branches
                rows.append((steps, bs, bs / ours_s, bs / theirs_s, theirs_s / ours_s, min(ratios), max(ratios),
                             ours_s, tflops))
        print(file=sys.stderr)

    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"\nMachine: {dev}, {torch.get_num_threads()} threads, torch {torch.__version__}, diffusers "
          f"{diffusers.__version__}. Model: {args.preset} at {args.image_size} px ({args.vae} VAE), DDIM, guidance "
          f"{args.guidance}, {args.dtype}. Parity before timing: max |image diff| {diff:.1e}. "
          f"Median of {args.reps} alternating calls.\n")
    print("| steps | batch | ldmkit images/s | DiTPipeline images/s | ldmkit / diffusers (min-max) | "
          "ldmkit s/call | ldmkit forward TFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    for steps, bs, o, t, r, lo, hi, s, tf in rows:
        print(f"| {steps} | {bs} | {o:.2f} | {t:.2f} | {r:.2f}x ({lo:.2f}-{hi:.2f}) | {s:.4g} | "
              f"{tf:.3g} |")


if __name__ == "__main__":
    main()
