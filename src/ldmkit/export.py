"""``ldmkit convert to-diffusers`` and ``from-diffusers``: models and whole runs as diffusers folders.

Without ``--pipeline`` the export is the diffusers denoiser (``save_pretrained`` layout) of the model, plus,
where the denoiser cannot hold everything, a ``conditioner/`` folder (``ldmkit.diffusers_pipeline``: control
embedder, class tokens, the ldmkit ``model.json``) or, for a class-conditional U-Net, ``class_table.safetensors``.

With ``--pipeline`` the export is a pipeline folder (``model_index.json``) that ``from_pretrained`` loads offline:

- ``DiTPipeline`` / ``PixArtAlphaPipeline`` when diffusers' own pipeline samples what ``ldmkit sample`` samples
  (``diffusers_pipeline_problems`` says why not otherwise),
- else ``ldmkit.diffusers_pipeline.LdmkitPipeline``, which samples like ldmkit with diffusers components.

Components: the denoiser, the run's VAE (``scaling_factor`` / ``shift_factor`` set to the run's latent
normalisation; none in pixel space), a scheduler of the run's objective (flow: ``FlowMatchEulerDiscreteScheduler``
with the run's sampling shift; DDPM: ``DDIMScheduler`` with the run's betas, prediction and trailing spacing, as
ldmkit's DDIM), the text encoder and tokenizer of text runs, ``id2label`` (the checkpoint's class names) for class
runs. A model card (``README.md``) is written with every export.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from torch import nn

from ldmkit.config import Config, ConfigError, from_dict

NATIVE_PIPELINES = {"dit": "DiTPipeline", "pixart": "PixArtAlphaPipeline", "mmdit": "StableDiffusion3Pipeline",
                    "unet": "StableDiffusionPipeline"}


@dataclass
class Export:
    """What an export wrote: the folder, the diffusers class that loads it, the files beside diffusers' own,
    and notes (why ldmkit's pipeline class, what differs from ``ldmkit sample``)."""

    out: Path
    diffusers_class: str
    extra_files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    scheduler: Optional[str] = None


# ------------------------------------------------------------------------------------------ which pipeline


def diffusers_pipeline_problems(model: nn.Module, cfg: Config, latent_shift: float = 0.0) -> list[str]:
    """Why diffusers' own pipeline for this architecture would not sample what ldmkit samples (empty: it would).
    ``latent_shift``: the run's resolved latent shift (the pipelines decode ``latents / scaling_factor``)."""
    from ldmkit.diffusers_pipeline import base_arch

    arch = base_arch(model.arch)
    name = NATIVE_PIPELINES[arch]
    kw = model.init_kwargs
    if arch == "mmdit":
        return [f"{name} encodes prompts with its own three encoders (two CLIP penultimate layers and T5) and has "
                "no class or control input"]
    if arch == "unet":
        return [f"{name} encodes prompts with CLIP and no attention mask and has no class token or control input"]
    problems = []
    if getattr(model, "control_embedder", None) is not None:
        problems.append(f"{name} has no control metadata input")
    if arch == "dit":
        if kw["time_freq_shift"] != 1:
            problems.append("the model embeds time with DiT's own sinusoid (time_freq_shift 0); diffusers' "
                            "DiTTransformer2DModel fixes frequency shift 1")
        if kw["num_classes"] != 1000:
            problems.append(f"{name} uses class id 1000 as the null class; this model has {kw['num_classes']} classes")
    else:
        text = cfg.cond.text
        if kw["pooled_dim"] > 0:
            problems.append(f"{name} has no pooled text input")
        if text.padding != "zero" or not text.mask_zero_padding:
            problems.append(f"{name} pads prompts with masked tokens; the run pads with {text.padding!r}"
                            + ("" if text.padding != "zero" else " without a mask"))
    d = cfg.diffusion
    if d.objective != "ddpm":
        problems.append(f"{name} steps its scheduler through scale_model_input / init_noise_sigma, which diffusers' "
                        "flow-matching Euler scheduler lacks (flow runs sample with LdmkitPipeline)")
    elif d.num_steps != 1000:
        problems.append(f"{name} passes the DDPM step k as the timestep; the model embeds 1000 k / T with T = "
                        f"{d.num_steps}")
    ae = cfg.autoencoder
    if ae.name == "identity":
        problems.append(f"{name} always decodes with a VAE; this is a pixel-space run")
    elif ae.channel_norm:
        problems.append(f"{name} cannot undo per-channel latent normalisation")
    elif latent_shift != 0:
        problems.append(f"{name} decodes latents / scaling_factor without the run's latent shift {latent_shift}")
    return problems


# ------------------------------------------------------------------------------------------ components


def scheduler_for(cfg: Config, model: nn.Module) -> Any:
    """The diffusers scheduler that steps like ldmkit's Euler (flow) or DDIM (DDPM) sampler for this run."""
    from ldmkit.sampling import SampleSettings

    settings = SampleSettings.from_config(cfg, model)
    if settings.diffusion is None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=float(settings.shift))
    from diffusers import DDIMScheduler

    ddpm = settings.diffusion
    prediction = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[ddpm.prediction]
    return DDIMScheduler(num_train_timesteps=ddpm.num_steps, trained_betas=ddpm.vp.betas.tolist(),
                         clip_sample=False, set_alpha_to_one=True, steps_offset=0, prediction_type=prediction,
                         timestep_spacing="trailing")


