"""Model cards: a Markdown file written next to every diffusers export (``ldmkit convert to-diffusers``,
``README.md``, the name the Hugging Face hub shows) and every FID evaluation (``ldmkit eval fid``,
``MODEL_CARD.md``): what the model is, what it was trained on and how long, with which objective, how it
was sampled and which numbers it reached under which protocol.

Everything comes from the files that produced the output (the model's constructor arguments, the run's
resolved config and the checkpoint's step); what is not known (a weights-only directory has no training
config) is said to be unknown rather than guessed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping, Optional

from torch import nn

from ldmkit.files import atomic_write_text

# Metrics in the order a card lists them, with their display names.
METRIC_NAMES = {
    "fid": "FID",
    "sfid": "sFID",
    "fd_dinov2": "FD-DINOv2",
    "precision": "Precision",
    "recall": "Recall",
    "inception_score": "Inception Score",
    "clip_score": "CLIPScore",
}


def count_parameters(model: nn.Module) -> int:
    """Trainable and frozen parameters (buffers, e.g. fixed positional tables, are not counted)."""
    return sum(p.numel() for p in model.parameters())


def training_record(config: Optional[Mapping[str, Any]], checkpoint: Optional[Path]) -> dict[str, Any]:
    """The training facts of a run: data, steps, batch, objective, autoencoder (None where unknown)."""
    from ldmkit.train.checkpoint import checkpoint_step

    step = None
    if checkpoint is not None:
        try:
            step = checkpoint_step(Path(checkpoint))
        except ValueError:
            step = None
    if not config:
        return {"step": step}
    data, train, diff = config.get("data", {}), config.get("train", {}), config.get("diffusion", {})
    cond, ae = config.get("cond", {}), config.get("autoencoder", {})
    if diff.get("objective") == "ddpm":
        objective = (f"DDPM ({diff.get('prediction')} prediction, {diff.get('schedule')} schedule, "
                     f"T = {diff.get('num_steps')}, loss weighting {diff.get('loss_weighting')})")
    else:
        objective = (f"flow matching, velocity prediction ({diff.get('objective')}; timesteps "
                     f"{diff.get('timesteps')}")
        if diff.get("timesteps") == "logit_normal":
            objective += f" with mean {diff.get('logit_mean')}, std {diff.get('logit_std')}"
        objective += ")"
    return {
        "step": step,
        "planned_steps": train.get("steps"),
        "batch_size": train.get("batch_size"),
        "lr": train.get("lr"),
        "ema_decay": train.get("ema_decay"),
        "precision": train.get("precision"),
        "data": data.get("name"),
        "data_path": data.get("path"),
        "image_size": data.get("image_size"),
        "semantic": cond.get("semantic"),
        "label_dropout": cond.get("p_drop_semantic"),
        "text_encoder": (cond.get("text") or {}).get("encoder") if cond.get("semantic") == "text" else None,
        "autoencoder": ae.get("name"),
        "objective": objective,
        "seed": config.get("seed"),
    }


def _conditioning(model: nn.Module) -> str:
    kw = getattr(model, "init_kwargs", {})
    parts = []
    if kw.get("num_classes", 0) > 0:
        parts.append(f"{kw['num_classes']} classes (+ the null class, id -1)")
    if kw.get("context_dim", 0) > 0:
        parts.append(f"text tokens of width {kw['context_dim']}")
    if kw.get("pooled_dim", 0) > 0:
        parts.append(f"pooled text of width {kw['pooled_dim']}")
    if kw.get("micro_conditioning"):
        parts.append("SDXL size/crop micro-conditioning")
    if kw.get("control_high") or kw.get("control_low"):
        parts.append(f"control metadata {list(kw.get('control_high', []))} / {list(kw.get('control_low', []))}")
    return ", ".join(parts) or "unconditional"


def _model_lines(model: nn.Module) -> list[str]:
    kw = getattr(model, "init_kwargs", {})
    shown = ", ".join(f"{k}={json.dumps(v)}" for k, v in kw.items())
    return [
        f"- Architecture: ldmkit `{model.arch}`",
        f"- Parameters: {count_parameters(model):,}",
        f"- Conditioning: {_conditioning(model)}",
        f"- Constructor arguments: {shown}",
    ]


def _training_lines(record: Mapping[str, Any]) -> list[str]:
    step = record.get("step")
    if len(record) <= 1:  # no run config: a weights-only directory
        return [f"- Training steps: {step if step is not None else 'unknown'}",
                "- Training data, objective: unknown (a weights-only directory carries no training config)"]
    lines = []
    planned = record.get("planned_steps")
    planned_text = f" of {planned:,} planned" if isinstance(planned, int) else ""
    if step is not None:
        batch = record.get("batch_size")
        seen = f" ({step * batch:,} samples at batch {batch})" if isinstance(batch, int) else ""
        lines.append(f"- Training steps: {step:,}{planned_text}{seen}")
    else:
        lines.append(f"- Training steps: unknown{planned_text}")
    data = f"`{record.get('data')}`" + (f" at `{record['data_path']}`" if record.get("data_path") else "")
    lines += [
        f"- Training data: {data}, {record.get('image_size')} px, {record.get('semantic')}-conditional"
        + (f" (text encoder `{record['text_encoder']}`)" if record.get("text_encoder") else "")
        + f", condition dropout {record.get('label_dropout')}",
        f"- Objective: {record.get('objective')}",
        f"- Optimisation: learning rate {record.get('lr')}, EMA decay {record.get('ema_decay')}, "
        f"{record.get('precision')}, seed {record.get('seed')}",
        f"- Autoencoder: `{record.get('autoencoder')}`",
    ]
    return lines


def _model_and_training(model: nn.Module, config: Optional[Mapping[str, Any]],
                        checkpoint: Optional[Path]) -> list[str]:
    """The "Model" and "Training" sections every card has."""
    return ["## Model", "", *_model_lines(model), "", "## Training", "",
            *_training_lines(training_record(config, checkpoint)), ""]


def export_card(model: nn.Module, *, source: str, diffusers_class: str, ema: bool,
                config: Optional[Mapping[str, Any]] = None, checkpoint: Optional[Path] = None,
                extra_files: tuple[str, ...] = (), notes: tuple[str, ...] = (), pipeline: bool = False,
                scheduler: Optional[str] = None) -> str:
    """The card of a diffusers export of ``model``: a denoiser (``pipeline=False``) or a pipeline folder
    loaded by ``diffusers_class`` (``DiTPipeline``, ``PixArtAlphaPipeline`` or ldmkit's ``LdmkitPipeline``)."""
    lines = [
        f"# {model.arch} as diffusers `{diffusers_class}`",
        "",
        f"Exported by `ldmkit convert to-diffusers{' --pipeline' if pipeline else ''}` from `{source}` "
        f"({'EMA' if ema else 'raw'} weights) on {time.strftime('%Y-%m-%d')}.",
        "",
        *_model_and_training(model, config, checkpoint),
    ]
    if pipeline:
        lines += _pipeline_lines(model, diffusers_class, scheduler, config)
    else:
        lines += [
            "## Calling it with diffusers",
            "",
            "- `timestep = 1000 * t`, where ldmkit's t in [0, 1] is the noise level (t = 1: pure noise).",
            "- The output is the model's prediction as trained: the velocity for flow-matching runs; "
            "DDPM runs predict as the objective above says (learned variance: the second half of the channels).",
        ]
        if extra_files:
            lines.append(
                f"- `{extra_files[0]}` holds the class table (null class in the last row): feed "
                "`encoder_hidden_states = table[class_ids][:, None]`, followed by the text tokens when the model "
                "takes text; `ldmkit convert from-diffusers` of this folder restores the class-conditional model."
            )
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def _pipeline_lines(model: nn.Module, diffusers_class: str, scheduler: Optional[str],
                    config: Optional[Mapping[str, Any]]) -> list[str]:
    kw = getattr(model, "init_kwargs", {})
    length = ((config or {}).get("cond") or {}).get("text", {}).get("length")
    text = kw.get("context_dim", 0) > 0
    if diffusers_class == "LdmkitPipeline":
        call = 'pipe(prompt=["a red circle"], generator=torch.Generator().manual_seed(0))' if text else \
            "pipe(class_labels=[0, 1], generator=torch.Generator().manual_seed(0))"
        load = ["from ldmkit.diffusers_pipeline import LdmkitPipeline  # registers the conditioner with diffusers",
                'pipe = LdmkitPipeline.from_pretrained("path/to/this/folder")']
        how = ("- Sampling settings (steps, guidance, control metadata) default to the run's; the noise of "
               "`generator` is the noise of `ldmkit sample --seed` for the same seed.")
    else:
        call = (f'pipe(prompt="a red circle", max_sequence_length={length}, clean_caption=False)' if text else
                'pipe(class_labels=pipe.get_label_ids(["a class name"]))')
        load = ["import diffusers", f'pipe = diffusers.{diffusers_class}.from_pretrained("path/to/this/folder")']
        how = f"- A diffusers pipeline: `diffusers.{diffusers_class}` loads and samples it without ldmkit."
    return ["## Sampling with diffusers", "", "```python", "import torch", *load, f"images = {call}.images",
            "```", "", how, f"- Scheduler: `{scheduler}` (the run's objective)."]


def _format(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def eval_card(model: nn.Module, *, checkpoint: str, metrics: Mapping[str, Any], protocol: Mapping[str, Any],
              config: Optional[Mapping[str, Any]] = None) -> str:
    """The card of an ``eval fid`` result: the model, its training, the sampler and the metrics with their
    protocol."""
    ckpt = Path(checkpoint)
    per_set = metrics.get("seed_sets")
    rows = []
    for key, name in METRIC_NAMES.items():
        if key not in metrics:
            continue
        if isinstance(per_set, Mapping) and key in per_set:
            s = per_set[key]
            rows.append(f"| {name} | {_format(s['mean'])} | {_format(s['min'])} | {_format(s['std'])} | "
                        f"{', '.join(_format(v) for v in s['values'])} |")
        else:
            rows.append(f"| {name} | {_format(metrics[key])} | | | |")
    notes = [f"- {k}: {v}" for k, v in metrics.items() if isinstance(v, str)]
    notes += [f"- {k}: skipped: {why}" for k, why in (metrics.get("skipped") or {}).items()]
    p = protocol
    ref_notes = (p.get("extra") or {}).get("reference_statistics") or {}
    notes += [f"- reference {kind} statistics from {where}" for kind, where in ref_notes.items()]
    lines = [
        f"# Evaluation of {model.arch}: {checkpoint}",
        "",
        *_model_and_training(model, config, ckpt),
        "## Sampling",
        "",
        f"- Sampler: {p.get('sampler')}, {p.get('steps')} steps, time shift {p.get('shift')}, DDIM eta "
        f"{p.get('eta')}; {'EMA' if p.get('ema') else 'raw'} weights",
        f"- Guidance: {p.get('guidance')} (control guidance {p.get('control_guidance')}, interval "
        f"{p.get('interval')})",
        f"- Conditioning: {p.get('conditioning')}",
        "",
        "## Metrics",
        "",
        f"{p.get('num_samples'):,} samples per set, {p.get('seed_sets', 1)} seed set(s), "
        f"{p.get('image_size')} px, against `{p.get('reference')}`"
        + (f" ({p['reference_count']:,} reference images)" if p.get("reference_count") else "") + ".",
        "",
        "| metric | value (mean over sets) | min | std | per set |",
        "|---|---|---|---|---|",
        *rows,
        "",
        *notes,
        "",
        "## Protocol",
        "",
        f"- Inception: `{p.get('inception')}`; {p.get('preprocessing')}",
        f"- DINOv2: `{p.get('dinov2') or 'not used'}`" + (f"; {p.get('dinov2_preprocessing')}"
                                                          if p.get("dinov2") else ""),
        f"- Seeds: {p.get('seed_scheme')}",
        "- Everything else: `protocol` in `metrics.json` next to this file.",
    ]
    return "\n".join(lines) + "\n"


def write_card(path: str | Path, text: str) -> Path:
    """Write a card atomically (a reader never sees half a file)."""
    return atomic_write_text(path, text)


__all__ = ["METRIC_NAMES", "count_parameters", "eval_card", "export_card", "training_record", "write_card"]
