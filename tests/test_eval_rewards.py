"""Rewards: JPEG (RLCM definition), brightness, the digits classifier, the aesthetic predictor's loading path."""
import io
import sys
import types

import numpy as np
import pytest
import torch

from cmgen.errors import UserError
from cmgen.eval.rewards import REWARDS, build_reward, jpeg_kilobytes, linear_stack_from_state
from conftest import PickleExploit


def _images():
    g = np.random.default_rng(0)
    flat = np.full((2, 32, 32, 3), 120, np.uint8)
    noisy = g.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    return flat, noisy


def test_jpeg_size_is_pil_quality_95_in_kilobytes():
    from PIL import Image

    _, noisy = _images()
    buf = io.BytesIO()
    Image.fromarray(noisy[0]).save(buf, format="JPEG", quality=95)
    assert jpeg_kilobytes(noisy[:1])[0] == pytest.approx(len(buf.getvalue()) / 1000)


def test_compressibility_prefers_flat_images_and_is_minus_incompressibility():
    flat, noisy = _images()
    comp, incomp = build_reward("jpeg-compressibility"), build_reward("jpeg_incompressibility")
    assert comp.fn(flat).min() > comp.fn(noisy).max()
    np.testing.assert_allclose(comp.fn(noisy), -incomp.fn(noisy))
    assert (incomp.fn(noisy) > 0).all()


def test_jpeg_rewards_enlarge_small_images_so_an_8x8_digits_size_follows_its_content():
    """At 8x8 a digit is one JPEG block, nearly all header (about 0.394 kB for every digit); the registry's JPEG
    rewards enlarge small images first, so digits' sizes spread and follow the image (the RG-LCD LRM's expert)."""
    import torch

    from cmgen.data import load_digits
    from cmgen.rewards import build_reward as registry_reward
    from cmgen.rewards.jpeg import jpeg_kb

    x = load_digits().x[:200]
    r = registry_reward("jpeg-compressibility", "--reward")(x, None)
    assert r.std() > 0.03
    torch.testing.assert_close(r, -jpeg_kb(x).double())
    blank = -torch.ones(1, 1, 8, 8)
    assert r.max() < registry_reward("jpeg-compressibility", "--reward")(blank, None)[0]


def test_brightness():
    r = build_reward("brightness")
    np.testing.assert_allclose(r.fn(np.zeros((1, 4, 4, 1), np.uint8)), [0.0])
    np.testing.assert_allclose(r.fn(np.full((1, 4, 4, 3), 255, np.uint8)), [1.0])


def test_digit_class_reward_follows_the_true_class():
    from cmgen.data import load_digits
    from cmgen.plots import to_uint8

    d = load_digits()
    threes, sevens = to_uint8(d.x[d.labels == 3][:20]), to_uint8(d.x[d.labels == 7][:20])
    r3 = build_reward("digit-class", target_class=3)
    assert r3.fn(threes).mean() > 0.9 and r3.fn(sevens).mean() < 0.1
    top = build_reward("digit-class").fn(threes)
    assert ((top >= r3.fn(threes) - 1e-12) & (top <= 1)).all()
    with pytest.raises(UserError, match="--target-class"):
        build_reward("digit-class", target_class=12)


def test_unknown_reward_names_the_valid_ones():
    with pytest.raises(UserError) as err:
        build_reward("prettiness")
    for name in REWARDS:
        assert name in str(err.value)


def test_aesthetic_without_weights_is_one_clear_sentence(monkeypatch):
    monkeypatch.delenv("CMGEN_AESTHETIC", raising=False)
    with pytest.raises(UserError) as err:
        build_reward("aesthetic")
    assert "--aesthetic" in str(err.value) and "\n" not in str(err.value)


