"""ldmkit models as diffusers pipelines: what diffusers' own classes cannot express, in two small classes.

Importable only when diffusers is installed. ``ldmkit convert to-diffusers`` uses this module for every model
whose export needs more than a diffusers denoiser (and for every ``--pipeline`` export that no diffusers
pipeline reproduces); docs/models.md, "Using exported models in diffusers", shows how to load the result.

``LdmkitConditioner`` (a diffusers ``ModelMixin``, saved as ``config.json`` + ``diffusion_pytorch_model.safetensors``)
holds what the diffusers denoiser lacks:

- the **control embedder** (``control_embedder.*``: the model's own weights, docs/method.md §3). Its term
  ``E_high + γ(t) · E_low`` joins the diffusers model where ldmkit adds it to the adaLN / time embedding, through
  a forward hook on that module for the duration of one call:

  DiT (``c = t + y + control``): every block's ``norm1.emb`` (the final layer calls block 0's again);
  PixArt (``t_emb + control``): ``adaln_single.emb``, so the term reaches ``t0`` and the final layer;
  mmDiT (``c = t + y + control``): ``time_text_embed``; U-Net (``emb + control``): ``time_embedding`` (the
  class / added embeddings are added after it).

- the **class table** of models whose class enters as context tokens (``class_table``, null class in the last
  row): the U-Net's class token (LDM's cond stage) and the mmDiT's ``class_tokens`` tokens. Class tokens
  travel as precomputed ``encoder_hidden_states`` rows (``context_rows``), so the diffusers model itself runs
  them through the joint attention. SD3's ``context_embedder`` is exported so that it passes class rows
  through unchanged: with text, rows have ``D + C + 1`` features, a class token being ``[token, 0, 0]`` and a
  text token ``[0, text, 1]``, against the weight ``[I | W | b]`` (ldmkit's projection ``W text + b``); class
  only, rows are the tokens themselves (weight ``I``). A model without pooled text gets a one-feature pooled
  input that its zero ``text_embedder`` maps to exactly zero.
- the ldmkit model's ``model.json`` (``model``), so that ``ldmkit convert from-diffusers`` rebuilds the same
  model; and, in a pipeline, how the run encoded text (``text``), normalised latents (``latents``) and sampled
  (``sample``: the defaults of ``LdmkitPipeline.__call__``). A DiT trained with DiT's own timestep sinusoid
  (``time_freq_shift = 0``; diffusers' port fixes 1) gets its sinusoid back through a hook on ``time_proj``.

``LdmkitPipeline`` (a diffusers ``DiffusionPipeline``) samples like ``ldmkit sample``: ldmkit's conditions
(class ids or prompts encoded and padded as in training, control metadata with its defaults), ldmkit's
guidance (semantic and control scales, interval), the scheduler's steps, then decoding. Its components:
``transformer`` (DiT/PixArt/SD3 transformer or ``UNet2DConditionModel``), ``scheduler``
(``FlowMatchEulerDiscreteScheduler`` for flow runs, stepped on ldmkit's Euler grid; ``DDIMScheduler`` with the
run's betas for DDPM runs), ``conditioner``, and optional ``vae`` (None in pixel space: the samples are the
images), ``text_encoder`` and ``tokenizer`` (text runs).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

try:
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, ModelMixin
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
    from diffusers.utils.torch_utils import randn_tensor
except ImportError as e:  # pragma: no cover - diffusers is an optional dependency
    raise ImportError("ldmkit.diffusers_pipeline needs diffusers: pip install diffusers") from e

from ldmkit.conditioning import NULL_CLASS, Conditioning
from ldmkit.models.control import build_control_embedder

# ldmkit architecture -> the diffusers denoiser class it exports to
DENOISERS = {"dit": "DiTTransformer2DModel", "pixart": "PixArtTransformer2DModel",
             "mmdit": "SD3Transformer2DModel", "unet": "UNet2DConditionModel"}
CONDITIONER = "conditioner"  # the folder (and pipeline component) holding an LdmkitConditioner
DIFFUSERS_TIME_SCALE = 1000.0  # every diffusers denoiser here takes timestep = 1000 t
FORMAT_VERSION = 1.0  # of LdmkitConditioner's config and tensors


def base_arch(arch: str) -> str:
    """The converter family of an ldmkit architecture ("mmdit-improved" exports like "mmdit")."""
    base = arch.split("-")[0]
    if base not in DENOISERS:
        raise ValueError(f"no diffusers converter for architecture {arch!r}; available: {sorted(DENOISERS)}")
    return base


def needs_conditioner(model: nn.Module) -> bool:
    """Whether ``model`` exports as a diffusers denoiser plus an ``LdmkitConditioner``: it has a control
    embedder, or it is an mmDiT that SD3's interface cannot take as it is (class tokens, no pooled text, or the
    improved mmDiT, which must come back as such)."""
    kw = model.init_kwargs
    if getattr(model, "control_embedder", None) is not None or model.arch == "mmdit-improved":
        return True
    return model.arch == "mmdit" and (kw["num_classes"] > 0 or kw["pooled_dim"] == 0)


# ------------------------------------------------------------------------------------------ the conditioner


class LdmkitConditioner(ModelMixin, ConfigMixin):
    """What an ldmkit model has beyond its diffusers denoiser (module docstring): control embedder, class table,
    the model's ``model.json``, and, in a pipeline, the run's text, latent and sampling settings.

    Args:
        model: the ldmkit ``model.json`` (``{"arch": ..., constructor arguments}``).
        control_width: width of the control term (the adaLN / time-embedding width); 0: no control embedder.
        class_rows, class_width: the class table (``num_classes + 1`` rows, null last); 0: none.
        text: how prompts become ``cond.text`` (``kind``, ``normalize``, ``length``, ``padding``, ``noise_sigma``,
            ``use_mask``, ``noise_at_inference``, ``pooled``); None: not a text model or not a pipeline.
        latents: ``image_size`` (pixels), ``channel_mean`` / ``channel_std`` (per-channel normalisation) or None.
        sample: the run's sampling defaults (``steps``, ``guidance``, ``control_guidance``, ``interval``,
            ``orig_size``, ``crop``, ``flip``, ``eta``).
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, model: dict, control_width: int = 0, class_rows: int = 0, class_width: int = 0,
                 text: Optional[dict] = None, latents: Optional[dict] = None,
                 sample: Optional[dict] = None) -> None:
        super().__init__()
        self.arch = base_arch(model["arch"])
        self.control_embedder = None
        if control_width > 0:
            self.control_embedder = build_control_embedder(
                control_width, model.get("control_high", ()), model.get("control_low", ()),
                model.get("control_gate", "cosine"), model.get("control_alpha", 1.0))
        self.class_table = nn.Embedding(class_rows, class_width) if class_rows > 0 else None
        # The format of this module; it also gives every conditioner a tensor, so that one without control
        # embedder or class table still saves a weights file (diffusers writes none for an empty state).
        self.register_buffer("format_version", torch.tensor([FORMAT_VERSION], dtype=torch.float32))

    # ------------------------------------------------------------------ inputs of the denoiser

    def control_term(self, cond: Conditioning, t: Tensor) -> Optional[Tensor]:
        """The (B, control_width) term added to the adaLN / time embedding, or None without a control embedder."""
        return None if self.control_embedder is None else self.control_embedder(cond, t)

    def class_embedding(self, class_ids: Tensor) -> Tensor:
        """Rows of the class table, (B, class_width); ``NULL_CLASS`` (-1) is the last row."""
        if self.class_table is None:
            raise ValueError("LdmkitConditioner: this model has no class table")
        ids = torch.where(class_ids == NULL_CLASS, self.class_table.num_embeddings - 1, class_ids)
        return self.class_table(ids.to(self.class_table.weight.device))

    def context_rows(self, cond: Conditioning, dtype: torch.dtype = torch.float32) -> Tensor:
        """``encoder_hidden_states`` of an exported mmDiT: class tokens and text tokens as rows of the widened
        context input (module docstring), (B, K + L, width), in ``dtype``."""
        m = self.config.model
        D, C = int(m["hidden_size"]), int(m.get("context_dim", 0))
        parts = []
        if self.class_table is not None:
            if cond.class_ids is None:
                raise ValueError("this model is class-conditional: give class ids (-1: the null class)")
            k = int(m.get("class_tokens", 1))
            tokens = self.class_embedding(cond.class_ids).reshape(-1, k, D).to(dtype)  # (B, K, D)
            if C > 0:
                tokens = torch.cat([tokens, tokens.new_zeros(*tokens.shape[:2], C + 1)], dim=-1)  # (B, K, D + C + 1)
            parts.append(tokens)
        if C > 0:
            if cond.text is None:
                raise ValueError("this model is text-conditional: give a prompt")
            if cond.text_mask is not None and not bool(cond.text_mask.all()):
                raise ValueError("an mmDiT exported to diffusers attends to every text token; this text has a mask")
            text = cond.text.to(dtype)
            if self.class_table is not None:
                B, L, _ = text.shape
                text = torch.cat([text.new_zeros(B, L, D), text, text.new_ones(B, L, 1)], dim=-1)  # (B, L, D + C + 1)
            parts.append(text)
        return torch.cat(parts, dim=1)

    # ------------------------------------------------------------------ hooks

    def _adaln_modules(self, transformer: nn.Module) -> list[nn.Module]:
        if self.arch == "dit":
            return [block.norm1.emb for block in transformer.transformer_blocks]
        if self.arch == "pixart":
            return [transformer.adaln_single.emb]
        if self.arch == "mmdit":
            return [transformer.time_text_embed]
        return [transformer.time_embedding]

    @contextlib.contextmanager
    def hooks(self, transformer: nn.Module, cond: Conditioning, t: Tensor) -> Iterator[None]:
        """Attach, for one call of ``transformer``, what the diffusers model cannot compute itself: the control term
        (rows of ``cond`` and times ``t`` in [0, 1]), DiT's own timestep sinusoid, and the U-Net's null
        micro-conditioning on control-dropped rows."""
        handles = []
        term = self.control_term(cond, t)
        if term is not None:
            def add_control(module: nn.Module, args: Any, output: Tensor) -> Tensor:
                return output + term.to(device=output.device, dtype=output.dtype)

            handles += [m.register_forward_hook(add_control) for m in self._adaln_modules(transformer)]
        shift = self.config.model.get("time_freq_shift")
        if self.arch == "dit" and shift is not None and shift != 1:
            from ldmkit.models.layers import timestep_embedding

            def own_sinusoid(module: nn.Module, args: Any, output: Tensor) -> Tensor:
                # DiT's sinusoid divides the frequency exponent by half (diffusers' port: half - 1).
                return timestep_embedding(args[0], output.shape[-1], freq_shift=shift).to(output.dtype)

            handles += [block.norm1.emb.time_proj.register_forward_hook(own_sinusoid)
                        for block in transformer.transformer_blocks]
        micro = bool(self.config.model.get("micro_conditioning"))
        if self.arch == "unet" and micro and cond.control_dropped is not None and bool(cond.control_dropped.any()):
            keep = (~cond.control_dropped.bool()).float()  # (B,)

            def null_micro(module: nn.Module, args: Any, output: Tensor) -> Tensor:
                # ldmkit zeroes the original-size and crop sinusoids (4 of the 6 time ids) of dropped rows.
                feats = output.reshape(keep.shape[0], 6, -1).clone()  # (B, 6, dim)
                feats[:, :4] *= keep.to(device=feats.device, dtype=feats.dtype)[:, None, None]
                return feats.reshape(output.shape)

            handles.append(transformer.add_time_proj.register_forward_hook(null_micro))
        try:
            yield
        finally:
            for h in handles:
                h.remove()


