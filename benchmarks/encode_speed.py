"""Autoencoder throughput of ``ldmkit encode``: source images per second through ``KLAutoencoder.posterior``
(each image and its mirror, as the cache stores both), per resolution and precision.

The VAEs have the published architectures (SD/SDXL: 4 latent channels; SD3/FLUX: 16, no quant convs)
with random weights, so the compute equals the real models' and nothing is downloaded.

Usage: ``python benchmarks/encode_speed.py [--sizes 256,512] [--dtypes float32,bfloat16] [--batch 32]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from ldmkit.autoencoders import build_autoencoder
from ldmkit.config import AutoencoderConfig

ARCHS = {  # diffusers AutoencoderKL configs of the published VAEs (architecture only)
    "sd": dict(latent_channels=4),
    "sd3": dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False),
}


def build(arch: str, dtype: str, device: str):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, norm_num_groups=32, **ARCHS[arch])
    path = tempfile.mkdtemp()
    vae.save_pretrained(path)
    return build_autoencoder(AutoencoderConfig(name="kl", path=path, dtype=dtype), device=device)


@torch.no_grad()
def images_per_s(ae, size: int, batch: int, device: str, iters: int) -> float:
    x = torch.rand((batch, 3, size, size), device=device) * 2 - 1
    both = torch.cat([x, x.flip(-1)])
    for _ in range(2):
        ae.posterior(both)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        ae.posterior(both)
    if device == "cuda":
        torch.cuda.synchronize()
    return batch * iters / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", default="sd,sd3")
    p.add_argument("--sizes", default="256,512")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--batch", type=int, default=32, help="source images per call (twice that with mirrors)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| VAE | size | dtype | images/s (with mirror) | ImageNet-1k (1.28M) GPU-hours |\n|---|---|---|---|---|")
    for arch in args.archs.split(","):
        for dtype in args.dtypes.split(","):
            ae = build(arch, dtype, args.device)
            for size in map(int, args.sizes.split(",")):
                batch = args.batch if size <= 256 else max(1, args.batch // 4)
                rate = images_per_s(ae, size, batch, args.device, args.iters)
                print(f"| {arch} | {size} | {dtype} | {rate:,.1f} | {1_281_167 / rate / 3600:.2f} |", flush=True)
            del ae
            if args.device == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
