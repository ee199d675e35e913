"""``ldmkit encode``: write the latent cache (``ldmkit.data.latents``) of a run config's dataset.

The same config that trains describes what to encode: ``data.*`` (source, size, crop), ``autoencoder.*``
and, for text-to-image, ``cond.text.*``; ``data.cache`` (or ``--out``) is where the cache goes, and a run
with ``data.cache`` set trains from it.

Work is cut into output shards: ``shard_size`` consecutive samples of an image folder, or one output
shard per input tar shard of a WebDataset. Rank r of a torchrun job encodes shards k ≡ r (mod world).
Each shard is written atomically (tmp + rename), so an interrupted job run again skips what is done and
a cache is never half-written; ``index.json`` (with per-channel latent statistics and the bad-input
report) is written last, by rank 0, once every shard exists.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

from ldmkit.config import Config, ConfigError, to_dict
from ldmkit.data.decode import BadInput, DataReport, Issue
from ldmkit.data.latents import (
    FORMAT, INDEX, VERSION, MappedShard, autoencoder_identity, channel_statistics, data_identity,
    shard_channel_sums, shard_name, write_index,
)
from ldmkit.errors import DataError
from ldmkit.files import atomic_path

MANIFEST = "encode.json"  # what is being encoded; a second job into the same directory must match it
_DTYPES = {"float16": torch.float16, "float32": torch.float32}


# --------------------------------------------------------------------------------------------------
# Sources: what a shard's samples are
# --------------------------------------------------------------------------------------------------


def build_source(cfg: Config, seed: int, need_caption: bool):
    """The dataset of ``cfg.data`` without flips (the encoder stores both mirrors itself)."""
    d = cfg.data
    if d.name == "shapes":
        from ldmkit.data import build_dataset
        from dataclasses import replace

        return build_dataset(replace(d, flip_prob=0.0), seed=seed)
    if d.name in ("imagenet", "folder"):
        from ldmkit.data.images import build_image_dataset

        return build_image_dataset(d, seed=seed, flip_prob=0.0)
    if d.name == "webdataset":
        from ldmkit.data.shards import build_shard_source

        return build_shard_source(d, seed=seed, need_caption=need_caption, flip_prob=0.0)
    raise ConfigError(f"config key 'data.name': cannot encode {d.name!r}")


def source_identity(source, cfg: Config) -> dict[str, Any]:
    """JSON identity of the source, stored in the cache and compared when training reads it."""
    if hasattr(source, "describe"):
        return source.describe()
    d = cfg.data  # shapes: the generator's settings
    return {"kind": "shapes", "image_size": d.image_size, "num_samples": d.num_samples, "crop": d.crop,
            "shapes": to_dict(d.shapes)}


class _Indexed(Dataset):
    """Samples ``lo..hi-1`` of a map-style source; a bad one becomes ``{"bad": issues}``."""

    def __init__(self, source, lo: int, hi: int) -> None:
        self.source, self.lo, self.hi = source, lo, hi

    def __len__(self) -> int:
        return self.hi - self.lo

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = self.lo + i
        if not hasattr(self.source, "sample"):  # shapes: procedural, never bad
            s = self.source.get(index, 0)
            return {**s, "key": f"shapes/{index}", "issues": []}
        issues: list[Issue] = []
        try:
            s = self.source.sample(index, 0, issues)
        except BadInput as e:
            return {"bad": issues + [(self.source.key(index), e.kind, e.detail)]}
        return {**s, "issues": issues + list(s.get("issues", []))}


def _units(source, shard_size: int) -> list[Any]:
    """Output shard k's input: an index range of a map-style source or one tar shard."""
    if hasattr(source, "shards"):
        return list(source.shards)
    n = len(source)
    return [(lo, min(lo + shard_size, n)) for lo in range(0, n, shard_size)]


def _unit_samples(source, unit, num_workers: int, batch_size: int) -> Iterator[dict[str, Any]]:
    """The samples of one output shard in order; bad ones as ``{"bad": issues}``."""
    if isinstance(unit, tuple):
        loader = DataLoader(_Indexed(source, *unit), batch_size=batch_size, num_workers=num_workers,
                            collate_fn=lambda x: x)
        for chunk in loader:
            yield from chunk
        return
    issues: list[Issue] = []
    for s in source.iter_shard(unit, issues=issues):
        if issues:  # skipped just before this sample
            yield {"bad": list(issues)}
            issues.clear()
        yield s
    if issues:
        yield {"bad": list(issues)}