# ------------------------------------------------------------------------------------------ model conversion


def _copy_without(model: nn.Module, arch: str, overrides: dict[str, Any], drop: Sequence[str] = (),
                  tensors: Optional[dict[str, Tensor]] = None) -> nn.Module:
    """The ldmkit model ``arch`` built from ``model``'s arguments with ``overrides``, holding ``model``'s tensors
    (less the prefixes in ``drop``, plus ``tensors``); built on the meta device and assigned, so nothing is
    initialised or copied."""
    from ldmkit.models import model_from_config

    kw = {**model.init_kwargs, "control_high": [], "control_low": [], **overrides}
    with torch.device("meta"):
        plain = model_from_config({"arch": arch, **kw})
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(("control_embedder.", *drop))}
    state.update(tensors or {})
    plain.load_state_dict(state, strict=True, assign=True)
    return plain.train(model.training)


def _mmdit_for_sd3(model: nn.Module) -> nn.Module:
    """An ldmkit MMDiT with text and pooled text that SD3's interface takes and that computes what ``model``
    computes when fed ``context_rows`` and zero pooled vectors (module docstring)."""
    kw = model.init_kwargs
    if kw.get("class_in_adaln"):
        raise ValueError("cannot export this mmdit to diffusers: its class_in_adaln embedding has no diffusers "
                         "counterpart (class tokens in the context stream do)")
    D, C, P, N = kw["hidden_size"], kw["context_dim"], kw["pooled_dim"], kw["num_classes"]
    if N == 0 and C == 0:
        raise ValueError("cannot export an unconditional mmdit to diffusers: SD3Transformer2DModel always has a "
                         "context stream")
    sd = model.state_dict()
    ref = next(model.parameters())
    tensors: dict[str, Tensor] = {}
    if N > 0:  # class rows pass through the context embedder unchanged
        eye = torch.eye(D, dtype=ref.dtype, device=ref.device)
        if C > 0:
            w, b = sd["context_embedder.weight"], sd["context_embedder.bias"]
            tensors["context_embedder.weight"] = torch.cat([eye, w, b[:, None]], dim=1)  # (D, D + C + 1)
        else:
            tensors["context_embedder.weight"] = eye
        tensors["context_embedder.bias"] = torch.zeros(D, dtype=ref.dtype, device=ref.device)
    if P == 0:  # a zero pooled path: SiLU(b1) through a zero Linear is exactly zero
        tensors.update({"y_embedder.mlp.0.weight": torch.zeros(D, 1, dtype=ref.dtype, device=ref.device),
                        "y_embedder.mlp.0.bias": torch.zeros(D, dtype=ref.dtype, device=ref.device),
                        "y_embedder.mlp.2.weight": torch.zeros(D, D, dtype=ref.dtype, device=ref.device),
                        "y_embedder.mlp.2.bias": torch.zeros(D, dtype=ref.dtype, device=ref.device)})
    context = (D + C + 1 if C > 0 else D) if N > 0 else C
    drop = ["class_embedder."] + (["context_embedder."] if N > 0 else [])
    return _copy_without(model, "mmdit", {"num_classes": 0, "context_dim": context, "pooled_dim": max(P, 1),
                                          "class_in_context": True, "class_in_adaln": False},
                         drop=drop, tensors=tensors)


