"""The training loop: one obvious loop over (data -> objective -> optimizer -> EMA -> logs/checkpoints).

The trainer knows nothing about the architecture: it builds a model by name and calls
``objective.loss(model, x0, cond)``, which calls ``model(x_t, t, cond)``.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ldmkit.autoencoders import build_autoencoder, to_uint8
from ldmkit.config import Config, ConfigError, dump_yaml, to_dict
from ldmkit.data import build_dataset
from ldmkit.data.batch import Batch, collate
from ldmkit.data.stream import StreamDataset, StreamSampler
from ldmkit.diffusion.flow import FlowMatching
from ldmkit.models import build_model
from ldmkit.sampling import generate, make_grid
from ldmkit.train.checkpoint import (list_checkpoints, load_train_state, load_weights,
                                     resolve_checkpoint, save_checkpoint)
from ldmkit.train.ema import EMA
from ldmkit.train.metrics import MetricsLog

# Sections whose change would make a checkpoint mean something else; resuming refuses such changes
# (except for the keys listed after them, which change how, not what, is computed).
_FROZEN_ON_RESUME = ("data", "autoencoder", "model", "diffusion")
_FREE_ON_RESUME = ("data.num_workers",)
LOSS_BINS = (0.0, 0.25, 0.5, 0.75, 1.0)  # loss is also logged per timestep bin


class RunDirError(RuntimeError):
    """The run directory cannot be used (exists without --resume, or missing with it)."""


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


def prepare_run_dir(cfg: Config, resume: bool) -> Path:
    """The run directory: a fresh one for a new run (never an existing one), the given one to resume."""
    if resume:
        if cfg.run.dir is None:
            raise RunDirError("--resume needs run.dir=PATH (the run to continue)")
        run_dir = Path(cfg.run.dir)
        if not run_dir.is_dir():
            raise RunDirError(f"cannot resume: run directory {str(run_dir)!r} does not exist")
        return run_dir
    if cfg.run.dir is not None:
        run_dir = Path(cfg.run.dir)
        if run_dir.exists() and any(run_dir.iterdir()):
            raise RunDirError(
                f"run directory {str(run_dir)!r} already exists and is not empty: pass --resume to "
                "continue that run, or choose another run.dir"
            )
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path("runs") / f"{cfg.run.name}-{stamp}"
        n = 1
        while run_dir.exists():  # two runs started in the same second
            n += 1
            run_dir = Path("runs") / f"{cfg.run.name}-{stamp}-{n}"
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def check_resume_config(cfg: Config, saved: dict[str, Any]) -> None:
    new = to_dict(cfg)
    changed = [
        f"{section}.{k}"
        for section in _FROZEN_ON_RESUME
        for k in set(new[section]) | set(saved.get(section, {}))
        if new[section].get(k) != saved.get(section, {}).get(k)
        and f"{section}.{k}" not in _FREE_ON_RESUME
    ]
    if changed:
        raise ConfigError(
            f"cannot resume with a different {', '.join(sorted(changed))} than the checkpoint was "
            "trained with; start a new run (or use the checkpoint's values)"
        )


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


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    steps: int
    final_grid: Path | None
    shapes_eval: dict[str, Any] | None


# --------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------


class Trainer:
    def __init__(self, cfg: Config, resume: str | None = None, progress: bool = True) -> None:
        self.cfg = cfg
        self.progress = progress
        resume_from = None
        if resume is not None:
            self.run_dir = prepare_run_dir(cfg, resume=True)
            if resume == "auto":
                found = list_checkpoints(self.run_dir)
                if not found:
                    raise RunDirError(f"cannot resume: {str(self.run_dir)!r} holds no complete checkpoint")
                resume_from = found[-1]
            else:
                resume_from = resolve_checkpoint(resume)
            check_resume_config(cfg, load_json(resume_from / "config.json"))
        else:
            self.run_dir = prepare_run_dir(cfg, resume=False)
        dump_yaml(cfg, self.run_dir / "config.yaml")

        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.seed)
        self.device = pick_device(cfg.train.device)

        self.dataset = build_dataset(cfg.data, seed=cfg.seed)
        self.autoencoder = build_autoencoder(cfg.autoencoder.name).to(self.device)
        self.latent_shape = (
            self.autoencoder.channels,
            cfg.data.image_size // self.autoencoder.downsample,
            cfg.data.image_size // self.autoencoder.downsample,
        )
        m = cfg.model
        self.model = build_model(
            m.name, in_channels=self.latent_shape[0], input_size=self.latent_shape[1],
            num_classes=self.dataset.num_classes, depth=m.depth, hidden_size=m.hidden_size,
            num_heads=m.num_heads, patch_size=m.patch_size, mlp_ratio=m.mlp_ratio,
            learn_sigma=m.learn_sigma, qk_norm=m.qk_norm,
        ).to(self.device)
        self.ema = EMA(self.model, cfg.train.ema_decay, warmup=cfg.train.ema_warmup)
        self.objective = FlowMatching(cfg.diffusion.timesteps, cfg.diffusion.logit_mean,
                                      cfg.diffusion.logit_std)
        t = cfg.train
        # Frozen parameters (DiT's fixed positional table) are not optimised.
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay,
            fused=True if self.device.type == "cuda" else None,
        )
        # One generator for every random draw of the training step (t, noise, condition dropout),
        # so that resuming restores the stream exactly.
        self.generator = torch.Generator(self.device).manual_seed(cfg.seed + 1)
        self.step = 0
        self.data_position = 0  # samples consumed from the stream
        self.skipped_steps = 0
        if resume_from is not None:
            self._load(resume_from)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")

    # ----------------------------------------------------------------------------------------------

    def _load(self, ckpt: Path) -> None:
        load_weights(self.model, ckpt / "model.safetensors")
        load_weights(self.ema.model, ckpt / "ema.safetensors")
        state = load_train_state(ckpt)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.data_position = int(state["data_position"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        print(f"Resumed from {ckpt} at step {self.step}")

    def save(self) -> Path:
        state = {
            "step": self.step,
            "data_position": self.data_position,
            "skipped_steps": self.skipped_steps,
            "generator": self.generator.get_state().cpu(),
            "torch_rng": torch.get_rng_state(),
        }
        return save_checkpoint(
            self.run_dir, self.step, model=self.model, ema_model=self.ema.model,
            optimizer=self.optimizer, config=to_dict(self.cfg), train_state=state,
            keep=self.cfg.train.keep_checkpoints,
        )

    def _batches(self) -> Iterator[Batch]:
        cfg = self.cfg
        sampler = StreamSampler(len(self.dataset), seed=cfg.seed, start=self.data_position)
        loader = DataLoader(
            StreamDataset(self.dataset), batch_size=cfg.train.batch_size, sampler=sampler,
            collate_fn=collate, num_workers=cfg.data.num_workers,
            persistent_workers=cfg.data.num_workers > 0, pin_memory=self.device.type == "cuda",
        )
        return iter(loader)

    def _autocast(self):
        if self.cfg.train.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def train_step(self, batch: Batch) -> dict[str, Any]:
        """One optimizer step; returns the numbers to log. Non-finite steps are skipped, not applied."""
        cfg = self.cfg
        x0 = self.autoencoder.encode(batch.images.to(self.device, non_blocking=True))
        cond = batch.cond.to(self.device)
        drop = torch.rand(x0.shape[0], device=self.device, generator=self.generator)
        cond = cond.drop_semantic(drop < cfg.cond.p_drop_semantic)

        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with self._autocast():
            loss, per_sample, t = self.objective.loss(self.model, x0, cond, generator=self.generator)
        loss.backward()
        clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(grad_norm))
        if finite:
            self.optimizer.step()
        else:
            self.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.data_position += x0.shape[0]
        if finite:
            self.ema.update(self.model, self.step)
        return {"loss": loss.item(), "grad_norm": grad_norm.item(), "lr": lr, "finite": finite,
                "per_sample": per_sample.cpu(), "t": t.detach().cpu()}

    # ----------------------------------------------------------------------------------------------

    def write_grid(self, name: str) -> Path:
        """A grid of EMA samples: one column per class, ``grid_rows`` noises per class."""
        s = self.cfg.sample
        n_cls = self.dataset.num_classes
        ncol = min(n_cls, 18) if s.grid_classes <= 0 else min(s.grid_classes, n_cls)
        classes = torch.arange(ncol).repeat(s.grid_rows)
        x = generate(self.ema.model, classes, self.latent_shape, sampler=s.sampler, steps=s.steps,
                     guidance=s.guidance, shift=s.shift, seed=self.cfg.seed, device=self.device)
        images = to_uint8(self.autoencoder.decode(x.to(self.device)))
        path = self.run_dir / "samples" / f"{name}.png"
        path.parent.mkdir(exist_ok=True)
        make_grid(images.numpy(), ncol=ncol).save(path)
        return path

    def evaluate_shapes(self) -> dict[str, Any]:
        from ldmkit.eval.shapes import evaluate_generation

        s = self.cfg.sample
        return evaluate_generation(
            self.ema.model, self.dataset, per_class=self.cfg.eval.shapes_per_class,
            sampler=s.sampler, steps=s.steps, guidance=s.guidance, shift=s.shift,
            seed=self.cfg.seed + 7, device=self.device, decode=self.autoencoder.decode,
        )

    def fit(self) -> TrainResult:
        cfg, t = self.cfg, self.cfg.train
        n_params = sum(p.numel() for p in self.model.parameters())
        print(f"Run directory: {self.run_dir}")
        print(f"Model: {cfg.model.name} ({n_params / 1e6:.2f}M parameters) on {self.device}; "
              f"data: {cfg.data.name} {cfg.data.image_size}px, {self.dataset.num_classes} classes")
        batches = self._batches()
        window = _Window()
        bar = tqdm(total=t.steps, initial=self.step, desc="train", unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        start_time = time.time()
        last_ckpt: Path | None = None
        try:
            while self.step < t.steps:
                t0 = time.perf_counter()
                batch = next(batches)
                t1 = time.perf_counter()
                out = self.train_step(batch)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                window.add(out, len(batch), data_s=t1 - t0, step_s=time.perf_counter() - t0)
                bar.update(1)
                if self.step % t.log_every == 0 or self.step == t.steps:
                    record = window.flush(self.step, time.time() - start_time, self.skipped_steps)
                    self.metrics.write(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}")
                if self.step % t.checkpoint_every == 0 and self.step < t.steps:
                    last_ckpt = self.save()
                if t.sample_every > 0 and self.step % t.sample_every == 0 and self.step < t.steps:
                    self.write_grid(f"step_{self.step:07d}")
                if cfg.eval.shapes_every > 0 and self.step % cfg.eval.shapes_every == 0 \
                        and self.step < t.steps:
                    result = self.evaluate_shapes()
                    self.metrics.write({"step": self.step, **_eval_record(result)})
        except KeyboardInterrupt:
            bar.close()
            path = self.save()
            print(f"\nInterrupted at step {self.step}; checkpoint written to {path}. Resume with:\n"
                  f"  ldmkit train --resume auto run.dir={self.run_dir}")
            raise
        bar.close()
        elapsed = time.time() - start_time
        last_ckpt = self.save()
        grid = self.write_grid("final")
        result = None
        if cfg.eval.shapes_at_end and cfg.data.name == "shapes":
            result = self.evaluate_shapes()
            self.metrics.write({"step": self.step, **_eval_record(result)})
            save_json(result, self.run_dir / "eval_shapes.json")
        curves = None
        try:
            from ldmkit.plot import plot_metrics

            curves = plot_metrics(self.run_dir)
        except ImportError:
            pass
        self._report(elapsed, last_ckpt, grid, curves, result)
        return TrainResult(self.run_dir, last_ckpt, self.step, grid, result)

    def _report(self, elapsed: float, ckpt: Path, grid: Path, curves: Path | None,
                result: dict[str, Any] | None) -> None:
        print(f"\nDone: {self.step} steps, {elapsed / 60:.1f} min of training"
              + (f", {self.skipped_steps} non-finite steps skipped" if self.skipped_steps else ""))
        print(f"  samples:     {grid}")
        print(f"  checkpoint:  {ckpt}")
        print(f"  metrics:     {self.run_dir / 'metrics.jsonl'}"
              + (f" (curves: {curves})" if curves else ""))
        if result is not None:
            print(f"  shapes eval: colour {100 * result['colour']:.1f}%, shape {100 * result['shape']:.1f}%, "
                  f"both {100 * result['both']:.1f}% over {result['n']} EMA samples "
                  f"-> {self.run_dir / 'eval_shapes.json'}")
        print(f"Sample more:   ldmkit sample --checkpoint {self.run_dir} --class 0 --num 16 --out grid.png")


def _eval_record(result: dict[str, Any]) -> dict[str, Any]:
    return {f"eval/shapes_{k}": result[k] for k in ("colour", "shape", "both") if k in result}


class _Window:
    """Running sums between two log lines."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss = self.grad = self.lr = 0.0
        self.steps = self.images = 0
        self.data_s = self.step_s = 0.0
        self.bin_sum = torch.zeros(len(LOSS_BINS) - 1, dtype=torch.float64)
        self.bin_n = torch.zeros(len(LOSS_BINS) - 1, dtype=torch.float64)

    def add(self, out: dict[str, Any], images: int, data_s: float, step_s: float) -> None:
        self.lr = out["lr"]
        if out["finite"]:
            self.loss += out["loss"]
            self.grad += out["grad_norm"]
            self.steps += 1
            bins = torch.bucketize(out["t"], torch.tensor(LOSS_BINS[1:-1]))
            self.bin_sum.index_add_(0, bins, out["per_sample"].double())
            self.bin_n.index_add_(0, bins, torch.ones_like(bins, dtype=torch.float64))
        self.images += images
        self.data_s += data_s
        self.step_s += step_s

    def flush(self, step: int, elapsed: float, skipped: int) -> dict[str, Any]:
        n = max(self.steps, 1)
        record = {
            "step": step,
            "loss": self.loss / n if self.steps else float("nan"),
            "grad_norm": self.grad / n if self.steps else float("nan"),
            "lr": self.lr,
            "images_per_s": self.images / max(self.step_s, 1e-9),
            "data_wait_frac": self.data_s / max(self.step_s, 1e-9),
            "elapsed_s": elapsed,
            "skipped_steps": skipped,
        }
        for i in range(len(LOSS_BINS) - 1):
            if self.bin_n[i] > 0:
                record[f"loss_t{LOSS_BINS[i]:.2f}-{LOSS_BINS[i + 1]:.2f}"] = (
                    self.bin_sum[i] / self.bin_n[i]).item()
        self.reset()
        return record


def load_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def save_json(data: dict[str, Any], path: Path) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def train(cfg: Config, resume: str | None = None, progress: bool = True) -> TrainResult:
    """Train a model as configured; ``resume`` = "auto" or a checkpoint path continues run.dir."""
    return Trainer(cfg, resume=resume, progress=progress).fit()