# --------------------------------------------------------------------------------------------------
# Encoding one shard
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def _encode_unit(samples: Iterator[dict[str, Any]], autoencoder, text_encoder, text_length: int,
                 device: torch.device, batch_size: int, dtype: torch.dtype, bar,
                 keep_std: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str], list[Issue]]:
    means, stds, text, n_valid, pooled = [], [], [], [], []
    meta: dict[str, list] = {"keys": [], "captions": []}
    class_ids, orig, crop, aspect = [], [], [], []
    issues: list[Issue] = []

    def flush(batch: list[dict[str, Any]]) -> None:
        x = torch.stack([s["image"] for s in batch]).to(device)  # (b, 3, H, W) in [-1, 1]
        both = torch.cat([x, torch.flip(x, dims=[-1])])  # the crop and its mirror
        m, s = autoencoder.posterior(both)
        b = len(batch)
        means.append(torch.stack([m[:b], m[b:]], 1).to("cpu", dtype))  # (b, 2, C, h, w)
        stds.append(torch.stack([s[:b], s[b:]], 1).to("cpu", dtype))
        if text_encoder is not None:
            enc = text_encoder.encode([s["caption"] for s in batch])
            tok = enc.tokens[:, :text_length]
            out = torch.zeros((b, text_length, tok.shape[-1]))
            out[:, : tok.shape[1]] = tok
            text.append(out.to(dtype))
            n_valid.append(enc.n_valid.clamp(max=text_length).long())
            pooled.append(enc.pooled.to(dtype))

    pending: list[dict[str, Any]] = []
    for s in samples:
        if "bad" in s:
            issues.extend(s["bad"])
            bar.update(1)
            continue
        issues.extend(s.get("issues", []))
        meta["keys"].append(s["key"])
        meta["captions"].append(s.get("caption", ""))
        c = s["control"]
        class_ids.append(int(s.get("class_id", -1)))
        orig.append(c["orig_size"])
        crop.append(c["crop"])
        aspect.append(c.get("aspect", 1.0))
        pending.append(s)
        if len(pending) == batch_size:
            flush(pending)
            bar.update(len(pending))
            pending = []
    if pending:
        flush(pending)
        bar.update(len(pending))
    n = len(meta["keys"])
    if means:
        tensors = {"mean": torch.cat(means), "std": torch.cat(stds)}
    else:  # every sample of the shard was bad: an empty shard keeps the numbering
        empty = torch.zeros((0, 2, autoencoder.channels, 1, 1), dtype=dtype)
        tensors = {"mean": empty, "std": empty.clone()}
    if not keep_std:
        del tensors["std"]
    tensors.update(class_id=torch.tensor(class_ids, dtype=torch.long),
                   orig_size=torch.tensor(orig, dtype=torch.float32).reshape(n, 2),
                   crop=torch.tensor(crop, dtype=torch.float32).reshape(n, 2),
                   aspect=torch.tensor(aspect, dtype=torch.float32).reshape(n))
    if text_encoder is not None:
        width = text_encoder.width
        tensors.update(text=torch.cat(text) if text else torch.zeros((0, text_length, width), dtype=dtype),
                       text_n_valid=torch.cat(n_valid) if n_valid else torch.zeros(0, dtype=torch.long),
                       text_pooled=torch.cat(pooled) if pooled else torch.zeros((0, text_encoder.pooled_width), dtype=dtype))
    metadata = {k: json.dumps(v) for k, v in meta.items()}
    metadata["issues"] = json.dumps(issues)
    return tensors, metadata, issues


def _save_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


# --------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------


def _manifest(cfg: Config, source, autoencoder, text: dict | None, shard_size: int, dtype: str,
              units: list) -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, "data": data_identity(cfg.data),
            "autoencoder_config": autoencoder_identity(cfg.autoencoder),
            "source": source_identity(source, cfg), "autoencoder": autoencoder.describe(), "image_size": cfg.data.image_size, "text": text,
            "dtype": dtype, "shard_size": shard_size if not hasattr(source, "shards") else None,
            "num_shards": len(units), "seed": cfg.seed}


def _check_manifest(out: Path, manifest: dict[str, Any]) -> None:
    path = out / MANIFEST
    if not path.is_file():
        return
    have = json.loads(path.read_text())
    diff = sorted(k for k in set(have) | set(manifest) if have.get(k) != manifest.get(k))
    if diff:
        raise DataError(f"{str(out)!r} holds a cache of something else (differs in: {', '.join(diff)}); "
                         "encode into a new directory (a cache is never overwritten)")