def to_diffusers_parts(model: nn.Module, conditioner: Optional[bool] = None) -> tuple[Any, Optional[LdmkitConditioner]]:
    """The diffusers denoiser of ``model`` and the ``LdmkitConditioner`` holding the rest (None when nothing is
    left over and ``conditioner`` is not True; ``conditioner=True``, as in a pipeline, always makes one).

    Raises ``ValueError`` naming what diffusers cannot express even with a conditioner."""
    from ldmkit.models import convert

    base = base_arch(model.arch)
    kw = model.init_kwargs
    make = needs_conditioner(model) if conditioner is None else conditioner
    if base == "pixart" and kw["context_dim"] <= 0:
        what = "class-conditional" if kw["num_classes"] > 0 else "unconditional"
        raise ValueError(f"cannot export this pixart to diffusers: it is {what}; diffusers' PixArtTransformer2DModel "
                         "takes text only")
    if not make:
        plain = model
    elif base == "dit":
        # The conditioner restores DiT's own sinusoid, so the copy takes diffusers' (no warning).
        plain = _copy_without(model, "dit", {"time_freq_shift": 1})
    elif base == "mmdit":
        plain = _mmdit_for_sd3(model)
    else:
        plain = _copy_without(model, model.arch, {})
    with_classes = base == "unet" and kw.get("num_classes", 0) > 0
    dm = convert.to_diffusers(plain, drop_class_table=with_classes)
    if not make:
        return dm, None

    table = None
    if base == "unet" and kw["num_classes"] > 0:
        table = model.y_embedder.embedding_table.weight
    elif base == "mmdit" and kw["num_classes"] > 0:
        table = model.class_embedder.embedding_table.weight
    embedder = getattr(model, "control_embedder", None)
    width = 0
    if embedder is not None:
        width = 4 * kw["model_channels"] if base == "unet" else kw["hidden_size"]
    cond = LdmkitConditioner(model={"arch": model.arch, **kw}, control_width=width,
                             class_rows=0 if table is None else table.shape[0],
                             class_width=0 if table is None else table.shape[1])
    state = {"format_version": cond.format_version}
    if embedder is not None:
        state.update({f"control_embedder.{k}": v.detach() for k, v in embedder.state_dict().items()})
    if table is not None:
        state["class_table.weight"] = table.detach()
    cond.load_state_dict({k: v.to("cpu", torch.float32) for k, v in state.items()}, strict=True)
    ref = next(model.parameters())
    cond = cond.to(ref.device)
    if ref.dtype != torch.float32:  # (diffusers warns on any dtype cast, even a no-op one)
        cond = cond.to(ref.dtype)
    return dm, cond.eval()


