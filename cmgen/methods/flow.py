"""Flow matching (Lipman et al. 2023; rectified flow, Liu et al. 2023) with SD3's time draws.

x_t = (1 - t) x_0 + t eps, target velocity eps - x_0, L = E_t || v(x_t, t) - (eps - x_0) ||^2 (mean over a
sample's elements). t is uniform on [0, 1] or logit-normal (SD3, Esser et al. 2024: t = sigmoid(m + s u),
u ~ N(0, 1)), then optionally shifted, t' = shift t / (1 + (shift - 1) t). `label_dropout` trains the
null label for classifier-free guidance.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cmgen.methods.base import Method as BaseMethod
from cmgen.methods.edm import drop_labels
from cmgen.sampling.flow import shift_time


@dataclass(frozen=True)
class Config:
    t_dist: str = "logit_normal"    # uniform | logit_normal
    logit_mean: float = 0.0         # logit-normal location m
    logit_std: float = 1.0          # logit-normal scale s
    shift: float = 1.0              # SD3 shift of the training times (1 = none)
    label_dropout: float = 0.0      # probability of training a sample unconditionally (CFG); 0 = off


def draw_times(rng, cfg: Config) -> torch.Tensor:
    if cfg.t_dist == "uniform":
        t = rng.rand()
    elif cfg.t_dist == "logit_normal":
        t = torch.sigmoid(cfg.logit_mean + cfg.logit_std * rng.randn())
    else:
        from cmgen.errors import UserError
        raise UserError(f"recipe key 'method.t_dist' must be uniform or logit_normal, got '{cfg.t_dist}'")
    return shift_time(t, cfg.shift)


class Method(BaseMethod):
    parameterisation = "flow"

    def loss(self, nets, batch, step: int) -> dict:
        x0, rng = batch.x, batch.rng
        t = draw_times(rng, self.cfg)
        eps = rng.randn(*x0.shape[1:]).to(x0.dtype)
        tv = t.view(-1, *([1] * (x0.ndim - 1)))
        xt = (1 - tv) * x0 + tv * eps
        labels = drop_labels(batch.labels, rng, self.cfg.label_dropout, self.gen.null_label)
        v = nets.model(xt, t, labels)
        err = (v.float() - (eps - x0).float()).pow(2).flatten(1).mean(1)
        return {"loss": err.mean()}
