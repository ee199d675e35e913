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
