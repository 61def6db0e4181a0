"""EDM samplers (Karras et al. 2022): Heun (Algorithm 1; Algorithm 2 with churn) and Euler.

Both integrate the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma over a decreasing
noise-level list that ends at 0 (`edm_sigmas`). Heun takes a second-order correction on every
step but the last (sigma -> 0), so N steps cost 2N - 1 network evaluations; Euler costs N.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch


def edm_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> list[float]:
    """EDM eq. 5: `steps` Karras levels from sigma_max down to sigma_min, then sigma = 0."""
    from cmgen.schedules import karras_sigmas

    if steps == 1:
        return [float(sigma_max), 0.0]
    grid = karras_sigmas(steps, sigma_min, sigma_max, rho).flip(0)
    return [float(v) for v in grid] + [0.0]


def heun_nfe(sigmas: Sequence[float]) -> int:
    steps = len(sigmas) - 1
    return 2 * steps - sum(1 for s in sigmas[1:] if s == 0)


def _labels_call(denoiser, labels):
    return lambda x, s: denoiser(x, torch.full((x.shape[0],), float(s), device=x.device), labels).float()


@torch.no_grad()
def edm_heun(denoiser, noise: Callable[[int], torch.Tensor], sigmas: Sequence[float], *,
             class_labels: Optional[torch.Tensor] = None, churn: float = 0.0, s_tmin: float = 0.0,
             s_tmax: float = float("inf"), s_noise: float = 1.0, callback=None) -> torch.Tensor:
    """Deterministic Heun (churn = 0, Algorithm 1) or stochastic (Algorithm 2) sampling.

    `noise(0)` is the initial unit noise (scaled by sigmas[0]); `noise(i + 1)` the churn noise of step i.
    """
    D = _labels_call(denoiser, class_labels)
    steps = len(sigmas) - 1
    x = noise(0).float() * float(sigmas[0])
    for i in range(steps):
        t, t_next = float(sigmas[i]), float(sigmas[i + 1])
        gamma = min(churn / steps, math.sqrt(2.0) - 1.0) if churn > 0 and s_tmin <= t <= s_tmax else 0.0
        t_hat = t + gamma * t
        if gamma > 0:
            x = x + math.sqrt(t_hat**2 - t**2) * s_noise * noise(i + 1).float()
        denoised = D(x, t_hat)
        d = (x - denoised) / t_hat
        x_next = x + (t_next - t_hat) * d
        if t_next > 0:  # second-order correction (EDM Algorithm 1, lines 9-11)
            d_next = (x_next - D(x_next, t_next)) / t_next
            x_next = x + (t_next - t_hat) * (0.5 * d + 0.5 * d_next)
        x = x_next
        if callback is not None:
            callback({"i": i, "sigma": t, "denoised": denoised})
    return x


@torch.no_grad()
def edm_euler(denoiser, noise: Callable[[int], torch.Tensor], sigmas: Sequence[float], *,
              class_labels: Optional[torch.Tensor] = None, callback=None) -> torch.Tensor:
    """First-order steps x <- x + (sigma_next - sigma) (x - D(x, sigma)) / sigma (what EDMEulerScheduler does)."""
    D = _labels_call(denoiser, class_labels)
    x = noise(0).float() * float(sigmas[0])
    for i in range(len(sigmas) - 1):
        t, t_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = D(x, t)
        x = x + (t_next - t) * (x - denoised) / t
        if callback is not None:
            callback({"i": i, "sigma": t, "denoised": denoised})
    return x