def from_diffusers_parts(dm: Any, conditioner: LdmkitConditioner) -> nn.Module:
    """The ldmkit model of a diffusers denoiser and its ``LdmkitConditioner`` (``to_diffusers_parts`` backwards)."""
    from ldmkit.models import model_from_config
    from ldmkit.models import convert_dit, convert_mmdit, convert_pixart, convert_unet

    model_json = dict(conditioner.config.model)
    base = base_arch(model_json["arch"])
    kw = model_json
    table = None if conditioner.class_table is None else conditioner.class_table.weight.detach()
    if base == "dit":
        state = dict(convert_dit.from_diffusers(dm).state_dict())
    elif base == "pixart":
        state = dict(convert_pixart.from_diffusers(dm).state_dict())
    elif base == "unet":
        text = kw["context_dim"] > 0
        state = dict(convert_unet.from_diffusers(dm, class_table=table, text=text if table is not None else None)
                     .state_dict())
    else:
        state = dict(convert_mmdit.from_diffusers(dm).state_dict())
        D, C, P = int(kw["hidden_size"]), int(kw["context_dim"]), int(kw["pooled_dim"])
        if table is not None:
            w = state.pop("context_embedder.weight")
            state.pop("context_embedder.bias")
            state["class_embedder.embedding_table.weight"] = table
            if C > 0:
                state["context_embedder.weight"] = w[:, D:D + C].contiguous()
                state["context_embedder.bias"] = w[:, D + C].contiguous()
        if P == 0:
            for k in [k for k in state if k.startswith("y_embedder.")]:
                del state[k]
    if conditioner.control_embedder is not None:
        state.update({f"control_embedder.{k}": v.detach()
                      for k, v in conditioner.control_embedder.state_dict().items()})
    model = model_from_config(model_json)
    if base in ("dit", "pixart"):  # fixed tables that both sides compute from the configuration
        state["pos_embed"] = model.pos_embed.detach().clone()
    ref = next(dm.parameters())
    model.load_state_dict({k: v.to("cpu", torch.float32) for k, v in state.items()}, strict=True)
    return model.to(device=ref.device, dtype=ref.dtype).eval()


