"""Advantage Weighted Matching (Xue et al. 2025, arXiv 2509.25050; the reference `train_sd3_awm.py`).

Rollouts and advantages: cmgen.methods.rollout. Any sampler makes the rollouts (`rollout_sampler`:
euler ODE or the Flow-GRPO SDE); the loss needs only their final x0. For each rollout, T grid
indices, one from each stratum [e_j, e_{j+1}) with edges e = floor(linspace(t_first, t_last + 1, T + 1))
(the reference's `discrete` / `discrete_wo_init` draw; one set per micro-batch), their grid times t,
fresh noise eps, x_t = (1 - t) x0 + t eps, u = eps - x0, m = mean_j (v(x_t, t) - u)_j^2 and

    l = m                                              (weighting: plain)
    l = t [(m + 1e-10)^p - (1e-10)^p] / p              (weighting: ghuber, p = 0.25)
    L = mean_{i,t} A_i l_i(t) + beta mean ||v - v_ref||^2 + beta_prev mean ||v - v_prev||^2

The reference code forms log p = -l and a PPO ratio; with one optimizer step per round the ratio is 1,
so its gradient is the gradient of A l, which is what is computed here. v_ref is the base model
(frozen), v_prev a copy updated after every optimizer step as prev <- d prev + (1 - d) theta with
d = min(prev_decay_max, prev_decay_rate * step), step = 0, 1, ... the index of the step just taken, as the
note writes it (the reference's "TRPO-like" EMA adapter; its code counts the step first, a decay larger by
prev_decay_rate until the cap, not taken over so that the measured runs stay comparable). The penalties
are independent: beta_prev acts at beta = 0 too (the reference nests it under beta > 0, but cannot run
beta = 0 at all).
The evaluation EMA is the loop's `train.ema_decay` (0.99 in the reference).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from cmgen.methods.rollout import RewardMethod, RolloutConfig
from cmgen.rng import keyed_generator

GHUBER_EPS = 1e-10


@dataclass(frozen=True)
class Config(RolloutConfig):
    rollout_sampler: str = "euler"  # euler (ODE) | sde: the loss is sampler-free
    timesteps: int = 4              # T per rollout (6 in the reference)
    t_first: int = 1                # first rollout-grid index a loss time may take (0 = t = 1; PickScore 0)
    t_last: Optional[int] = None    # last index; None = int(0.9 rollout_steps) - 1 (timestep_fraction 0.9: 11 of 14)
    weighting: str = "plain"        # plain | ghuber
    ghuber_p: float = 0.25          # p of the ghuber weighting
    beta: float = 0.0               # KL-to-reference weight (1e-4 PickScore, 1e-3 GenEval)
    beta_prev: float = 1.0          # weight of the penalty toward the previous-policy copy; 0 = off
    prev_decay_max: float = 0.3     # d = min(prev_decay_max, prev_decay_rate * step)
    prev_decay_rate: float = 0.001

    def problems(self):
        yield from RolloutConfig.problems(self)
        if self.weighting not in ("plain", "ghuber"):
            yield f"recipe key 'method.weighting' must be plain or ghuber, got '{self.weighting}'"
        if self.rollout_sampler not in ("euler", "sde"):
            yield f"recipe key 'method.rollout_sampler' must be euler or sde, got '{self.rollout_sampler}'"
        last = self.last_index()
        if not 0 <= self.t_first <= last < self.rollout_steps:
            yield (f"recipe keys 'method.t_first' <= 'method.t_last' must lie in [0, rollout_steps - 1], "
                   f"got {self.t_first} and {last}")
        elif not 1 <= self.timesteps <= last - self.t_first + 1:
            yield (f"recipe key 'method.timesteps' must be between 1 and the {last - self.t_first + 1} grid "
                   f"indices in [t_first, t_last], got {self.timesteps}")
        if self.beta < 0 or self.beta_prev < 0:
            yield "recipe keys 'method.beta' and 'method.beta_prev' must be >= 0"

    def last_index(self) -> int:
        """The reference's exclusive end int(rollout_steps * timestep_fraction), fraction 0.9, less one."""
        return int(0.9 * self.rollout_steps) - 1 if self.t_last is None else self.t_last