def _tiny_aesthetic(monkeypatch, tmp_path):
    """(the aesthetic reward on a stand-in `clip` package, its head's state dict, the stand-in's projection,
    the head applied to embeddings in float64)."""
    # LAION's head: Linear layers at indices 0, 2, 4, 6, 7 (dropouts between), no activations
    g = torch.Generator().manual_seed(0)
    dims = [(6, 5), (5, 4), (4, 3), (3, 2), (2, 1)]
    state = {}
    for idx, (i, o) in zip((0, 2, 4, 6, 7), dims):
        state[f"layers.{idx}.weight"] = torch.randn(o, i, generator=g)
        state[f"layers.{idx}.bias"] = torch.randn(o, generator=g)
    head_file = tmp_path / "head.pth"
    torch.save(state, head_file)
    clip_file = tmp_path / "ViT-L-14.pt"
    clip_file.write_bytes(b"stand-in")
    torch.manual_seed(0)
    proj = torch.nn.Linear(3, 6)

    class TinyClip(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = proj

        def encode_image(self, x):
            return self.proj(x.mean((2, 3)))

    def head(emb):
        e = emb.double() / emb.double().norm(dim=-1, keepdim=True)
        for idx in (0, 2, 4, 6, 7):
            e = e @ state[f"layers.{idx}.weight"].double().T + state[f"layers.{idx}.bias"].double()
        return e[:, 0]

    monkeypatch.setitem(sys.modules, "clip", types.SimpleNamespace(load=lambda *a, **k: (TinyClip(), None)))
    return build_reward("aesthetic", aesthetic=str(head_file), clip=str(clip_file)), proj, head


def test_aesthetic_head_on_clip_embeddings(monkeypatch, tmp_path):
    r, proj, head = _tiny_aesthetic(monkeypatch, tmp_path)
    flat, noisy = _images()
    got = r.fn(noisy)
    from cmgen.eval.features import clip_preprocess

    with torch.no_grad():   # evaluation: clean-fid's uint8 CLIP input, as before the training path had gradients
        want = head(proj(clip_preprocess(noisy).mean((2, 3))))
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)
    deep = {"net.10.weight": torch.zeros(1, 3), "net.2.weight": torch.zeros(3, 7)}
    assert [w.shape[1] for w, _ in linear_stack_from_state(deep)] == [7, 3]  # numeric order: 2 before 10


def test_aesthetic_is_differentiable_through_float_clip_preprocessing(monkeypatch, tmp_path):
    """Training (RG-LCD's direct mode) scores float images: clip_input's float resize, crop and normalisation,
    CLIP, the unit norm and the head; its gradient agrees with central finite differences."""
    from cmgen.eval.features import clip_preprocess
    from cmgen.rewards.weights import clip_input

    r, proj, head = _tiny_aesthetic(monkeypatch, tmp_path)
    assert r.differentiable and REWARDS["aesthetic"].differentiable
    _, noisy = _images()
    x = torch.from_numpy(noisy).permute(0, 3, 1, 2).float() / 127.5 - 1
    x = (x * 0.8).requires_grad_(True)   # inside [-1, 1]: the clamp passes gradients
    got = r(x)
    with torch.no_grad():
        want = head(proj(clip_input(x).mean((2, 3))))
        uint8_path = head(proj(clip_preprocess(noisy).mean((2, 3))))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got.double(), uint8_path, atol=1e-6)   # the float path: no uint8 round trip
    got.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    h = 1e-2
    with torch.no_grad():
        fd = (r(x + h * v).double() - r(x - h * v).double()).sum() / (2 * h)
    assert (x.grad * v).sum().item() == pytest.approx(fd.item(), rel=1e-2, abs=1e-4)


@pytest.mark.parametrize("name, option", [("aesthetic", "--aesthetic"), ("hpsv2.1", "--hpsv21")])
def test_reward_weights_that_need_unpickling_are_refused_not_executed(name, option, tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "weights.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "config": PickleExploit(marker)}, bad)
    (tmp_path / "clip.pt").write_bytes(b"stand-in")
    kwargs = {"aesthetic": {"aesthetic": str(bad), "clip": str(tmp_path / "clip.pt")}, "hpsv2.1": {"hpsv21": str(bad)}}
    with pytest.raises(UserError) as err:
        build_reward(name, **kwargs[name])
    msg = str(err.value)
    assert not marker.exists(), "the pickle was executed"
    assert option in msg and "never pickled objects" in msg and "\n" not in msg
    # a plain state dict gets past the weights (hpsv2.1 then needs open_clip, which is not installed here)
    good = tmp_path / "plain.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, good)
    from cmgen.rewards.weights import load_state_dict

    assert torch.equal(load_state_dict(good, option, "fix")["state_dict"]["w"], torch.zeros(2))
