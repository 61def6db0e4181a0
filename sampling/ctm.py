"""CTM gamma-sampling (Kim et al. 2024, Algorithm 1, in the reference code's `gamma_multistep` form).

x_0 = t_0 z_0; for n = 0..M-1, with t_M = sigma_min:
    s_n = sqrt(1 - gamma^2) (t_{n+1} - sigma_min) + sigma_min
    x   = G(x, t_n, s_n) + sqrt(t_{n+1}^2 - s_n^2) z_{n+1}      (no noise after the last jump)
gamma = 0: deterministic jumps t_n -> t_{n+1} along the ODE; gamma = 1: denoise to sigma_min, then renoise
to t_{n+1}, exactly consistency multistep with f(x, t) = G(x, t, sigma_min). NFE = M = len(times).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch


def ctm_times(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> list[float]:
    """The first `steps` points of a Karras grid of steps + 1 points from sigma_max to sigma_min (the
    reference `exact` schedule; 2 steps jump 80 -> 2.515 -> sigma_min)."""
    from cmgen.schedules import karras_sigmas

    grid = karras_sigmas(steps + 1, sigma_min, sigma_max, rho).flip(0)
    return [float(v) for v in grid[:steps]]


def gamma_target(t_next: float, gamma: float, sigma_min: float) -> float:
    """s_n = sqrt(1 - gamma^2) (t_{n+1} - sigma_min) + sigma_min."""
    return math.sqrt(max(0.0, 1.0 - gamma * gamma)) * (t_next - sigma_min) + sigma_min


@torch.no_grad()
def ctm_gamma(jump, noise: Callable[[int], torch.Tensor], times: Sequence[float], *, gamma: float = 0.0,
              sigma_min: float = 0.002, class_labels: Optional[torch.Tensor] = None, clip_denoised: bool = True,
              callback=None) -> torch.Tensor:
    """Samples from a jump `jump(x, t, s, class_labels)` over decreasing `times` (then sigma_min).

    `noise(0)` is the initial unit noise, `noise(n + 1)` the renoising of step n (the draw order of
    consistency multistep). With `clip_denoised`, estimates at sigma_min (every step when gamma = 1, the
    last otherwise) are clamped to [-1, 1], as consistency multistep clamps them.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    times = [float(t) for t in times]
    x = noise(0).float() * times[0]
    for n, t in enumerate(times):
        t_next = times[n + 1] if n + 1 < len(times) else sigma_min
        s = gamma_target(t_next, gamma, sigma_min) if n + 1 < len(times) else sigma_min
        full = lambda v: torch.full((x.shape[0],), v, device=x.device, dtype=torch.float32)  # noqa: E731
        x = jump(x, full(t), full(s), class_labels).float()
        if clip_denoised and s == sigma_min:
            x = x.clamp(-1, 1)
        if callback is not None:
            callback({"i": n, "sigma": t, "s": s, "x": x})
        if n + 1 < len(times):
            x = x + math.sqrt(max(0.0, t_next**2 - s**2)) * noise(n + 1).float()
    return x
