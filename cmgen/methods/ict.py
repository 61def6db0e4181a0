"""Improved consistency training (Song & Dhariwal 2023, "Improved Techniques for Training CMs").

L = E[ lambda(sigma_i) * d( f(x + sigma_{i+1} z, sigma_{i+1}), sg f(x + sigma_i z, sigma_i) ) ]
with the exponential curriculum N(k), a discretised lognormal draw of i, lambda = 1/(sigma_{i+1}
- sigma_i), pseudo-Huber d on the per-sample norm with c = 0.00054 sqrt(d), and the teacher the
student itself under stop-gradient, with the same noise z and the same dropout mask.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch

from cmgen.losses import ict_huber_c, pseudo_huber
from cmgen.methods.base import Method as BaseMethod
from cmgen.rng import same_dropout
from cmgen.schedules import ict_curriculum, karras_sigmas, lognormal_index_probs


@dataclass(frozen=True)
class Config:
    s0: int = 10                    # initial discretisation steps
    s1: int = 1280                  # final steps; short runs may cap it (e.g. 160)
    total_steps: Optional[int] = None  # K of the curriculum; train.steps at the run's start, then stored
    p_mean: float = -1.1            # lognormal location of the noise-level draw
    p_std: float = 2.0              # lognormal scale
    huber_c: Optional[float] = None  # pseudo-Huber c; defaults to 0.00054 * sqrt(d)


class Method(BaseMethod):
    parameterisation = "cm"

    def __init__(self, cfg: Config, recipe, gen):
        super().__init__(cfg, recipe, gen)
        self._init_curriculum(recipe)
        self.c = cfg.huber_c if cfg.huber_c is not None else ict_huber_c(math.prod(gen.shape))

    def _init_curriculum(self, recipe) -> None:
        self.p = recipe.precond
        self.total_steps = self.cfg.total_steps or recipe.train.steps
        self._grids: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def resolve(cls, recipe):
        if recipe.method.total_steps is not None:
            return recipe
        return replace(recipe, method=replace(recipe.method, total_steps=recipe.train.steps))

    def discretisation(self, step: int) -> int:
        return ict_curriculum(step, self.total_steps, self.cfg.s0, self.cfg.s1)

    def grid(self, n: int):
        """(sigmas ascending float64, index probabilities) for N = n, cached per stage."""
        if n not in self._grids:
            s = karras_sigmas(n, self.p.sigma_min, self.p.sigma_max, self.p.rho)
            self._grids[n] = (s, lognormal_index_probs(s, self.cfg.p_mean, self.cfg.p_std))
        return self._grids[n]

    def pair(self, model, batch, step: int, z: Optional[torch.Tensor] = None) -> "Pair":
        """One consistency pair: index i from the stage's lognormal draw, then (unless `z` is given) the
        shared noise; teacher f(x + sigma_i z, sigma_i) under stop-gradient, student at sigma_{i+1},
        both with the same dropout mask; lambda = 1 / (sigma_{i+1} - sigma_i)."""
        x, labels, rng = batch.x, batch.labels, batch.rng
        n = self.discretisation(step)
        sigmas, probs = self.grid(n)
        i = rng.multinomial(probs).cpu()
        sigma_t = sigmas[i].to(x.device, torch.float32)       # teacher: the lower level
        sigma_s = sigmas[i + 1].to(x.device, torch.float32)   # student: the higher level
        if z is None:
            z = rng.randn(*x.shape[1:]).to(x.dtype)
        view = (-1,) + (1,) * (x.ndim - 1)

        with torch.no_grad(), same_dropout(rng.dropout_seed, x.device):
            target = model(x + sigma_t.view(view) * z, sigma_t, labels)
        with same_dropout(rng.dropout_seed, x.device):
            pred = model(x + sigma_s.view(view) * z, sigma_s, labels)
        weight = 1.0 / (sigmas[i + 1] - sigmas[i]).to(x.device, torch.float32)
        return Pair(n, i, sigma_s, weight, pred, target)

    def loss(self, nets, batch, step: int) -> dict:
        p = self.pair(nets.model, batch, step)
        dist = pseudo_huber(p.pred, p.target, self.c)
        return {"loss": (p.weight * dist).mean(), "pseudo_huber": dist.detach().mean(),
                "N": torch.tensor(float(p.n))}


@dataclass
class Pair:
    n: int                          # the stage's discretisation N
    i: torch.Tensor                 # ascending index of the teacher level (student: i + 1)
    sigma_s: torch.Tensor           # the student's noise level
    weight: torch.Tensor            # lambda = 1 / (sigma_{i+1} - sigma_i)
    pred: torch.Tensor              # student output (carries the gradient)
    target: torch.Tensor            # teacher output (no gradient)
