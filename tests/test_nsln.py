"""NsLN (LayerNorm, gamma fixed at 1, learnable beta of shape C x H x W) and the NsLN UNet."""
from __future__ import annotations

import pytest
import torch
from torch import nn

torch.set_num_threads(1)

from cmgen.errors import UserError  # noqa: E402
from cmgen.models.nsln import NsLN, NsLNUNet2DModel  # noqa: E402

UNET = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=8, norm_num_groups=8)


def test_nsln_standardises_over_chw_then_adds_beta():
    norm = NsLN((3, 4, 5))
    with torch.no_grad():
        norm.bias.copy_(torch.randn(3, 4, 5))
    x = 3 * torch.randn(2, 3, 4, 5) + 7
    flat = x.flatten(1)
    want = ((flat - flat.mean(1, keepdim=True)) / (flat.var(1, unbiased=False, keepdim=True) + 1e-5).sqrt())
    assert torch.allclose(norm(x), want.view_as(x) + norm.bias, atol=1e-5)
    # the attention blocks' (B, C, H*W) layout gives the same result
    assert torch.allclose(norm(x.flatten(2)), norm(x).flatten(2), atol=1e-6)


def test_nsln_has_trainable_beta_and_no_gamma():
    norm = NsLN((2, 3, 3))
    assert [name for name, _ in norm.named_parameters()] == ["bias"]
    assert norm.bias.requires_grad and torch.equal(norm.bias, torch.zeros(2, 3, 3))
    norm(torch.randn(4, 2, 3, 3)).pow(2).sum().backward()
    assert norm.bias.grad is not None and norm.bias.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="built for"):
        norm(torch.randn(1, 2, 4, 4))


def test_unet_has_no_group_norm_left_and_betas_match_activation_shapes():
    from diffusers import UNet2DModel

    plain = UNet2DModel(**UNET)
    unet = NsLNUNet2DModel(**UNET)
    assert not any(isinstance(m, nn.GroupNorm) for m in unet.modules())
    norms = {n: m for n, m in unet.named_modules() if isinstance(m, NsLN)}
    groups = {n: m for n, m in plain.named_modules() if isinstance(m, nn.GroupNorm)}
    assert norms.keys() == groups.keys()
    assert norms["conv_norm_out"].bias.shape == (16, 8, 8)
    assert norms["mid_block.attentions.0.group_norm"].bias.shape == (32, 4, 4)
    assert norms["down_blocks.1.resnets.0.norm1"].bias.shape == (16, 4, 4)  # after the first downsampler
    # parameters: each GroupNorm's 2C become C*H*W
    delta = sum(m.bias.numel() - 2 * groups[n].num_channels for n, m in norms.items())
    assert sum(p.numel() for p in unet.parameters()) - sum(p.numel() for p in plain.parameters()) == delta


def test_nsln_unet_saves_and_loads_like_a_diffusers_model(tmp_path):
    unet = NsLNUNet2DModel(**UNET)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([-100.0, 900.0])
    unet.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = NsLNUNet2DModel.from_pretrained(tmp_path)  # builds on the meta device, then loads
    assert type(loaded) is NsLNUNet2DModel
    for key, value in UNET.items():
        assert loaded.config[key] == (list(value) if isinstance(value, tuple) else value), key
    # same weights; the loaded copy may take another kernel path (strides), so float-level agreement
    assert torch.allclose(loaded(x, t).sample, unet(x, t).sample, atol=1e-6, rtol=0)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), unet.state_dict().values()))


def test_recipe_model_norm_selects_nsln_and_is_validated():
    from cmgen.generator import build_network
    from cmgen.recipe import load_recipe

    overrides = ["model.block_out_channels=[16,32]", "model.norm_num_groups=8", "model.attention_head_dim=8"]
    assert load_recipe("ict_digits", overrides).model.norm == "group"
    model = build_network(load_recipe("ict_digits", overrides + ["model.norm=nsln"]), (1, 8, 8), 10)
    assert isinstance(model.backbone.unet, NsLNUNet2DModel)
    with pytest.raises(UserError, match="recipe key 'model.norm' must be group or nsln, got 'layer'"):
        load_recipe("ict_digits", ["model.norm=layer"])
