"""Flow-matching samplers: the Euler ODE and the SDE with the same marginals (Flow-GRPO's rollout).

x_t = (1 - t) x_0 + t eps, velocity v = eps - x_0, integrated from t = 1 (noise) to t = 0 (data).
The SDE step (Liu et al. 2025, Flow-GRPO eq. 9) with sigma_t = a sqrt(t / (1 - t)):
  mean = x (1 + sigma_t^2 dt / (2t)) + v (1 + sigma_t^2 (1 - t) / (2t)) dt,  std = sigma_t sqrt(-dt),
dt = t_next - t < 0; `sde_step` also returns the step's Gaussian log-probability, which
policy-gradient baselines (DDPO / Flow-GRPO) need.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch


def shift_time(t, shift: float):
    """SD3's timestep shift t' = s t / (1 + (s - 1) t) (s > 1 spends more steps at high noise)."""
    return shift * t / (1 + (shift - 1) * t)


def flow_times(steps: int, shift: float = 1.0) -> list[float]:
    """`steps` + 1 decreasing times from 1 to 0, evenly spaced, then shifted."""
    return [float(shift_time(1.0 - i / steps, shift)) for i in range(steps + 1)]


def _v(velocity, labels):
    return lambda x, t: velocity(x, torch.full((x.shape[0],), float(t), device=x.device), labels).float()


@torch.no_grad()
def flow_euler(velocity, noise: Callable[[int], torch.Tensor], times: Sequence[float], *,
               class_labels: Optional[torch.Tensor] = None, callback=None) -> torch.Tensor:
    """x <- x + (t_next - t) v(x, t), as FlowMatchEulerDiscreteScheduler.step does."""
    v = _v(velocity, class_labels)
    x = noise(0).float()
    for i in range(len(times) - 1):
        t, t_next = float(times[i]), float(times[i + 1])
        x = x + (t_next - t) * v(x, t)
        if callback is not None:
            callback({"i": i, "t": t, "x": x})
    return x


def sde_sigma(t: float, a: float, t_cap: float) -> float:
    """sigma_t = a sqrt(t / (1 - t)); at t = 1 the denominator uses `t_cap` (the next time), as Flow-GRPO does."""
    return a * math.sqrt(t / (1.0 - (t_cap if t >= 1.0 else t)))


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std) -> torch.Tensor:
    """Per-sample log N(x; mean, std^2 I), summed over every element of a sample."""
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device)
    z = (x.float() - mean.float()) / std
    per = -0.5 * z * z - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return per.flatten(1).sum(1)


def sde_step(x: torch.Tensor, v: torch.Tensor, t: float, t_next: float, z: torch.Tensor, *, a: float = 0.7,
             t_cap: Optional[float] = None):
    """(x_next, mean, std) of one SDE step from t to t_next with unit noise z."""
    dt = t_next - t
    sig = sde_sigma(t, a, t_next if t_cap is None else t_cap)
    mean = x * (1 + sig**2 / (2 * t) * dt) + v * (1 + sig**2 * (1 - t) / (2 * t)) * dt
    std = sig * math.sqrt(-dt)
    return mean + std * z, mean, std


@torch.no_grad()
def flow_sde(velocity, noise: Callable[[int], torch.Tensor], times: Sequence[float], *,
             class_labels: Optional[torch.Tensor] = None, a: float = 0.7, return_log_prob: bool = False,
             callback=None):
    """Stochastic sampling with the ODE's marginals; `noise(i + 1)` is step i's noise.

    With `return_log_prob`, returns (x, [per-sample log-probability of each step]).
    """
    v = _v(velocity, class_labels)
    x = noise(0).float()
    log_probs = []
    for i in range(len(times) - 1):
        t, t_next = float(times[i]), float(times[i + 1])
        x_next, mean, std = sde_step(x, v(x, t), t, t_next, noise(i + 1).float(), a=a, t_cap=float(times[1]))
        if return_log_prob:
            log_probs.append(gaussian_log_prob(x_next, mean, std))
        x = x_next
        if callback is not None:
            callback({"i": i, "t": t, "x": x})
    return (x, log_probs) if return_log_prob else x