def ghuber(m: torch.Tensor, t: torch.Tensor, p: float = 0.25) -> torch.Tensor:
    """t [(m + 1e-10)^p - (1e-10)^p] / p: its gradient is t (m + 1e-10)^(p - 1) grad m."""
    return t * ((m + GHUBER_EPS) ** p - GHUBER_EPS ** p) / p


def prev_decay(step: int, rate: float = 0.001, cap: float = 0.3) -> float:
    """d = min(cap, rate * step) after the step of index `step` (from 0): the copy follows closely at first."""
    return min(cap, rate * step)


def strata_edges(count: int, first: int, last: int) -> torch.Tensor:
    """floor(linspace(first, last + 1, count + 1)) in integers: stratum j is [edge_j, edge_{j+1}), as the reference's
    `linspace(first, int(steps * timestep_fraction), T + 1).long()` (14 steps from 1: {1}, {2, 3}, ..., {10, 11})."""
    return first + torch.arange(count + 1) * (last + 1 - first) // count


def stratified_indices(gen: torch.Generator, count: int, first: int, last: int) -> torch.Tensor:
    """One index drawn uniformly from each of the `count` strata of [first, last] (`strata_edges`)."""
    edges = strata_edges(count, first, last)
    u = torch.rand(count, generator=gen, dtype=torch.float64)
    return edges[:-1] + (u * (edges[1:] - edges[:-1])).long()


class Method(RewardMethod):
    parameterisation = "flow"

    def targets(self) -> dict:
        c = self.cfg
        return {"previous": lambda step: prev_decay(step, c.prev_decay_rate, c.prev_decay_max)} if c.beta_prev > 0 else {}

    def rollout(self, policy, noise, labels):
        sampler = self.gen.sampler(self.cfg.rollout_sampler)
        x0 = sampler.run(policy, noise, self.times.tolist(), labels, self.gen, {"sde_a": self.cfg.sde_a})
        return x0, {}

    def loss_times(self, batch) -> torch.Tensor:
        """The micro-batch's T stratified grid times (the same for all its samples)."""
        gen = keyed_generator(batch.rng.seed, batch.rng.step, "awm-times", batch.rng.offset)
        idx = stratified_indices(gen, self.cfg.timesteps, self.cfg.t_first, self.cfg.last_index())
        return self.times[idx].float()

    def loss(self, nets, batch, step: int) -> dict:
        c, x0, labels, adv = self.cfg, batch.x, batch.labels, batch.extra["advantage"]
        T, n = c.timesteps, len(x0)
        t = self.loss_times(batch).to(x0.device).repeat_interleave(n)           # [T n], time-major
        eps = torch.cat([batch.rng.randn(*x0.shape[1:]) for _ in range(T)]).to(x0.dtype)
        x0r, y = x0.repeat(T, *([1] * (x0.ndim - 1))), labels.repeat(T)
        tv = t.view(-1, *([1] * (x0.ndim - 1)))
        xt = (1 - tv) * x0r + tv * eps
        v = nets.model(xt, t, y).float()
        m = (v - (eps - x0r).float()).pow(2).flatten(1).mean(1)
        ell = ghuber(m, t, c.ghuber_p) if c.weighting == "ghuber" else m
        loss = (adv.float().repeat(T) * ell).mean()
        terms = {"fm_error": m.detach().mean()}
        if c.beta > 0:
            v_ref = self.reference_velocity(nets, xt, t, y).float()
            kl = (v - v_ref).pow(2).flatten(1).mean(1).mean()
            loss = loss + c.beta * kl
            terms["kl_ref"] = kl.detach()
        if c.beta_prev > 0:
            with torch.no_grad():
                v_prev = nets.previous(xt, t, y).float()
            prev = (v - v_prev).pow(2).flatten(1).mean(1).mean()
            loss = loss + c.beta_prev * prev
            terms["kl_prev"] = prev.detach()
        return {"loss": loss} | terms | self.round_terms(batch)
