"""Latent diffusion in Stable Diffusion's parameterisation (Rombach et al. 2022; DDPM, Ho et al. 2020).

Discrete VP process over T = 1000 steps with scaled-linear betas (cmgen.vp); t ~ U{0..T-1},
z_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, L = E || F(z_t, t, c) - target ||^2 (mean over a
sample's elements) with target eps (`epsilon`) or v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0
(`v_prediction`). With `label_dropout` a class label is replaced by the null label (classifier-free
guidance). Sampled with DDIM (sampling/ddim.py); the teacher of LCD and RG-LCD (cmgen.methods.lcd).
"""
from __future__ import annotations

from dataclasses import dataclass


from cmgen.methods.base import Method as BaseMethod
from cmgen.methods.edm import drop_labels
from cmgen.vp import VPSchedule, add_noise, velocity

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class Config:
    prediction_type: str = "epsilon"  # epsilon | v_prediction
    label_dropout: float = 0.1      # probability of training a sample unconditionally (CFG)
    beta_start: float = 0.00085     # scaled-linear betas (Stable Diffusion's)
    beta_end: float = 0.012
    num_train_timesteps: int = 1000

    def problems(self):
        if self.prediction_type not in PREDICTION_TYPES:
            yield f"recipe key 'method.prediction_type' must be epsilon or v_prediction, got '{self.prediction_type}'"
        if not 0 < self.beta_start < self.beta_end < 1:
            yield "recipe keys 'method.beta_start' < 'method.beta_end' must lie in (0, 1)"
        if self.num_train_timesteps < 2:
            yield "recipe key 'method.num_train_timesteps' must be at least 2"
        if not 0 <= self.label_dropout < 1:
            yield "recipe key 'method.label_dropout' must be in [0, 1)"

    @property
    def schedule(self) -> VPSchedule:
        return VPSchedule(self.beta_start, self.beta_end, self.num_train_timesteps)


def build_unet(recipe, shape, num_class_embeds: int, time_cond_proj_dim=None):
    from diffusers import UNet2DConditionModel

    from cmgen.errors import UserError
    from cmgen.models.ldm_unet import unet_config

    if recipe.model.arch != "unet" or len(shape) != 3:
        raise UserError("recipe key 'model.arch' must be unet for latent diffusion (data of shape C x H x W)")
    kw = unet_config(recipe.model, shape[0], shape[1], num_class_embeds, time_cond_proj_dim)
    return UNet2DConditionModel(**kw)


class Method(BaseMethod):
    parameterisation = "ldm"

    @classmethod
    def build_network(cls, recipe, shape, num_classes: int):
        from cmgen.generator import null_label
        from cmgen.models.ldm_unet import CondUNetBackbone, NoisePredictor

        embeds = (num_classes + (1 if null_label(recipe, num_classes) is not None else 0)
                  if recipe.model.class_conditional else 0)
        unet = build_unet(recipe, shape, embeds)
        return NoisePredictor(CondUNetBackbone(unet), recipe.method.schedule, recipe.method.prediction_type)

    def __init__(self, cfg: Config, recipe, gen):
        super().__init__(cfg, recipe, gen)
        self.alphas_cumprod = cfg.schedule.alphas_cumprod()

    def loss(self, nets, batch, step: int) -> dict:
        x0, rng = batch.x, batch.rng
        t = rng.randint(0, self.cfg.num_train_timesteps)
        eps = rng.randn(*x0.shape[1:]).to(x0.dtype)
        labels = drop_labels(batch.labels, rng, self.cfg.label_dropout, self.gen.null_label)
        zt = add_noise(x0, eps, self.alphas_cumprod, t)
        target = eps if self.cfg.prediction_type == "epsilon" else velocity(x0, eps, self.alphas_cumprod, t)
        out = nets.model(zt, t, labels)
        err = (out.float() - target.float()).pow(2).flatten(1).mean(1)
        return {"loss": err.mean()}