def _vae_for(cfg: Config) -> tuple[Any, Optional[dict]]:
    """The run's diffusers ``AutoencoderKL`` with its latent normalisation in the config (None in pixel space),
    and the per-channel statistics of a ``channel_norm`` run."""
    if cfg.autoencoder.name == "identity":
        return None, None
    from ldmkit.autoencoders import build_autoencoder

    try:
        ae = build_autoencoder(cfg.autoencoder)
    except OSError as e:
        raise ConfigError(f"the run's autoencoder cannot be loaded: {str(e).splitlines()[0]}") from None
    vae = ae.vae
    vae.register_to_config(scaling_factor=ae.scale, shift_factor=ae.shift)
    stats = None
    if ae.channel_norm:
        stats = {"channel_mean": ae.channel_mean.tolist(), "channel_std": ae.channel_std.tolist()}
    return vae, stats


def _text_encoder_for(cfg: Config) -> Any:
    from ldmkit.text_encoder import TextEncoder

    tc = cfg.cond.text
    try:
        return TextEncoder(tc.encoder, max_length=tc.length)
    except (OSError, ImportError) as e:
        raise ConfigError(f"the run's text encoder {tc.encoder!r} cannot be loaded: {str(e).splitlines()[0]}") from None


def class_names(checkpoint: Path, cfg: Config, model: nn.Module) -> list[str]:
    """The class names of a class run: stored in its checkpoint; for older checkpoints the procedural shapes'
    names or the class ids (no dataset is opened)."""
    from ldmkit.train.checkpoint import read_class_names

    names = read_class_names(checkpoint)
    if names is None and cfg.data.name == "shapes":
        from ldmkit.data import build_dataset

        names = list(build_dataset(cfg.data, seed=cfg.seed).class_names)
    return names if names is not None else [str(i) for i in range(getattr(model, "num_classes", 0))]


def _sample_defaults(cfg: Config, model: nn.Module) -> dict[str, Any]:
    from ldmkit.sampling import SampleSettings

    s = SampleSettings.from_config(cfg, model)
    return {"steps": int(s.steps), "guidance": float(s.guidance), "control_guidance": float(s.control_guidance),
            "interval": [float(v) for v in s.interval],
            "orig_size": None if cfg.sample.orig_size is None else [float(v) for v in cfg.sample.orig_size],
            "crop": [float(v) for v in cfg.sample.crop], "flip": bool(cfg.sample.flip), "eta": float(s.eta)}


def _sampler_notes(cfg: Config, model: nn.Module) -> list[str]:
    from ldmkit.sampling import SampleSettings

    settings = SampleSettings.from_config(cfg, model)
    sampler = settings.sampler
    if sampler == "ddim" and settings.eta > 0:
        return [f"DDIM with eta {settings.eta} draws its step noise from the pipeline's generator, not from "
                "ldmkit's per-batch streams: the same distribution, other samples"]
    if sampler == "heun":
        return ["the run samples with Heun; the exported scheduler is Euler on the same grid (diffusers' Heun "
                "scheduler uses another grid): `ldmkit sample --sampler euler` gives the same images"]
    if sampler == "ancestral":
        return ["the run samples ancestrally; the exported scheduler is DDIM with trailing spacing: "
                "`ldmkit sample --sampler ddim` gives the same images"]
    return []


