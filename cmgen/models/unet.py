"""diffusers UNet2DModel backbones with named size presets.

The backbone sees c_in-scaled inputs and c_noise = 250 ln(sigma) through UNet2DModel's
positional time embedding: exactly what diffusers' ConsistencyModelPipeline feeds it, so
every UNet trained here exports to the stock pipeline unchanged.
"""
from __future__ import annotations

import copy

from diffusers import UNet2DModel
from torch import nn

# NCSN++-like layout as score_sde used for CIFAR-10 (128 ch x mult 1,2,2,2: four levels at 32/16/8/4,
# 4 blocks/level, attention at 16x16, dropout 0.3); cmgen's ict_cifar10 preset before 2026-11-25, kept so
# that runs made with it load.
_NCSNPP_CIFAR10 = dict(
    sample_size=32, in_channels=3, out_channels=3,
    block_out_channels=(128, 256, 256, 256), layers_per_block=4,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    downsample_type="resnet", upsample_type="resnet", attention_head_dim=None,
    norm_num_groups=32, dropout=0.3, resnet_time_scale_shift="default",
)

# NCSN++-like layout as iCT used for CIFAR-10 (128 ch x mult 2,2,2: three levels of 256 channels
# at 32/16/8, 4 blocks/level, attention at 16x16, BigGAN-style resnet up/downsampling, dropout
# 0.3; 62M parameters against NCSN++'s 56M). UNet2DModel has no FIR resampling and no
# Fourier-scale option that the stock pipeline accepts, so the time embedding is positional on
# 250 ln(sigma) (as ADM in CM).
_NCSNPP_CIFAR10_ICT = dict(
    sample_size=32, in_channels=3, out_channels=3,
    block_out_channels=(256, 256, 256), layers_per_block=4,
    down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D"),
    up_block_types=("ResnetUpsampleBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"),
    downsample_type="resnet", upsample_type="resnet", attention_head_dim=None,
    norm_num_groups=32, dropout=0.3, resnet_time_scale_shift="default",
)

# ADM as in CM/iCT ImageNet 64, identical to diffusers' converter config for
# openai/diffusers-ct_imagenet64 (so `model.init_from` can load it).
_ADM_IMAGENET64 = dict(
    sample_size=64, in_channels=3, out_channels=3,
    block_out_channels=(192, 384, 576, 768), layers_per_block=3,
    down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"),
    downsample_type="resnet", upsample_type="resnet", attn_norm_num_groups=32,
    attention_head_dim=64, norm_num_groups=32, dropout=0.2, resnet_time_scale_shift="scale_shift",
)

# DDPM++ as EDM used it for CIFAR-10 (SongUNet: 128 ch x mult 2,2,2 at 32/16/8, 4 blocks per level,
# attention at 16x16, dropout 0.13), on UNet2DModel's conv resampling.
_DDPMPP_CIFAR10 = dict(
    sample_size=32, in_channels=3, out_channels=3,
    block_out_channels=(256, 256, 256), layers_per_block=4,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None, norm_num_groups=32, dropout=0.13, resnet_time_scale_shift="default",
)

_DIGITS = dict(
    sample_size=8, in_channels=1, out_channels=1,
    block_out_channels=(64, 128), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=32, norm_num_groups=32, dropout=0.0,
)

_TINY = dict(
    sample_size=8, in_channels=1, out_channels=1,
    block_out_channels=(16, 32), layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=8, norm_num_groups=8, dropout=0.0,
)

PRESETS = {
    "ncsnpp_cifar10_ict": _NCSNPP_CIFAR10_ICT,
    "ncsnpp_cifar10": _NCSNPP_CIFAR10,
    "adm_imagenet64": _ADM_IMAGENET64,
    "ddpmpp_cifar10": _DDPMPP_CIFAR10,
    "digits": _DIGITS,
    "tiny": _TINY,
}


def _block_types(levels: int, attention_levels, resnet_sampling: bool):
    down, up = [], []
    for i in range(levels):
        attn = i in attention_levels
        down.append("AttnDownBlock2D" if attn else ("ResnetDownsampleBlock2D" if resnet_sampling else "DownBlock2D"))
    for i in reversed(range(levels)):
        attn = i in attention_levels
        up.append("AttnUpBlock2D" if attn else ("ResnetUpsampleBlock2D" if resnet_sampling else "UpBlock2D"))
    return tuple(down), tuple(up)


def unet_kwargs(model_cfg, channels: int, resolution: int, num_classes: int) -> dict:
    """UNet2DModel keyword arguments from a preset plus the recipe's overrides."""
    from cmgen.errors import UserError

    preset = model_cfg.preset or "digits"
    if preset not in PRESETS:
        raise UserError(f"recipe key 'model.preset' must be one of {', '.join(PRESETS)}, got '{preset}'")
    kw = copy.deepcopy(PRESETS[preset])
    for key in ("block_out_channels", "layers_per_block", "attention_head_dim", "norm_num_groups"):
        value = getattr(model_cfg, key)
        if value is not None:
            kw[key] = value
    kw["dropout"] = model_cfg.dropout
    levels = len(kw["block_out_channels"])
    if model_cfg.attention_levels is not None or len(kw["down_block_types"]) != levels:
        attn = model_cfg.attention_levels if model_cfg.attention_levels is not None else (levels - 1,)
        resnet_sampling = "Resnet" in kw["down_block_types"][0]
        kw["down_block_types"], kw["up_block_types"] = _block_types(levels, attn, resnet_sampling)
    kw.update(sample_size=resolution, in_channels=channels, out_channels=channels)
    kw["num_class_embeds"] = num_classes if model_cfg.class_conditional else None
    groups = kw["norm_num_groups"]
    if any(c % groups for c in kw["block_out_channels"]):
        raise UserError(f"recipe key 'model.norm_num_groups' ({groups}) must divide every entry of "
                        f"'model.block_out_channels' {list(kw['block_out_channels'])}")
    kw["block_out_channels"] = tuple(kw["block_out_channels"])
    return kw


class UNetBackbone(nn.Module):
    """F(x_in, c_noise, class_labels) over a diffusers UNet2DModel."""

    def __init__(self, unet: UNet2DModel):
        super().__init__()
        self.unet = unet

    def forward(self, x, noise_label, class_labels=None):
        return self.unet(x, noise_label, class_labels=class_labels, return_dict=False)[0]
