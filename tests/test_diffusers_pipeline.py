"""Exports a diffusers user can rely on (ldmkit.diffusers_pipeline, ldmkit.export): models with a control path
or class tokens as a diffusers denoiser plus an ``LdmkitConditioner``, and whole runs as pipeline folders that
``DiTPipeline``, ``PixArtAlphaPipeline`` or ``LdmkitPipeline`` load offline. Every check compares with ldmkit
itself: the same weights come back, the denoiser computes the same outputs, and a pipeline loaded from the
exported folder samples the same images as ``ldmkit sample``'s code path for the same noise. Tiny random
models, a tiny VAE and a tiny BERT built from configs; each case takes about a second."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from ldmkit.autoencoders import build_autoencoder  # noqa: E402
from ldmkit.cli import main  # noqa: E402
from ldmkit.conditioning import NULL_CLASS, Conditioning  # noqa: E402
from ldmkit.config import AutoencoderConfig, Config, from_dict, to_dict  # noqa: E402
from ldmkit.diffusers_pipeline import (LdmkitConditioner, LdmkitPipeline, from_diffusers_parts,  # noqa: E402
                                       to_diffusers_parts)
from ldmkit.models import convert  # noqa: E402
from ldmkit.models.dit import DiT  # noqa: E402
from ldmkit.models.mdt import MDT  # noqa: E402
from ldmkit.models.mmdit import MMDiT, MMDiTImproved  # noqa: E402
from ldmkit.models.pixart import PixArt  # noqa: E402
from ldmkit.models.unet import PRESETS, UNet  # noqa: E402
from ldmkit.sampling import SampleSettings, conditions_for, default_control, generate  # noqa: E402
from ldmkit.text import build_text_conditioner  # noqa: E402
from ldmkit.train.checkpoint import load_model, load_weights, model_config, save_checkpoint, save_weights  # noqa: E402

B = 3
TOL = dict(atol=1e-5, rtol=1e-5)
DIT = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2)
MMDIT = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2)
WORDS = "a blue red green square circle triangle in the top bottom left right center middle".split()


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: extra threads only add synchronisation on a shared CPU
    yield
    torch.set_num_threads(threads)


def _perturb(model: torch.nn.Module, seed: int = 2) -> torch.nn.Module:
    """Random offsets on every trainable weight, so that zero-initialised layers (adaLN-Zero, the control
    embedder's output) contribute."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _unet(**kw) -> UNet:
    return UNet(input_size=8, in_channels=4, **{**PRESETS["unet-tiny"], **kw})


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """A tiny VAE (downsample 2, 4 channels) and a tiny BERT text encoder with a word-level tokenizer, saved."""
    root = tmp_path_factory.mktemp("assets")
    torch.manual_seed(0)
    diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                            latent_channels=4, norm_num_groups=8, sample_size=16,
                            down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2).save_pretrained(root / "vae")
    bert = root / "bert"
    bert.mkdir()
    (bert / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(bert / "vocab.txt")).save_pretrained(str(bert))
    transformers.BertModel(transformers.BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=64)).save_pretrained(bert)
    return {"vae": root / "vae", "bert": root / "bert"}


# ------------------------------------------------------------------ the denoiser and its conditioner

CONTROL = {"orig_size": torch.tensor([[16.0, 16.0], [32.0, 8.0], [64.0, 64.0]]),
           "crop": torch.tensor([[0.0, 0.0], [3.0, 1.0], [2.0, 5.0]]),
           "flip": torch.tensor([0.0, 1.0, 0.0]), "aspect": torch.tensor([1.0, 0.5, 1.2])}
CTRL = dict(control_high=["crop", "flip", "aspect"], control_low=["orig_size"])


def _semantic(classes: bool = False, text: int = 0, pooled: int = 0, mask: bool = False) -> dict[str, Any]:
    g = torch.Generator().manual_seed(3)
    kw: dict[str, Any] = {}
    if classes:
        kw["class_ids"] = torch.tensor([1, NULL_CLASS, 4])
    if text:
        kw["text"] = torch.randn(B, 5, text, generator=g)
        if mask:
            kw["text_mask"] = torch.tensor([[1, 1, 1, 0, 0], [1] * 5, [1, 0, 0, 0, 0]], dtype=torch.bool)
    if pooled:
        kw["text_pooled"] = torch.randn(B, pooled, generator=g)
    return kw


