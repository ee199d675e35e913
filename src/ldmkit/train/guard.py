"""The divergence guard: which steps to skip, and when a run has diverged and must stop.

A step is **bad** (skipped: no optimizer or EMA update, counted in ``skipped_steps``) when
- its loss or gradient norm is not finite, or
- its loss exceeds ``train.loss_spike_factor`` x the median loss of the last ``SPIKE_WINDOW`` good steps
  (once ``SPIKE_MIN_HISTORY`` are known): one bad batch is dropped instead of being learnt from.

The run has **diverged** (it stops with exit status 3, writing nothing) when
- the weights after an update are not finite, or their norm exceeds ``train.max_weight_growth`` x the
  reference norm: the norm at the last good step that was a multiple of ``train.checkpoint_every`` (at
  first, the norm of the initial weights). A learning rate typed 1e3 for 1e-3 trips this at the first
  update, before the loss has had a chance to become non-finite;
- ``train.max_consecutive_skips`` steps in a row were bad: the weights (which bad steps leave unchanged)
  give non-finite or spiking losses whatever the batch, so they are broken.

Every decision is a function of the step's global loss and the weights, and the guard's state is saved in
``train_state.pt``, so a resumed run takes exactly the decisions the uninterrupted run would have taken.
Measured on the quickstart (4000 steps): the weight norm grows 1.11x over 1000 steps and no step's loss
exceeds 1.4x the running median; DDPM with batch 4 reaches 15x, hence the default factor of 20.
"""

from __future__ import annotations

import math
import shutil
import statistics
from collections import deque
from pathlib import Path
from typing import Any, Optional

from ldmkit.errors import TrainingDiverged
from ldmkit.train.checkpoint import checkpoint_step, list_checkpoints

SPIKE_WINDOW = 100  # good steps whose median loss is the spike reference
SPIKE_MIN_HISTORY = 20  # no spike test before this many good steps


class DivergenceGuard:
    def __init__(self, loss_spike_factor: float, max_weight_growth: float) -> None:
        self.loss_spike_factor = loss_spike_factor  # 0: no spike test
        self.max_weight_growth = max_weight_growth  # 0: only non-finite weights stop a run
        self.losses: deque[float] = deque(maxlen=SPIKE_WINDOW)
        self.reference_norm: float | None = None

    def is_spike(self, loss: float) -> bool:
        """Whether a (finite) loss is far above the running median of good steps."""
        if self.loss_spike_factor <= 0 or len(self.losses) < SPIKE_MIN_HISTORY:
            return False
        return loss > self.loss_spike_factor * statistics.median(self.losses)

    def record(self, loss: float) -> None:
        """Add the loss of a good step to the spike reference."""
        self.losses.append(loss)

    def weight_problem(self, norm: float) -> str | None:
        """Why weights of global norm ``norm`` mean the run diverged, or None when they look healthy."""
        if not math.isfinite(norm):
            return "the weights are no longer finite"
        ref = self.reference_norm
        if self.max_weight_growth > 0 and ref and norm > self.max_weight_growth * ref:
            return (f"the weight norm grew from {ref:.4g} to {norm:.4g} ({norm / ref:.3g}x; the limit is "
                    f"train.max_weight_growth={self.max_weight_growth:g})")
        return None

    def set_reference(self, norm: float) -> None:
        self.reference_norm = norm

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "reference_norm": self.reference_norm}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses = deque((float(x) for x in state.get("losses", ())), maxlen=SPIKE_WINDOW)
        ref = state.get("reference_norm")
        self.reference_norm = None if ref is None else float(ref)


def set_aside_checkpoints_after(run_dir: Path, last_good: Optional[int]) -> list[str]:
    """Rename the checkpoints newer than the newest known-good one (all of them without one) to
    ``diverged_step_*``: they hold the broken weights, are kept for inspection and never resumed."""
    moved = []
    for ckpt in list_checkpoints(run_dir):
        if last_good is None or checkpoint_step(ckpt) > last_good:
            target = ckpt.with_name(f"diverged_{ckpt.name}")
            if target.exists():  # from an earlier divergence of this run
                shutil.rmtree(target)
            ckpt.rename(target)
            moved.append(target.name)
    return moved


def diverged_error(run_dir: Path, step: int, reason: str, last_good: Optional[int],
                   moved: list[str]) -> TrainingDiverged:
    """The error that stops a diverged run: what happened, and how to go on from the last good weights."""
    again = f"ldmkit train --resume auto run.dir={run_dir} train.lr=<lower>"
    if last_good is not None:
        good = run_dir / "checkpoints" / f"step_{last_good:07d}"
        advice = (f"The newest checkpoint with healthy weights is {good}; continue from it with a lower learning "
                  f"rate: {again}")
    else:
        advice = f"No checkpoint holds healthy weights yet; start again with a lower learning rate: {again}"
    if moved:
        advice += f". Checkpoints with the broken weights were renamed: {', '.join(moved)}"
    return TrainingDiverged(f"training diverged at step {step}: {reason}. {advice}")
