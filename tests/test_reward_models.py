"""The CLIP-family rewards on a tiny CLIP model saved here (transformers' own CLIPModel is the oracle):
CLIP's image input, PickScore's logit / 26 and CLIPScore's 100 max(cos, 0)."""
import types

import numpy as np
import pytest
import torch

from cmgen.errors import UserError
from cmgen.rewards import build_reward

transformers = pytest.importorskip("transformers")

PROMPTS = ["a red square", "the digit seven", "noise", "a blue circle"]
SEED = 1   # a draw whose four image-prompt cosines have both signs (the CLIPScore test asserts it)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A CLIPModel folder with CLIP's layout (224 input, a byte-level BPE tokenizer) but tiny random towers."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from cmgen.sd import tiny_text_config, tiny_tokenizer_files

    folder = tmp_path_factory.mktemp("clip")
    tiny_tokenizer_files(folder)
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    tok.save_pretrained(str(folder))
    torch.manual_seed(SEED)
    cfg = CLIPConfig(
        text_config=tiny_text_config(tok),
        vision_config=dict(image_size=224, patch_size=32, hidden_size=32, intermediate_size=64,
                           num_attention_heads=4, num_hidden_layers=2),
        projection_dim=16, logit_scale_init_value=float(np.log(60.0)))
    CLIPModel(cfg).eval().save_pretrained(str(folder), safe_serialization=True)
    return folder


def images(n=4):
    """Smooth RGB images 24x40 in [-1, 1], one per prompt (not square: the crop is visible)."""
    g = torch.Generator().manual_seed(3)
    low = torch.rand(n, 3, 3, 5, generator=g)
    return torch.nn.functional.interpolate(low, size=(24, 40), mode="bilinear", align_corners=True) * 2 - 1


def oracle(folder, x, prompts):
    """transformers' CLIPModel forward on clip_input(x): (logits_per_image diagonal, cosine of the pairs)."""
    from transformers import AutoTokenizer, CLIPModel

    from cmgen.rewards.weights import clip_input

    model, tok = CLIPModel.from_pretrained(str(folder)).eval(), AutoTokenizer.from_pretrained(str(folder))
    ids = tok(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=ids.input_ids, attention_mask=ids.attention_mask, pixel_values=clip_input(x))
    return out.logits_per_image.diagonal(), (out.image_embeds * out.text_embeds).sum(-1)


def test_clip_input_is_clips_image_processor_bicubic_shortest_side_and_centre_crop():
    from transformers import CLIPImageProcessor

    from cmgen.rewards.weights import clip_input

    x = images(2)
    uint8 = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    proc = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    ref = torch.from_numpy(proc(images=list(uint8), return_tensors="np")["pixel_values"])
    got = clip_input(x)
    assert got.shape == ref.shape == (2, 3, 224, 224)
    # PIL's bicubic (a = -0.5) on uint8 against torch's (a = -0.75) on floats: close, not equal
    assert (got - ref).abs().max() < 0.03 and (got - ref).abs().mean() < 0.01
    grey = clip_input(x[:, :1])                                      # one channel is repeated to RGB
    assert torch.allclose(grey, clip_input(x[:, :1].expand(-1, 3, -1, -1)))


def test_pickscore_is_clips_logit_over_26(tiny_clip):
    x = images()
    r = build_reward("pickscore", pickscore=str(tiny_clip))
    logits, cos = oracle(tiny_clip, x, PROMPTS)
    got = r(x, PROMPTS)
    assert got.shape == (4,)
    torch.testing.assert_close(got, logits / 26.0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, 60.0 * cos / 26.0, rtol=1e-4, atol=1e-5)   # logit_scale is stored as a log


def test_clipscore_is_100_times_the_positive_part_of_the_cosine(tiny_clip, monkeypatch):
    monkeypatch.setenv("CMGEN_CLIPSCORE", str(tiny_clip))
    x = images()
    r = build_reward("clipscore")
    _, cos = oracle(tiny_clip, x, PROMPTS)
    assert (cos < 0).any() and (cos > 0).any(), "the draw should give cosines of both signs"
    torch.testing.assert_close(r(x, PROMPTS), 100 * cos.clamp(min=0), rtol=1e-4, atol=1e-4)


def test_prompted_rewards_need_one_prompt_per_image(tiny_clip):
    r = build_reward("pickscore", pickscore=str(tiny_clip))
    for cond in (None, PROMPTS[:3], torch.zeros(4)):
        with pytest.raises(UserError, match="one prompt per image"):
            r(images(), cond)


