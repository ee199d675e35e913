"""The training state beside the weights: counters, random streams and the divergence guard.

With the model, EMA and optimizer states it is everything a resume needs to continue bit for bit; it
travels in a checkpoint's ``train_state.pt`` (``train/checkpoint.py`` owns the file layout).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ldmkit.train.guard import DivergenceGuard


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken (skipped ones included)
    data_position: int = 0  # global samples consumed
    skipped_steps: int = 0
    consecutive_skips: int = 0
    last_good_step: Optional[int] = None  # newest checkpoint whose weights a healthy step has used
    unconfirmed_step: Optional[int] = None  # newest checkpoint not yet used by a healthy step (not saved)
    guard: DivergenceGuard = field(default_factory=lambda: DivergenceGuard(0.0, 0.0))

    def checkpoint_written(self) -> None:
        """A checkpoint of the current weights exists: good once a healthy step has used them."""
        self.unconfirmed_step = self.step

    def healthy_step(self) -> None:
        """A step with a good loss used the current weights, so their newest checkpoint is good."""
        self.consecutive_skips = 0
        if self.unconfirmed_step is not None:
            self.last_good_step, self.unconfirmed_step = self.unconfirmed_step, None

    def skipped_step(self) -> None:
        self.skipped_steps += 1
        self.consecutive_skips += 1

    def to_dict(self, device: torch.device) -> dict[str, Any]:
        """Plain values and tensors only (``torch.load(weights_only=True)`` reads them back)."""
        return {
            "step": self.step,
            "data_position": self.data_position,
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
            "last_good_step": -1 if self.last_good_step is None else self.last_good_step,
            "guard": self.guard.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        }

    def load_dict(self, state: dict[str, Any]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Restore the counters and the guard; returns the (CPU, CUDA) random states, which the trainer
        restores just before its loop (creating the data loader draws from the global generator)."""
        self.step = int(state["step"])
        self.data_position = int(state["data_position"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
        last_good = int(state.get("last_good_step", -1))
        self.last_good_step = None if last_good < 0 else last_good
        self.unconfirmed_step = self.step  # the resumed checkpoint: confirmed by the first healthy step
        if state.get("guard") is not None:
            self.guard.load_state_dict(state["guard"])
        return state["torch_rng"], state.get("cuda_rng")