# ------------------------------------------------------------------------------------------ writing


def _staged(out: Path) -> Path:
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"output directory {str(out)!r} exists and is not empty")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _finish(tmp: Path, out: Path) -> None:
    if out.exists():
        out.rmdir()
    tmp.rename(out)


def _write_model(model: nn.Module, folder: Path) -> Export:
    """The denoiser (and what it cannot hold) of ``model`` into ``folder``."""
    from ldmkit.diffusers_pipeline import CONDITIONER, needs_conditioner, to_diffusers_parts

    if not needs_conditioner(model):
        from ldmkit.models import convert

        dm, extra = convert.save_diffusers(model, folder)
        return Export(folder, type(dm).__name__, extra_files=list(extra))
    dm, cond = to_diffusers_parts(model)
    dm.save_pretrained(str(folder))
    cond.save_pretrained(str(folder / CONDITIONER))
    return Export(folder, f"{type(dm).__name__} + LdmkitConditioner", extra_files=[f"{CONDITIONER}/"],
                  notes=["`conditioner/` (ldmkit.diffusers_pipeline.LdmkitConditioner) holds what the diffusers "
                         "model cannot: " + _conditioner_contents(model)])


def _conditioner_contents(model: nn.Module) -> str:
    parts = []
    if getattr(model, "control_embedder", None) is not None:
        parts.append("the control embedder (its term joins the time/adaLN embedding)")
    if model.arch.startswith("mmdit") and model.init_kwargs["num_classes"] > 0:
        parts.append("the class-token table (class tokens enter as encoder_hidden_states rows)")
    if model.arch == "unet" and model.init_kwargs["num_classes"] > 0:
        parts.append("the class table (the class token starts encoder_hidden_states)")
    parts.append("the ldmkit model.json")
    return ", ".join(parts)


def _write_pipeline(model: nn.Module, cfg: Config, checkpoint: Path, folder: Path) -> Export:
    """A pipeline folder for the run (module docstring)."""
    from ldmkit.diffusers_pipeline import base_arch, to_diffusers_parts

    arch = base_arch(model.arch)  # an architecture without a converter is refused before anything is loaded
    text = cfg.cond.semantic == "text"
    if text and arch == "mmdit" and cfg.cond.text.padding == "zero" and cfg.cond.text.mask_zero_padding:
        raise ConfigError("cannot export this mmdit run to diffusers: it masks zero-padded text tokens, and "
                          "SD3Transformer2DModel attends to every token (train with another cond.text.padding)")
    scheduler = scheduler_for(cfg, model)
    vae, stats = _vae_for(cfg)
    problems = diffusers_pipeline_problems(model, cfg, 0.0 if vae is None else float(vae.config.shift_factor or 0.0))
    encoder = _text_encoder_for(cfg) if text else None
    names = None if text else class_names(checkpoint, cfg, model)
    id2label = None if names is None else {str(i): name for i, name in enumerate(names)}
    notes = _sampler_notes(cfg, model)
    if not problems:
        dm, _ = to_diffusers_parts(model, conditioner=False)
        if arch == "dit":
            from diffusers import DiTPipeline

            pipe = DiTPipeline(transformer=dm, vae=vae, scheduler=scheduler, id2label=id2label)
            pipe.register_to_config(id2label=id2label)
        else:
            from diffusers import PixArtAlphaPipeline

            pipe = PixArtAlphaPipeline(tokenizer=encoder.tokenizer, text_encoder=encoder.model, vae=vae,
                                       transformer=dm, scheduler=scheduler)
            notes.append(f"call with max_sequence_length={cfg.cond.text.length}, clean_caption=False (and "
                         "use_resolution_binning=False at other sizes than 256/512/1024 px); PixArtAlphaPipeline "
                         "lower-cases prompts, which a cased text encoder sees")
    else:
        from ldmkit.diffusers_pipeline import LdmkitPipeline

        dm, cond = to_diffusers_parts(model, conditioner=True)
        text_settings = None
        if text:
            tc = cfg.cond.text
            text_settings = {"kind": encoder.kind, "normalize": encoder.normalize, "length": tc.length,
                             "padding": tc.padding, "noise_sigma": tc.noise_sigma,
                             "use_mask": tc.mask_zero_padding, "noise_at_inference": tc.noise_at_inference,
                             "pooled": tc.pooled}
        cond.register_to_config(text=text_settings, sample=_sample_defaults(cfg, model),
                                latents={"image_size": cfg.data.image_size, **(stats or {})})
        pipe = LdmkitPipeline(transformer=dm, scheduler=scheduler, conditioner=cond, vae=vae,
                              text_encoder=None if encoder is None else encoder.model,
                              tokenizer=None if encoder is None else encoder.tokenizer, id2label=id2label)
        notes = [f"LdmkitPipeline rather than {NATIVE_PIPELINES[arch]}: " + "; ".join(problems)] + notes
    pipe.save_pretrained(str(folder))
    return Export(folder, type(pipe).__name__, notes=notes, scheduler=type(scheduler).__name__)