class TinyOpenClip(torch.nn.Module):
    """open_clip's CLIP API (encode_image / encode_text with normalize=, logit_scale stored as a log)."""

    def __init__(self):
        super().__init__()
        self.visual = torch.nn.Linear(3, 5)
        self.text = torch.nn.Embedding(64, 5)
        self.logit_scale = torch.nn.Parameter(torch.tensor(float(np.log(73.0))))

    def _out(self, e, normalize):
        return e / e.norm(dim=-1, keepdim=True) if normalize else e

    def encode_image(self, x, normalize=False):
        return self._out(self.visual(x.mean((2, 3))), normalize)

    def encode_text(self, ids, normalize=False):
        return self._out(self.text(ids).mean(1), normalize)


def open_clip_tokenizer(name):
    return lambda prompts: torch.tensor([[len(p) % 64, ord(p[0]) % 64] for p in prompts])


@pytest.fixture
def fake_hps(tmp_path, monkeypatch):
    """open_clip is not installed here: a stand-in module with its API (create_model_and_transforms,
    get_tokenizer) and an HPSv2.1 file of the stand-in's trained weights. Returns (file, what was made)."""
    import sys
    import types

    made = {}

    def create(name, pretrained=None, device="cpu"):
        made["name"], made["pretrained"] = name, pretrained
        made["model"] = TinyOpenClip()
        return made["model"], None, None

    monkeypatch.setitem(sys.modules, "open_clip", types.SimpleNamespace(
        create_model_and_transforms=create, get_tokenizer=open_clip_tokenizer))
    torch.manual_seed(2)
    made["trained"] = TinyOpenClip().state_dict()
    weights = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": made["trained"]}, weights)                # HPSv2's layout: the weights under state_dict
    return weights, made


def test_hpsv21_reads_the_checkpoints_state_dict_into_vit_h14_and_scores_the_normalised_cosine(fake_hps):
    from cmgen.rewards.weights import clip_input

    weights, made = fake_hps
    r = build_reward("hpsv2.1", hpsv21=str(weights))
    assert made["name"] == "ViT-H-14" and made["pretrained"] is None  # no download: the file's weights only
    assert all(torch.equal(made["model"].state_dict()[k], v) for k, v in made["trained"].items())
    x = images()
    with torch.no_grad():
        img = made["model"].visual(clip_input(x).mean((2, 3)))
        txt = made["model"].text(open_clip_tokenizer("ViT-H-14")(PROMPTS)).mean(1)
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    torch.testing.assert_close(r(x, PROMPTS), cos, rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match="one prompt per image"):
        r(x, PROMPTS[:2])
    # RG-LCD's expert logits: the checkpoint's logit_scale (a log) exponentiated, times the cosine
    assert r.logit_scale == pytest.approx(73.0, rel=1e-6)


def test_pickscores_logit_scale_turns_its_score_back_into_the_clip_logit(tiny_clip):
    r = build_reward("pickscore", pickscore=str(tiny_clip))
    x = images()
    logits, _ = oracle(tiny_clip, x, PROMPTS)
    torch.testing.assert_close(r.logit_scale * r(x, PROMPTS), logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["pickscore", "clipscore"])
def test_rglcd_trains_on_the_bare_clip_cosine_with_the_models_logit_scale(tiny_clip, monkeypatch, name):
    """RG-LCD's PickScore and CLIPScore (reward_fn.py) are the bare cosine, in direct mode and as the LRM's
    expert, whose preference logits are the model's logit scale x cos; the registry's (cmgen eval reward, AWM)
    stay logit / 26 and 100 max(cos, 0)."""
    from cmgen.rewards.differentiable import build_reward as rglcd_reward

    monkeypatch.setenv(f"CMGEN_{name.upper()}", str(tiny_clip))
    x = images().requires_grad_(True)
    logits, cos = oracle(tiny_clip, x.detach(), PROMPTS)
    for differentiable in (True, False):
        r = rglcd_reward(name, differentiable=differentiable)
        torch.testing.assert_close(r(x, PROMPTS), cos, rtol=1e-4, atol=1e-5)
        assert r.logit_scale == pytest.approx(60.0, rel=1e-5)
    torch.testing.assert_close(r.logit_scale * r(x, PROMPTS), logits, rtol=1e-4, atol=1e-4)
    r(x, PROMPTS).sum().backward()
    assert (x.grad.abs().sum((1, 2, 3)) > 0).all(), "every image's cosine has a gradient, negative ones too"
    registry = build_reward(name)(x, PROMPTS)
    assert not torch.allclose(registry, cos, atol=1e-3)


def test_a_weight_backed_reward_scores_where_its_network_is(fake_hps, fake_imagereward):
    """A training loop moves Reward.module (Method.frozen); the score follows it (meta stands in for a GPU),
    ImageReward's own device attribute included."""
    weights, _ = fake_hps
    x = images()
    for r in (build_reward("hpsv2.1", hpsv21=str(weights)), build_reward("imagereward", imagereward=str(fake_imagereward)),
              build_reward("hpsv2.1+0.1imagereward", hpsv21=str(weights), imagereward=str(fake_imagereward))):
        assert r(x, PROMPTS).device.type == "cpu"
        r.module.to("meta")
        assert r(x, PROMPTS).device.type == "meta", r.name