# (name, builder, semantic inputs)
PARTS: list[tuple[str, Callable[[], torch.nn.Module], dict[str, Any]]] = [
    ("dit/class+control", lambda: DiT(num_classes=5, **CTRL, **DIT), _semantic(classes=True)),
    ("dit/class+control, diffusers' sinusoid", lambda: DiT(num_classes=5, time_freq_shift=1, **CTRL, **DIT),
     _semantic(classes=True)),
    ("pixart/text+control", lambda: PixArt(context_dim=16, **CTRL, **DIT), _semantic(text=16, mask=True)),
    ("mmdit-improved/class", lambda: MMDiTImproved(num_classes=5, class_tokens=2, **MMDIT), _semantic(classes=True)),
    ("mmdit-improved/text", lambda: MMDiTImproved(num_classes=0, context_dim=16, **MMDIT), _semantic(text=16)),
    ("mmdit-improved/class+text+pooled", lambda: MMDiTImproved(num_classes=5, context_dim=16, pooled_dim=8, **MMDIT),
     _semantic(classes=True, text=16, pooled=8)),
    ("mmdit/class", lambda: MMDiT(num_classes=5, **MMDIT), _semantic(classes=True)),
    ("mmdit-improved/no control", lambda: MMDiTImproved(num_classes=0, context_dim=16, pooled_dim=8, control_high=[],
                                                        control_low=[], **MMDIT), _semantic(text=16, pooled=8)),
    ("unet/class+text+control", lambda: _unet(num_classes=5, context_dim=16, **CTRL),
     _semantic(classes=True, text=16, mask=True)),
    ("unet/text+pooled+micro+control",
     lambda: _unet(context_dim=16, pooled_dim=8, micro_conditioning=True, micro_embed_dim=8, control_high=["flip"],
                   control_low=["aspect"], control_gate="constant"), _semantic(text=16, pooled=8)),
]


@pytest.mark.parametrize("name,build,semantic", PARTS, ids=[p[0] for p in PARTS])
@torch.no_grad()
def test_denoiser_and_conditioner_round_trip_and_compute_the_model(name, build, semantic):
    torch.manual_seed(0)
    model = _perturb(build())
    dm, cond = to_diffusers_parts(model)
    assert cond is not None and type(dm).__name__ in ("DiTTransformer2DModel", "PixArtTransformer2DModel",
                                                      "SD3Transformer2DModel", "UNet2DConditionModel")
    back = from_diffusers_parts(dm, cond)
    assert {"arch": back.arch, **back.init_kwargs} == {"arch": model.arch, **model.init_kwargs}
    sd, sd_back = model.state_dict(), back.state_dict()
    assert set(sd) == set(sd_back)
    for k in sd:
        assert torch.equal(sd[k], sd_back[k]), k
    pipe = LdmkitPipeline(transformer=dm.eval(), scheduler=None, conditioner=cond)
    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(B, 4, 8, 8, generator=g), torch.rand(B, generator=g)
    outs = []
    for dropped in (None, torch.tensor([True, False, True])):  # control guidance's null-control rows
        c = Conditioning(control=CONTROL, control_dropped=dropped, **semantic)
        ours = model(x, t, c)
        assert ours.abs().mean() > 0.05
        torch.testing.assert_close(pipe.predict(x, t, c), ours, **TOL)
        outs.append(ours)
    if getattr(model, "control_embedder", None) is not None:  # the control path is live on the diffusers side
        assert (outs[0] - outs[1]).abs().max() > 1e-4
        flipped = {**CONTROL, "flip": 1 - CONTROL["flip"]}
        c = Conditioning(control=flipped, **semantic)
        torch.testing.assert_close(pipe.predict(x, t, c), model(x, t, c), **TOL)
        assert (model(x, t, c) - outs[0]).abs().max() > 1e-4


def test_models_without_leftovers_export_without_conditioner():
    dm, cond = to_diffusers_parts(_perturb(MMDiT(num_classes=0, context_dim=16, pooled_dim=8, **MMDIT)))
    assert cond is None and type(dm).__name__ == "SD3Transformer2DModel"


