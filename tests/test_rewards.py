"""The shared rewards registry: flags that tell the truth, conditioning, the evaluation path, weights missing."""
import numpy as np
import pytest
import torch

from cmgen.errors import UserError
from cmgen.rewards import REWARDS, build_reward

OFFLINE = ["jpeg-compressibility", "jpeg-incompressibility", "brightness", "digit-class"]
WEIGHTED = {"aesthetic": "CMGEN_AESTHETIC", "pickscore": "CMGEN_PICKSCORE", "hpsv2.1": "CMGEN_HPSV21",
            "imagereward": "CMGEN_IMAGEREWARD", "clipscore": "CMGEN_CLIPSCORE"}


def digits(n=12):
    from cmgen.data import load_digits

    d = load_digits()
    return d.x[:n].clone(), d.labels[:n].clone()


@pytest.mark.parametrize("name", OFFLINE)
def test_differentiable_flag_says_whether_gradients_reach_the_images(name):
    x, y = digits()
    x = x.clone().requires_grad_(True)
    r = build_reward(name)
    out = r(x, y if r.needs_condition else None)
    assert out.shape == (len(x),)
    if r.differentiable:
        out.sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
    else:
        assert not out.requires_grad


def test_digit_class_scores_the_conditioning_class():
    from cmgen.eval import digits_net as dn

    x, y = digits(40)
    r = build_reward("digit-class")
    assert r.needs_condition and not REWARDS["brightness"].needs_condition
    probs = dn.digits_net()(x).softmax(1)
    assert torch.allclose(r(x, y), probs[torch.arange(len(y)), y], atol=1e-6)
    wrong = (y + 1) % 10
    assert r(x, y).mean() > 0.9 > 0.1 > r(x, wrong).mean()
    # with a fixed target class and no condition, the target's probability (the eval path)
    assert torch.allclose(build_reward("digit-class", target_class=3)(x), probs[:, 3], atol=1e-6)


def test_evaluation_path_on_uint8_equals_the_tensor_path():
    from cmgen.plots import to_uint8

    x, y = digits()
    u8 = to_uint8(x)
    xq = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 127.5 - 1   # the images the uint8 files hold
    for name in OFFLINE:
        r = build_reward(name)
        cond = y if r.needs_condition else None
        np.testing.assert_allclose(r.fn(u8, cond), r(xq, cond).double().numpy(), rtol=1e-5, atol=1e-6)


def test_brightness_is_the_mean_in_unit_range():
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    assert torch.allclose(build_reward("brightness")(x), ((x + 1) / 2).mean((1, 2, 3)))


@pytest.mark.parametrize("name, env", list(WEIGHTED.items()))
def test_weight_backed_rewards_without_weights_say_so_in_one_sentence(name, env, monkeypatch):
    monkeypatch.delenv(env, raising=False)
    with pytest.raises(UserError) as err:
        build_reward(name)
    msg = str(err.value)
    assert env in msg and "download" in msg and "\n" not in msg


def test_unknown_reward_suggests_and_lists():
    with pytest.raises(UserError) as err:
        build_reward("digit_clas", "recipe key 'method.reward'")
    msg = str(err.value)
    assert "method.reward" in msg and "digit-class" in msg and all(n in msg for n in REWARDS)


def test_registration_is_one_line(monkeypatch):
    from cmgen import rewards

    monkeypatch.setitem(rewards.REWARDS, "dummy", rewards.REWARDS["brightness"])
    rewards.register("dummy", "cmgen.rewards.image:brightness", differentiable=False, needs_condition=True, help="t")
    r = build_reward("dummy")
    assert r.name == "dummy" and not r.differentiable and r.needs_condition
