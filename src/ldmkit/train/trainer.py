"""The training loop: one obvious loop over (data -> objective -> optimizer -> EMA -> logs/checkpoints).

The trainer knows nothing about the architecture: it builds a model by name and calls
``objective.loss(model, x0, cond, draw)``, which calls ``model(x_t, t, cond)``.

Determinism: the random inputs of step k (timesteps, noise, condition dropout) are drawn for the whole
global batch from a generator seeded by (seed, k), and each rank / micro-batch takes its rows; the data
stream is a function of the global position. A step therefore computes the same thing on 1 process or
N ranks, with or without gradient accumulation, and resuming needs only the step and the position.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
import shutil
import signal
import sys
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm

from ldmkit.autoencoders import build_autoencoder, to_uint8
from ldmkit.conditioning import Conditioning
from ldmkit.config import Config, ConfigError, dump_yaml, to_dict
from ldmkit.data import build_dataset
from ldmkit.data.batch import Batch, collate
from ldmkit.data.decode import DataReport
from ldmkit.data.latents import LatentCacheDataset, autoencoder_identity, check_cache, data_identity, read_index
from ldmkit.data.stream import StreamDataset, StreamSampler
from ldmkit.diffusion.ddpm import DDPM
from ldmkit.diffusion.flow import FlowMatching
from ldmkit.diffusion.scaling import resolution_scale_for
from ldmkit.errors import RunDirError, TrainingDiverged  # noqa: F401 (RunDirError: re-exported)
from ldmkit.files import atomic_write_json, atomic_write_text
from ldmkit.models import PRESETS, build_model, constructor_keys, model_from_config
from ldmkit.models.flops import forward_flops_per_image
from ldmkit.sampling import conditions_for, default_control, generate, make_grid, sample_settings
from ldmkit.text import build_text_conditioner
from ldmkit.train import distributed as D
from ldmkit.train.checkpoint import (checkpoint_step, list_checkpoints, load_train_state, model_config,
                                     read_weights, save_checkpoint)
from ldmkit.train.ema import EMA
from ldmkit.train.guard import DivergenceGuard
from ldmkit.train.metrics import read_metrics
from ldmkit.train.run_dir import create_run_dir, plan_run
from ldmkit.train.telemetry import Telemetry, peak_memory_gib, peak_tflops, reset_peak_memory
from ldmkit.train.transfer import (class_map_for, read_source, read_source_config, transfer_init,
                                   transfer_options)

LOSS_BINS = (0.0, 0.25, 0.5, 0.75, 1.0)  # loss is also logged per timestep bin
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # cluster pre-emption: checkpoint and exit cleanly


# --------------------------------------------------------------------------------------------------
# Set-up helpers
# --------------------------------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config key 'train.device': {name!r} requested but CUDA is not available")
    return device


def lr_at(step: int, cfg: Config) -> float:
    """Linear warm-up, then constant or cosine decay to min_lr_ratio · lr at train.steps."""
    t = cfg.train
    if t.warmup_steps > 0 and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "cosine":
        span = max(1, t.steps - t.warmup_steps)
        progress = min(1.0, (step - t.warmup_steps) / span)
        floor = t.min_lr_ratio
        return t.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
    return t.lr


def resolution_scale(cfg: Config) -> float:
    """s of docs/method.md §7's noise-schedule scaling: ``diffusion.resolution_scale``, or for "auto"
    data.image_size over the base resolution (``diffusion.base_resolution``, else the init.from run's)."""
    d = cfg.diffusion
    if d.resolution_scale != "auto":
        return float(d.resolution_scale)
    base = d.base_resolution
    if base is None and cfg.init.from_:
        run_config = read_source_config(cfg.init.from_)
        base = None if run_config is None else run_config["data"]["image_size"]
    if base is None:
        raise ConfigError("config key 'diffusion.resolution_scale': 'auto' needs diffusion.base_resolution "
                          "(init.from is a weights directory without a run config)")
    return resolution_scale_for(base, cfg.data.image_size)


def build_objective(cfg: Config, model: torch.nn.Module, scale: float = 1.0):
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


def step_seed(seed: int, step: int) -> int:
    """Seed of the random draws of optimizer step ``step`` (well mixed, independent of world size)."""
    return int(np.random.SeedSequence([seed, step, 0x5EED]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _sdpa_context(choice: str):
    if choice == "auto":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[choice]
    return sdpa_kernel([backend])


def _optimizer_flags(impl: str, device: torch.device, sharded: bool) -> dict[str, Any]:
    if impl == "auto":
        impl = "fused" if device.type == "cuda" and not sharded else "foreach"
    return {"fused": {"fused": True}, "foreach": {"foreach": True},
            "for_loop": {"foreach": False}}[impl]


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    steps: int
    final_grid: Path | None
    shapes_eval: dict[str, Any] | None
    stopped_by: str | None = None  # "signal" when a SIGTERM/SIGUSR1 ended the run early


# --------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------


class Trainer:
    def __init__(self, cfg: Config, resume: str | None = None, progress: bool = True) -> None:
        self.cfg = cfg
        t = cfg.train
        self.dist = D.init_distributed(t.device)
        self.main = self.dist.is_main
        self.progress = progress and self.main
        self.device = self.dist.device
        per_rank, rem = divmod(t.batch_size, self.dist.world_size * t.grad_accum)
        if rem or per_rank == 0:
            raise ConfigError(
                f"config key 'train.batch_size': the global batch {t.batch_size} must be a multiple of "
                f"world size × train.grad_accum = {self.dist.world_size} × {t.grad_accum}"
            )
        self.micro_batch = per_rank
        if t.wandb and "wandb" not in sys.modules and importlib.util.find_spec("wandb") is None:
            raise ConfigError("config key 'train.wandb': true needs the wandb package (pip install wandb)")

        # Inputs that would fail later are checked before the run directory exists.
        name = cfg.model.name
        arch = PRESETS[name.lower()]["arch"]
        if cfg.cond.semantic == "text" and "context_dim" not in constructor_keys(arch):
            texts = sorted({p["arch"] for p in PRESETS.values() if "context_dim" in constructor_keys(p["arch"])})
            raise ConfigError(f"config key 'cond.semantic': 'text' needs a model with text conditioning; {name} "
                              f"({arch}) takes class labels only (text models: {', '.join(a + '-*' for a in texts)})")
        if cfg.eval.fid_every > 0:  # not at the first evaluation hours later
            from ldmkit.eval.inception import load_fid_inception

            for key in ("fid_ref", "fid_captions"):
                value = getattr(cfg.eval, key)
                if value is not None and not Path(value).is_file():
                    raise ConfigError(f"config key 'eval.{key}': {value!r} does not exist")
            load_fid_inception(cfg.eval.inception_weights)  # found, readable and of the right layout
        if cfg.init.from_ and resume is None:
            read_source_config(cfg.init.from_)  # the source exists and is a checkpoint, run or weights dir
        if cfg.diffusion.resolution_scale == "auto":  # resolved once; the run's config stores the number
            self.cfg = cfg = replace(cfg, diffusion=replace(cfg.diffusion, resolution_scale=resolution_scale(cfg)))
        # Data and autoencoder: a bad path, an empty dataset or a mismatched cache fails here.
        text_on = cfg.cond.semantic == "text"
        if cfg.data.cache:
            index = read_index(cfg.data.cache)
            check_cache(index, data=data_identity(cfg.data), autoencoder=autoencoder_identity(cfg.autoencoder),
                        text={"encoder": cfg.cond.text.encoder, "length": cfg.cond.text.length} if text_on else None,
                        directory=cfg.data.cache)
            a = cfg.autoencoder
            if a.channel_norm and a.channel_mean is None:  # the run's config stores the statistics it used
                self.cfg = cfg = replace(cfg, autoencoder=replace(a, channel_mean=index["channel_mean"],
                                                                  channel_std=index["channel_std"]))
            self.dataset = LatentCacheDataset(cfg.data.cache, flip_prob=cfg.data.flip_prob, seed=cfg.seed)
        else:
            self.dataset = build_dataset(cfg.data, seed=cfg.seed, rank=self.dist.rank,
                                         world_size=self.dist.world_size, need_caption=text_on)
        self.autoencoder = build_autoencoder(cfg.autoencoder, device=self.device)
        self.buckets = None
        if cfg.data.buckets:  # every file's header is read once here
            from ldmkit.data.buckets import make_buckets

            self.buckets = make_buckets(cfg.data.image_size, cfg.data.bucket_step, cfg.data.bucket_max_aspect)
            self._check_buckets()
            self.dataset.use_buckets(self.buckets)
        self.data_report = DataReport()  # bad and converted source files, from construction on
        self.data_report.add(getattr(self.dataset, "init_issues", ()))
        self._shapes = None  # the shapes source for its evaluations when training reads a cache of it
        self._check_semantic_source()
        # Where the run goes and what it resumes from: decided now, written only once nothing can fail.
        self.plan = self._plan_run(resume)
        resume_from = self.plan.resume_from
        self._threads_before = torch.get_num_threads()  # restored when fit() ends
        if t.threads > 0:
            torch.set_num_threads(t.threads)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = t.tf32
            torch.backends.cudnn.allow_tf32 = t.tf32
        torch.manual_seed(cfg.seed)

        size = cfg.data.image_size // self.autoencoder.downsample
        self.latent_shape = (self.autoencoder.channels, size, size)
        self.text = build_text_conditioner(cfg.cond.text, self.device) if cfg.cond.semantic == "text" else None
        m = cfg.model
        # Transfer initialisation (not on resume: a resume restores its own weights).
        self.init_source = read_source(cfg.init.from_) if cfg.init.from_ and resume_from is None else None
        options = dict(m.options)
        if self.init_source is not None:
            options = transfer_options(self.init_source, m.name, options, cfg.init.pe)
        patch = m.patch_size or PRESETS[m.name.lower()].get("patch_size")
        if patch and size % patch:
            raise ConfigError(f"config key 'model.patch_size': {patch} does not divide the model's input of "
                              f"{size}x{size} (data.image_size {cfg.data.image_size} / autoencoder downsampling "
                              f"{self.autoencoder.downsample})")
        try:
            self.model = build_model(
                m.name, in_channels=self.latent_shape[0], input_size=size,
                num_classes=self.dataset.num_classes if self.text is None else 0,
                context_dim=0 if self.text is None else self.text.width,
                pooled_dim=0 if self.text is None else self.text.pooled_width,
                depth=m.depth, hidden_size=m.hidden_size,
                num_heads=m.num_heads, patch_size=m.patch_size, mlp_ratio=m.mlp_ratio,
                learn_sigma=m.learn_sigma, qk_norm=m.qk_norm, **options,
            ).to(self.device)
        except (ValueError, TypeError) as e:  # the architecture refuses these sizes or options
            raise ConfigError(f"config key 'model': {m.name} cannot be built for this run: {e}") from None
        init_report = None
        if self.init_source is not None:
            init_report = transfer_init(self.model, self.init_source, pe_mode=cfg.init.pe,
                                        class_map=class_map_for(cfg.init), allow_partial=cfg.init.allow_partial,
                                        min_fraction=cfg.init.min_fraction)
        self.model_json = model_config(self.model)
        self.n_params = sum(p.numel() for p in self.model.parameters())

        # Order matters: EMA copies the plain model (before compile); FSDP shards it in place, after
        # which the optimizer and a sharded EMA must be built on the sharded parameters.
        sharding = t.parallel == "fsdp"
        if not sharding:
            self.ema = EMA(self.model, t.ema_decay, t.ema_warmup, build=self._fresh_model)
        if t.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        if t.compile:
            for unit in D.fsdp_units(self.model):
                unit.compile()
        self.train_model = D.wrap_model(self.model, self.dist, t.parallel, t.precision)
        if sharding:
            self.ema = EMA(self.model, t.ema_decay, t.ema_warmup)

        self.params = [p for p in self.model.parameters() if p.requires_grad]  # not the frozen pos-embed
        self.optimizer = torch.optim.AdamW(
            self.params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay,
            **_optimizer_flags(t.optimizer_impl, self.device, sharding),
        )
        self.scaler = torch.amp.GradScaler(self.device.type) if t.precision == "fp16" else None
        self.objective = build_objective(cfg, self.model, resolution_scale(cfg))
        self.step = 0
        self._resume_rng = None
        self.data_position = 0  # global samples consumed
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.guard = DivergenceGuard(t.loss_spike_factor, t.max_weight_growth)
        self.last_good_step: int | None = None  # newest checkpoint whose weights a healthy step has used
        self._unconfirmed_step: int | None = None  # newest checkpoint not yet used by a healthy step

        # Nothing below can fail on bad input: the run directory is made (or continued) now.
        self.run_dir = self._create_run_dir()
        if self.main and not self.plan.resuming:  # first, so that a run directory always has its config
            dump_yaml(cfg, self.run_dir / "config.yaml")
        if init_report is not None and self.main:
            print(init_report.summary())
            init_report.save(self.run_dir / "init_report.json")
        if resume_from is not None:
            self._load(resume_from)
        else:
            self.guard.set_reference(D.param_norm(self.params, self.dist))
            if self.plan.resuming and self.main:  # killed before its first checkpoint: start again
                print(f"{self.run_dir} holds no checkpoint: starting again from step 0")
                self._truncate_metrics(0)
        if self.main and self.plan.resuming:  # after a successful load: a failed resume leaves it as it was
            dump_yaml(cfg, self.run_dir / "config.yaml")
        self.telemetry = (Telemetry(self.run_dir, to_dict(cfg), t.tensorboard, t.wandb, t.wandb_project,
                                    t.wandb_mode) if self.main else None)
        self._stop_signal: int | None = None
        self._grid_captions: list[str] | None = None  # the first batch's captions (text grids by default)
        self._eval_model = None
        self._fid = None  # (InceptionFeatures, reference stats, make_cond), built at the first FID evaluation

    def _check_buckets(self) -> None:
        """Refuse aspect-ratio buckets for a model that takes only square inputs: a meta-device probe of
        the configured architecture (no weights, no compute) at the two most elongated buckets."""
        m, ds, text = self.cfg.model, self.autoencoder.downsample, self.cfg.cond.semantic == "text"
        for h, w in (self.buckets[0], self.buckets[-1]):
            try:
                with torch.device("meta"):
                    model = build_model(m.name, in_channels=self.autoencoder.channels,
                                        input_size=self.cfg.data.image_size // ds,
                                        num_classes=0 if text else max(self.dataset.num_classes, 1),
                                        context_dim=8 if text else 0, depth=m.depth, hidden_size=m.hidden_size,
                                        num_heads=m.num_heads, patch_size=m.patch_size, mlp_ratio=m.mlp_ratio,
                                        learn_sigma=m.learn_sigma, qk_norm=m.qk_norm, **m.options)
                    cond = (Conditioning(text=torch.empty((1, 4, 8))) if text
                            else Conditioning(class_ids=torch.zeros(1, dtype=torch.long)))
                    model(torch.empty((1, self.autoencoder.channels, h // ds, w // ds)), torch.empty(1), cond)
            except Exception as e:
                raise ConfigError(
                    f"config key 'data.buckets': {m.name} cannot take {h}x{w} px crops ({e}). Buckets need a "
                    "model that takes any size: the U-Net, or mmDiT with model.options.pos_embed_max_size "
                    "covering the longest side in patches") from None

    def _fresh_model(self) -> torch.nn.Module:
        """A new, unwrapped instance of the trained architecture, on the training device."""
        with torch.device(self.device):
            return model_from_config(self.model_json)

    def _plan_run(self, resume: str | None):
        """Rank 0 plans the run directory and the checkpoint to resume from (``train/run_dir.py``);
        every rank receives the answer, or the same error, so that no rank is left waiting."""
        answer: Any = None
        error: Exception | None = None
        if self.main:
            try:
                answer = plan_run(self.cfg, resume)
                for ckpt, why in answer.skipped:
                    print(f"Skipping damaged checkpoint {ckpt}: {why}")
            except Exception as e:  # every rank must hear of it, or the others wait forever
                error, answer = e, f"{type(e).__name__}: {e}"
        answer = D.broadcast_object(self.dist, answer)
        if error is not None:
            raise error
        if isinstance(answer, str):
            raise RunDirError(f"rank 0 could not set up the run: {answer}")
        return answer

    def _create_run_dir(self) -> Path:
        path = str(create_run_dir(self.plan, self.cfg)) if self.main else None
        return Path(D.broadcast_object(self.dist, path))

    def _check_semantic_source(self) -> None:
        """The semantic condition must exist in the data: captions for text, labels for classes."""
        d, text_on = self.cfg.data, self.cfg.cond.semantic == "text"
        if text_on and d.name == "imagenet":
            raise ConfigError("config key 'cond.semantic': 'text' needs captions, but data.name='imagenet' has "
                              "class labels only; use cond.semantic=class, or a captioned source (folder, "
                              "webdataset)")
        if not text_on and self.dataset.num_classes == 0:
            raise ConfigError(f"config key 'cond.semantic': 'class' needs class labels, but data.name={d.name!r} "
                              "has captions only; use cond.semantic=text"
                              + (", or give data.class_map for the shards' cls labels" if d.name == "webdataset"
                                 else ""))

    # ----------------------------------------------------------------------------------------------
    # Checkpoints
    # ----------------------------------------------------------------------------------------------

    def _load(self, ckpt: Path) -> None:
        D.load_full_model_state(self.model, read_weights(ckpt / "model.safetensors"), self.dist)
        self.ema.load_full_state_dict(read_weights(ckpt / "ema.safetensors"))
        state = load_train_state(ckpt)
        D.load_full_optimizer_state(self.model, self.optimizer, state["optimizer"], self.dist)
        self.step = int(state["step"])
        self.data_position = int(state["data_position"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
        # Restored just before the loop (creating the data loader draws from the global generator).
        self._resume_rng = (state["torch_rng"], state.get("cuda_rng"))
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        if state.get("guard") is not None:
            self.guard.load_state_dict(state["guard"])
        else:  # a checkpoint from before the guard: its weights are the reference
            self.guard.set_reference(D.param_norm(self.params, self.dist))
        last_good = int(state.get("last_good_step", -1))
        self.last_good_step = None if last_good < 0 else last_good
        self._unconfirmed_step = self.step  # confirmed by the first healthy step after the resume
        if self.main:
            self._truncate_metrics(self.step)
            print(f"Resumed from {ckpt} at step {self.step}")

    def _truncate_metrics(self, step: int) -> None:
        """Drop records written after the checkpoint (a killed run logged steps it must now redo)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

    def save(self) -> Path:
        """Gather full state on rank 0 and write it atomically (every rank must call this)."""
        if self.data_report.counts:  # each rank reports the files it read
            name = "data_report.json" if not self.dist.enabled else f"data_report.rank{self.dist.rank}.json"
            self.data_report.save(self.run_dir / name)
        model_state = D.full_model_state(self.model, self.dist)
        ema_state = self.ema.full_state_dict(self.model)
        optimizer_state = D.full_optimizer_state(self.model, self.optimizer, self.dist)
        # Only finite weights are ever written (rank 0 holds the full state and tells the others).
        broken = D.broadcast_object(self.dist, _first_non_finite(model_state, ema_state) if self.main else None)
        if broken is not None:
            raise self._diverged(f"{broken} holds non-finite values, so no checkpoint was written")
        path = None
        if self.main:
            state = {
                "step": self.step,
                "data_position": self.data_position,
                "skipped_steps": self.skipped_steps,
                "consecutive_skips": self.consecutive_skips,
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
                "grad_scaler": self.scaler.state_dict() if self.scaler is not None else {},
                "world_size": self.dist.world_size,
                "guard": self.guard.state_dict(),
                "last_good_step": -1 if self.last_good_step is None else self.last_good_step,
            }
            protect = [] if self.last_good_step is None else [self._checkpoint_dir(self.last_good_step)]
            path = save_checkpoint(
                self.run_dir, self.step, model_state=model_state, ema_state=ema_state,
                model_json=self.model_json, optimizer_state=optimizer_state, config=to_dict(self.cfg),
                train_state=state, keep=self.cfg.train.keep_checkpoints, protect=protect,
            )
        self._unconfirmed_step = self.step  # good once a healthy step has used these weights
        D.barrier(self.dist)
        return path or self._checkpoint_dir(self.step)

    def _checkpoint_dir(self, step: int) -> Path:
        return self.run_dir / "checkpoints" / f"step_{step:07d}"

    def _diverged(self, reason: str) -> TrainingDiverged:
        """The error that stops a diverged run. Checkpoints newer than the newest one known to be healthy
        hold the broken weights: they are renamed ``diverged_step_*`` (kept, never resumed)."""
        moved: list[str] = []
        if self.main:
            for ckpt in list_checkpoints(self.run_dir):
                if self.last_good_step is None or checkpoint_step(ckpt) > self.last_good_step:
                    target = ckpt.with_name(f"diverged_{ckpt.name}")
                    if target.exists():  # from an earlier divergence of this run
                        shutil.rmtree(target)
                    ckpt.rename(target)
                    moved.append(target.name)
        D.barrier(self.dist)
        lr = f"train.lr={self.cfg.train.lr / 10:g}"
        if self.last_good_step is not None:
            advice = (f"The newest checkpoint with healthy weights is {self._checkpoint_dir(self.last_good_step)}; "
                      f"continue from it with a lower learning rate: ldmkit train --resume auto "
                      f"run.dir={self.run_dir} {lr}")
        else:
            advice = (f"No checkpoint holds healthy weights yet; start again with a lower learning rate: "
                      f"ldmkit train --resume auto run.dir={self.run_dir} {lr}")
        if moved:
            advice += f". Checkpoints with the broken weights were renamed: {', '.join(moved)}"
        return TrainingDiverged(f"training diverged at step {self.step}: {reason}. {advice}")

    # ----------------------------------------------------------------------------------------------
    # The step
    # ----------------------------------------------------------------------------------------------

    def _batches(self) -> Iterator[Batch]:
        cfg = self.cfg
        pin = self.device.type == "cuda"
        if isinstance(self.dataset, IterableDataset):  # WebDataset shards: each rank/worker reads its own
            # An approximate resume: the epoch the position falls in starts again with its shard order.
            self.dataset.start_epoch = self.data_position // max(cfg.data.num_samples, 1)
            loader = DataLoader(self.dataset, batch_size=self.micro_batch, collate_fn=collate,
                                num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0,
                                pin_memory=pin)
            return iter(loader)
        if self.buckets is not None:  # every global batch from one bucket
            from ldmkit.data.buckets import BucketBatchSampler

            batch_sampler = BucketBatchSampler(self.dataset.bucket_ids, cfg.train.batch_size, self.micro_batch,
                                               seed=cfg.seed, start=self.data_position, rank=self.dist.rank,
                                               world_size=self.dist.world_size)
            loader = DataLoader(StreamDataset(self.dataset), batch_sampler=batch_sampler, collate_fn=collate,
                                num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0,
                                pin_memory=pin)
            return iter(loader)
        sampler = StreamSampler(len(self.dataset), seed=cfg.seed, global_batch=cfg.train.batch_size,
                                start=self.data_position, rank=self.dist.rank,
                                world_size=self.dist.world_size)
        loader = DataLoader(
            StreamDataset(self.dataset), batch_size=self.micro_batch, sampler=sampler,
            collate_fn=collate, num_workers=cfg.data.num_workers,
            persistent_workers=cfg.data.num_workers > 0, pin_memory=pin,
        )
        return iter(loader)

    def _autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.train.precision)
        return torch.autocast(self.device.type, dtype=dtype) if dtype else nullcontext()

    def _train_conditioning(self, batch: Batch, dropped: torch.Tensor, ctrl_dropped: torch.Tensor,
                            pad_noise: torch.Tensor | None) -> Conditioning:
        """The batch's condition with semantic and control dropout applied (docs/method.md §5): a dropped class
        becomes the null class, a dropped caption the empty prompt (encoded and padded like any other)."""
        cond = batch.cond.to(self.device)
        if self.text is None:
            cond = cond.drop_semantic(dropped)
        elif batch.text is not None:  # cached encoder outputs; a dropped caption becomes the null prompt's
            cond = replace(cond, class_ids=None, **self.text.from_encoded(
                batch.text, batch.text_n_valid, batch.text_pooled, dropped=dropped, training=True,
                device=self.device, eps=pad_noise))
        else:
            keep = (~dropped).tolist()
            captions = [c if k else "" for c, k in zip(batch.captions, keep)]
            cond = replace(cond, class_ids=None, **self.text(captions, training=True, device=self.device,
                                                             eps=pad_noise))
        return replace(cond, control_dropped=ctrl_dropped)

    def train_step(self, batches: Iterator[Batch]) -> dict[str, Any]:
        """One optimizer step over grad_accum micro-batches; non-finite steps are skipped, not applied."""
        cfg, t = self.cfg, self.cfg.train
        B, m, accum = t.batch_size, self.micro_batch, t.grad_accum
        g = torch.Generator(self.device).manual_seed(step_seed(cfg.seed, self.step))
        t0 = time.perf_counter()
        first = next(batches)  # its shape is the step's (aspect-ratio buckets change it between steps)
        first_s = time.perf_counter() - t0
        if first.latent:
            shape = tuple(first.images.shape[1:])
        else:
            ds = self.autoencoder.downsample
            shape = (self.latent_shape[0], first.images.shape[2] // ds, first.images.shape[3] // ds)
        draw = self.objective.draw(B, shape, device=self.device, generator=g)
        dropped = torch.rand(B, device=self.device, generator=g) < cfg.cond.p_drop_semantic
        ctrl_dropped = torch.rand(B, device=self.device, generator=g) < cfg.cond.p_drop_control
        pad_noise = None
        if self.text is not None and self.text.needs_noise(training=True):  # noisy_replicate's noise
            pad_noise = torch.randn((B, self.text.length, self.text.width), device=self.device, generator=g)

        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        per_sample, ts, data_s = [], [], 0.0
        rank_offset = self.dist.rank * (B // self.dist.world_size)
        for a in range(accum):
            t0 = time.perf_counter()
            batch = first if a == 0 else next(batches)
            data_s += first_s if a == 0 else time.perf_counter() - t0
            if batch.issues:
                self.data_report.add(batch.issues)
            if self._grid_captions is None:
                self._grid_captions = list(batch.captions)
            lo = rank_offset + a * m
            images = batch.images.to(self.device, non_blocking=True)
            x0 = self.autoencoder.normalize(images) if batch.latent else self.autoencoder.encode(images)
            cond = self._train_conditioning(batch, dropped[lo : lo + m], ctrl_dropped[lo : lo + m],
                                            None if pad_noise is None else pad_noise[lo : lo + m])
            sync = a == accum - 1  # reduce gradients across ranks once, on the last micro-batch
            with ExitStack() as stack:
                if hasattr(self.train_model, "set_requires_gradient_sync"):  # FSDP2
                    self.train_model.set_requires_gradient_sync(sync)
                elif not sync and hasattr(self.train_model, "no_sync"):  # DDP
                    stack.enter_context(self.train_model.no_sync())
                stack.enter_context(_sdpa_context(t.attention))
                with self._autocast():
                    loss, ps, tt = self.objective.loss(self.train_model, x0, cond, draw.rows(lo, lo + m))
                scaled = loss / accum
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss_sum += loss.detach() / accum
            per_sample.append(ps)
            ts.append(tt.detach())

        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        clip = t.grad_clip if t.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        # The step's decisions need the flags of every rank and the global loss: one all-reduce, one sync.
        local_bad = ~(torch.isfinite(grad_norm) & torch.isfinite(loss_sum))
        stop = torch.tensor(self._stop_signal is not None, device=self.device)
        totals = D.sum_across_ranks(self.dist, torch.stack([local_bad.float(), stop.float(), loss_sum.float()]))
        n_bad, n_stop, loss_total = totals.tolist()
        loss_value = loss_total / self.dist.world_size
        bad = n_bad > 0 or self.guard.is_spike(loss_value)  # non-finite, or far above the running median
        stop = n_stop > 0
        if bad:
            self.skipped_steps += 1
            self.consecutive_skips += 1
            if self.scaler is not None:
                self.scaler.update()  # lowers the scale after an overflow
        else:
            self.consecutive_skips = 0
            self.guard.record(loss_value)
            if self._unconfirmed_step is not None:  # this healthy step used the newest checkpoint's weights
                self.last_good_step, self._unconfirmed_step = self._unconfirmed_step, None
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.data_position += B
        diverged = None
        if not bad:
            norm = D.param_norm(self.params, self.dist)
            diverged = self.guard.weight_problem(norm)
            if diverged is None:
                self.ema.update(self.model, self.step)
                if self.step % t.checkpoint_every == 0:
                    self.guard.set_reference(norm)
        if self.consecutive_skips >= t.max_consecutive_skips:
            diverged = (f"{self.consecutive_skips} consecutive steps ({self.step - self.consecutive_skips + 1}-"
                        f"{self.step}) had a non-finite or spiking loss or gradient")
        return {"loss": loss_sum, "grad_norm": grad_norm.detach(), "lr": lr, "bad": bad, "stop": stop,
                "diverged": diverged, "per_sample": torch.cat(per_sample), "t": torch.cat(ts), "data_s": data_s}

    # ----------------------------------------------------------------------------------------------
    # Sampling and evaluation (rank 0; the other ranks wait)
    # ----------------------------------------------------------------------------------------------

    def _ema_eval_model(self) -> torch.nn.Module | None:
        """A plain model with the EMA weights on rank 0 (None elsewhere); collective when sharded."""
        if self.ema.model is not None:
            return self.ema.model if self.main else None
        state = self.ema.full_state_dict(self.model)
        if not self.main:
            return None
        if self._eval_model is None:
            self._eval_model = self._fresh_model().to(self.device).eval()
        self._eval_model.load_state_dict(state)
        return self._eval_model

    def _sample_kwargs(self) -> dict[str, Any]:
        return sample_settings(self.cfg, self.model)

    def _control(self, n: int) -> dict[str, torch.Tensor]:
        s = self.cfg.sample
        return default_control(n, self.cfg.data.image_size, s.orig_size, s.crop, s.flip)

    def grid_prompts(self) -> list[str]:
        """Text models: the prompts of the sample grid (sample.prompts, else up to 8 distinct captions)."""
        if self.cfg.sample.prompts:
            return list(self.cfg.sample.prompts)
        captions: list[str] = []
        if self.cfg.data.name == "shapes":  # every caption of the procedural set is known
            source = self.shapes_dataset()
            candidates = [source[i]["caption"] for i in range(min(len(source), 200))]
        else:
            candidates = self._grid_captions or []
        for caption in candidates:
            if caption and caption not in captions:
                captions.append(caption)
            if len(captions) == 8:
                break
        return captions

    def write_grid(self, name: str) -> Path | None:
        """A grid of EMA samples: one column per class (or prompt), ``grid_rows`` noises each."""
        model = self._ema_eval_model()
        path = None
        if model is not None:
            s = self.cfg.sample
            if self.text is None:
                n_cls = self.dataset.num_classes
                ncol = min(n_cls, 18) if s.grid_classes <= 0 else min(s.grid_classes, n_cls)
                cond, uncond = conditions_for(self._control(ncol * s.grid_rows),
                                              class_ids=torch.arange(ncol).repeat(s.grid_rows))
            else:
                prompts = self.grid_prompts()
                ncol = len(prompts)
                cond, uncond = conditions_for(self._control(ncol * s.grid_rows), prompts=prompts * s.grid_rows,
                                              text=self.text)
            x = generate(model, cond, self.latent_shape, uncond=uncond, seed=self.cfg.seed, device=self.device,
                         **self._sample_kwargs())
            images = to_uint8(self.autoencoder.decode(x.to(self.device)))
            path = self.run_dir / "samples" / f"{name}.png"
            path.parent.mkdir(exist_ok=True)
            make_grid(images.numpy(), ncol=ncol).save(path)
        D.barrier(self.dist)
        return path

    def shapes_dataset(self):
        """The procedural ``shapes`` source (for its evaluations), also when training reads a cache of it."""
        if not isinstance(self.dataset, LatentCacheDataset):
            return self.dataset
        if self._shapes is None:
            self._shapes = build_dataset(self.cfg.data, seed=self.cfg.seed)
        return self._shapes

    def evaluate_shapes(self) -> dict[str, Any] | None:
        from ldmkit.eval.shapes import evaluate_captions, evaluate_generation

        model = self._ema_eval_model()
        result = None
        if model is not None:
            s = self.cfg.sample
            control = dict(orig_size=s.orig_size, crop=s.crop, flip=s.flip)
            if self.text is None:
                result = evaluate_generation(
                    model, self.shapes_dataset(), per_class=self.cfg.eval.shapes_per_class, control=control,
                    seed=self.cfg.seed + 7, device=self.device, decode=self.autoencoder.decode,
                    **self._sample_kwargs(),
                )
            else:
                result = evaluate_captions(
                    model, self.shapes_dataset(), self.text, per_caption=self.cfg.eval.shapes_per_caption,
                    control=control,
                    seed=self.cfg.seed + 7, device=self.device, decode=self.autoencoder.decode,
                    **self._sample_kwargs(),
                )
        D.barrier(self.dist)
        return result

    def evaluate_fid(self) -> float | None:
        """FID of ``eval.fid_num_samples`` EMA samples against ``eval.fid_ref`` (rank 0; others wait)."""
        model = self._ema_eval_model()
        fid = None
        if model is not None:
            from ldmkit.eval.fid import load_reference
            from ldmkit.eval.inception import InceptionFeatures
            from ldmkit.eval.protocol import condition_maker, fid_of_model

            e, s = self.cfg.eval, self.cfg.sample
            if self._fid is None:
                inception = InceptionFeatures(weights=e.inception_weights, device=self.device, progress=False)
                captions = None
                if self.text is not None:
                    if e.fid_captions:
                        captions = [c.strip() for c in Path(e.fid_captions).read_text().splitlines() if c.strip()]
                    else:
                        from ldmkit.eval.shapes import all_captions

                        captions = [c for c, *_ in all_captions(self.shapes_dataset())]
                make_cond, _ = condition_maker(model, self.cfg.data.image_size, e.fid_num_samples, text=self.text,
                                               captions=captions,
                                               control=dict(orig_size=s.orig_size, crop=s.crop, flip=s.flip))
                self._fid = (inception, load_reference(e.fid_ref, features_fn=inception.extract), make_cond)
            inception, reference, make_cond = self._fid
            fid = fid_of_model(model, reference, inception, e.fid_num_samples, make_cond=make_cond,
                               latent_shape=self.latent_shape, decode=self.autoencoder.decode,
                               settings=self._sample_kwargs(), seed=self.cfg.seed + 13, device=self.device)
        D.barrier(self.dist)
        return fid

    # ----------------------------------------------------------------------------------------------
    # The loop
    # ----------------------------------------------------------------------------------------------

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum  # acted on at the end of the current step, on every rank

    def _flops_per_image(self, probe: Batch) -> float | None:
        """Training FLOPs per image (3 x forward), counted on a meta-device copy: no compute, and
        untouched by compile or sharding of the real model."""
        try:
            with torch.device("meta"):
                model = model_from_config(self.model_json)
            x = torch.empty((1, *self.latent_shape), device="meta")
            tt = torch.full((1,), 0.5, device="meta")
            cond = probe.cond.index(slice(0, 1))
            if self.text is not None:  # the caption's tokens (no padding noise: the global RNG stays untouched)
                cond = replace(cond, **self.text(probe.captions[:1], training=False))
            return 3.0 * forward_flops_per_image(model, x, tt, cond.to("meta"))
        except Exception:  # FLOP counting is telemetry: never let it stop a run
            return None

    def fit(self) -> TrainResult:
        cfg, t = self.cfg, self.cfg.train
        if self.main:
            print(f"Run directory: {self.run_dir}")
            semantic = (f"{self.dataset.num_classes} classes" if self.text is None
                        else f"captions through {self.text.encoder}")
            print(f"Model: {cfg.model.name} ({self.n_params / 1e6:.2f}M parameters) on {self.device}"
                  f"{f' x {self.dist.world_size} ranks ({t.parallel})' if self.dist.enabled else ''}; "
                  f"data: {cfg.data.name} {cfg.data.image_size}px, {semantic}; "
                  f"batch {t.batch_size} = {self.dist.world_size} ranks x {t.grad_accum} x {self.micro_batch}")
        batches = self._batches()
        first = next(batches)  # also a probe for the FLOP count; replayed below
        self.flops_per_image = self._flops_per_image(first)
        self.peak = t.peak_tflops or peak_tflops(self.device, t.precision, t.tf32)
        batches = _prepend(first, batches)
        if self._resume_rng is not None:  # the global RNG streams continue where they stopped
            cpu_state, cuda_state = self._resume_rng
            torch.set_rng_state(cpu_state)
            if cuda_state is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(cuda_state, self.device)

        previous = {}
        for sig in STOP_SIGNALS:
            try:
                previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread: leave signals to the host program
                pass
        window = _Window(self)
        bar = tqdm(total=t.steps, initial=self.step, desc="train", unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        start_time = time.time()
        stopped_by = None
        try:
            while self.step < t.steps:
                t0 = time.perf_counter()
                out = self.train_step(batches)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                window.add(out, step_s=time.perf_counter() - t0)
                bar.update(1)
                if self.step % t.log_every == 0 or self.step == t.steps or out["stop"] or out["diverged"]:
                    record = window.flush(time.time() - start_time)
                    if self.data_report.counts:
                        record.update(data_skipped=self.data_report.skipped,
                                      data_converted=self.data_report.converted)
                    if self.main:
                        self.telemetry.write(record)
                        bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}")
                if out["diverged"]:
                    raise self._diverged(out["diverged"])
                if out["stop"]:
                    stopped_by = "signal"
                    break
                if self.step % t.checkpoint_every == 0 and self.step < t.steps:
                    if self.consecutive_skips == 0:
                        self.save()
                    elif self.main:  # the current weights just gave bad steps: not worth a checkpoint
                        tqdm.write(f"Step {self.step}: no checkpoint, the last {self.consecutive_skips} "
                                   "steps were skipped")
                if t.sample_every > 0 and self.step % t.sample_every == 0 and self.step < t.steps:
                    self.write_grid(f"step_{self.step:07d}")
                if cfg.eval.shapes_every > 0 and self.step % cfg.eval.shapes_every == 0 \
                        and self.step < t.steps:
                    result = self.evaluate_shapes()
                    if self.main:
                        self.telemetry.write({"step": self.step, **_eval_record(result)})
                if cfg.eval.fid_every > 0 and self.step % cfg.eval.fid_every == 0 and self.step < t.steps:
                    fid = self.evaluate_fid()
                    if self.main:
                        self.telemetry.write({"step": self.step, "eval/fid": fid})
        except KeyboardInterrupt:
            bar.close()
            path = self.save()
            if self.main:
                print(f"\nInterrupted at step {self.step}; checkpoint written to {path}. Resume with:\n"
                      f"  ldmkit train --resume auto run.dir={self.run_dir}")
            raise
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            torch.set_num_threads(self._threads_before)
        bar.close()
        elapsed = time.time() - start_time
        last_ckpt = self.save()
        if stopped_by is not None:
            if self.main:
                print(f"Stopped by a signal at step {self.step}; checkpoint written to {last_ckpt}. "
                      f"Resume with:\n  ldmkit train --resume auto run.dir={self.run_dir}")
            self._close()
            return TrainResult(self.run_dir, last_ckpt, self.step, None, None, stopped_by)
        grid = self.write_grid("final")
        result = None
        if cfg.eval.shapes_at_end and cfg.data.name == "shapes":
            result = self.evaluate_shapes()
            if self.main:
                self.telemetry.write({"step": self.step, **_eval_record(result)})
                save_json(result, self.run_dir / "eval_shapes.json")
        if cfg.eval.fid_every > 0:
            fid = self.evaluate_fid()
            if self.main:
                self.telemetry.write({"step": self.step, "eval/fid": fid})
                print(f"FID ({cfg.eval.fid_num_samples} EMA samples vs {cfg.eval.fid_ref}): {fid:.3f}")
        curves = None
        if self.main:
            try:
                from ldmkit.plot import plot_metrics

                curves = plot_metrics(self.run_dir)
            except ImportError:
                pass
            self._report(elapsed, last_ckpt, grid, curves, result)
        self._close()
        return TrainResult(self.run_dir, last_ckpt, self.step, grid, result)

    def _close(self) -> None:
        cache = self.cfg.cond.text.cache_file
        if self.text is not None and cache and self.main:
            self.text.encoder.save_cache(cache)
        if self.telemetry is not None:
            self.telemetry.close()

    def _report(self, elapsed: float, ckpt: Path, grid: Path | None, curves: Path | None,
                result: dict[str, Any] | None) -> None:
        print(f"\nDone: {self.step} steps, {elapsed / 60:.1f} min of training"
              + (f", {self.skipped_steps} non-finite steps skipped" if self.skipped_steps else ""))
        print(f"  samples:     {grid}")
        print(f"  checkpoint:  {ckpt}")
        print(f"  metrics:     {self.run_dir / 'metrics.jsonl'}"
              + (f" (curves: {curves})" if curves else ""))
        if result is not None:
            position = f", position {100 * result['position']:.1f}%" if "position" in result else ""
            print(f"  shapes eval: colour {100 * result['colour']:.1f}%, shape {100 * result['shape']:.1f}%"
                  f"{position}, both {100 * result['both']:.1f}% over {result['n']} EMA samples "
                  f"-> {self.run_dir / 'eval_shapes.json'}")
        if self.text is None:
            print(f"Sample more:   ldmkit sample --checkpoint {self.run_dir} --class 0 --num 16 --out grid.png")
        else:
            prompt = next(iter(self.grid_prompts()), "a prompt")
            print(f"Sample more:   ldmkit sample --checkpoint {self.run_dir} --prompt {prompt!r} --num 16 --out grid.png")


def _prepend(first: Batch, rest: Iterator[Batch]) -> Iterator[Batch]:
    yield first
    yield from rest


def _eval_record(result: dict[str, Any]) -> dict[str, Any]:
    return {f"eval/shapes_{k}": result[k] for k in ("colour", "shape", "both", "position", "all") if k in result}


class _Window:
    """Running sums between two log lines, kept on the device (no per-step host sync for logging)."""

    def __init__(self, trainer: Trainer) -> None:
        self.tr = trainer
        self.reset()

    def reset(self) -> None:
        dev = self.tr.device
        nb = len(LOSS_BINS) - 1
        self.loss = torch.zeros((), device=dev, dtype=torch.float64)
        self.grad = torch.zeros((), device=dev, dtype=torch.float64)
        self.bin_sum = torch.zeros(nb, device=dev, dtype=torch.float64)
        self.bin_n = torch.zeros(nb, device=dev, dtype=torch.float64)
        self.good = self.steps = 0
        self.data_s = self.step_s = 0.0
        self.lr = 0.0
        self.edges = torch.tensor(LOSS_BINS[1:-1], device=dev)
        reset_peak_memory(dev)

    def add(self, out: dict[str, Any], step_s: float) -> None:
        self.steps += 1
        self.lr = out["lr"]
        self.data_s += out["data_s"]
        self.step_s += step_s
        if not out["bad"]:
            self.good += 1
            self.loss += out["loss"].double()
            self.grad += out["grad_norm"].double()
            bins = torch.bucketize(out["t"], self.edges)
            self.bin_sum.index_add_(0, bins, out["per_sample"].double())
            self.bin_n.index_add_(0, bins, torch.ones_like(out["per_sample"], dtype=torch.float64))

    def flush(self, elapsed: float) -> dict[str, Any]:
        tr = self.tr
        d = tr.dist
        # loss is already the global-batch mean on each rank's share; average it over ranks
        loss = D.sum_across_ranks(d, self.loss) / d.world_size
        bins = D.sum_across_ranks(d, torch.stack([self.bin_sum, self.bin_n]))
        images = self.steps * tr.cfg.train.batch_size
        images_per_s = images / max(self.step_s, 1e-9)
        record: dict[str, Any] = {
            "step": tr.step,
            "loss": (loss / self.good).item() if self.good else float("nan"),
            "grad_norm": (self.grad / self.good).item() if self.good else float("nan"),
            "lr": self.lr,
            "images_per_s": images_per_s,
            "steps_per_s": self.steps / max(self.step_s, 1e-9),
            "data_wait_frac": self.data_s / max(self.step_s, 1e-9),
            "peak_mem_gib": peak_memory_gib(tr.device),
            "elapsed_s": elapsed,
            "skipped_steps": tr.skipped_steps,
        }
        tokens = getattr(tr.model, "num_tokens", None)
        if tokens:
            record["tokens_per_s"] = images_per_s * tokens
        if tr.flops_per_image:
            record["model_tflops_per_image"] = tr.flops_per_image / 1e12
            achieved = tr.flops_per_image * images_per_s / 1e12  # over all ranks
            record["model_tflops_per_s"] = achieved
            if tr.peak:
                record["mfu"] = achieved / (tr.peak * d.world_size)
        for i in range(len(LOSS_BINS) - 1):
            if bins[1, i] > 0:
                record[f"loss_t{LOSS_BINS[i]:.2f}-{LOSS_BINS[i + 1]:.2f}"] = (bins[0, i] / bins[1, i]).item()
        self.reset()
        return record


def save_json(data: dict[str, Any], path: Path) -> None:
    atomic_write_json(path, data)


def _first_non_finite(*states: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor with a NaN or infinity, or None."""
    for state in states:
        for name, v in state.items():
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                return name
    return None


def train(cfg: Config, resume: str | None = None, progress: bool = True) -> TrainResult:
    """Train a model as configured; ``resume`` = "auto" or a checkpoint path continues run.dir.

    Under torchrun every rank calls this; the process group is started and torn down here.
    """
    threads = torch.get_num_threads()  # train.threads applies to this run only
    try:
        return Trainer(cfg, resume=resume, progress=progress).fit()
    finally:
        D.shutdown()
        torch.set_num_threads(threads)
