"""What a run reports: metrics sinks (JSONL always, TensorBoard, W&B) and the FLOPs/MFU/memory numbers.

MFU here is *model* FLOPs utilisation: the FLOPs the model needs per trained image (forward + backward
= 3 × forward, counted by PyTorch's FlopCounterMode, ``models.flops``; real FLOPs, not multiply-adds),
times images/s, over the device's dense peak at the training precision. Recomputation from activation
checkpointing is not counted (it is work the hardware does, not work the model needs).
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from ldmkit.models.flops import forward_flops_per_image  # noqa: F401 - re-exported for older imports
from ldmkit.train import distributed as D
from ldmkit.train.metrics import MetricsLog

# Dense peak TFLOP/s per GPU by (name fragment, precision). SXM parts unless the name says otherwise.
# Sources: NVIDIA datasheets (H100/H200 SXM: 989 bf16 dense, 494 TF32, 67 fp32; H100 PCIe: 756 / 378 /
# 51; A100: 312 / 156 / 19.5; L40S: 362 / 183 / 91.6).
_PEAKS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0}),
    ("H200", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "fp16": 362.0, "tf32": 183.0, "fp32": 91.6}),
]


def peak_tflops(device: torch.device, precision: str, tf32: bool) -> Optional[float]:
    """The device's dense peak for the training precision, or None when unknown (CPUs, other GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    key = precision if precision != "fp32" else ("tf32" if tf32 else "fp32")
    for fragment, peaks in _PEAKS:
        if fragment in name:
            return peaks[key]
    return None


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory since the last reset: allocated CUDA memory, or the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


class Telemetry:
    """Writes each record to metrics.jsonl and, when enabled and installed, TensorBoard and W&B."""

    def __init__(self, run_dir: Path, config: dict[str, Any], tensorboard: bool, wandb: bool,
                 wandb_project: str, wandb_mode: str) -> None:
        self.jsonl = MetricsLog(run_dir / "metrics.jsonl")
        self.tb = None
        self.wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional; metrics.jsonl always has everything
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if wandb:
            self.wandb = _start_wandb(run_dir, config, wandb_project, wandb_mode)

    def write(self, record: dict[str, Any]) -> None:
        self.jsonl.write(record)
        step = record.get("step", 0)
        scalars = {k: v for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(run_dir: Path, config: dict[str, Any], project: str, mode: str):
    try:
        import wandb
    except ImportError as e:
        raise RuntimeError("train.wandb=true needs the wandb package: pip install wandb") from e
    id_file = run_dir / "wandb_id.txt"  # a resumed run continues the same W&B run
    run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
    id_file.write_text(run_id)
    return wandb.init(project=project, name=run_dir.name, id=run_id, resume="allow", dir=str(run_dir),
                      mode=mode, config=config)


LOSS_BINS = (0.0, 0.25, 0.5, 0.75, 1.0)  # the loss is also logged per timestep bin


class StepWindow:
    """Running sums between two log lines, kept on the device (no per-step host sync for logging).

    ``flush`` turns them into one metrics record: the global-batch loss (and per timestep bin), the
    gradient norm, throughput, MFU and memory.
    """

    def __init__(self, dist, batch_size: int, tokens_per_image: Optional[int] = None,
                 flops_per_image: Optional[float] = None, peak: Optional[float] = None) -> None:
        self.dist, self.device, self.batch_size = dist, dist.device, batch_size
        self.tokens_per_image, self.flops_per_image, self.peak = tokens_per_image, flops_per_image, peak
        self.edges = torch.tensor(LOSS_BINS[1:-1], device=self.device)
        self.reset()

    def reset(self) -> None:
        dev, nb = self.device, len(LOSS_BINS) - 1
        self.loss = torch.zeros((), device=dev, dtype=torch.float64)
        self.grad = torch.zeros((), device=dev, dtype=torch.float64)
        self.bin_sum = torch.zeros(nb, device=dev, dtype=torch.float64)
        self.bin_n = torch.zeros(nb, device=dev, dtype=torch.float64)
        self.good = self.steps = 0
        self.data_s = self.step_s = 0.0
        self.lr = 0.0
        reset_peak_memory(dev)

    def add(self, out: dict[str, Any], step_s: float) -> None:
        """Account one step's record (``train.step.TrainStep``) and its wall time."""
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

    def flush(self, step: int, elapsed: float, skipped_steps: int) -> dict[str, Any]:
        """The metrics record of the window ending at ``step`` (collective: every rank calls it)."""
        d = self.dist
        # the loss is already the global-batch mean on each rank's share; average it over ranks
        loss = D.sum_across_ranks(d, self.loss) / d.world_size
        bins = D.sum_across_ranks(d, torch.stack([self.bin_sum, self.bin_n]))
        images_per_s = self.steps * self.batch_size / max(self.step_s, 1e-9)
        record: dict[str, Any] = {
            "step": step,
            "loss": (loss / self.good).item() if self.good else float("nan"),
            "grad_norm": (self.grad / self.good).item() if self.good else float("nan"),
            "lr": self.lr,
            "images_per_s": images_per_s,
            "steps_per_s": self.steps / max(self.step_s, 1e-9),
            "data_wait_frac": self.data_s / max(self.step_s, 1e-9),
            "peak_mem_gib": peak_memory_gib(self.device),
            "elapsed_s": elapsed,
            "skipped_steps": skipped_steps,
        }
        if self.tokens_per_image:
            record["tokens_per_s"] = images_per_s * self.tokens_per_image
        if self.flops_per_image:
            record["model_tflops_per_image"] = self.flops_per_image / 1e12
            achieved = self.flops_per_image * images_per_s / 1e12  # over all ranks
            record["model_tflops_per_s"] = achieved
            if self.peak:
                record["mfu"] = achieved / (self.peak * d.world_size)
        for i in range(len(LOSS_BINS) - 1):
            if bins[1, i] > 0:
                record[f"loss_t{LOSS_BINS[i]:.2f}-{LOSS_BINS[i + 1]:.2f}"] = (bins[0, i] / bins[1, i]).item()
        self.reset()
        return record


def print_summary(run_dir: Path, steps: int, skipped: int, elapsed: float, checkpoint: Path, grid: Optional[Path],
                  curves: Optional[Path], shapes: Optional[dict[str, Any]], prompt: Optional[str]) -> None:
    """What a finished run says: where its samples, checkpoint and metrics are, its shapes accuracy, and
    how to sample more (``prompt``: a text model's example prompt; None for class models)."""
    print(f"\nDone: {steps} steps, {elapsed / 60:.1f} min of training"
          + (f", {skipped} non-finite steps skipped" if skipped else ""))
    print(f"  samples:     {grid}")
    print(f"  checkpoint:  {checkpoint}")
    print(f"  metrics:     {run_dir / 'metrics.jsonl'}" + (f" (curves: {curves})" if curves else ""))
    if shapes is not None:
        position = f", position {100 * shapes['position']:.1f}%" if "position" in shapes else ""
        print(f"  shapes eval: colour {100 * shapes['colour']:.1f}%, shape {100 * shapes['shape']:.1f}%"
              f"{position}, both {100 * shapes['both']:.1f}% over {shapes['n']} EMA samples "
              f"-> {run_dir / 'eval_shapes.json'}")
    what = "--class 0" if prompt is None else f"--prompt {prompt!r}"
    print(f"Sample more:   ldmkit sample --checkpoint {run_dir} {what} --num 16 --out grid.png")
