"""The ImageNet/CC12M recipes in configs/: they load, build their full-size models, document their cost,
and their transfer chains point at each other with the settings docs/method.md §7 asks for."""

from pathlib import Path

import pytest
import torch

from ldmkit.autoencoders import PRESETS as VAE_PRESETS
from ldmkit.config import load_config
from ldmkit.models import PRESETS, build_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPE_DIRS = ("imagenet256", "imagenet512", "imagenet22k256", "cc12m256", "cc12m512")
RECIPES = sorted(p for d in RECIPE_DIRS for p in (CONFIGS / d).glob("*.yaml"))
TEXT_WIDTH = {"google/flan-t5-xl": 2048}  # the encoders the recipes name (no download in tests)


def _id(p: Path) -> str:
    return f"{p.parent.name}/{p.name}"


def test_recipes_cover_every_architecture_at_256_and_512():
    for folder in ("imagenet256", "imagenet512"):
        archs = {PRESETS[load_config(p).model.name]["arch"] for p in (CONFIGS / folder).glob("*.yaml")}
        assert archs == {"dit", "mdt", "pixart", "mmdit", "mmdit-improved", "unet"}, folder
    assert (CONFIGS / "imagenet22k256").glob("*.yaml") and list((CONFIGS / "cc12m256").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=_id)
def test_recipe_loads_documents_its_cost_and_builds_its_model(path):
    cfg = load_config(path)
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    for must in ("H100-hours", "batch 1024", "From the", "Our defaults"):
        assert must in header, f"{_id(path)}: the header does not say {must!r}"
    assert cfg.train.batch_size == 1024 and cfg.run.dir and cfg.data.cache
    assert cfg.data.image_size in (256, 512) and cfg.data.name in ("imagenet", "webdataset")
    vae = VAE_PRESETS[cfg.autoencoder.name]
    text = cfg.cond.semantic == "text"
    num_classes = 0 if text else (21841 if cfg.data.class_map and "22k" in cfg.data.class_map else 1000)
    m = cfg.model
    with torch.device("meta"):
        model = build_model(m.name, in_channels=vae.channels, input_size=cfg.data.image_size // 8,
                            num_classes=num_classes, context_dim=TEXT_WIDTH[cfg.cond.text.encoder] if text else 0,
                            depth=m.depth, hidden_size=m.hidden_size, num_heads=m.num_heads,
                            patch_size=m.patch_size, learn_sigma=m.learn_sigma, qk_norm=m.qk_norm, **m.options)
    assert sum(p.numel() for p in model.parameters()) > 300e6  # the published sizes, not a toy
    if cfg.diffusion.objective == "ddpm" and m.learn_sigma:
        assert model.init_kwargs["learn_sigma"]


def _run_dirs() -> dict[str, Path]:
    return {load_config(p).run.dir: p for p in RECIPES}


@pytest.mark.parametrize("path", [p for p in RECIPES if load_config(p).init.from_], ids=_id)
def test_transfer_recipes_start_from_a_shipped_recipe_with_the_method_settings(path):
    cfg = load_config(path)
    sources = _run_dirs()
    assert cfg.init.from_ in sources, f"{_id(path)}: init.from {cfg.init.from_!r} is no recipe's run.dir"
    src = load_config(sources[cfg.init.from_])
    assert src.model.name == cfg.model.name
    if cfg.data.image_size != src.data.image_size:  # resolution transfer (docs/method.md §7)
        assert cfg.init.pe == "resample"
        assert cfg.diffusion.resolution_scale == "auto" and cfg.diffusion.base_resolution == src.data.image_size
        assert cfg.train.grad_checkpointing
    else:
        assert cfg.diffusion.resolution_scale == 1.0
    if src.cond.semantic == "class" and cfg.cond.semantic == "class" and src.data.class_map:
        assert cfg.init.source_classes == src.data.class_map and cfg.init.target_classes  # 22k -> 1k by synset
    if cfg.data.name == src.data.name:  # a fine-tune on the same kind of data is shorter than its start
        assert cfg.train.steps < src.train.steps
