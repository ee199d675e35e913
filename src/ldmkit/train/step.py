"""One optimizer step: its random draws, the conditioning, the micro-batches, and whether it is applied.

Determinism: the random inputs of step k (timesteps, noise, condition dropout, padding noise) are drawn
for the whole global batch from a generator seeded by (seed, k), and each rank / micro-batch takes its
rows; the data stream is a function of the global position. A step therefore computes the same thing
on 1 process or N ranks, with or without gradient accumulation, and resuming needs only the step and the
position.
"""

from __future__ import annotations

import math
import time
from contextlib import ExitStack, nullcontext
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch import nn

from ldmkit.conditioning import Conditioner
from ldmkit.config import Config
from ldmkit.data.batch import Batch
from ldmkit.data.decode import DataReport
from ldmkit.train import distributed as D
from ldmkit.train.build import Wrapped
from ldmkit.train.state import TrainState


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


def step_seed(seed: int, step: int) -> int:
    """Seed of the random draws of optimizer step ``step`` (well mixed, independent of world size)."""
    return int(np.random.SeedSequence([seed, step, 0x5EED]).generate_state(1, dtype=np.uint64)[0] >> 1)


def sdpa_context(choice: str):
    """Pin PyTorch's attention kernel (``train.attention``), or leave the choice to it (``auto``)."""
    if choice == "auto":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[choice]
    return sdpa_kernel([backend])


class TrainStep:
    """``step(batches, state, stop_requested) -> record``: one optimizer step over ``train.grad_accum``
    micro-batches. A step whose loss or gradient is not finite, or whose loss spikes (``train/guard.py``),
    is skipped, not applied; non-finite or exploding weights after an update are reported as divergence."""

    def __init__(self, cfg: Config, dist: D.Dist, model: nn.Module, wrapped: Wrapped, objective: Any,
                 autoencoder: Any, conditioner: Conditioner, latent_channels: int, micro_batch: int,
                 data_report: DataReport) -> None:
        self.cfg, self.dist, self.device = cfg, dist, dist.device
        self.model, self.w, self.objective = model, wrapped, objective
        self.autoencoder, self.conditioner = autoencoder, conditioner
        self.latent_channels, self.micro_batch, self.data_report = latent_channels, micro_batch, data_report
        self.first_captions: Optional[list[str]] = None  # of the first batch (text grids on real data)

    def _autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.train.precision)
        return torch.autocast(self.device.type, dtype=dtype) if dtype else nullcontext()

    def __call__(self, batches: Iterator[Batch], state: TrainState, stop_requested: bool = False) -> dict[str, Any]:
        cfg, t, w = self.cfg, self.cfg.train, self.w
        B, m, accum = t.batch_size, self.micro_batch, t.grad_accum
        g = torch.Generator(self.device).manual_seed(step_seed(cfg.seed, state.step))
        t0 = time.perf_counter()
        first = next(batches)  # its shape is the step's (aspect-ratio buckets change it between steps)
        first_s = time.perf_counter() - t0
        if first.latent:
            shape = tuple(first.images.shape[1:])
        else:
            ds = self.autoencoder.downsample
            shape = (self.latent_channels, first.images.shape[2] // ds, first.images.shape[3] // ds)
        draw = self.objective.draw(B, shape, device=self.device, generator=g)  # timesteps and noise first
        draws = self.conditioner.draw(B, self.device, g)  # then the condition dropout

        lr = lr_at(state.step, cfg)
        for group in w.optimizer.param_groups:
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
            if self.first_captions is None:
                self.first_captions = list(batch.captions)
            lo = rank_offset + a * m
            images = batch.images.to(self.device, non_blocking=True)
            x0 = self.autoencoder.normalize(images) if batch.latent else self.autoencoder.encode(images)
            cond = self.conditioner.for_training(batch, draws.rows(lo, lo + m), self.device)
            sync = a == accum - 1  # reduce gradients across ranks once, on the last micro-batch
            with ExitStack() as stack:
                if hasattr(w.train_model, "set_requires_gradient_sync"):  # FSDP2
                    w.train_model.set_requires_gradient_sync(sync)
                elif not sync and hasattr(w.train_model, "no_sync"):  # DDP
                    stack.enter_context(w.train_model.no_sync())
                stack.enter_context(sdpa_context(t.attention))
                with self._autocast():
                    loss, ps, tt = self.objective.loss(w.train_model, x0, cond, draw.rows(lo, lo + m))
                scaled = loss / accum
                (w.scaler.scale(scaled) if w.scaler is not None else scaled).backward()
            loss_sum += loss.detach() / accum
            per_sample.append(ps)
            ts.append(tt.detach())

        if w.scaler is not None:
            w.scaler.unscale_(w.optimizer)
        clip = t.grad_clip if t.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(w.params, clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        # The step's decisions need the flags of every rank and the global loss: one all-reduce, one sync.
        local_bad = ~(torch.isfinite(grad_norm) & torch.isfinite(loss_sum))
        stop = torch.tensor(stop_requested, device=self.device)
        totals = D.sum_across_ranks(self.dist, torch.stack([local_bad.float(), stop.float(), loss_sum.float()]))
        n_bad, n_stop, loss_total = totals.tolist()
        loss_value = loss_total / self.dist.world_size
        bad = n_bad > 0 or state.guard.is_spike(loss_value)  # non-finite, or far above the running median
        if bad:
            state.skipped_step()
            if w.scaler is not None:
                w.scaler.update()  # lowers the scale after an overflow
        else:
            state.healthy_step()
            state.guard.record(loss_value)
            if w.scaler is not None:
                w.scaler.step(w.optimizer)
                w.scaler.update()
            else:
                w.optimizer.step()
        w.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.data_position += B
        diverged = None
        if not bad:
            norm = D.param_norm(w.params, self.dist)
            diverged = state.guard.weight_problem(norm)
            if diverged is None:
                w.ema.update(self.model, state.step)
                if state.step % t.checkpoint_every == 0:
                    state.guard.set_reference(norm)
        if state.consecutive_skips >= t.max_consecutive_skips:
            diverged = (f"{state.consecutive_skips} consecutive steps ({state.step - state.consecutive_skips + 1}-"
                        f"{state.step}) had a non-finite or spiking loss or gradient")
        return {"loss": loss_sum, "grad_norm": grad_norm.detach(), "lr": lr, "bad": bad, "stop": n_stop > 0,
                "diverged": diverged, "per_sample": torch.cat(per_sample), "t": torch.cat(ts), "data_s": data_s}
