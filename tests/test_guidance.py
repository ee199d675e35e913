"""Two-scale classifier-free guidance (docs/method.md §5), checked against the formula evaluated branch by branch
with separate model calls."""

import pytest
import torch

from ldmkit.conditioning import NULL_CLASS, Conditioning
from ldmkit.diffusion.guidance import guided_velocity
from ldmkit.models import build_model
from ldmkit.sampling import SampleSettings, conditions_for, default_control, generate


def model_and_cond(seed=0):
    torch.manual_seed(seed)
    model = build_model("mmdit-improved-tiny/2", in_channels=3, input_size=8, num_classes=5).eval()
    with torch.no_grad():  # non-zero everywhere: zero-initialised layers would hide the control path
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    control = default_control(3, 8, orig_size=(24, 32), crop=(1, 2), flip=True)
    return model, Conditioning(class_ids=torch.tensor([0, 3, 4]), control=control)


class Counting(torch.nn.Module):
    """Records the batch size of every call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x, t, cond):
        self.calls.append(x.shape[0])
        return self.model(x, t, cond)


def test_three_branch_formula_matches_separate_calls():
    model, cond = model_and_cond()
    x, t = torch.randn(3, 3, 8, 8), torch.full((3,), 0.4)
    w_sem, w_ctrl = 2.5, 1.7
    with torch.no_grad():
        null = cond.drop_semantic()
        u = model(x, t, null.drop_control())
        cc = model(x, t, null)
        cf = model(x, t, cond)
        expected = u + w_ctrl * (cc - u) + w_sem * (cf - cc)
        counting = Counting(model)
        got = guided_velocity(counting, cond, w_sem, control_guidance=w_ctrl)(x, t)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert counting.calls == [9]  # one forward of 3 branches
    # the three branches differ: the control and the class both matter
    assert not torch.allclose(u, cc, atol=1e-4) and not torch.allclose(cc, cf, atol=1e-4)


def test_unit_control_scale_is_ordinary_guidance():
    """w_ctrl = 1: u + (cc - u) + w (cf - cc) = cc + w (cf - cc), ordinary CFG with the control kept in both
    branches, computed with two branches."""
    model, cond = model_and_cond(1)
    x, t = torch.randn(3, 3, 8, 8), torch.full((3,), 0.6)
    with torch.no_grad():
        counting = Counting(model)
        two = guided_velocity(counting, cond, 3.0, control_guidance=1.0)(x, t)
        three = guided_velocity(model, cond, 3.0, control_guidance=1.0, force_three=True)(x, t)
        cc, cf = model(x, t, cond.drop_semantic()), model(x, t, cond)
    assert counting.calls == [6]
    torch.testing.assert_close(two, cc + 3.0 * (cf - cc), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(three, two, rtol=1e-5, atol=1e-5)


def test_no_guidance_is_one_conditional_call_and_interval_falls_back_to_it():
    model, cond = model_and_cond(2)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        counting = Counting(model)
        plain = guided_velocity(counting, cond, 1.0)(x, torch.full((3,), 0.5))
        assert counting.calls == [3]
        torch.testing.assert_close(plain, model(x, torch.full((3,), 0.5), cond))
        v = guided_velocity(model, cond, 4.0, (0.2, 0.7), control_guidance=2.0)
        t = torch.tensor([0.1, 0.5, 0.9])
        out = v(x, t)
        cf = model(x, t, cond)
        full = guided_velocity(model, cond, 4.0, control_guidance=2.0)(x, t)
    torch.testing.assert_close(out[[0, 2]], cf[[0, 2]])  # outside the interval: conditional only
    torch.testing.assert_close(out[1], full[1])


def test_text_guidance_needs_the_null_prompt():
    cond = Conditioning(text=torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match="uncond"):
        guided_velocity(lambda x, t, c: x, cond, 3.0)


def test_generate_noise_depends_on_seed_and_index_only():
    model, cond = model_and_cond(3)
    settings = SampleSettings(steps=2, guidance=2.0, control_guidance=1.5)
    a = generate(model, cond, (3, 8, 8), settings, batch_size=3)
    b = generate(model, cond, (3, 8, 8), settings, batch_size=2)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a, generate(model, cond, (3, 8, 8), SampleSettings(steps=2, guidance=2.0), seed=1), atol=1e-3)


def test_default_control_and_conditions_for():
    c = default_control(2, 16)
    assert c["orig_size"].tolist() == [[16.0, 16.0]] * 2 and c["crop"].tolist() == [[0.0, 0.0]] * 2
    assert c["flip"].tolist() == [0.0, 0.0] and c["aspect"].tolist() == [1.0, 1.0]
    c = default_control(1, 16, orig_size=(48, 64), crop=(3, 4), flip=True)
    assert c["orig_size"].tolist() == [[48.0, 64.0]] and c["crop"].tolist() == [[3.0, 4.0]] and c["flip"].item() == 1
    with pytest.raises(ValueError, match="orig_size"):
        default_control(1, 16, orig_size=(0, 16))
    cond, uncond = conditions_for(c, class_ids=torch.tensor([2]))
    assert uncond is None and cond.control is c
    with pytest.raises(ValueError, match="exactly one"):
        conditions_for(c)
    with pytest.raises(ValueError, match="text conditioner"):
        conditions_for(c, prompts=["a"])


def test_control_dropped_rows_concatenate_with_undropped_ones():
    a = Conditioning(class_ids=torch.tensor([1, 2]))
    b = Conditioning(class_ids=torch.tensor([NULL_CLASS])).drop_control()
    both = Conditioning.cat([a, b])
    assert both.control_dropped.tolist() == [False, False, True]