def finalize(out: Path, manifest: dict[str, Any], num_classes: int) -> dict[str, Any]:
    """Collect the shards into ``index.json``: counts, channel statistics and the bad-input report."""
    shards, report = [], DataReport()
    sums = sq = var = None
    count = 0.0
    latent_shape = None
    for k in range(manifest["num_shards"]):
        shard = MappedShard(out / shard_name(k))
        shards.append({"file": shard_name(k), "count": len(shard)})
        report.add(tuple(i) for i in shard.json_meta("issues"))
        if len(shard):
            latent_shape = list(shard.arrays["mean"].shape[2:])
            s, q, v, c = shard_channel_sums(shard)
            sums, sq, var = (s, q, v) if sums is None else (sums + s, sq + q, var + v)
            count += c
    if latent_shape is None:
        raise DataError(f"{str(out)!r}: no sample could be encoded; see data_report.json")
    mean, std = channel_statistics(sums, sq, var, count)
    report.save(out / "data_report.json")
    index = {**manifest, "shards": shards, "num_samples": sum(s["count"] for s in shards),
             "num_classes": num_classes, "latent_shape": latent_shape, "channel_mean": mean,
             "channel_std": std, "report": {k: v for k, v in report.to_dict().items() if k != "files"},
             "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_index(out, index)
    return index


def encode_dataset(cfg: Config, out: str | Path | None = None, batch_size: int = 64, shard_size: int = 10_000,
                   dtype: str = "float16", device: str = "auto", progress: bool = True, cache_text: bool = True,
                   posterior: str = "mean_std") -> Path:
    """Encode ``cfg``'s dataset into a latent cache at ``out`` (default ``data.cache``); returns the directory.

    ``cache_text=False`` leaves a text model's captions to be encoded during training (a large encoder's tokens
    can outweigh the latents many times over); ``posterior="mean"`` stores the posterior mean only (half the
    disk; training then uses the mean, as a deterministic encoder would).
    """
    from tqdm.auto import tqdm

    from ldmkit.autoencoders import build_autoencoder
    from ldmkit.train import distributed as D

    out = out or cfg.data.cache
    if out is None:
        raise ConfigError("ldmkit encode needs an output directory: --out DIR or data.cache=DIR")
    if dtype not in _DTYPES:
        raise ConfigError(f"--dtype: expected one of {tuple(_DTYPES)}, got {dtype!r}")
    if shard_size < 1 or batch_size < 1:
        raise ConfigError("--shard-size and --batch-size must be >= 1")
    out = Path(out)
    dist = D.init_distributed(device)
    if posterior not in ("mean_std", "mean"):
        raise ConfigError(f"--posterior: expected mean_std or mean, got {posterior!r}")
    need_caption = cfg.cond.semantic == "text"
    text_on = need_caption and cache_text
    source = build_source(cfg, cfg.seed, need_caption=need_caption)  # fails here, before any work, on bad paths
    autoencoder = build_autoencoder(cfg.autoencoder, device=dist.device, allow_missing_stats=True)
    text_encoder, text = None, None
    if text_on:
        from ldmkit.text_encoder import load_text_encoder

        tc = cfg.cond.text
        text_encoder = load_text_encoder(tc.encoder, max_length=tc.length, device=dist.device)
        text = {"encoder": tc.encoder, "length": tc.length, "width": text_encoder.width,
                "pooled_width": text_encoder.pooled_width}
    units = _units(source, shard_size)
    manifest = _manifest(cfg, source, autoencoder, text, shard_size, dtype, units)
    manifest["posterior"] = posterior
    if dist.is_main:
        _check_manifest(out, manifest)
        out.mkdir(parents=True, exist_ok=True)
        if not (out / MANIFEST).is_file():
            (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    D.barrier(dist)
    if (out / INDEX).is_file():
        if dist.is_main:
            print(f"{out}: the cache is complete ({INDEX} exists)")
        return out

    mine = [k for k in range(len(units)) if k % dist.world_size == dist.rank
            and not (out / shard_name(k)).is_file()]
    total = sum(u[1] - u[0] for k, u in enumerate(units) if k in set(mine)) if not hasattr(source, "shards") else None
    bar = tqdm(total=total, unit="img", disable=not (progress and dist.is_main), dynamic_ncols=True,
               desc=f"encode {len(mine)}/{len(units)} shards")
    workers = cfg.data.num_workers
    for k in mine:
        samples = _unit_samples(source, units[k], workers, batch_size)
        tensors, metadata, issues = _encode_unit(
            samples, autoencoder, text_encoder, cfg.cond.text.length, dist.device, batch_size,
            _DTYPES[dtype], bar, keep_std=posterior == "mean_std")
        _save_shard(out / shard_name(k), tensors, metadata)
        bar.set_postfix(shard=k, skipped=sum(1 for i in issues if i[1].startswith("skipped")))
    bar.close()
    D.barrier(dist)
    if dist.is_main:
        missing = [k for k in range(len(units)) if not (out / shard_name(k)).is_file()]
        if missing:  # another job (or rank) is still at work on these
            print(f"{out}: {len(missing)} shards still missing; {INDEX} is written once all exist")
        else:
            index = finalize(out, manifest, getattr(source, "num_classes", 0))
            r = index["report"]
            print(f"{out}: {index['num_samples']} samples in {len(units)} shards; {r['skipped']} skipped, "
                  f"{r['converted']} converted (data_report.json)")
    D.barrier(dist)
    return out
