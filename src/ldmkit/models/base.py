"""What every backbone shares: a config dataclass of its constructor arguments, and the ``Backbone`` module
that holds it.

Each architecture declares one config (``DiTConfig``, ``MMDiTConfig``, ..., in the spirit of nanoGPT's
``GPTConfig``): its fields are the constructor's keyword arguments, coerced to plain JSON types and checked
once (``validate``). ``model.init_kwargs`` is that config as JSON, so
``model_from_config({"arch": model.arch, **model.init_kwargs})`` rebuilds the model. ``Backbone`` turns the
config into the attributes every caller reads (``in_channels``, ``out_channels``, ``learn_sigma``, the
token grid of transformers), builds the optional control embedder (docs/method.md §3), and runs blocks with
optional activation checkpointing.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ldmkit.conditioning import Conditioning
from ldmkit.models.control import ControlEmbedder, build_control_embedder, check_control_options
from ldmkit.models.positions import check_pe_options


def _coerce(value: Any, annotation: Any) -> Any:
    """``value`` in the plain JSON type of a config field's annotation (int, float, bool, str, optional,
    or a sequence, stored as a list)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union and type(None) in args:  # Optional[X]
        return None if value is None else _coerce(value, next(a for a in args if a is not type(None)))
    if origin in (list, tuple) or origin is typing.get_origin(Sequence[int]):
        return [_coerce(v, args[0]) for v in value]
    if annotation in (int, float, bool, str):
        return annotation(value)
    return value


@dataclass(kw_only=True)
class BackboneConfig:
    """Constructor arguments every architecture takes."""

    in_channels: int
    learn_sigma: bool = False  # also output a DDPM variance (2 x in_channels outputs)
    qk_norm: bool = False  # RMSNorm on queries and keys
    # Control metadata through the adaLN path (docs/method.md §3); no fields: no control path.
    control_high: Sequence[str] = ()
    control_low: Sequence[str] = ()
    control_gate: str = "cosine"
    control_alpha: float = 1.0

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(getattr(self, f.name), hints[f.name]))

    def validate(self, owner: str) -> None:
        """Raise ValueError naming ``owner`` and the argument that cannot build a model."""
        try:
            check_control_options(self.control_high, self.control_low, self.control_gate, self.control_alpha)
        except ValueError as e:
            raise ValueError(f"{owner}: {e}") from None

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(kw_only=True)
class TransformerConfig(BackboneConfig):
    """A transformer on a square grid of patches with fixed or learned positions."""

    input_size: int  # latent side, in pixels of the latent
    patch_size: int
    hidden_size: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    pe_mode: str = "extrapolate"  # positions on a new grid (docs/method.md §7, models/positions.py)
    pe_base_grid: Optional[int] = None

    def validate(self, owner: str) -> None:
        super().validate(owner)
        if self.input_size % self.patch_size:
            raise ValueError(f"{owner}: input_size {self.input_size} is not divisible by patch_size {self.patch_size}")
        if self.depth < 1:
            raise ValueError(f"{owner}: depth must be >= 1, got {self.depth}")
        check_pe_options(owner, self.pe_mode, self.positions_grid())

    def positions_grid(self) -> Optional[int]:
        """The grid the positions are expressed on (``pe_base_grid``; None: this model's own)."""
        return self.pe_base_grid


class Backbone(nn.Module):
    """Base of the diffusion backbones: ``forward(x (B, C, H, W), t (B,) in [0, 1], cond) -> (B, C_out, H, W)``.

    A subclass sets ``arch`` and ``Config`` and builds its layers after ``super().__init__(config, **kwargs)``;
    it may be given a config or its fields as keyword arguments.
    """

    arch: ClassVar[str]
    Config: ClassVar[type[BackboneConfig]]

    def __init__(self, config: Optional[BackboneConfig] = None, **kwargs: Any) -> None:
        super().__init__()
        if config is None:
            config = self.Config(**kwargs)
        elif kwargs:
            raise TypeError(f"{type(self).__name__}: give a config or keyword arguments, not both")
        config.validate(type(self).__name__)
        self.config = config
        self.init_kwargs: dict[str, Any] = config.to_json()
        self.in_channels = config.in_channels
        self.learn_sigma = config.learn_sigma
        self.out_channels = 2 * config.in_channels if config.learn_sigma else config.in_channels
        self.grad_checkpointing = False
        if isinstance(config, TransformerConfig):
            self.input_size, self.patch_size = config.input_size, config.patch_size
            self.hidden_size = config.hidden_size
            self.grid_size = config.input_size // config.patch_size
            self.num_tokens = self.grid_size**2
            self.pe_mode, self.pe_base_grid = config.pe_mode, config.pe_base_grid

    @classmethod
    def config_keys(cls) -> list[str]:
        """The names ``model_from_config`` accepts for this architecture."""
        return [f.name for f in dataclasses.fields(cls.Config)]

    def make_control_embedder(self, width: int) -> Optional[ControlEmbedder]:
        """The control embedder the config asks for (None without control fields)."""
        c = self.config
        return build_control_embedder(width, c.control_high, c.control_low, c.control_gate, c.control_alpha)

    def control_embedding(self, cond: Optional[Conditioning], t: Tensor) -> Optional[Tensor]:
        """The (B, D) control term ``E_high + γ(t) · E_low`` of the adaLN vector (docs/method.md §3), or None
        without control fields (the published models have none). ``t`` (B,) in [0, 1] drives the gate."""
        embedder = getattr(self, "control_embedder", None)
        return None if embedder is None else embedder(cond, t)

    def add_control(self, c: Tensor, cond: Optional[Conditioning], t: Tensor) -> Tensor:
        """The adaLN vector ``c`` (B, D) plus the control term when there is one."""
        control = self.control_embedding(cond, t)
        return c if control is None else c + control  # (B, D)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.grad_checkpointing = enabled

    def run(self, block: nn.Module, *args: Any) -> Any:
        """``block(*args)``, recomputed in the backward pass when activation checkpointing is on."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def check_input_size(self, height: int, width: int) -> None:
        """A model with a fixed token grid takes inputs of exactly ``input_size``."""
        if height != self.input_size or width != self.input_size:
            raise ValueError(f"{type(self).__name__}: input is {height}x{width} but the model was built for "
                             f"{self.input_size}x{self.input_size}")

    def class_ids(self, cond: Optional[Conditioning]) -> Tensor:
        """``cond.class_ids`` of a class-conditional model (an error naming the model when missing)."""
        if cond is None or cond.class_ids is None:
            raise ValueError(f"{type(self).__name__}: the model is class-conditional but cond.class_ids is missing "
                             "(pass NULL_CLASS = -1 for unconditional samples)")
        return cond.class_ids


def batch_times(t: Tensor, batch: int) -> Tensor:
    """``t`` as (B,): a scalar time is shared by the batch."""
    return t.expand(batch) if t.ndim == 0 else t


def xavier_init(module: nn.Module) -> None:
    """The transformers' base initialisation (DiT's ``_basic_init``): xavier-uniform Linear weights, zero
    biases, unit RMSNorm scales. Apply with ``model.apply(xavier_init)``."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.RMSNorm) and module.weight is not None:
        nn.init.ones_(module.weight)


def zero_init(*modules: Optional[nn.Module]) -> None:
    """Zero the weight and bias of each module (adaLN-Zero outputs, final projections)."""
    for m in modules:
        if m is not None:
            nn.init.zeros_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
