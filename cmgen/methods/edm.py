"""EDM diffusion training (Karras et al. 2022, "Elucidating the Design Space", Table 1 and eq. 8).

L = E_{sigma, n}[ lambda(sigma) || D(x + n, sigma) - x ||^2 ],  ln sigma ~ N(P_mean, P_std^2),
n ~ N(0, sigma^2 I), lambda = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2. The squared error is averaged
over a sample's elements (EDM sums them; with Adam only the scale differs). With `label_dropout` a
class label is replaced by the null label with that probability (classifier-free guidance).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cmgen.methods.base import Method as BaseMethod
from cmgen.precond import edm_loss_weight


@dataclass(frozen=True)
class Config:
    p_mean: float = -1.2            # lognormal location of sigma
    p_std: float = 1.2              # lognormal scale
    label_dropout: float = 0.0      # probability of training a sample unconditionally (CFG); 0 = off


def drop_labels(labels, rng, p: float, null: int):
    """Labels with each replaced by `null` with probability p (one keyed draw per sample)."""
    if labels is None or p <= 0:
        return labels
    return torch.where(rng.rand() < p, torch.full_like(labels, null), labels)


class Method(BaseMethod):
    parameterisation = "edm"

    def loss(self, nets, batch, step: int) -> dict:
        x, rng, sd = batch.x, batch.rng, self.recipe.precond.sigma_data
        sigma = torch.exp(self.cfg.p_mean + self.cfg.p_std * rng.randn())
        n = rng.randn(*x.shape[1:]).to(x.dtype) * sigma.view(-1, *([1] * (x.ndim - 1)))
        labels = drop_labels(batch.labels, rng, self.cfg.label_dropout, self.gen.null_label)
        denoised = nets.model(x + n, sigma, labels)
        err = (denoised.float() - x.float()).pow(2).flatten(1).mean(1)
        weighted = edm_loss_weight(sigma, sd) * err
        return {"loss": weighted.mean(), "mse": err.detach().mean()}