# ------------------------------------------------------------------------------------------ the pipeline


class LdmkitPipeline(DiffusionPipeline):
    """Sampling an exported ldmkit run with diffusers components, the way ``ldmkit sample`` samples it.

    Load with ``LdmkitPipeline.from_pretrained(folder)`` (importing this module registers the conditioner's
    class with diffusers' loader). Call with ``class_labels`` (ids, names from ``id2label``, or -1 for the null
    class) or ``prompt``; every sampling setting defaults to the run's (``conditioner.config.sample``).
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["vae", "text_encoder", "tokenizer"]

    def __init__(self, transformer: ModelMixin, scheduler: Any, conditioner: LdmkitConditioner,
                 vae: Optional[ModelMixin] = None, text_encoder: Any = None, tokenizer: Any = None,
                 id2label: Optional[dict] = None) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, conditioner=conditioner, vae=vae,
                              text_encoder=text_encoder, tokenizer=tokenizer)
        self.register_to_config(id2label=id2label)
        self.labels: dict[str, int] = {}
        for key, value in (id2label or {}).items():
            for label in str(value).split(","):
                self.labels[label.strip()] = int(key)
        self._text = None

    # ------------------------------------------------------------------ conditions

    def get_label_ids(self, label: Union[str, Sequence[str]]) -> list[int]:
        """Class ids of class names (``id2label``)."""
        labels = [label] if isinstance(label, str) else list(label)
        missing = [name for name in labels if name not in self.labels]
        if missing:
            raise ValueError(f"unknown class name(s) {missing}; classes: {sorted(self.labels)}")
        return [self.labels[name] for name in labels]

    def text_conditioner(self):
        """ldmkit's ``TextConditioner`` over this pipeline's text encoder and tokenizer, set as the run's."""
        settings = self.conditioner.config.text
        if settings is None or self.text_encoder is None or self.tokenizer is None:
            raise ValueError("this pipeline has no text encoder: it is not a text-conditional model")
        if self._text is None or self._text.encoder.model is not self.text_encoder:
            from ldmkit.text import TextConditioner
            from ldmkit.text_encoder import TextEncoder

            encoder = TextEncoder.from_modules(self.text_encoder, self.tokenizer, kind=settings["kind"],
                                               normalize=settings["normalize"], max_length=settings["length"])
            self._text = TextConditioner(encoder, settings["length"], settings["padding"], settings["noise_sigma"],
                                         use_mask=settings["use_mask"],
                                         noise_at_inference=settings["noise_at_inference"], pooled=settings["pooled"])
        return self._text

    def encode_prompt(self, prompt: Union[str, Sequence[str]], generator: Optional[torch.Generator] = None
                      ) -> dict[str, Optional[Tensor]]:
        """The text fields ldmkit gives the model for ``prompt``: ``text`` (B, L, D), ``text_mask`` and
        ``text_pooled`` (None where the run has none). The null prompt of guidance is ``""``."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        return self.text_conditioner()(prompts, training=False, generator=generator)

    def _conditions(self, class_labels: Any, prompt: Any, control: dict[str, Tensor],
                    generator: Optional[torch.Generator]) -> tuple[Conditioning, Optional[Conditioning]]:
        if (class_labels is None) == (prompt is None):
            raise ValueError("give class_labels (a class model) or prompt (a text model), not both or neither")
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            cond = Conditioning(control=control, **self.encode_prompt(prompts, generator))
            uncond = Conditioning(control=control, **self.encode_prompt([""] * len(prompts), generator))
            return cond, uncond
        if self.conditioner.config.text is not None:
            raise ValueError("this model is text-conditional: give prompt, not class_labels")
        labels = [class_labels] if isinstance(class_labels, (int, str)) else list(class_labels)
        ids = [self.get_label_ids(v)[0] if isinstance(v, str) else int(v) for v in labels]
        return Conditioning(class_ids=torch.tensor(ids, dtype=torch.long), control=control), None

    # ------------------------------------------------------------------ the denoiser

    def predict(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """The denoiser's output in ldmkit's convention: ``x`` (B, C, h, w), ``t`` (B,) in [0, 1] with t = 1 noise
        (diffusers' ``timestep = 1000 t``), ``cond`` a ldmkit ``Conditioning``. Float32, all output channels."""
        tr, arch, m = self.transformer, self.conditioner.arch, self.conditioner.config.model
        dtype = tr.dtype
        timestep = DIFFUSERS_TIME_SCALE * t.float()
        x_in = x.to(dtype)
        with self.conditioner.hooks(tr, cond, t):
            if arch == "dit":
                ids = torch.where(cond.class_ids == NULL_CLASS, int(m["num_classes"]), cond.class_ids)
                out = tr(x_in, timestep=timestep, class_labels=ids).sample
            elif arch == "pixart":
                out = tr(x_in, encoder_hidden_states=cond.text.to(dtype), timestep=timestep,
                         encoder_attention_mask=cond.text_mask,
                         added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
            elif arch == "mmdit":
                pooled = cond.text_pooled if int(m["pooled_dim"]) > 0 else x.new_zeros(x.shape[0], 1)
                out = tr(hidden_states=x_in, encoder_hidden_states=self.conditioner.context_rows(cond, dtype),
                         pooled_projections=pooled.to(dtype), timestep=timestep).sample
            else:
                out = tr(x_in, timestep, **self._unet_inputs(x, cond, dtype)).sample
        return out.float()

    def _unet_inputs(self, x: Tensor, cond: Conditioning, dtype: torch.dtype) -> dict[str, Any]:
        m = self.conditioner.config.model
        B = x.shape[0]
        tokens, masks = [], []
        if int(m.get("num_classes", 0)) > 0:
            tokens.append(self.conditioner.class_embedding(cond.class_ids)[:, None])  # (B, 1, D_ctx)
            masks.append(torch.ones(B, 1, dtype=torch.bool, device=x.device))
        if int(m.get("context_dim", 0)) > 0:
            tokens.append(cond.text)
            masks.append(cond.text_mask.bool() if cond.text_mask is not None
                         else torch.ones(cond.text.shape[:2], dtype=torch.bool, device=x.device))
        kwargs: dict[str, Any] = {"encoder_hidden_states": torch.cat([t.to(dtype) for t in tokens], dim=1)}
        if cond.text_mask is not None:
            kwargs["encoder_attention_mask"] = torch.cat(masks, dim=1)
        pooled = cond.text_pooled if int(m.get("pooled_dim", 0)) > 0 else None
        if m.get("micro_conditioning"):
            scale = float(m.get("latent_scale", 8.0))
            target = torch.tensor([x.shape[-2] * scale, x.shape[-1] * scale], device=x.device).expand(B, 2)
            control = cond.control
            orig = control["orig_size"].float().reshape(B, 2).to(x.device) if "orig_size" in control else target
            crop = (control["crop"].float().reshape(B, 2).to(x.device) if "crop" in control
                    else torch.zeros_like(target))
            kwargs["added_cond_kwargs"] = {
                "text_embeds": (pooled if pooled is not None else x.new_zeros(B, 0)).to(dtype),
                "time_ids": torch.cat([orig, crop, target], dim=1)}
        elif pooled is not None:
            kwargs["class_labels"] = pooled.to(dtype)
        return kwargs

    # ------------------------------------------------------------------ sampling

    def _timesteps(self, steps: int, device: torch.device) -> Tensor:
        sched = self.scheduler
        if isinstance(sched, FlowMatchEulerDiscreteScheduler) and not sched.config.use_dynamic_shifting:
            # ldmkit's Euler grid: 1, 1 - 1/N, ..., 1/N before the shift (the scheduler shifts and appends 0).
            sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps).tolist(), device=device)
        else:
            sched.set_timesteps(steps, device=device)
        return sched.timesteps

    def decode(self, latents: Tensor) -> Tensor:
        """The model's latents -> images in [-1, 1] (float32): the run's normalisation undone, then the VAE; in
        pixel space (no VAE) the latents are the images."""
        if self.vae is None:
            return latents.float().clamp(-1, 1)
        stats = self.conditioner.config.latents or {}
        if stats.get("channel_mean") is not None:
            mean = torch.tensor(stats["channel_mean"], device=latents.device)[:, None, None]
            std = torch.tensor(stats["channel_std"], device=latents.device)[:, None, None]
            raw = latents.float() * std + mean
        else:
            cfg = self.vae.config
            raw = latents.float() / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
        return self.vae.decode(raw.to(self.vae.dtype)).sample.float().clamp(-1, 1)

    @torch.no_grad()
    def __call__(self, class_labels: Union[int, str, Sequence[Union[int, str]], None] = None,
                 prompt: Union[str, Sequence[str], None] = None, *, num_inference_steps: Optional[int] = None,
                 guidance_scale: Optional[float] = None, control_guidance_scale: Optional[float] = None,
                 guidance_interval: Optional[Sequence[float]] = None, orig_size: Optional[Sequence[float]] = None,
                 crop: Optional[Sequence[float]] = None, flip: Optional[bool] = None, height: Optional[int] = None,
                 width: Optional[int] = None, eta: Optional[float] = None,
                 generator: Optional[torch.Generator] = None, latents: Optional[Tensor] = None,
                 output_type: str = "pil", return_dict: bool = True) -> Union[ImagePipelineOutput, tuple]:
        """Sample one image per class label or prompt.

        Args:
            class_labels: class ids, class names (``id2label``) or -1 (the null class: unconditional samples).
            prompt: prompt(s) of a text model; the null prompt of guidance is ``""``, as in training.
            num_inference_steps, guidance_scale (w_sem), control_guidance_scale (w_ctrl), guidance_interval
                ((t_lo, t_hi), t = 1 noise), eta (DDIM): default to the run's ``sample.*``.
            orig_size ((h, w) pixels), crop ((top, left) pixels), flip: control metadata; default the run's
                (the target size, (0, 0), no flip).
            height, width: image size in pixels (default: the run's ``data.image_size``).
            generator: draws the initial noise (``randn`` of shape (N, C, h, w)), as ``ldmkit sample --seed`` does
                with ``torch.Generator().manual_seed(seed)``; latents: that noise, given.
            output_type: ``pil``, ``np`` (N, H, W, 3) in [0, 1], ``pt`` (N, 3, H, W) in [0, 1] or ``latent``.
        """
        from ldmkit.diffusion.guidance import guided_velocity
        from ldmkit.sampling import default_control

        s = self.conditioner.config.sample or {}
        latent_cfg = self.conditioner.config.latents or {}
        steps = int(num_inference_steps or s.get("steps", 50))
        guidance = float(s.get("guidance", 1.0) if guidance_scale is None else guidance_scale)
        control_guidance = float(s.get("control_guidance", 1.0) if control_guidance_scale is None
                                 else control_guidance_scale)
        interval = tuple(s.get("interval", (0.0, 1.0)) if guidance_interval is None else guidance_interval)
        eta = float(s.get("eta", 0.0) if eta is None else eta)
        size = latent_cfg.get("image_size")
        height, width = int(height or size or 0), int(width or size or 0)
        if not height or not width:
            raise ValueError("give height and width: this export does not record the run's image size")
        n = len([prompt] if isinstance(prompt, str) else prompt) if prompt is not None else (
            1 if isinstance(class_labels, (int, str)) else len(class_labels or []))
        orig = orig_size if orig_size is not None else s.get("orig_size")
        control = default_control(n, height, orig_size=orig if orig is not None else (height, width),
                                  crop=crop if crop is not None else s.get("crop", (0.0, 0.0)),
                                  flip=bool(s.get("flip", False) if flip is None else flip))
        control["aspect"] = torch.full((n,), width / height)

        device = self._execution_device
        channels = int(self.transformer.config.in_channels)
        down = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1
        shape = (n, channels, height // down, width // down)
        if latents is None:  # first from the generator, so that the noise is ldmkit's for the same seed
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
        x = latents.to(device=device, dtype=torch.float32)
        x = x * getattr(self.scheduler, "init_noise_sigma", 1.0)
        cond, uncond = self._conditions(class_labels, prompt, control, generator)
        cond = cond.to(device)
        uncond = None if uncond is None else uncond.to(device)

        velocity = guided_velocity(self.predict, cond, guidance, interval, control_guidance=control_guidance,
                                   uncond=uncond, guided_channels=channels)
        step_kwargs = {}
        params = inspect.signature(self.scheduler.step).parameters
        if "eta" in params:
            step_kwargs["eta"] = eta
        if "generator" in params:
            step_kwargs["generator"] = generator
        T = float(self.scheduler.config.num_train_timesteps)
        for ts in self.progress_bar(self._timesteps(steps, device)):
            t = (ts.double() / T).float().to(device).expand(n)  # ldmkit's time of this step
            x_in = self.scheduler.scale_model_input(x, ts) if hasattr(self.scheduler, "scale_model_input") else x
            out = velocity(x_in, t)[:, :channels]  # a learned variance is not used by these samplers
            x = self.scheduler.step(out, ts, x, **step_kwargs).prev_sample.float()

        if output_type == "latent":
            images: Any = x
        else:
            images = (self.decode(x) + 1) / 2
            if output_type != "pt":
                images = images.cpu().permute(0, 2, 3, 1).numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


__all__ = ["CONDITIONER", "DENOISERS", "LdmkitConditioner", "LdmkitPipeline", "base_arch", "from_diffusers_parts",
           "needs_conditioner", "to_diffusers_parts"]
