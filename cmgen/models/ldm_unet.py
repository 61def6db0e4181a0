"""Latent diffusion networks in Stable Diffusion's parameterisation, over a diffusers UNet2DConditionModel.

- `NoisePredictor` (parameterisation `ldm`): the teacher, eps(z_t, t, c) or v(z_t, t, c) at integer t;
- `LatentConsistency` (parameterisation `lcm`): the LCD student f(z_t, t, c, w) = c_skip(t) z_t + c_out(t)
  x_0(F(z_t, t, c, embed(w))), F the same UNet with `time_cond_proj_dim` set (the w-embedding enters as
  `timestep_cond`), so `LatentConsistencyModelPipeline` samples a text student unchanged.

The condition c is a class label tensor (long, `class_labels`) or text embeddings (float [B, L, D],
`encoder_hidden_states`).
"""
from __future__ import annotations

import torch
from torch import nn

from cmgen.vp import VPSchedule, guidance_embedding, lcm_boundary_scalings, to_x0_eps

W_EMBED_DIM = 256  # LCM's time_cond_proj_dim


def unet_config(model_cfg, channels: int, resolution: int, num_class_embeds: int,
                time_cond_proj_dim=None) -> dict:
    """UNet2DConditionModel keyword arguments for a class-conditional latent UNet from the recipe's model section:
    self-attention (no cross-attention) at `attention_levels` (default: the last level)."""
    from cmgen.errors import UserError

    ch = tuple(model_cfg.block_out_channels or (32, 64))
    levels = len(ch)
    attn = model_cfg.attention_levels if model_cfg.attention_levels is not None else (levels - 1,)
    groups = model_cfg.norm_num_groups or 16
    if any(c % groups for c in ch):
        raise UserError(f"recipe key 'model.norm_num_groups' ({groups}) must divide every entry of "
                        f"'model.block_out_channels' {list(ch)}")
    down = tuple("AttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(levels))
    up = tuple("AttnUpBlock2D" if i in attn else "UpBlock2D" for i in reversed(range(levels)))
    return dict(sample_size=resolution, in_channels=channels, out_channels=channels, block_out_channels=ch,
                layers_per_block=model_cfg.layers_per_block or 2, down_block_types=down, up_block_types=up,
                mid_block_type="UNetMidBlock2D", norm_num_groups=groups,
                attention_head_dim=model_cfg.attention_head_dim or 32, cross_attention_dim=ch[-1],
                num_class_embeds=num_class_embeds or None, time_cond_proj_dim=time_cond_proj_dim)


class CondUNetBackbone(nn.Module):
    """F(z, t, c, timestep_cond) over a UNet2DConditionModel; c is class labels or text embeddings."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, z, t, cond=None, timestep_cond=None):
        text = cond is not None and cond.is_floating_point()
        return self.unet(z, t, encoder_hidden_states=cond if text else None,
                         class_labels=None if text else cond, timestep_cond=timestep_cond, return_dict=False)[0]


class _VPNet(nn.Module):
    def __init__(self, backbone: nn.Module, schedule: VPSchedule, prediction_type: str):
        super().__init__()
        self.backbone = backbone
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.register_buffer("alphas_cumprod", schedule.alphas_cumprod(), persistent=False)

    def _t(self, t, z):
        t = torch.as_tensor(t, device=z.device)
        return (t.expand(z.shape[0]) if t.ndim == 0 else t).long()


class NoisePredictor(_VPNet):
    """The teacher's raw output (eps or v) at integer timesteps t."""

    def forward(self, z: torch.Tensor, t, cond=None) -> torch.Tensor:
        return self.backbone(z.float(), self._t(t, z), cond).float()

    def x0_eps(self, z, t, cond=None):
        t = self._t(t, z)
        return to_x0_eps(self(z, t, cond), z, self.alphas_cumprod, t, self.prediction_type)


class LatentConsistency(_VPNet):
    """f(z, t, c, w) = c_skip(t) z + c_out(t) x_0; w is the guidance in LCM's w-form (guidance scale - 1)."""

    embeds_guidance = True

    def __init__(self, backbone, schedule, prediction_type, w_dim: int = W_EMBED_DIM):
        super().__init__(backbone, schedule, prediction_type)
        self.w_dim = w_dim

    def forward(self, z: torch.Tensor, t, cond=None, w=0.0) -> torch.Tensor:
        t = self._t(t, z)
        w = torch.as_tensor(w, dtype=torch.float32, device=z.device)
        emb = guidance_embedding(w.expand(z.shape[0]) if w.ndim == 0 else w, self.w_dim).to(z.device)
        out = self.backbone(z.float(), t, cond, timestep_cond=emb).float()
        x0, _ = to_x0_eps(out, z, self.alphas_cumprod, t, self.prediction_type)
        c_skip, c_out = lcm_boundary_scalings(t.float().to(z.device))
        view = (-1,) + (1,) * (z.ndim - 1)
        return c_skip.view(view) * z.float() + c_out.view(view) * x0

