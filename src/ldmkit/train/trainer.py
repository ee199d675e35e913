"""The training loop: one obvious loop over (data -> step -> logs / checkpoints / evaluations).

The trainer knows nothing about the architecture. The pieces live beside it: ``build.py`` makes the run
from its Config, ``step.py`` takes one optimizer step, ``state.py`` holds the counters a resume needs,
``checkpoint.py`` the file format, ``run_dir.py`` where a run goes, ``guard.py`` when a run has diverged,
``telemetry.py`` what is logged, and ``eval/hooks.py`` the evaluations during training.
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from tqdm.auto import tqdm

from ldmkit.autoencoders import build_autoencoder
from ldmkit.conditioning import Conditioner
from ldmkit.config import Config, dump_yaml, to_dict
from ldmkit.data.batch import Batch
from ldmkit.data.decode import DataReport
from ldmkit.errors import RunDirError, TrainingDiverged
from ldmkit.eval.hooks import RunEvaluator
from ldmkit.files import atomic_write_json, atomic_write_text
from ldmkit.models import model_from_config
from ldmkit.text import build_text_conditioner
from ldmkit.train import distributed as D
from ldmkit.train.build import (build_objective, build_run_model, build_training_data, check_inputs,
                                check_semantic_source, class_names_of, make_buckets, micro_batch, open_init_source,
                                pick_device, reads_ahead, resolve_config, training_batches, training_flops_per_image,
                                wrap_for_training)
from ldmkit.train.checkpoint import (model_config, read_checkpoint,
                                     save_checkpoint)
from ldmkit.train.guard import DivergenceGuard, diverged_error, set_aside_checkpoints_after
from ldmkit.train.metrics import read_metrics
from ldmkit.train.run_dir import create_run_dir, plan_run_on_rank0
from ldmkit.train.state import TrainState
from ldmkit.train.step import TrainStep, lr_at
from ldmkit.train.telemetry import StepWindow, Telemetry, peak_tflops, print_summary

# Re-exported: the names callers have imported from here.
__all__ = ["RunDirError", "TrainResult", "Trainer", "TrainingDiverged", "lr_at", "pick_device", "train"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # cluster pre-emption: checkpoint and exit cleanly


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    steps: int
    final_grid: Optional[Path]
    shapes_eval: Optional[dict[str, Any]]
    stopped_by: Optional[str] = None  # "signal" when a SIGTERM/SIGUSR1 ended the run early


class Trainer:
    """Builds the run (every input checked before its directory exists), then ``fit()`` trains it."""

    def __init__(self, cfg: Config, resume: Optional[str] = None, progress: bool = True) -> None:
        t = cfg.train
        self.dist = D.init_distributed(t.device)
        self.main = self.dist.is_main
        self.progress = progress and self.main
        self.device = self.dist.device
        self.micro_batch = micro_batch(cfg, self.dist.world_size)
        check_inputs(cfg)
        # init.from is opened once: its config resolves resolution_scale "auto", its weights start a new run
        init_source = open_init_source(cfg) if resume is None or cfg.diffusion.resolution_scale == "auto" else None
        self.cfg = cfg = resolve_config(cfg, init_source)

        self.dataset = build_training_data(cfg, self.dist)  # a bad path or an empty dataset fails here
        self.autoencoder = build_autoencoder(cfg.autoencoder, device=self.device)
        self.buckets = make_buckets(cfg, self.dataset, self.autoencoder) if cfg.data.buckets else None
        self.data_report = DataReport()  # bad and converted source files, from construction on
        self.data_report.add(getattr(self.dataset, "init_issues", ()))
        check_semantic_source(cfg, self.dataset)
        # Where the run goes and what it resumes from: decided now, written only once nothing can fail.
        self.plan = plan_run_on_rank0(self.cfg, resume, self.dist)
        for ckpt, why in self.plan.skipped if self.main else ():
            print(f"Skipping damaged checkpoint {ckpt}: {why}")
        if self.plan.resume_from is not None:
            init_source = None  # a resume restores its own weights
        elif init_source is None and cfg.init.from_:  # started again from step 0: it needs its initial weights
            init_source = open_init_source(cfg)

        self._threads_before = torch.get_num_threads()  # restored when fit() ends
        if t.threads > 0:
            torch.set_num_threads(t.threads)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = t.tf32
            torch.backends.cudnn.allow_tf32 = t.tf32
        torch.manual_seed(cfg.seed)  # the model's initialisation (and nothing random before it)

        size = cfg.data.image_size // self.autoencoder.downsample
        self.latent_shape = (self.autoencoder.channels, size, size)
        self.text = build_text_conditioner(cfg.cond.text, self.device) if cfg.cond.semantic == "text" else None
        self.conditioner = Conditioner(self.text, cfg.cond.p_drop_semantic, cfg.cond.p_drop_control)
        self.model, init_report = build_run_model(cfg, self.latent_shape, self.dataset.num_classes, self.text,
                                                  init_source, self.device)
        self.model_json = model_config(self.model)
        self.class_names = class_names_of(cfg, self.dataset, self.text)  # stored with every checkpoint
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.w = wrap_for_training(self.model, cfg, self.dist, self._fresh_model)
        objective = build_objective(cfg, self.model, float(cfg.diffusion.resolution_scale))
        self.state = TrainState(guard=DivergenceGuard(t.loss_spike_factor, t.max_weight_growth))
        self.stepper = TrainStep(cfg, self.dist, self.model, self.w, objective, self.autoencoder, self.conditioner,
                                 self.latent_shape[0], self.micro_batch, self.data_report)
        self._resume_rng = None
        self._eval_model = None

        # Nothing below can fail on bad input: the run directory is made (or continued) now.
        self.run_dir = Path(D.broadcast_object(self.dist, str(create_run_dir(self.plan, cfg)) if self.main else None))
        if self.main and not self.plan.resuming:  # first, so that a run directory always has its config
            dump_yaml(cfg, self.run_dir / "config.yaml")
        if init_report is not None and self.main:
            print(init_report.summary())
            init_report.save(self.run_dir / "init_report.json")
        if self.plan.resume_from is not None:
            self._load(self.plan.resume_from)
        else:
            self.state.guard.set_reference(D.param_norm(self.w.params, self.dist))
            if self.plan.resuming and self.main:  # killed before its first checkpoint: start again
                print(f"{self.run_dir} holds no checkpoint: starting again from step 0")
                self._truncate_metrics(0)
        if self.main and self.plan.resuming:  # after a successful load: a failed resume leaves it as it was
            dump_yaml(cfg, self.run_dir / "config.yaml")
        self.telemetry = (Telemetry(self.run_dir, to_dict(cfg), t.tensorboard, t.wandb, t.wandb_project,
                                    t.wandb_mode) if self.main else None)
        self.evaluator = RunEvaluator(cfg, self.device, lambda: D.barrier(self.dist), self._ema_eval_model,
                                      self.conditioner, self.autoencoder, self.dataset, self.latent_shape,
                                      self.run_dir, lambda: self.stepper.first_captions)
        self._stop_signal: Optional[int] = None

    # The parts a test or a caller may look at or replace.
    objective = property(lambda self: self.stepper.objective,
                         lambda self, value: setattr(self.stepper, "objective", value))
    optimizer = property(lambda self: self.w.optimizer)
    params = property(lambda self: self.w.params)
    ema = property(lambda self: self.w.ema)
    step = property(lambda self: self.state.step)
    skipped_steps = property(lambda self: self.state.skipped_steps)
    consecutive_skips = property(lambda self: self.state.consecutive_skips)

    def _fresh_model(self) -> torch.nn.Module:
        """A new, unwrapped instance of the trained architecture, on the training device."""
        with torch.device(self.device):
            return model_from_config(self.model_json)

    def _ema_eval_model(self) -> Optional[torch.nn.Module]:
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

    # ----------------------------------------------------------------------------------------------
    # The run directory and checkpoints
    # ----------------------------------------------------------------------------------------------

    def _checkpoint_dir(self, step: int) -> Path:
        return self.run_dir / "checkpoints" / f"step_{step:07d}"

    def _load(self, ckpt: Path) -> None:
        saved = read_checkpoint(ckpt)
        D.load_full_model_state(self.model, saved.model_state, self.dist)
        self.ema.load_full_state_dict(saved.ema_state)
        D.load_full_optimizer_state(self.model, self.optimizer, saved.optimizer_state, self.dist)
        self._resume_rng = self.state.load_dict(saved.train_state)
        if saved.train_state.get("guard") is None:  # a checkpoint from before the guard: its weights are the reference
            self.state.guard.set_reference(D.param_norm(self.w.params, self.dist))
        if self.w.scaler is not None and saved.train_state.get("grad_scaler"):
            self.w.scaler.load_state_dict(saved.train_state["grad_scaler"])
        if self.main:
            self._truncate_metrics(self.step)
            print(f"Resumed from {ckpt} at step {self.step}")

    def _truncate_metrics(self, step: int) -> None:
        """Drop records written after the checkpoint (a killed run logged steps it must now redo)."""
        path = self.run_dir / "metrics.jsonl"
        if path.is_file():
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
            state = {**self.state.to_dict(self.device), "world_size": self.dist.world_size,
                     "grad_scaler": self.w.scaler.state_dict() if self.w.scaler is not None else {}}
            good = self.state.last_good_step
            path = save_checkpoint(
                self.run_dir, self.step, model_state=model_state, ema_state=ema_state,
                model_json=self.model_json, optimizer_state=optimizer_state, config=to_dict(self.cfg),
                train_state=state, keep=self.cfg.train.keep_checkpoints,
                protect=[] if good is None else [self._checkpoint_dir(good)], class_names=self.class_names,
            )
        self.state.checkpoint_written()
        D.barrier(self.dist)
        return path or self._checkpoint_dir(self.step)

    def _diverged(self, reason: str) -> TrainingDiverged:
        """The error that stops a diverged run; checkpoints newer than the last good one are set aside."""
        moved = set_aside_checkpoints_after(self.run_dir, self.state.last_good_step) if self.main else []
        D.barrier(self.dist)
        return diverged_error(self.run_dir, self.step, reason, self.state.last_good_step, moved)

    # ----------------------------------------------------------------------------------------------
    # Data
    # ----------------------------------------------------------------------------------------------

    def _batches(self) -> Iterator[Batch]:
        """The micro-batches of this rank from the current data position on."""
        return training_batches(self.dataset, self.cfg, self.dist, self.micro_batch, self.state.data_position,
                                self.buckets, read_ahead=reads_ahead(self.cfg, self.device))

    # ----------------------------------------------------------------------------------------------
    # The loop
    # ----------------------------------------------------------------------------------------------

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum  # acted on at the end of the current step, on every rank

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
        window = StepWindow(self.dist, t.batch_size, getattr(self.model, "num_tokens", None),
                            training_flops_per_image(self.model_json, self.text), t.peak_tflops or peak_tflops(self.device, t.precision, t.tf32))
        bar = tqdm(total=t.steps, initial=self.step, desc="train", unit="step", disable=not self.progress,
                   dynamic_ncols=True)
        start_time = time.time()
        stopped_by = None
        try:
            while self.step < t.steps:
                if self.run_step(batches, window, bar, start_time)["stop"]:
                    stopped_by = "signal"
                    break
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
        grid, result = self._final_evaluations()
        curves = None
        if self.main:
            try:
                from ldmkit.train.metrics import plot_metrics

                curves = plot_metrics(self.run_dir)
            except ImportError:
                pass
            prompt = None if self.text is None else next(iter(self.evaluator.grid_prompts()), "a prompt")
            print_summary(self.run_dir, self.step, self.skipped_steps, elapsed, last_ckpt, grid, curves, result,
                          prompt)
        self._close()
        return TrainResult(self.run_dir, last_ckpt, self.step, grid, result)

    def run_step(self, batches: Iterator[Batch], window: StepWindow, bar, start_time: float) -> dict[str, Any]:
        """One iteration of the loop: the step, its log record when one is due, and the checkpoints,
        grids and evaluations that fall on it. Raises ``TrainingDiverged``."""
        t = self.cfg.train
        t0 = time.perf_counter()
        out = self.stepper(batches, self.state, self._stop_signal is not None)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        window.add(out, step_s=time.perf_counter() - t0)
        bar.update(1)
        if self.step % t.log_every == 0 or self.step == t.steps or out["stop"] or out["diverged"]:
            record = window.flush(self.step, time.time() - start_time, self.skipped_steps)
            if self.data_report.counts:
                record.update(data_skipped=self.data_report.skipped, data_converted=self.data_report.converted)
            if self.main:
                self.telemetry.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}")
        if out["diverged"]:
            raise self._diverged(out["diverged"])
        if not out["stop"]:
            self._periodic(bar)
        return out

    def _periodic(self, bar) -> None:
        """Checkpoints, sample grids and evaluations that fall on this step (not on the last one)."""
        cfg, t, step = self.cfg, self.cfg.train, self.step
        if step >= t.steps:
            return
        if step % t.checkpoint_every == 0:
            if self.state.consecutive_skips == 0:
                self.save()
            elif self.main:  # the current weights just gave bad steps: not worth a checkpoint
                bar.write(f"Step {step}: no checkpoint, the last {self.state.consecutive_skips} steps were skipped")
        if t.sample_every > 0 and step % t.sample_every == 0:
            self.evaluator.write_grid(f"step_{step:07d}")
        if cfg.eval.shapes_every > 0 and step % cfg.eval.shapes_every == 0:
            result = self.evaluator.shapes()
            if self.main:
                self.telemetry.write({"step": step, **_eval_record(result)})
        if cfg.eval.fid_every > 0 and step % cfg.eval.fid_every == 0:
            fid = self.evaluator.fid()
            if self.main:
                self.telemetry.write({"step": step, "eval/fid": fid})

    def _final_evaluations(self) -> tuple[Optional[Path], Optional[dict[str, Any]]]:
        cfg = self.cfg
        grid = self.evaluator.write_grid("final")
        result = None
        if cfg.eval.shapes_at_end and cfg.data.name == "shapes":
            result = self.evaluator.shapes()
            if self.main:
                self.telemetry.write({"step": self.step, **_eval_record(result)})
                atomic_write_json(self.run_dir / "eval_shapes.json", result)
        if cfg.eval.fid_every > 0:
            fid = self.evaluator.fid()
            if self.main:
                self.telemetry.write({"step": self.step, "eval/fid": fid})
                print(f"FID ({cfg.eval.fid_num_samples} EMA samples vs {cfg.eval.fid_ref}): {fid:.3f}")
        return grid, result

    def _close(self) -> None:
        cache = self.cfg.cond.text.cache_file
        if self.text is not None and cache and self.main:
            self.text.encoder.save_cache(cache)
        if self.telemetry is not None:
            self.telemetry.close()


def _eval_record(result: dict[str, Any]) -> dict[str, Any]:
    return {f"eval/shapes_{k}": result[k] for k in ("colour", "shape", "both", "position", "all") if k in result}


def _first_non_finite(*states: dict[str, torch.Tensor]) -> Optional[str]:
    """The name of the first floating-point tensor with a NaN or infinity, or None."""
    for state in states:
        for name, v in state.items():
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                return name
    return None


def train(cfg: Config, resume: Optional[str] = None, progress: bool = True) -> TrainResult:
    """Train a model as configured; ``resume`` = "auto" or a checkpoint path continues run.dir.

    Under torchrun every rank calls this; the process group is started and torn down here.
    """
    threads = torch.get_num_threads()  # train.threads applies to this run only
    try:
        return Trainer(cfg, resume=resume, progress=progress).fit()
    finally:
        D.shutdown()
        torch.set_num_threads(threads)
