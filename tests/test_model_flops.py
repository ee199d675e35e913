"""The closed forms of ``models.cost`` against the reference: parameters of the built model and FLOPs
counted by FlopCounterMode (``models.flops``), to the FLOP; and ``ldmkit models`` built on them."""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import subprocess
import sys

import pytest
import torch

from ldmkit.conditioning import CONTROL_FIELDS, Conditioning
from ldmkit.models import ARCHITECTURES, build_model, list_models, unet
from ldmkit.models.catalog import describe, format_table, table
from ldmkit.models.control import DEFAULT_HIGH, DEFAULT_LOW
from ldmkit.models.cost import CLOSED_FORMS, CONTROL_SCALARS, COST_NEUTRAL, NUM_TIME_IDS, model_cost
from ldmkit.models.cost import DEFAULT_HIGH as COST_DEFAULT_HIGH
from ldmkit.models.cost import DEFAULT_LOW as COST_DEFAULT_LOW
from ldmkit.models.flops import forward_flops_per_image

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TINY = ["dit-tiny/2", "mdt-tiny/2", "pixart-tiny/2", "mmdit-tiny/2", "mmdit-improved-tiny/2", "unet-tiny"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ldmkit.cli", "models", *args], env=ENV, capture_output=True,
                          text=True, timeout=600)


def table_of(stdout: str) -> str:
    """The markdown table of ``ldmkit models``' output (without the note below it)."""
    return "\n".join(line for line in stdout.splitlines() if line.startswith("|"))


# ------------------------------------------------------------------------------- the published presets


@pytest.fixture(scope="module")
def counted() -> dict:
    """Every preset as ``ldmkit models --count`` describes it: built on meta, counted (about a minute)."""
    return {name: describe(name, count=True) for name in list_models()}


@pytest.mark.slow
def test_closed_form_equals_the_count_for_every_preset(counted):
    for name in list_models():
        assert describe(name) == counted[name], name  # parameters and FLOPs at 256 and 512 px, exact


@pytest.mark.slow
def test_ldmkit_models_prints_the_counted_table(counted):
    out = cli()
    assert out.returncode == 0, out.stderr
    assert table_of(out.stdout) == format_table([counted[n] for n in list_models()], (256, 512))
    assert len(table_of(out.stdout).splitlines()) == 2 + len(list_models())


@pytest.mark.parametrize("name", TINY)
def test_closed_form_equals_the_count_per_architecture(name):
    assert describe(name) == describe(name, count=True)


# ------------------------------------------------------------------------- configurations the trainer uses


CONTROL = {"orig_size": torch.tensor([[256.0, 192.0]]), "crop": torch.tensor([[0.0, 8.0]]),
           "flip": torch.tensor([1.0]), "aspect": torch.tensor([0.75])}

# (preset, data: num_classes / context_dim / pooled_dim, overrides, control fields in the batch)
CONFIGS = [
    ("dit-tiny/4", dict(num_classes=18), dict(control_high=["crop", "flip"], control_low=["orig_size"],
                                              qk_norm=True, mlp_ratio=2.5), ("crop", "flip", "orig_size")),
    ("dit-tiny/2", dict(num_classes=0), dict(control_high=["aspect"], control_low=["orig_size"],
                                             control_gate="none"), ("aspect", "orig_size")),
    ("dit-tiny/4", dict(num_classes=18), dict(control_high=["crop"], control_low=["orig_size"]), ()),
    ("mdt-tiny/2", dict(num_classes=18), dict(depth=6, decode_layer=2, qk_norm=True, control_high=["flip"],
                                              control_low=["orig_size"]), ("flip", "orig_size")),
    ("pixart-tiny/2", dict(num_classes=0, context_dim=24, pooled_dim=12), dict(control_high=["crop"]), ("crop",)),
    ("pixart-tiny/4", dict(num_classes=18), dict(num_class_tokens=3, qk_norm=True), ()),
    ("pixart-tiny/4", dict(num_classes=0), dict(), ()),
    ("mmdit-tiny/2", dict(num_classes=18), dict(class_in_context=False, class_in_adaln=True), ()),
    ("mmdit-tiny/2", dict(num_classes=18, context_dim=24, pooled_dim=12),
     dict(class_tokens=2, class_in_adaln=True, qk_norm=True, pos_embed_max_size=12), ()),
    ("mmdit-tiny/2", dict(num_classes=0), dict(depth=3), ()),
    ("mmdit-improved-tiny/2", dict(num_classes=18), dict(), tuple(CONTROL)),  # the paper's model with metadata
    ("mmdit-improved-tiny/2", dict(num_classes=18), dict(), ("orig_size",)),  # the low group only
    ("mmdit-improved-tiny/2", dict(num_classes=0, context_dim=24), dict(control_gate="constant"), tuple(CONTROL)),
    ("unet-tiny", dict(num_classes=18), dict(), ()),
    ("unet-tiny", dict(num_classes=0), dict(linear_projection=False, resblock_scale_shift=True), ()),
    ("unet-tiny", dict(num_classes=18, context_dim=24, pooled_dim=12),
     dict(class_embed_dim=24, micro_conditioning=True, micro_embed_dim=8, num_head_channels=-1, num_heads=2,
          qk_norm=True, channel_mult=[1, 2, 2], transformer_depth=[1, 0, 2], transformer_depth_middle=3,
          control_high=["flip"], control_low=["orig_size"]), ("flip", "orig_size")),
]