REFUSED: list[tuple[str, Callable[[], torch.nn.Module], str]] = [
    ("mdt", lambda: MDT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=4, decode_layer=2,
                        num_heads=2, num_classes=5, **CTRL), "no diffusers converter for architecture 'mdt'"),
    ("pixart/class+control", lambda: PixArt(num_classes=5, **CTRL, **DIT), "class-conditional"),
    ("mmdit/class_in_adaln", lambda: MMDiT(num_classes=5, class_in_adaln=True, **MMDIT), "class_in_adaln"),
    ("mmdit-improved/unconditional", lambda: MMDiTImproved(num_classes=0, **MMDIT), "unconditional"),
    ("dit/unconditional+control", lambda: DiT(num_classes=0, **CTRL, **DIT), "class-conditional"),
    ("pixart/text+pooled+control", lambda: PixArt(context_dim=16, pooled_dim=8, **CTRL, **DIT), "pooled text"),
]


@pytest.mark.parametrize("name,build,message", REFUSED, ids=[r[0] for r in REFUSED])
def test_what_diffusers_cannot_express_is_refused(name, build, message):
    with pytest.raises(ValueError, match=message):
        to_diffusers_parts(build())


def test_cli_exports_a_control_model_with_its_conditioner_and_reads_it_back(tmp_path, capsys):
    model = _perturb(MMDiTImproved(num_classes=5, class_tokens=2, **MMDIT))
    save_weights(model, tmp_path / "ours")
    assert main(["convert", "to-diffusers", str(tmp_path / "ours"), str(tmp_path / "hf")]) == 0
    assert "conditioner/" in capsys.readouterr().out
    files = sorted(p.name for p in (tmp_path / "hf" / "conditioner").iterdir())
    assert files == ["config.json", "diffusion_pytorch_model.safetensors"]
    config = json.loads((tmp_path / "hf" / "conditioner" / "config.json").read_text())
    assert config["_class_name"] == "LdmkitConditioner" and config["model"]["arch"] == "mmdit-improved"
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "SD3Transformer2DModel + LdmkitConditioner" in card and "control embedder" in card
    # the two parts load with diffusers alone
    dm = diffusers.SD3Transformer2DModel.from_pretrained(str(tmp_path / "hf"))
    cond = LdmkitConditioner.from_pretrained(str(tmp_path / "hf" / "conditioner"))
    x, t = torch.randn(B, 4, 8, 8), torch.rand(B)
    c = Conditioning(control=CONTROL, class_ids=torch.tensor([0, NULL_CLASS, 2]))
    with torch.no_grad():
        torch.testing.assert_close(LdmkitPipeline(transformer=dm, scheduler=None, conditioner=cond).predict(x, t, c),
                                   model(x, t, c), **TOL)
    assert main(["convert", "from-diffusers", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    back = load_weights(tmp_path / "back")
    assert back.arch == "mmdit-improved" and back.init_kwargs == model.init_kwargs
    with torch.no_grad():
        torch.testing.assert_close(back(x, t, c), model(x, t, c), atol=0, rtol=0)


# ------------------------------------------------------------------ whole runs as pipelines


def _run(root: Path, name: str, model: torch.nn.Module, assets: dict[str, Path], *, objective: str = "flow",
         vae: bool = True, shift: float = 0.1, channel_stats: bool = False, text: Optional[dict] = None,
         diffusion: Optional[dict] = None, sample: Optional[dict] = None,
         classes: Optional[list[str]] = None) -> Path:
    """A run directory holding one checkpoint of ``model`` (weights and EMA alike) with its config."""
    cfg = Config()
    cfg.data.image_size = 16 if vae else 8
    if vae:
        stats = dict(channel_norm=True, channel_mean=[0.1, -0.2, 0.0, 0.3], channel_std=[1.5, 0.5, 1.0, 2.0])
        cfg.autoencoder = AutoencoderConfig(name="kl", path=str(assets["vae"]), scale=0.7, shift=shift,
                                            **(stats if channel_stats else {}))
    cfg.diffusion.objective = objective
    for key, value in (diffusion or {}).items():
        setattr(cfg.diffusion, key, value)
    if objective == "ddpm":
        cfg.diffusion.prediction = "v"
        cfg.diffusion.learn_sigma = bool(model.learn_sigma)
    cfg.sample.steps = 4
    cfg.sample.sampler = "euler" if objective == "flow" else "ddim"
    cfg.sample.guidance = 3.0
    for key, value in (sample or {}).items():
        setattr(cfg.sample, key, value)
    if text is not None:
        cfg.cond.semantic = "text"
        cfg.cond.text.encoder = str(assets["bert"])
        cfg.cond.text.length = 6
        for key, value in text.items():
            setattr(cfg.cond.text, key, value)
    run = root / name
    state = model.state_dict()
    save_checkpoint(run, 2, model_state=state, ema_state=state, model_json=model_config(model), optimizer_state={},
                    config=to_dict(cfg), train_state={"step": 2},
                    class_names=classes if classes is not None else (None if text else ["red circle", "blue square",
                                                                                       "green triangle", "d", "e"]))
    return run


def _ldmkit_samples(run: Path, labels: Optional[list[int]], prompts: Optional[list[str]], seed: int):
    """What ``ldmkit sample`` computes for the run: the latents and the decoded images, clamped to [-1, 1] as
    ``to_uint8`` clamps them (pixel space decodes to the unclamped samples)."""
    model, cfg_dict = load_model(run)
    cfg = from_dict(cfg_dict)
    ae = build_autoencoder(cfg.autoencoder)
    n = len(labels if labels is not None else prompts)
    control = default_control(n, cfg.data.image_size, orig_size=cfg.sample.orig_size, crop=cfg.sample.crop,
                              flip=cfg.sample.flip)
    text = build_text_conditioner(cfg.cond.text) if cfg.cond.semantic == "text" else None
    cond, uncond = conditions_for(control, class_ids=None if labels is None else torch.tensor(labels),
                                  prompts=prompts, text=text)
    size = cfg.data.image_size // ae.downsample
    x = generate(model, cond, (ae.channels, size, size), SampleSettings.from_config(cfg, model), uncond=uncond, seed=seed)
    return x, ae.decode(x).clamp(-1, 1)


PROMPTS = ["a red circle", "a blue square in the top left corner", "green"]

# (name, builder, run options, pipeline class, call arguments)
RUNS: list[tuple[str, Callable[[], torch.nn.Module], dict[str, Any], str, dict[str, Any]]] = [
    ("dit/flow/class+control, shifted grid", lambda: DiT(num_classes=5, **CTRL, **DIT),
     dict(diffusion={"resolution_scale": 1.5},
          sample={"shift": 2.0, "control_guidance": 1.5, "guidance_interval": (0.1, 0.9)}), "LdmkitPipeline",
     dict(class_labels=["red circle", "e", "blue square"])),
    ("mmdit-improved/ddpm T=100, scaled/class tokens", lambda: MMDiTImproved(num_classes=5, class_tokens=2, **MMDIT),
     dict(objective="ddpm", diffusion={"num_steps": 100, "resolution_scale": 2.0},
          sample={"orig_size": (32.0, 24.0), "flip": True}), "LdmkitPipeline", dict(class_labels=[0, 3, NULL_CLASS])),
    ("pixart/flow/text, noisy replicate, channel stats", lambda: PixArt(context_dim=32, **CTRL, **DIT),
     dict(text={}, channel_stats=True), "LdmkitPipeline", dict(prompt=PROMPTS)),
    ("mmdit-improved/flow/text+pooled, pixel space",
     lambda: MMDiTImproved(num_classes=0, context_dim=32, pooled_dim=32, **{**MMDIT, "in_channels": 3}),
     dict(vae=False, text={"pooled": True, "padding": "replicate"}), "LdmkitPipeline", dict(prompt=PROMPTS)),
    ("unet/ddpm/text+micro+control, zero padding",
     lambda: _unet(context_dim=32, micro_conditioning=True, micro_embed_dim=8, **CTRL),
     dict(objective="ddpm", text={"padding": "zero"}, sample={"control_guidance": 2.0}), "LdmkitPipeline",
     dict(prompt=PROMPTS)),
    ("dit/ddpm/1000 classes (DiTPipeline)",
     lambda: DiT(num_classes=1000, time_freq_shift=1, learn_sigma=True, **DIT),
     dict(objective="ddpm", shift=0.0, classes=[f"class {i}" for i in range(1000)]), "DiTPipeline",
     dict(class_labels=[0, 3, 999])),
    ("pixart/ddpm/text, zero padding (PixArtAlphaPipeline)", lambda: PixArt(context_dim=32, **DIT),
     dict(objective="ddpm", shift=0.0, text={"padding": "zero"}), "PixArtAlphaPipeline", dict(prompt=PROMPTS)),
]


@pytest.mark.parametrize("name,build,options,pipeline,call", RUNS, ids=[r[0] for r in RUNS])
def test_pipeline_folder_samples_what_ldmkit_samples(name, build, options, pipeline, call, assets, tmp_path, capsys):
    torch.manual_seed(0)
    model = _perturb(build())
    run = _run(tmp_path, "run", model, assets, **options)
    out = tmp_path / "hf"
    assert main(["convert", "to-diffusers", str(run), str(out), "--pipeline"]) == 0
    printed = capsys.readouterr().out
    assert f"Wrote diffusers {pipeline}" in printed
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == pipeline
    card = (out / "README.md").read_text()
    assert f"as diffusers `{pipeline}`" in card and "## Sampling with diffusers" in card

    labels = call.get("class_labels")
    seed = 5
    generator = torch.Generator().manual_seed(seed)
    if pipeline == "LdmkitPipeline":
        pipe = LdmkitPipeline.from_pretrained(str(out))
        pipe.set_progress_bar_config(disable=True)
        ids = None if labels is None else [pipe.get_label_ids(v)[0] if isinstance(v, str) else v for v in labels]
        x_ref, ref = _ldmkit_samples(run, ids, call.get("prompt"), seed)
        x = pipe(**call, generator=generator, output_type="latent").images
        torch.testing.assert_close(x, x_ref, atol=1e-4, rtol=1e-4)
        images = pipe(**call, generator=torch.Generator().manual_seed(seed), output_type="pt").images
        assert (pipe.vae is None) == name.endswith("pixel space")
    elif pipeline == "DiTPipeline":
        pipe = diffusers.DiTPipeline.from_pretrained(str(out))
        pipe.set_progress_bar_config(disable=True)
        ids = pipe.get_label_ids([f"class {i}" for i in labels])  # id2label travels in model_index.json
        assert ids == labels
        _, ref = _ldmkit_samples(run, ids, None, seed)
        images = pipe(class_labels=ids, guidance_scale=3.0, num_inference_steps=4, generator=generator,
                      output_type="pt").images
    else:
        pipe = diffusers.PixArtAlphaPipeline.from_pretrained(str(out))
        pipe.set_progress_bar_config(disable=True)
        _, ref = _ldmkit_samples(run, None, PROMPTS, seed)
        images = pipe(prompt=PROMPTS, guidance_scale=3.0, num_inference_steps=4, generator=generator,
                      max_sequence_length=6, clean_caption=False, use_resolution_binning=False,
                      output_type="pt").images
    assert ref.std() > 0.05  # not a blank image
    torch.testing.assert_close(images * 2 - 1, ref, atol=2e-5, rtol=2e-5)

    # the pipeline's denoiser (with its conditioner) converts back to the run's model
    assert main(["convert", "from-diffusers", str(out), str(tmp_path / "back")]) == 0
    back, _ = load_model(tmp_path / "back")
    ema, _ = load_model(run)
    assert back.init_kwargs == ema.init_kwargs or pipeline != "LdmkitPipeline"
    for k, v in ema.state_dict().items():
        if k != "pos_embed":
            assert torch.equal(back.state_dict()[k], v), k


def test_pipeline_defaults_are_the_runs(assets, tmp_path):
    model = _perturb(DiT(num_classes=5, **CTRL, **DIT))
    run = _run(tmp_path, "run", model, assets, sample={"steps": 3, "guidance": 2.0, "crop": (1.0, 2.0)})
    out = tmp_path / "hf"
    assert main(["convert", "to-diffusers", str(run), str(out), "--pipeline"]) == 0
    pipe = LdmkitPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.conditioner.config.sample["steps"] == 3 and pipe.conditioner.config.sample["crop"] == [1.0, 2.0]
    assert pipe.labels["green triangle"] == 2
    pil = pipe(class_labels=[2], generator=torch.Generator().manual_seed(0)).images
    assert len(pil) == 1 and pil[0].size == (16, 16)
    x_default = pipe(class_labels=[2], generator=torch.Generator().manual_seed(0), output_type="latent").images
    x_other = pipe(class_labels=[2], generator=torch.Generator().manual_seed(0), output_type="latent",
                   crop=(0.0, 0.0)).images
    assert (x_default - x_other).abs().max() > 1e-4  # the crop default is the run's, and it matters
    with pytest.raises(ValueError, match="unknown class name"):
        pipe(class_labels=["purple hexagon"])
    with pytest.raises(ValueError, match="text-conditional|not a text"):
        pipe(prompt=["a red circle"])


def test_sd3_pipeline_samples_the_same_with_ldmkit_prompt_embeddings(assets, tmp_path):
    """diffusers' StableDiffusion3Pipeline takes the exported SD3 transformer, scheduler and VAE as they are; given
    the run's prompt encodings (``LdmkitPipeline.encode_prompt``) and ldmkit's grid (``sigmas``), it samples the
    same images."""
    model = _perturb(MMDiT(num_classes=0, context_dim=32, pooled_dim=32, **MMDIT))
    run = _run(tmp_path, "run", model, assets, text={"pooled": True, "padding": "replicate"}, sample={"shift": 3.0})
    out = tmp_path / "hf"
    assert main(["convert", "to-diffusers", str(run), str(out), "--pipeline"]) == 0
    ours = LdmkitPipeline.from_pretrained(str(out))
    sd3 = diffusers.StableDiffusion3Pipeline(transformer=ours.transformer, scheduler=ours.scheduler, vae=ours.vae,
                                             text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                             text_encoder_3=None, tokenizer_3=None)
    sd3.set_progress_bar_config(disable=True)
    pos, neg = ours.encode_prompt(PROMPTS), ours.encode_prompt([""] * len(PROMPTS))
    steps = 4
    images = sd3(prompt_embeds=pos["text"], pooled_prompt_embeds=pos["text_pooled"],
                 negative_prompt_embeds=neg["text"], negative_pooled_prompt_embeds=neg["text_pooled"],
                 guidance_scale=3.0, num_inference_steps=steps, sigmas=[1 - i / steps for i in range(steps)],
                 height=16, width=16, generator=torch.Generator().manual_seed(1), output_type="pt").images
    _, ref = _ldmkit_samples(run, None, PROMPTS, 1)
    torch.testing.assert_close(images * 2 - 1, ref, atol=2e-5, rtol=2e-5)


def test_pipeline_export_refusals_are_one_line_errors(assets, tmp_path, capsys):
    def refused(args: list[str], message: str) -> None:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("ldmkit: error: ") and message in err and len(err.strip().splitlines()) == 1, err

    mdt = _run(tmp_path, "mdt", MDT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=4,
                                    decode_layer=2, num_heads=2, num_classes=5), assets)
    refused(["convert", "to-diffusers", str(mdt), str(tmp_path / "o1"), "--pipeline"], "no diffusers converter")
    pixart = _run(tmp_path, "pixart", PixArt(num_classes=5, **DIT), assets)
    refused(["convert", "to-diffusers", str(pixart), str(tmp_path / "o2"), "--pipeline"], "takes text only")
    masked = _run(tmp_path, "masked", MMDiT(num_classes=0, context_dim=32, pooled_dim=32, **MMDIT), assets,
                  text={"padding": "zero", "pooled": True})
    refused(["convert", "to-diffusers", str(masked), str(tmp_path / "o3"), "--pipeline"], "attends to every token")
    save_weights(DiT(num_classes=5, **DIT), tmp_path / "weights")
    refused(["convert", "to-diffusers", str(tmp_path / "weights"), str(tmp_path / "o4"), "--pipeline"],
            "--pipeline needs a checkpoint or run directory")
    refused(["convert", "from-diffusers", str(tmp_path / "weights"), str(tmp_path / "o5"), "--pipeline"],
            "--pipeline applies to to-diffusers only")
    for o in ("o1", "o2", "o3", "o4"):  # nothing half-written is left behind
        assert not (tmp_path / o).exists() and not (tmp_path / f".{o}.tmp").exists()
    with pytest.raises(ValueError, match="control embedder"):  # one diffusers model still cannot hold it
        convert.to_diffusers(DiT(num_classes=5, **CTRL, **DIT))
