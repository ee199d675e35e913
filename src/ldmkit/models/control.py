"""Control conditioning for the adaLN path: embedders of the control metadata and the time gate
(docs/method.md §3).

    c(t) = E_t(t) + E_high(crop, flip, aspect) + γ(t) · E_low(orig_size)
    γ(t) = ((1 + cos(π t)) / 2) ** α        cosine gate: 1 at t = 0 (clean), 0 at t = 1 (noise)

``ControlEmbedder`` returns ``E_high + γ(t) · E_low`` (B, D), the term a model adds to its adaLN vector
(every backbone's ``control_embedding`` hook, ``models/base.py``). Each scalar of a field becomes a 256-d sinusoid (the
timestep sinusoid of ``scale · value``), the features of a group are concatenated and an MLP
(Linear -> LayerNorm without parameters -> SiLU -> Linear) maps them to the model width. Scales: pixel
fields (``orig_size`` (h, w), ``crop`` (top, left)) are embedded as they are, like SDXL's micro-conditioning; ``flip`` (0/1) and
``aspect`` (w/h) are multiplied by 1000, as timesteps are, so that their range spans the sinusoid's
frequencies. Rows marked in ``cond.control_dropped`` (control dropout for two-scale guidance, §5) get a
learned null embedding per group instead; so does every row when none of a group's fields is in
``cond.control`` (no metadata is the "unknown" control that dropout trains), while a group with only
some of its fields present is an error.

Lives in ``models/`` rather than in ``conditioning.py`` because it is a network layer (``conditioning``
holds the data type every module imports, and must not import the models).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from ldmkit.conditioning import CONTROL_FIELDS, Conditioning
from ldmkit.models.layers import timestep_embedding

GateKind = Literal["none", "constant", "cosine"]
GATES = ("none", "constant", "cosine")
FIELD_SCALE = {"orig_size": 1.0, "crop": 1.0, "flip": 1000.0, "aspect": 1000.0}
DEFAULT_HIGH = ("crop", "flip", "aspect")
DEFAULT_LOW = ("orig_size",)


def time_gate(t: Tensor, kind: GateKind = "cosine", alpha: float = 1.0) -> Tensor:
    """γ(t) of the low-level group, (B,) float32: ``cosine`` ((1 + cos πt) / 2) ** α, ``constant`` 1
    (SDXL's micro-conditioning), ``none`` 0 (the group is switched off)."""
    if kind not in GATES:
        raise ValueError(f"control gate {kind!r}: expected one of {GATES}")
    if alpha <= 0:
        raise ValueError(f"control gate alpha must be > 0, got {alpha}")
    t = t.float()
    if kind == "constant":
        return torch.ones_like(t)
    if kind == "none":
        return torch.zeros_like(t)
    return ((1 + torch.cos(math.pi * t)) / 2).clamp(min=0) ** alpha


class _GroupEmbedder(nn.Module):
    """Sinusoids of the group's scalars -> Linear -> LayerNorm -> SiLU -> Linear, plus a learned null embedding."""

    def __init__(self, names: tuple[str, ...], hidden_size: int, freq_dim: int) -> None:
        super().__init__()
        self.names = names
        self.freq_dim = freq_dim
        n_scalars = sum(max(1, math.prod(CONTROL_FIELDS[n])) for n in names)
        # The LayerNorm (no parameters) keeps the hidden units alive: control values are nearly constant
        # over a batch (aspect 1, crop 0, ...), so Adam moves every first-layer weight of a unit the same way
        # and, without it, drives all pre-activations negative within ~100 steps at lr 1e-3 (dead SiLUs:
        # the embedder then ignores its input).
        self.mlp = nn.Sequential(nn.Linear(n_scalars * freq_dim, hidden_size),
                                 nn.LayerNorm(hidden_size, elementwise_affine=False), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.null = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, cond: Conditioning, batch: int, device: torch.device) -> Tensor:
        present = [name in cond.control for name in self.names]
        if not any(present):  # no metadata for this group at all: the learned "unknown" embedding
            return self.null.repeat(batch, 1)  # a copy: a view of a parameter trips no-grad module hooks
        if not all(present):
            missing = [n for n, ok in zip(self.names, present) if not ok]
            raise ValueError(f"control field(s) {missing} missing from cond.control (present: "
                             f"{sorted(cond.control)}); a group's fields come together or not at all")
        feats = []
        for name in self.names:
            value = cond.control[name].to(device).float().reshape(batch, -1) * FIELD_SCALE[name]  # (B, k)
            feats += [timestep_embedding(value[:, j], self.freq_dim) for j in range(value.shape[1])]
        emb = self.mlp(torch.cat(feats, dim=1).to(self.null.dtype))  # (B, D)
        if cond.control_dropped is not None:
            emb = torch.where(cond.control_dropped.to(device)[:, None], self.null.to(emb.dtype), emb)
        return emb


class ControlEmbedder(nn.Module):
    """``E_high(high fields) + γ(t) · E_low(low fields)`` -> (B, hidden_size).

    Args:
        hidden_size: the model width D.
        high: fields of the high-level group (composition), added at every t.
        low: fields of the low-level group (resolution/detail), gated by ``gate``.
        gate: ``none | constant | cosine`` for the low group; ``alpha`` its exponent.
        freq_dim: sinusoid size per scalar (256, like the timestep).
    """

    def __init__(self, hidden_size: int, high: tuple[str, ...] = DEFAULT_HIGH, low: tuple[str, ...] = DEFAULT_LOW,
                 gate: GateKind = "cosine", alpha: float = 1.0, freq_dim: int = 256) -> None:
        super().__init__()
        check_control_options(high, low, gate, alpha)
        self.gate, self.alpha = gate, alpha
        self.high = _GroupEmbedder(tuple(high), hidden_size, freq_dim) if high else None
        self.low = _GroupEmbedder(tuple(low), hidden_size, freq_dim) if low and gate != "none" else None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # N(0, 0.02) like the timestep MLP of DiT/SD3; the output layers start at zero so that a control
        # embedder added to a trained model (transfer) starts as a no-op.
        for group in (self.high, self.low):
            if group is not None:
                nn.init.normal_(group.mlp[0].weight, std=0.02)
                nn.init.zeros_(group.mlp[0].bias)
                nn.init.zeros_(group.mlp[3].weight)
                nn.init.zeros_(group.mlp[3].bias)
                nn.init.zeros_(group.null)

    def forward(self, cond: Conditioning | None, t: Tensor) -> Tensor:
        B, device = t.shape[0], t.device
        cond = Conditioning() if cond is None else cond
        out = 0
        if self.high is not None:
            out = out + self.high(cond, B, device)
        if self.low is not None:
            gamma = time_gate(t, self.gate, self.alpha).to(device)  # (B,)
            low = self.low(cond, B, device)
            out = out + gamma[:, None].to(low.dtype) * low
        if isinstance(out, int):
            raise ValueError("ControlEmbedder has no field to embed (both groups empty or switched off)")
        return out


def check_control_options(high, low, gate: str, alpha: float) -> None:
    """Raise ValueError naming the bad field, group overlap, gate or alpha."""
    for name in (*high, *low):
        if name not in CONTROL_FIELDS:
            raise ValueError(f"control field {name!r}: expected one of {sorted(CONTROL_FIELDS)}")
    if set(high) & set(low):
        raise ValueError(f"control fields {sorted(set(high) & set(low))} are in both groups")
    time_gate(torch.zeros(1), gate, alpha)  # validates gate and alpha


def build_control_embedder(hidden_size: int, control_high, control_low, control_gate: str,
                           control_alpha: float) -> ControlEmbedder | None:
    """The control embedder a model's constructor arguments ask for, or None when no field is enabled
    (the published architectures' default: no control path)."""
    low = tuple(control_low) if control_gate != "none" else ()
    if not control_high and not low:
        return None
    return ControlEmbedder(hidden_size, tuple(control_high), tuple(control_low), control_gate, control_alpha)
