"""Two-time UNet for CTM (Kim et al. 2024): the backbone F(x_in, c_noise(t), c_noise(s), y).

s enters additively, in parallel with t, as the reference code does: a second embedding MLP
`time_embedding_s` on the sinusoidal embedding of c_noise(s), and in every ResNet block a second
projection `time_emb_proj.s` whose output is summed with the t projection before the block's
(scale/shift) modulation. The class embedding joins the t path only. Every teacher parameter keeps
its diffusers name, so a student copies its teacher by name; the s projections start at zero, so at
initialisation F(x, t, s) = F_teacher(x, t) for every s. `TwoTimeUNet2DModel` takes UNet2DModel's
config keys and saves and loads like any diffusers model. `TwoTimeMLPBackbone` does the same for the
residual MLP of 2-D data: an s embedding MLP and a zero-initialised s projection `emb_s` in every block,
summed with the block's t projection.
"""
from __future__ import annotations

import functools

import torch
from diffusers import UNet2DModel
from diffusers.models.embeddings import TimestepEmbedding
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  diffusers looks this name up to load the class
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from cmgen.models.mlp import MLPBackbone, sinusoidal_embedding

S_BRANCH = ("time_embedding_s.", "time_emb_proj.s.", ".emb_s.")   # parameter names only a two-time network has


class TwoTimeLinear(nn.Linear):
    """The t projection of a ResNet block (its own weight and bias) plus a zero-initialised s projection
    `s`; the input is [silu(emb_t), silu(emb_s)] concatenated on the last axis."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features)
        self.s = nn.Linear(in_features, out_features)
        nn.init.zeros_(self.s.weight)
        nn.init.zeros_(self.s.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h_t, h_s = h.split(self.in_features, dim=-1)
        return super().forward(h_t) + self.s(h_s)


class TwoTimeUNet2DModel(UNet2DModel):
    """UNet2DModel (same config keys) conditioned on a second time s."""

    @functools.wraps(UNet2DModel.__init__)  # keeps UNet2DModel's signature: diffusers reads config keys from it
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.config.time_embedding_type != "positional":
            raise ValueError("TwoTimeUNet2DModel needs time_embedding_type='positional'")
        lin = self.time_embedding.linear_1
        self.time_embedding_s = TimestepEmbedding(lin.in_features, self.time_embedding.linear_2.out_features)
        for block in self.modules():
            if isinstance(block, ResnetBlock2D) and block.time_emb_proj is not None:
                old = block.time_emb_proj
                new = TwoTimeLinear(old.in_features, old.out_features)
                new.weight.data.copy_(old.weight.data)
                new.bias.data.copy_(old.bias.data)
                block.time_emb_proj = new

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, s_timestep: torch.Tensor = None,
                class_labels=None, return_dict: bool = True):
        """UNet2DModel.forward with emb = [emb_t (+ class), emb_s]; s defaults to t (the denoiser g(x, t, t))."""
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        n = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device).float().reshape(-1).expand(n)
        s = t if s_timestep is None else torch.as_tensor(s_timestep, device=sample.device).float().reshape(-1).expand(n)
        emb = self.time_embedding(self.time_proj(t).to(self.dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("class_labels should be provided when doing class conditioning")
            if self.config.class_embed_type == "timestep":
                class_labels = self.time_proj(class_labels)
            emb = emb + self.class_embedding(class_labels).to(self.dtype)
        emb = torch.cat([emb, self.time_embedding_s(self.time_proj(s).to(self.dtype))], dim=-1)

        skip_sample = sample
        sample = self.conv_in(sample)
        res = (sample,)
        for block in self.down_blocks:
            if hasattr(block, "skip_conv"):
                sample, more, skip_sample = block(hidden_states=sample, temb=emb, skip_sample=skip_sample)
            else:
                sample, more = block(hidden_states=sample, temb=emb)
            res += more
        if self.mid_block is not None:
            sample = self.mid_block(sample, emb)
        skip_sample = None
        for block in self.up_blocks:
            more, res = res[-len(block.resnets):], res[:-len(block.resnets)]
            if hasattr(block, "skip_conv"):
                sample, skip_sample = block(sample, more, emb, skip_sample)
            else:
                sample = block(sample, more, emb)
        sample = self.conv_out(self.conv_act(self.conv_norm_out(sample)))
        if skip_sample is not None:
            sample = sample + skip_sample
        return (sample,) if not return_dict else {"sample": sample}


class TwoTimeUNetBackbone(nn.Module):
    """F(x_in, c_noise(t), c_noise(s), class_labels) over a TwoTimeUNet2DModel."""
    two_time = True

    def __init__(self, unet: TwoTimeUNet2DModel):
        super().__init__()
        self.unet = unet

    def forward(self, x, noise_t, noise_s=None, class_labels=None):
        return self.unet(x, noise_t, noise_s, class_labels=class_labels, return_dict=False)[0]


class TwoTimeMLPBackbone(MLPBackbone):
    """MLPBackbone conditioned on a second time s: F(x, c_noise(t), c_noise(s), y)."""
    two_time = True

    def __init__(self, dim: int, width: int = 256, depth: int = 4, num_classes: int = 0, dropout: float = 0.0):
        super().__init__(dim, width, depth, num_classes, dropout)
        self.time_embedding_s = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        for block in self.blocks:
            block.emb_s = nn.Linear(width, 2 * width)
            nn.init.zeros_(block.emb_s.weight)
            nn.init.zeros_(block.emb_s.bias)

    def forward(self, x, noise_t, noise_s=None, class_labels=None):
        """s defaults to t (the denoiser g(x, t, t))."""
        noise_s = noise_t if noise_s is None else noise_s
        emb_s = nn.functional.silu(self.time_embedding_s(sinusoidal_embedding(noise_s, self.width)))
        return self.trunk(x, self.embed(noise_t, class_labels), emb_s)


def two_time_backbone(backbone: nn.Module) -> nn.Module:
    """The two-time version of a one-time UNet backbone (cmgen.models.unet.UNetBackbone) or MLP backbone: same
    config, same weights for every shared name, the s branch added (s projections zero)."""
    from cmgen.errors import UserError

    if type(backbone) is MLPBackbone:
        two = TwoTimeMLPBackbone(**backbone.config)
        missing, unexpected = two.load_state_dict(backbone.state_dict(), strict=False)
        assert not unexpected and all(is_s_branch(k) for k in missing), missing
        return two
    unet = getattr(backbone, "unet", None)
    if isinstance(unet, TwoTimeUNet2DModel):   # a loaded CTM export
        return TwoTimeUNetBackbone(unet)
    if not isinstance(unet, UNet2DModel) or type(unet) is not UNet2DModel:
        raise UserError("method 'ctm' needs model.arch: mlp, or unet with model.norm: group (a diffusers "
                        "UNet2DModel); set them in the recipe")
    two = TwoTimeUNet2DModel(**dict(unet.config))
    missing, unexpected = two.load_state_dict(unet.state_dict(), strict=False)
    assert not unexpected and all(is_s_branch(k) for k in missing), missing
    return TwoTimeUNetBackbone(two)


def is_s_branch(name: str) -> bool:
    return any(part in name for part in S_BRANCH)
