"""Noise-level grids and the iCT discretisation curriculum (Song & Dhariwal 2023, sec. 3.3-3.4)."""
from __future__ import annotations

import math

import torch


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                  dtype=torch.float64) -> torch.Tensor:
    """Ascending Karras grid: sigma_1 = sigma_min ... sigma_n = sigma_max (EDM eq. 5)."""
    if n < 2:
        raise ValueError(f"a Karras grid needs at least 2 points, got {n}")
    i = torch.arange(n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return ((lo + i / (n - 1) * (hi - lo)) ** rho).to(dtype)


def ict_stage_length(total_steps: int, s0: int, s1: int) -> int:
    """K' = floor(K / (log2 floor(s1/s0) + 1))."""
    return max(1, math.floor(total_steps / (math.log2(math.floor(s1 / s0)) + 1)))


def ict_curriculum(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """Number of grid points N(k) = min(s0 * 2^floor(k/K'), s1) + 1 (iCT eq. 7)."""
    k_prime = ict_stage_length(total_steps, s0, s1)
    return min(s0 * 2 ** (step // k_prime), s1) + 1


def lognormal_index_probs(sigmas: torch.Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> torch.Tensor:
    """p(i) for the pair (sigma_i, sigma_{i+1}), i = 0..N-2: the lognormal mass of that interval.

    p(i) ∝ erf((ln sigma_{i+1} - P_mean) / (sqrt 2 P_std)) - erf((ln sigma_i - P_mean) / (sqrt 2 P_std)).
    """
    s = sigmas.to(torch.float64)
    cdf = torch.erf((torch.log(s) - p_mean) / (math.sqrt(2.0) * p_std))
    mass = cdf[1:] - cdf[:-1]
    return mass / mass.sum()
