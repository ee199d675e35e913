"""Every shipped ablation file loads, every arm's config validates for every seed, and each file is sized
as it says (>= 3 seeds, a cost estimate within the CPU budget unless marked for a GPU)."""

from pathlib import Path

import pytest
import torch

from ldmkit.ablate import _config, load_spec, plan
from ldmkit.config import load_config

FILES = sorted(Path("configs/ablations").glob("*.yaml"))
CLAIMS = {"gate": "C1/C2", "gate_alpha": "C2", "semantic_path": "C3", "size_inference": "C4", "metadata": "C5",
          "flip": "C6", "padding": "C7", "transfer": "C9-C12", "beta2": "C13", "architectures": "C14"}


def test_one_file_per_claim():
    assert {f.stem for f in FILES} >= set(CLAIMS)


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_ablation_file_loads_and_every_arm_validates(path, tmp_path):
    spec = load_spec(path)
    assert len(spec["seeds"]) >= 3 and len(spec["variants"]) >= 2
    assert spec["estimate_minutes"] is not None, "state the measured or estimated cost"
    assert spec["gpu"] or spec["estimate_minutes"] <= 30, "over the CPU budget: mark it gpu: true"
    assert spec["claim"] and spec["claim"]["expect_by_arm"], "state the paper's expected direction"
    if path.stem in CLAIMS:
        assert spec["claim"]["id"] == CLAIMS[path.stem]
    for seed in spec["seeds"]:
        for arm in spec["variants"]:
            cfg = _config(spec, arm, seed, tmp_path)
            assert cfg.seed == seed
    assert len(plan(spec, tmp_path)) == len(spec["seeds"]) * len(spec["variants"])


def test_architecture_arms_have_nearly_equal_flops(tmp_path):
    """C14 compares architectures at equal compute: the closed-form forward FLOPs of the arms' models."""
    from ldmkit.models import PRESETS, build_model
    from ldmkit.models.cost import model_cost

    spec = load_spec(Path("configs/ablations/architectures.yaml"))
    flops = {}
    for arm in spec["variants"]:
        cfg = _config(spec, arm, 0, tmp_path)
        m = cfg.model
        with torch.device("meta"):
            model = build_model(m.name, in_channels=3, input_size=cfg.data.image_size, num_classes=18, depth=m.depth,
                                hidden_size=m.hidden_size, num_heads=m.num_heads, patch_size=m.patch_size,
                                **m.options)
        fields = ("orig_size", "crop", "flip", "aspect") if getattr(model, "control_embedder", None) else ()
        flops[arm] = model_cost({"arch": PRESETS[m.name.lower()]["arch"], **model.init_kwargs},
                                control_fields=fields).flops
    assert max(flops.values()) / min(flops.values()) < 1.25, flops


def test_testbed_recipes_turn_the_conditions_on():
    for name in ("class", "t2i"):
        d = load_config(Path("configs/testbed") / f"{name}.yaml").data
        assert d.shapes.upsample and d.shapes.orig_scale[0] < 1 and d.shapes.placement == "source"
        assert d.crop in ("random", "random_resized") and d.flip_prob > 0
