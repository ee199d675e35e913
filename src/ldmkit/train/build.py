"""Building a run from its Config: checks, data, autoencoder, model (with its initial weights), wrapping,
EMA, optimizer and objective.

Everything that can fail on bad input happens here, before the run directory exists. ``init.from`` is
opened once (``open_init_source``): its config resolves ``diffusion.resolution_scale: auto``, its model
sets the positional-embedding options, and its weights initialise the new model.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from queue import Full, Queue
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from ldmkit.conditioning import Conditioning
from ldmkit.config import Config, ConfigError
from ldmkit.data import build_dataset
from ldmkit.data.stream import StreamDataset, StreamSampler
from ldmkit.data.batch import collate
from ldmkit.data.latents import LatentCacheDataset, autoencoder_identity, check_cache, data_identity, read_index
from ldmkit.diffusion.ddpm import DDPM
from ldmkit.diffusion.flow import FlowMatching
from ldmkit.diffusion.scaling import resolution_scale_for
from ldmkit.models import PRESETS, build_model, constructor_keys
from ldmkit.train import distributed as D
from ldmkit.train.ema import EMA
from ldmkit.train.transfer import (TransferReport, TransferSource, class_map_for, read_source, transfer_init,
                                   transfer_options)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config key 'train.device': {name!r} requested but CUDA is not available")
    return device


# --------------------------------------------------------------------------------------------------
# Checks and the resolved config
# --------------------------------------------------------------------------------------------------


def micro_batch(cfg: Config, world_size: int) -> int:
    """Samples per rank and micro-batch: the global batch split over ranks and accumulation steps."""
    t = cfg.train
    per_rank, rem = divmod(t.batch_size, world_size * t.grad_accum)
    if rem or per_rank == 0:
        raise ConfigError(f"config key 'train.batch_size': the global batch {t.batch_size} must be a multiple of "
                          f"world size × train.grad_accum = {world_size} × {t.grad_accum}")
    return per_rank


def check_inputs(cfg: Config) -> None:
    """Inputs that would fail later (at the first evaluation, hours in) or silently."""
    name = cfg.model.name
    arch = PRESETS[name.lower()]["arch"]
    if cfg.cond.semantic == "text" and "context_dim" not in constructor_keys(arch):
        texts = sorted({p["arch"] for p in PRESETS.values() if "context_dim" in constructor_keys(p["arch"])})
        raise ConfigError(f"config key 'cond.semantic': 'text' needs a model with text conditioning; {name} "
                          f"({arch}) takes class labels only (text models: {', '.join(a + '-*' for a in texts)})")
    if cfg.train.wandb and "wandb" not in sys.modules and importlib.util.find_spec("wandb") is None:
        raise ConfigError("config key 'train.wandb': true needs the wandb package (pip install wandb)")
    if cfg.eval.fid_every > 0:
        from ldmkit.eval.inception import load_fid_inception

        for key in ("fid_ref", "fid_captions"):
            value = getattr(cfg.eval, key)
            if value is not None and not Path(value).is_file():
                raise ConfigError(f"config key 'eval.{key}': {value!r} does not exist")
        load_fid_inception(cfg.eval.inception_weights)  # found, readable and of the right layout


def open_init_source(cfg: Config) -> Optional[TransferSource]:
    """``init.from``, opened once (its weights are read when first used), or None."""
    return read_source(cfg.init.from_) if cfg.init.from_ else None


def resolution_scale(cfg: Config, init_source: Optional[TransferSource] = None) -> float:
    """s of docs/method.md §7's noise-schedule scaling: ``diffusion.resolution_scale``, or for "auto"
    data.image_size over the base resolution (``diffusion.base_resolution``, else the init.from run's)."""
    d = cfg.diffusion
    if d.resolution_scale != "auto":
        return float(d.resolution_scale)
    base = d.base_resolution
    if base is None and init_source is not None and init_source.run_config is not None:
        base = init_source.run_config["data"]["image_size"]
    if base is None:
        raise ConfigError("config key 'diffusion.resolution_scale': 'auto' needs diffusion.base_resolution "
                          "(init.from is a weights directory without a run config)")
    return resolution_scale_for(base, cfg.data.image_size)


def resolve_config(cfg: Config, init_source: Optional[TransferSource]) -> Config:
    """The config the run records: ``resolution_scale: auto`` resolved to its number, and the latent
    cache's channel statistics when ``autoencoder.channel_norm`` takes them from there."""
    if cfg.diffusion.resolution_scale == "auto":
        cfg = replace(cfg, diffusion=replace(cfg.diffusion, resolution_scale=resolution_scale(cfg, init_source)))
    a = cfg.autoencoder
    if cfg.data.cache and a.channel_norm and a.channel_mean is None:
        index = read_index(cfg.data.cache)
        cfg = replace(cfg, autoencoder=replace(a, channel_mean=index["channel_mean"], channel_std=index["channel_std"]))
    return cfg


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def build_training_data(cfg: Config, dist: D.Dist):
    """The training source: the latent cache (checked against the config) or the dataset itself.
    A bad path, an empty dataset or a mismatched cache fails here."""
    text_on = cfg.cond.semantic == "text"
    if cfg.data.cache:
        index = read_index(cfg.data.cache)
        check_cache(index, data=data_identity(cfg.data), autoencoder=autoencoder_identity(cfg.autoencoder),
                    text={"encoder": cfg.cond.text.encoder, "length": cfg.cond.text.length} if text_on else None,
                    directory=cfg.data.cache)
        return LatentCacheDataset(cfg.data.cache, flip_prob=cfg.data.flip_prob, seed=cfg.seed)
    return build_dataset(cfg.data, seed=cfg.seed, rank=dist.rank, world_size=dist.world_size, need_caption=text_on)


def check_semantic_source(cfg: Config, dataset) -> None:
    """The semantic condition must exist in the data: captions for text, labels for classes."""
    d, text_on = cfg.data, cfg.cond.semantic == "text"
    if text_on and d.name == "imagenet":
        raise ConfigError("config key 'cond.semantic': 'text' needs captions, but data.name='imagenet' has "
                          "class labels only; use cond.semantic=class, or a captioned source (folder, webdataset)")
    if not text_on and dataset.num_classes == 0:
        raise ConfigError(f"config key 'cond.semantic': 'class' needs class labels, but data.name={d.name!r} "
                          "has captions only; use cond.semantic=text"
                          + (", or give data.class_map for the shards' cls labels" if d.name == "webdataset" else ""))


def make_buckets(cfg: Config, dataset, autoencoder) -> list[tuple[int, int]]:
    """Aspect-ratio buckets (``data.buckets``), refused for a model that takes only square inputs: a
    meta-device probe of the configured architecture (no weights, no compute) at the two most elongated
    buckets. Every file's header is read once here."""
    from ldmkit.data.buckets import make_buckets as buckets_for

    buckets = buckets_for(cfg.data.image_size, cfg.data.bucket_step, cfg.data.bucket_max_aspect)
    m, ds, text = cfg.model, autoencoder.downsample, cfg.cond.semantic == "text"
    for h, w in (buckets[0], buckets[-1]):
        try:
            with torch.device("meta"):
                model = build_model(m.name, in_channels=autoencoder.channels, input_size=cfg.data.image_size // ds,
                                    num_classes=0 if text else max(dataset.num_classes, 1),
                                    context_dim=8 if text else 0, depth=m.depth, hidden_size=m.hidden_size,
                                    num_heads=m.num_heads, patch_size=m.patch_size, mlp_ratio=m.mlp_ratio,
                                    learn_sigma=m.learn_sigma, qk_norm=m.qk_norm, **m.options,
                                    **cfg.cond.control.model_options())
                cond = (Conditioning(text=torch.empty((1, 4, 8))) if text
                        else Conditioning(class_ids=torch.zeros(1, dtype=torch.long)))
                model(torch.empty((1, autoencoder.channels, h // ds, w // ds)), torch.empty(1), cond)
        except Exception as e:
            raise ConfigError(
                f"config key 'data.buckets': {m.name} cannot take {h}x{w} px crops ({e}). Buckets need a "
                "model that takes any size: the U-Net, or mmDiT with model.options.pos_embed_max_size "
                "covering the longest side in patches") from None
    dataset.use_buckets(buckets)
    return buckets


def prefetch(batches: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """``batches`` read ahead by a background thread, ``depth`` at most, in the same order: the next
    batch is decoded or rendered while the current step computes. An error reading a batch is raised
    where that batch is taken; closing (or dropping) the iterator stops the thread."""
    done = object()
    queue: Queue = Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> None:
        while not stop.is_set():
            try:
                queue.put(item, timeout=0.1)
                return
            except Full:
                pass

    def read() -> None:
        try:
            for batch in batches:
                put(batch)
                if stop.is_set():
                    return
        except BaseException as e:  # handed to the consumer, raised there
            put(e)
        put(done)

    threading.Thread(target=read, daemon=True, name="ldmkit-prefetch").start()
    try:
        while (item := queue.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def training_batches(dataset, cfg: Config, dist: D.Dist, micro_batch: int, position: int, buckets=None,
                     read_ahead: bool = False):
    """This rank's micro-batches from global data position ``position`` on: every sample once per epoch
    in a per-epoch permutation, the same for any number of ranks (``data/stream.py``); with
    ``read_ahead``, read by a background thread while the step computes (the same batches)."""
    batches = _loader(dataset, cfg, dist, micro_batch, position, buckets)
    return prefetch(batches) if read_ahead else batches


def reads_ahead(cfg: Config, device: torch.device) -> bool:
    """Whether the trainer reads batches ahead in a thread: when the step runs on an accelerator and no
    loader workers do it already. On the CPU the step uses every core, and a reader thread competing
    for them made the quickstart 8-14% slower on 2 cores (benchmarks/RESULTS.md)."""
    return device.type != "cpu" and cfg.data.num_workers == 0


def _loader(dataset, cfg: Config, dist: D.Dist, micro_batch: int, position: int, buckets=None):
    workers = cfg.data.num_workers
    common = dict(collate_fn=collate, num_workers=workers, persistent_workers=workers > 0,
                  pin_memory=dist.device.type == "cuda")
    if isinstance(dataset, IterableDataset):  # WebDataset shards: each rank/worker reads its own
        # An approximate resume: the epoch the position falls in starts again with its shard order.
        dataset.start_epoch = position // max(cfg.data.num_samples, 1)
        return iter(DataLoader(dataset, batch_size=micro_batch, **common))
    if buckets is not None:  # every global batch from one bucket
        from ldmkit.data.buckets import BucketBatchSampler

        sampler = BucketBatchSampler(dataset.bucket_ids, cfg.train.batch_size, micro_batch, seed=cfg.seed,
                                     start=position, rank=dist.rank, world_size=dist.world_size)
        return iter(DataLoader(StreamDataset(dataset), batch_sampler=sampler, **common))
    sampler = StreamSampler(len(dataset), seed=cfg.seed, global_batch=cfg.train.batch_size, start=position,
                            rank=dist.rank, world_size=dist.world_size)
    return iter(DataLoader(StreamDataset(dataset), batch_size=micro_batch, sampler=sampler, **common))


def class_names_of(cfg: Config, dataset, text) -> Optional[list[str]]:
    """Class models: the names of the classes in id order (stored with every checkpoint), or None."""
    if text is not None:
        return None
    names = getattr(dataset, "class_names", None)
    if names is None and cfg.data.name == "shapes":  # a latent cache of the procedural set
        names = build_dataset(cfg.data, seed=cfg.seed).class_names
    return None if names is None else list(names)


# --------------------------------------------------------------------------------------------------
# Model, wrapping, optimizer, objective
# --------------------------------------------------------------------------------------------------


def build_run_model(cfg: Config, latent_shape: tuple[int, int, int], num_classes: int, text,
                    init_source: Optional[TransferSource], device: torch.device
                    ) -> tuple[nn.Module, Optional[TransferReport]]:
    """The model ``model.*`` names for these latents and this condition, with its initial weights from
    ``init_source`` when given (and a report of what was loaded)."""
    m = cfg.model
    channels, size, _ = latent_shape
    options = {**m.options, **cfg.cond.control.model_options()}
    if init_source is not None:
        options = transfer_options(init_source, m.name, options, cfg.init.pe)
    patch = m.patch_size or PRESETS[m.name.lower()].get("patch_size")
    if patch and size % patch:
        raise ConfigError(f"config key 'model.patch_size': {patch} does not divide the model's input of "
                          f"{size}x{size} (data.image_size {cfg.data.image_size} / autoencoder downsampling "
                          f"{cfg.data.image_size // size})")
    try:
        model = build_model(
            m.name, in_channels=channels, input_size=size, num_classes=num_classes if text is None else 0,
            context_dim=0 if text is None else text.width, pooled_dim=0 if text is None else text.pooled_width,
            depth=m.depth, hidden_size=m.hidden_size, num_heads=m.num_heads, patch_size=m.patch_size,
            mlp_ratio=m.mlp_ratio, learn_sigma=m.learn_sigma, qk_norm=m.qk_norm, **options,
        ).to(device)
    except (ValueError, TypeError) as e:  # the architecture refuses these sizes or options
        raise ConfigError(f"config key 'model': {m.name} cannot be built for this run: {e}") from None
    report = None
    if init_source is not None:
        report = transfer_init(model, init_source, pe_mode=cfg.init.pe, class_map=class_map_for(cfg.init),
                               allow_partial=cfg.init.allow_partial, min_fraction=cfg.init.min_fraction)
    return model, report


@dataclass
class Wrapped:
    """The model as training runs it: the module the step calls, the EMA, the optimised parameters."""

    train_model: nn.Module
    ema: EMA
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scaler: Optional[torch.amp.GradScaler]


def _optimizer_flags(impl: str, device: torch.device, sharded: bool) -> dict[str, Any]:
    if impl == "auto":
        impl = "fused" if device.type == "cuda" and not sharded else "foreach"
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}[impl]


def wrap_for_training(model: nn.Module, cfg: Config, dist: D.Dist, fresh_model: Callable[[], nn.Module]) -> Wrapped:
    """EMA, activation checkpointing, compile, DDP/FSDP2, AdamW and the fp16 grad scaler.

    Order matters: the EMA copies the plain model (before compile); FSDP shards it in place, after which
    the optimizer and a sharded EMA must be built on the sharded parameters."""
    t = cfg.train
    sharding = t.parallel == "fsdp"
    ema = None if sharding else EMA(model, t.ema_decay, t.ema_warmup, build=fresh_model)
    if t.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if t.compile:
        for unit in D.fsdp_units(model):
            unit.compile()
    train_model = D.wrap_model(model, dist, t.parallel, t.precision)
    if sharding:
        ema = EMA(model, t.ema_decay, t.ema_warmup)
    params = [p for p in model.parameters() if p.requires_grad]  # not the frozen positional tables
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay,
                                  **_optimizer_flags(t.optimizer_impl, dist.device, sharding))
    scaler = torch.amp.GradScaler(dist.device.type) if t.precision == "fp16" else None
    return Wrapped(train_model, ema, params, optimizer, scaler)


def training_flops_per_image(model_json: dict[str, Any], text) -> Optional[float]:
    """Training FLOPs per image (3 x forward) from the architecture's closed form (``models/cost.py``), with
    every control field present and the text conditioner's token count; None if it cannot be counted."""
    from ldmkit.conditioning import CONTROL_FIELDS
    from ldmkit.models.cost import model_cost

    try:
        tokens = text.length if text is not None else 0
        return 3.0 * model_cost(model_json, text_tokens=tokens, control_fields=CONTROL_FIELDS).flops
    except Exception:  # FLOP counting is telemetry: never let it stop a run
        return None


def build_objective(cfg: Config, model: nn.Module, scale: float = 1.0):
    """The training objective of ``diffusion.objective`` with resolution scale ``scale``."""
    d = cfg.diffusion
    if d.objective == "ddpm":
        return DDPM(schedule=d.schedule, num_steps=d.num_steps, prediction=d.prediction,
                    learn_sigma=bool(getattr(model, "learn_sigma", False)), loss_weighting=d.loss_weighting,
                    min_snr_gamma=d.min_snr_gamma, resolution_scale=scale)
    if getattr(model, "learn_sigma", False):
        raise ConfigError("config key 'model.learn_sigma': a learned variance needs diffusion.objective=ddpm "
                          f"(flow matching predicts a velocity only), got {d.objective!r}")
    if d.objective == "flow_masked":
        from ldmkit.diffusion.masking import MaskedFlowMatching

        if "mask" not in inspect.signature(model.forward).parameters:
            raise ConfigError(f"config key 'diffusion.objective': 'flow_masked' needs a model that takes a "
                              f"token mask (MDT); {cfg.model.name!r} does not")
        return MaskedFlowMatching(d.timesteps, d.logit_mean, d.logit_std, patch_size=model.patch_size,
                                  mask_ratio_min=d.mask_ratio[0], mask_ratio_max=d.mask_ratio[1],
                                  resolution_scale=scale)
    return FlowMatching(d.timesteps, d.logit_mean, d.logit_std, resolution_scale=scale)
