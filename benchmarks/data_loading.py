"""Data-loading throughput: decoding + augmenting JPEGs, and reading the latent cache, with N loader workers.

Both pipelines run exactly as the trainer runs them (``StreamSampler`` → ``DataLoader`` → ``collate``), on
data this script writes to a temporary directory first:

- **images**: an ImageNet-layout folder of JPEGs of ImageNet's typical size (500×375, ~100 KB), decoded,
  resized, cropped to ``--size`` and flipped (``ImageFolderDataset``);
- **latents**: a latent cache of ``--latents`` samples with SD-VAE shapes at ``--size`` (4 × size/8 ×
  size/8, float16 mean and std for both mirrors); each read draws a posterior sample and a flip.
  Side by side, the *reference* reads the same cache one sample at a time (``get``; the DataLoader's
  default per-index fetch) instead of one vectorised gather per batch (``get_many``).

Usage: ``python benchmarks/data_loading.py [--workers 0,1,2] [--size 256] [--seconds 8]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from ldmkit.data.batch import collate
from ldmkit.data.images import ImageFolderDataset
from ldmkit.data.latents import FORMAT, VERSION, LatentCacheDataset, shard_name, write_index
from ldmkit.data.stream import StreamDataset, StreamSampler


class PerSample(StreamDataset):
    """The reference: the same cache read one sample at a time (no batched ``__getitems__``)."""

    def __getitems__(self, keys):
        return _merge([self.dataset.get(index, epoch) for epoch, index in keys])


def _merge(parts):
    from ldmkit.data.latents import CachedBatch

    return CachedBatch(latents=torch.cat([p.latents for p in parts]),
                       class_ids=torch.cat([p.class_ids for p in parts]),
                       control={k: torch.cat([p.control[k] for p in parts]) for k in parts[0].control},
                       captions=[c for p in parts for c in p.captions])


def write_images(root: Path, n: int, classes: int = 10) -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (375 // 15 + 1, 500 // 15 + 1, 3), dtype=np.uint8)
    for i in range(n):
        folder = root / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        # smooth colour fields plus noise: JPEG sizes like photographs (~100 KB at quality 90)
        small = np.roll(base, i, axis=1).astype(np.int16) + rng.integers(-40, 40, base.shape)
        img = Image.fromarray(small.clip(0, 255).astype(np.uint8)).resize((500, 375), Image.Resampling.BICUBIC)
        noisy = np.asarray(img, np.int16) + rng.integers(-12, 12, (375, 500, 3))
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(folder / f"{i:06d}.JPEG", quality=90)


def write_cache(root: Path, n: int, size: int, shard: int = 10_000) -> None:
    root.mkdir(parents=True)
    h = size // 8
    g = torch.Generator().manual_seed(0)
    shards = []
    for k, lo in enumerate(range(0, n, shard)):
        m = min(shard, n - lo)
        save_file({"mean": torch.randn((m, 2, 4, h, h), generator=g).half(),
                   "std": (0.1 * torch.rand((m, 2, 4, h, h), generator=g)).half(),
                   "class_id": torch.randint(0, 1000, (m,), generator=g),
                   "orig_size": torch.full((m, 2), 375.0), "crop": torch.zeros((m, 2)),
                   "aspect": torch.ones(m)}, str(root / shard_name(k)))
        shards.append({"file": shard_name(k), "count": m})
    write_index(root, {"format": FORMAT, "version": VERSION, "shards": shards, "num_samples": n,
                       "latent_shape": [4, h, h], "num_classes": 1000, "text": None})


def measure(dataset, wrapper, batch: int, workers: int, seconds: float) -> float:
    """Samples per second of the trainer's loading path, after one warm-up batch."""
    sampler = StreamSampler(len(dataset), seed=0, global_batch=batch)
    loader = DataLoader(wrapper(dataset), batch_size=batch, sampler=sampler, collate_fn=collate,
                        num_workers=workers, persistent_workers=False, prefetch_factor=4 if workers else None)
    it = iter(loader)
    next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += len(next(it))
    rate = n / (time.perf_counter() - t0)
    del it
    return rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", default="0,1,2", help="comma-separated loader worker counts")
    p.add_argument("--size", type=int, default=256, help="image size (latents: size/8 with 4 channels)")
    p.add_argument("--images", type=int, default=600, help="JPEGs to write")
    p.add_argument("--latents", type=int, default=20_000, help="cached samples to write")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seconds", type=float, default=8.0, help="per measurement")
    p.add_argument("--dir", help="work directory (default: a temporary one)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    torch.set_num_threads(1)  # the loader's own work; workers are separate processes

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        write_images(tmp / "images", args.images)
        write_cache(tmp / "cache", args.latents, args.size)
        print(f"wrote {args.images} JPEGs and {args.latents} cached latents in {time.perf_counter() - t0:.0f} s")
        rows = []
        for crop in ("center", "random_resized"):
            ds = ImageFolderDataset(tmp / "images", args.size, crop=crop)
            for w in workers:
                rate = measure(ds, StreamDataset, min(args.batch, 64), w, args.seconds)
                rows.append({"pipeline": f"decode+augment JPEG 500x375 -> {args.size} ({crop})",
                             "workers": w, "samples_per_s": rate})
                print(rows[-1])
        cache = LatentCacheDataset(tmp / "cache", flip_prob=0.5)
        for name, wrapper in (("latent cache, batched gather (ours)", StreamDataset),
                              ("latent cache, per-sample reads (reference)", PerSample)):
            for w in workers:
                rate = measure(cache, wrapper, args.batch, w, args.seconds)
                rows.append({"pipeline": name, "workers": w, "samples_per_s": rate})
                print(rows[-1])

    print(f"\nMachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s) "
          f"per process, torch {torch.__version__}; batch {args.batch} (images: {min(args.batch, 64)})\n")
    print("| pipeline | workers | samples/s |\n|---|---|---|")
    for r in rows:
        print(f"| {r['pipeline']} | {r['workers']} | {r['samples_per_s']:,.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
