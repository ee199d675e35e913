"""Every architecture takes control metadata through its timestep/adaLN path (docs/method.md §3), with the
time gate, control dropout and the zero-initialised start that transfer relies on."""

import pytest
import torch

from ldmkit.conditioning import Conditioning
from ldmkit.models import build_model, model_from_config
from ldmkit.sampling import default_control

ARCHS = {  # name -> extra build arguments
    "dit-tiny/2": {},
    "mdt-tiny/2": {},
    "pixart-tiny/2": {},
    "mmdit-tiny/2": {},
    "mmdit-improved-tiny/2": {},
    "unet-tiny": {"model_channels": 16},
}
CONTROL = dict(control_high=["crop", "flip"], control_low=["orig_size"])


def build(name, seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(name, in_channels=3, input_size=8, num_classes=4, **{**ARCHS[name], **kw}).eval()


def perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def cond(orig=(16, 16), crop=(0, 0), flip=False, dropped=None, n=2):
    return Conditioning(class_ids=torch.arange(n) % 4, control=default_control(n, 8, orig, crop, flip),
                        control_dropped=dropped)


@pytest.mark.parametrize("name", list(ARCHS))
def test_control_reaches_the_output_through_the_gated_path(name):
    model = perturb(build(name, **CONTROL, control_gate="cosine"))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        for t in (0.0, 0.5):
            tt = torch.full((2,), t)
            base = model(x, tt, cond())
            assert not torch.allclose(base, model(x, tt, cond(flip=True)), atol=1e-5)  # high group
            assert not torch.allclose(base, model(x, tt, cond(orig=(64, 48))), atol=1e-5)  # low group
        # at t = 1 the cosine gate is exactly 0: the size condition cannot act, the crop still does
        t1 = torch.ones(2)
        base = model(x, t1, cond())
        torch.testing.assert_close(model(x, t1, cond(orig=(64, 48))), base, rtol=0, atol=0)
        assert not torch.allclose(base, model(x, t1, cond(crop=(3, 5))), atol=1e-5)


@pytest.mark.parametrize("name", list(ARCHS))
def test_constant_gate_lets_the_size_act_at_every_noise_level(name):
    model = perturb(build(name, **CONTROL, control_gate="constant"))
    x, t1 = torch.randn(2, 3, 8, 8), torch.ones(2)
    with torch.no_grad():
        assert not torch.allclose(model(x, t1, cond()), model(x, t1, cond(orig=(64, 48))), atol=1e-5)


@pytest.mark.parametrize("name", list(ARCHS))
def test_dropped_control_equals_missing_metadata_and_init_is_a_no_op(name):
    model = perturb(build(name, **CONTROL))
    x, t = torch.randn(2, 3, 8, 8), torch.full((2,), 0.3)
    with torch.no_grad():
        dropped = model(x, t, cond(orig=(40, 40), flip=True, dropped=torch.tensor([True, False])))
        missing = model(x, t, Conditioning(class_ids=torch.arange(2)))
        full = model(x, t, cond(orig=(40, 40), flip=True))
    torch.testing.assert_close(dropped[0], missing[0])
    torch.testing.assert_close(dropped[1], full[1])
    # freshly built, the control embedder outputs 0: the model computes what the same model without
    # control computes (so adding control to a pre-trained model starts from its function)
    fresh, bare = build(name, **CONTROL), build(name, control_high=[], control_low=[])
    bare = perturb(bare, seed=3)
    state = {k: v for k, v in bare.state_dict().items()}
    missing_keys, unexpected = fresh.load_state_dict(state, strict=False)
    assert all(k.startswith("control_embedder.") for k in missing_keys) and not unexpected
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, cond(orig=(40, 40), flip=True)), bare(x, t, cond()))


@pytest.mark.parametrize("name", list(ARCHS))
def test_control_options_survive_a_rebuild(name):
    model = build(name, control_high=["flip"], control_low=["orig_size"], control_gate="constant", control_alpha=2.0)
    kw = model.init_kwargs
    assert (kw["control_high"], kw["control_low"], kw["control_gate"], kw["control_alpha"]) == (
        ["flip"], ["orig_size"], "constant", 2.0)
    rebuilt = model_from_config({"arch": model.arch, **kw})
    assert set(rebuilt.state_dict()) == set(model.state_dict())


def test_published_architectures_have_no_control_path_by_default_and_the_improved_one_has():
    for name in ARCHS:
        model = build(name)
        has = model.control_embedder is not None
        assert has == (name.startswith("mmdit-improved")), name
    improved = build("mmdit-improved-tiny/2")
    assert improved.init_kwargs["control_high"] == ["crop", "flip", "aspect"]
    assert improved.init_kwargs["control_low"] == ["orig_size"] and improved.init_kwargs["control_gate"] == "cosine"


def test_bad_control_options_are_named():
    with pytest.raises(ValueError, match="control field 'size'"):
        build("dit-tiny/2", control_high=["size"])
    with pytest.raises(ValueError, match="control gate 'linear'"):
        build("dit-tiny/2", control_low=["orig_size"], control_gate="linear")
    assert build("dit-tiny/2", control_low=["orig_size"], control_gate="none").control_embedder is None


def test_models_with_a_control_path_do_not_convert_to_diffusers():
    from ldmkit.models.convert import to_diffusers

    with pytest.raises(ValueError, match="control embedder"):
        to_diffusers(build("dit-tiny/2", **CONTROL))