class TinyImageReward(torch.nn.Module):
    """ImageReward's API: blip.tokenizer, score_gard(ids, mask, image) -> [B, 1], and its device kept in an
    attribute that score_gard reads (as the package's)."""

    def __init__(self, device="cpu"):
        super().__init__()
        self.device = device
        self.w = torch.nn.Parameter(torch.tensor([1.0, 10.0, 1.0]))
        self.blip = types.SimpleNamespace(tokenizer=self.tokenize)

    @staticmethod
    def tokenize(prompts, padding, truncation, max_length, return_tensors):
        ids = torch.tensor([[ord(c) % 50 for c in p.ljust(max_length)[:max_length]] for p in prompts])
        return transformers.BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)})

    def score_gard(self, ids, mask, image):
        atts = torch.ones(len(image), 1, dtype=torch.long).to(self.device)
        return (image.mean((2, 3)) * self.w).sum(1, keepdim=True) * atts + ids.float().mean(1, keepdim=True) / 100


@pytest.fixture
def fake_imagereward(tmp_path, monkeypatch):
    """The image-reward package is not installed here: a stand-in `ImageReward.load`; returns the .pt path."""
    import sys

    folder = tmp_path / "imagereward"
    folder.mkdir()
    (folder / "ImageReward.pt").write_bytes(b"weights")
    (folder / "med_config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "ImageReward", types.SimpleNamespace(
        load=lambda path, device="cpu", med_config=None: TinyImageReward(device)))
    return folder / "ImageReward.pt"


def test_rglcd_trains_on_imagereward_capped_at_2_and_evaluation_reads_the_raw_score(fake_imagereward, monkeypatch):
    """RG-LCD's ImageReward is -relu(2 - r) = min(r, 2) (reward_fn.py), direct and as the LRM's expert; the
    registry's `imagereward` (cmgen eval reward) stays the raw score."""
    from cmgen.rewards.differentiable import build_reward as rglcd_reward
    from cmgen.rewards.weights import clip_input

    monkeypatch.setenv("CMGEN_IMAGEREWARD", str(fake_imagereward))
    raw = build_reward("imagereward")
    x = images().requires_grad_(True)
    r = raw(x, PROMPTS)
    ids = TinyImageReward.tokenize(PROMPTS, "max_length", True, 35, "pt").input_ids
    want = (clip_input(x).mean((2, 3)) * torch.tensor([1.0, 10.0, 1.0])).sum(1) + ids.float().mean(1) / 100
    torch.testing.assert_close(r, want)
    assert (r > 2).any() and (r < 2).any(), "the draw should score on both sides of the cap"
    for differentiable in (True, False):
        capped = rglcd_reward("imagereward", differentiable=differentiable)
        torch.testing.assert_close(capped(x, PROMPTS), r.clamp(max=2.0))
    x.grad = None
    capped(x, PROMPTS).sum().backward()
    above = (r > 2).detach()
    assert (x.grad[above] == 0).all() and (x.grad[~above].abs().sum((1, 2, 3)) > 0).all()
    u8 = ((x.detach() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert (raw.fn(u8, PROMPTS) > 2).any()                            # evaluation: uncapped


def test_hps_plus_a_tenth_of_capped_imagereward_is_rglcds_weighted_reward(fake_hps, fake_imagereward):
    weights, _ = fake_hps
    r = build_reward("hpsv2.1+0.1imagereward", hpsv21=str(weights), imagereward=str(fake_imagereward))
    assert r.differentiable and r.needs_condition
    x = images()
    hps = build_reward("hpsv2.1", hpsv21=str(weights))(x, PROMPTS)
    ir = build_reward("imagereward", imagereward=str(fake_imagereward))(x, PROMPTS)
    assert (ir > 2).any()
    torch.testing.assert_close(r(x, PROMPTS), hps + 0.1 * ir.clamp(max=2.0))


def test_hpsv21_without_open_clip_is_one_sentence_naming_the_extra(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "open_clip", None)               # import open_clip raises ImportError
    weights = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, weights)
    with pytest.raises(UserError) as err:
        build_reward("hpsv2.1", hpsv21=str(weights))
    assert "cmgen[hps]" in str(err.value) and "\n" not in str(err.value)

def test_imagereward_needs_its_checkpoint_file_and_med_config_beside_it(tmp_path):
    for given in (tmp_path, tmp_path / "ImageReward.pt"):            # a folder; the file without med_config.json
        (tmp_path / "ImageReward.pt").write_bytes(b"weights")
        with pytest.raises(UserError) as err:
            build_reward("imagereward", imagereward=str(given))
        assert "med_config.json" in str(err.value) and "\n" not in str(err.value)
