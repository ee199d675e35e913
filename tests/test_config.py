"""Typed configs: YAML recipes, dotted overrides, errors that name the key."""

from pathlib import Path

import pytest
import yaml

from ldmkit.config import Config, ConfigError, from_dict, load_config, to_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_required_overrides_work():
    cfg = load_config(None, ["model.name=dit-b/4", "train.steps=123", "train.batch_size=7",
                             "run.dir=/tmp/somewhere", "seed=5"])
    assert cfg.model.name == "dit-b/4"
    assert cfg.train.steps == 123 and isinstance(cfg.train.steps, int)
    assert cfg.train.batch_size == 7
    assert cfg.run.dir == "/tmp/somewhere"
    assert cfg.seed == 5


def test_values_are_parsed_and_typed():
    cfg = load_config(None, ["train.lr=3e-4", "train.betas=[0.9,0.99]", "train.ema_warmup=true",
                             "data.shapes.colours=red,blue", "train.precision=bf16",
                             "train.steps=1e3", "model.depth=3", "model.depth=null"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.betas == (0.9, 0.99)
    assert cfg.train.ema_warmup is True
    assert cfg.data.shapes.colours == ["red", "blue"]
    assert cfg.train.steps == 1000 and isinstance(cfg.train.steps, int)
    assert cfg.model.depth is None


@pytest.mark.parametrize("override,names", [
    ("train.step=10", ["train.steps"]),
    ("trian.steps=10", ["train.steps"]),
    ("model.nmae=dit-b/4", ["model.name"]),
    ("batch_size=4", ["train.batch_size"]),
])
def test_unknown_key_names_the_key_and_the_closest_valid_keys(override, names):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    msg = str(err.value)
    assert repr(override.split("=")[0]) in msg
    for name in names:
        assert repr(name) in msg


@pytest.mark.parametrize("override,fragment", [
    ("train.steps=ten", "expected int"),
    ("train.steps=1.5", "expected int"),
    ("train.lr=fast", "expected float"),
    ("train.ema_warmup=maybe", "expected bool"),
    ("train.precision=fp8", "'fp32'"),
    ("train.betas=[0.9]", "expected 2 values"),
    ("train", "key=value"),
    ("train=3", "is a section"),
    ("train.steps=0", "must be > 0"),
    ("model.name=dit-q/4", "did you mean"),
])
def test_bad_values_fail_with_the_key_named(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert fragment in str(err.value)
    key = override.split("=")[0]
    if key != "train" or "=" in override:
        assert key in str(err.value)


def test_yaml_recipe_unknown_key_and_type_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stpes: 10\n")
    with pytest.raises(ConfigError, match=r"'train\.stpes'.*'train\.steps'"):
        load_config(bad)
    bad.write_text("model:\n  depth: deep\n")
    with pytest.raises(ConfigError, match=r"'model\.depth': expected int"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_recipe_names_only_what_differs_and_overrides_win(tmp_path):
    recipe = tmp_path / "small.yaml"
    recipe.write_text("train:\n  steps: 50\n  lr: 0.001\n")
    cfg = load_config(recipe, ["train.lr=0.002"])
    assert cfg.train.steps == 50 and cfg.train.lr == 0.002
    assert cfg.train.batch_size == Config().train.batch_size  # untouched default
    assert cfg.run.name == "small"  # named after the recipe file


def test_round_trip_through_dict_and_yaml(tmp_path):
    cfg = load_config(None, ["train.betas=[0.8,0.9]", "data.shapes.colours=[red,green]"])
    again = from_dict(yaml.safe_load(yaml.safe_dump(to_dict(cfg))))
    assert again == cfg


@pytest.mark.parametrize("recipe", sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml")
                                           if p.parent.name != "ablations"))
def test_shipped_recipes_load(recipe):
    load_config(CONFIGS / recipe)


def test_model_options_may_not_shadow_model_keys_or_data():
    with pytest.raises(ConfigError, match=r"'model.options.qk_norm': set it as model.qk_norm"):
        load_config(None, ["model.options={qk_norm: true}"])
    with pytest.raises(ConfigError, match=r"'model.options.num_classes': comes from the data"):
        load_config(None, ["model.options={num_classes: 3}"])
    assert load_config(None, ["model.name=mmdit-tiny/2", "model.options={class_tokens: 2}"]).model.options == {
        "class_tokens": 2}


def test_control_options_are_a_typed_section_and_old_configs_are_read_into_it(tmp_path):
    from ldmkit.train.trainer import Trainer

    cfg = load_config(None, ["cond.control.gate=constant", "cond.control.alpha=2", "cond.control.high=[flip]"])
    assert cfg.cond.control.model_options() == {"control_high": ["flip"], "control_gate": "constant",
                                                "control_alpha": 2.0}
    old = load_config(None, ["model.options.control_gate=constant"])  # the layout before cond.control
    assert old.cond.control.gate == "constant" and "control_gate" not in old.model.options
    saved = to_dict(load_config(None))
    saved["model"]["options"] = {"control_low": ["orig_size"]}
    del saved["cond"]["control"]
    assert from_dict(saved).cond.control.low == ["orig_size"]
    with pytest.raises(ConfigError, match="cond.control.gate.*contradicts model.options.control_gate"):
        load_config(None, ["cond.control.gate=cosine", "model.options.control_gate=none"])
    with pytest.raises(ConfigError, match="cond.control.high.*'size' is not a control field"):
        load_config(None, ["cond.control.high=[size]"])
    # the typed keys reach the model
    trainer = Trainer(load_config(None, [
        "data.image_size=16", "model.name=dit-tiny/4", "train.steps=1", "train.batch_size=4",
        "cond.control.high=[crop,flip]", "cond.control.low=[orig_size]", "cond.control.gate=constant",
        f"run.dir={tmp_path / 'run'}"]), progress=False)
    kw = trainer.model.init_kwargs
    assert (kw["control_high"], kw["control_low"], kw["control_gate"]) == (["crop", "flip"], ["orig_size"], "constant")
