"""Flow-GRPO (Liu et al. 2025, arXiv 2505.05470): the policy-gradient baseline beside AWM.

Rollouts are the SDE with the ODE's marginals (cmgen.sampling.flow.sde_step, sigma_t = a sqrt(t/(1-t))),
recording every x_j and the per-step Gaussian log-probability log N(x_{j+1}; mu_theta(x_j), s_j^2 I),
averaged over a sample's elements as flow_grpo's `sde_step_with_logprob` does. The advantages are
AWM's (cmgen.methods.rollout). Per step j, with rho = exp(log p_theta - log p_old):

    L_j = mean_i max(-A_i rho_ij, -A_i clip(rho_ij, 1 - eps, 1 + eps)) + beta mean_i ||mu_theta - mu_ref||^2 / (2 s_j^2)

(the KL between the two step Gaussians, averaged over elements), and L = mean_j L_j. With one
optimizer step per round the update is on-policy: rho = 1 and the clip never binds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cmgen.methods.rollout import RewardMethod, RolloutConfig
from cmgen.sampling.flow import sde_step


@dataclass(frozen=True)
class Config(RolloutConfig):
    clip_range: float = 1e-4        # PPO ratio clip eps (flow_grpo's default)
    beta: float = 0.0               # KL-to-reference weight (0.04 in flow_grpo's GenEval config)

    def problems(self):
        yield from RolloutConfig.problems(self)
        if self.clip_range <= 0 or self.beta < 0:
            yield "recipe keys 'method.clip_range' must be > 0 and 'method.beta' >= 0"


def step_log_prob(x_next: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """log N(x_next; mean, std^2), averaged over a sample's elements: shape [N]."""
    z = (x_next.float() - mean.float()) / std
    per = -0.5 * z * z - math.log(std) - 0.5 * math.log(2 * math.pi)
    return per.flatten(1).mean(1)


def clipped_objective(adv: torch.Tensor, ratio: torch.Tensor, eps: float) -> torch.Tensor:
    """PPO's per-sample loss max(-A rho, -A clip(rho, 1 - eps, 1 + eps))."""
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - eps, 1 + eps))


class Method(RewardMethod):
    parameterisation = "flow"

    def _step(self, net, x, j: int, labels):
        """(mean, std) of SDE step j from x: the one formula the rollout and the loss share."""
        t, t_next = float(self.times[j]), float(self.times[j + 1])
        v = net(x, torch.full((len(x),), t, device=x.device), labels).float()
        _, mean, std = sde_step(x.float(), v, t, t_next, torch.zeros_like(x, dtype=torch.float32), a=self.cfg.sde_a,
                                t_cap=float(self.times[1]))
        return mean, std

    def rollout(self, policy, noise, labels):
        x = noise(0).float()
        xs, logps = [x], []
        for j in range(len(self.times) - 1):
            mean, std = self._step(policy, x, j, labels)
            x = mean + std * noise(j + 1).float()
            logps.append(step_log_prob(x, mean, std))
            xs.append(x)
        return x, {"trajectory": torch.stack(xs, 1), "log_prob": torch.stack(logps, 1)}

    def loss(self, nets, batch, step: int) -> dict:
        xs, old, adv, labels = batch.extra["trajectory"], batch.extra["log_prob"], batch.extra["advantage"], batch.labels
        steps = xs.shape[1] - 1
        total, ratios, kls = 0.0, [], []
        for j in range(steps):
            mean, std = self._step(nets.model, xs[:, j], j, labels)
            ratio = torch.exp(step_log_prob(xs[:, j + 1], mean, std) - old[:, j])
            loss_j = clipped_objective(adv.float(), ratio, self.cfg.clip_range).mean()
            if self.cfg.beta > 0:
                mean_ref, _ = self._step(lambda *a: self.reference_velocity(nets, *a), xs[:, j], j, labels)
                kl = ((mean - mean_ref).pow(2).flatten(1).mean(1) / (2 * std**2)).mean()
                loss_j = loss_j + self.cfg.beta * kl
                kls.append(kl.detach())
            total = total + loss_j / steps
            ratios.append(ratio.detach())
        r = torch.stack(ratios)
        terms = {"ratio": r.mean(), "ratio_dev": (r - 1).abs().max(),
                 "clip_frac": ((r - 1).abs() > self.cfg.clip_range).float().mean()}
        if kls:
            terms["kl_ref"] = torch.stack(kls).mean()
        return {"loss": total} | terms | self.round_terms(batch)