@pytest.mark.parametrize("learn_sigma", [False, True])
@pytest.mark.parametrize("name, data, overrides, fields", CONFIGS)
def test_closed_form_equals_the_count_for_other_configurations(name, data, overrides, fields, learn_sigma):
    size, tokens = 16, 5
    with torch.device("meta"):
        model = build_model(name, in_channels=3, input_size=size, **data, **overrides, learn_sigma=learn_sigma)
    cond = Conditioning(control={k: CONTROL[k] for k in fields})
    if data.get("num_classes"):
        cond.class_ids = torch.tensor([4])
    if data.get("context_dim"):
        cond.text = torch.zeros(1, tokens, data["context_dim"])
        cond.text_mask = torch.tensor([[True, True, True, False, False]])
    if data.get("pooled_dim"):
        cond.text_pooled = torch.zeros(1, data["pooled_dim"])
    flops = forward_flops_per_image(model, torch.empty(1, 3, size, size, device="meta"),
                                    torch.full((1,), 0.5, device="meta"), cond.to("meta"))
    cost = model_cost({"arch": model.arch, **model.init_kwargs}, text_tokens=tokens, control_fields=fields)
    assert cost.params == sum(p.numel() for p in model.parameters())
    assert cost.flops == flops


# ------------------------------------------------------------------------------- the closed forms' inputs


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_closed_forms_take_the_constructors_arguments_with_their_defaults(arch):
    """A new constructor argument must be added to the closed form or declared cost-neutral."""
    # the constructor's arguments are the fields of the architecture's config dataclass
    ctor = {f.name: (inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default)
            for f in dataclasses.fields(ARCHITECTURES[arch].Config)}
    form = {k: p for k, p in inspect.signature(CLOSED_FORMS[arch]).parameters.items()
            if k not in ("text_tokens", "control_fields")}
    assert set(form) | COST_NEUTRAL[arch] == set(ctor) and not set(form) & COST_NEUTRAL[arch]
    for k, p in form.items():
        assert p.default == ctor[k], (arch, k)


def test_restated_constants_match_their_sources():
    assert {k: math.prod(s) for k, s in CONTROL_FIELDS.items()} == CONTROL_SCALARS
    assert (COST_DEFAULT_HIGH, COST_DEFAULT_LOW) == (DEFAULT_HIGH, DEFAULT_LOW)
    assert NUM_TIME_IDS == unet.NUM_TIME_IDS


def test_model_cost_refuses_what_it_does_not_know():
    with pytest.raises(ValueError, match="unknown arch"):
        model_cost({"arch": "vit"})
    cfg = {"arch": "dit", "input_size": 32, "patch_size": 2, "in_channels": 4, "hidden_size": 64, "depth": 2,
           "num_heads": 4}
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['dpeth'\]"):
        model_cost({**cfg, "dpeth": 3})
    with pytest.raises(ValueError, match="not divisible"):
        model_cost({**cfg, "input_size": 33})
    with pytest.raises(ValueError, match="text_tokens"):
        model_cost({**cfg, "arch": "mmdit", "context_dim": 8})


# ----------------------------------------------------------------------------------------- ldmkit models


def test_ldmkit_models_imports_no_torch_and_prints_the_closed_form_table():
    code = ("import sys; from ldmkit.cli import main; main(['models']); "
            "assert 'torch' not in sys.modules, 'ldmkit models imported torch'")
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert table_of(out.stdout) == table(list_models())
    assert "| dit-xl/2 | 675,129,632 | 237.2 | 1049.1 |" in out.stdout  # DiT's published count


def test_ldmkit_models_count_on_a_filtered_set():
    counted, closed = cli("tiny", "--count"), cli("tiny")
    assert counted.returncode == 0, counted.stderr
    assert table_of(counted.stdout) == table_of(closed.stdout)
    assert [row.split(" | ")[0][2:] for row in table_of(counted.stdout).splitlines()[2:]] == \
        [n for n in list_models() if "tiny" in n]
    assert "counted with FlopCounterMode" in counted.stdout


def test_ldmkit_models_bad_input_is_one_line(capsys):
    from ldmkit.cli import main

    assert main(["models", "no-such-model"]) == 2
    assert capsys.readouterr().err == "ldmkit: error: no model name contains 'no-such-model'\n"
    assert main(["models", "dit-s/8", "--resolutions", "100"]) == 2
    assert capsys.readouterr().err == ("ldmkit: error: --resolutions 100: dit-s/8: DiT: input_size 12 is not "
                                       "divisible by patch_size 8\n")
    with pytest.raises(SystemExit) as exit_:
        main(["models", "--resolutions", "0"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("ldmkit: error: argument --resolutions: must be >= 1, got 0")