def export_to_diffusers(source: str | Path, out: str | Path, *, pipeline: bool = False, ema: bool = True) -> Export:
    """Export an ldmkit checkpoint, run or weights directory to ``out`` (module docstring); writes the model
    card ``README.md`` too. Raises ``ConfigError`` (or ``ValueError`` from a converter) on what cannot export."""
    from ldmkit.model_card import export_card, write_card
    from ldmkit.train.checkpoint import is_checkpoint, is_weights_dir, load_model, resolve_checkpoint

    source, out = Path(source), Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"output directory {str(out)!r} exists and is not empty")
    model, config = load_model(source, ema=ema)
    weights_only = is_weights_dir(source) and not is_checkpoint(source)
    ckpt = None if weights_only else resolve_checkpoint(source)
    if pipeline and config is None:
        raise ConfigError(f"--pipeline needs a checkpoint or run directory: {str(source)!r} holds weights only, "
                          "without the run's autoencoder, objective or text encoder")
    tmp = _staged(out)
    try:
        if pipeline:
            result = _write_pipeline(model, from_dict(config), ckpt, tmp)
        else:
            result = _write_model(model, tmp)
        write_card(tmp / "README.md", export_card(
            model, source=str(source), diffusers_class=result.diffusers_class, ema=ema, config=config,
            checkpoint=ckpt, extra_files=tuple(f for f in result.extra_files if f.endswith(".safetensors")),
            notes=tuple(result.notes), pipeline=pipeline, scheduler=result.scheduler))
        _finish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result.out = out
    return result


# ------------------------------------------------------------------------------------------ reading back


def load_as_ldmkit(source: str, subfolder: Optional[str] = None) -> nn.Module:
    """The ldmkit model of a diffusers folder written by ``export_to_diffusers`` (the denoiser with its
    ``conditioner/`` or class table; a pipeline folder's ``transformer``), or of any supported diffusers model."""
    from ldmkit.models import convert

    path = Path(source)
    if subfolder is None and (path / "model_index.json").is_file():
        index = json.loads((path / "model_index.json").read_text())
        subfolder = next((name for name in ("transformer", "unet") if name in index), None)
    folder = path / subfolder if subfolder else path
    cond_dir = next((d for d in (folder / "conditioner", path / "conditioner") if (d / "config.json").is_file()), None)
    if cond_dir is None:
        return convert.load_diffusers_as_ldmkit(source, subfolder)
    from ldmkit.diffusers_pipeline import LdmkitConditioner, from_diffusers_parts

    conditioner = LdmkitConditioner.from_pretrained(str(cond_dir), use_safetensors=True)
    return from_diffusers_parts(convert.load_diffusers(source, subfolder), conditioner)


__all__ = ["Export", "NATIVE_PIPELINES", "class_names", "diffusers_pipeline_problems", "export_to_diffusers",
           "load_as_ldmkit", "scheduler_for"]
