"""Stable Diffusion's discrete variance-preserving process, and the LCM formulas built on it.

- schedule: scaled-linear betas, beta_t = (sqrt(b0) + t (sqrt(b1) - sqrt(b0)) / (T - 1))^2, t = 0..T-1
  (SD: b0 = 0.00085, b1 = 0.012, T = 1000), alpha_bar_t = prod_{s<=t} (1 - beta_s);
  z_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps;
- predictions: eps, or v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 (Salimans & Ho 2022), converted
  to (x_0, eps) in one place (`to_x0_eps`);
- DDIM (eta = 0, Song et al. 2021 eq. 12): z_prev = sqrt(alpha_bar_prev) x_0 + sqrt(1 - alpha_bar_prev) eps;
- LCM (Luo et al. 2023): the boundary scalings c_skip = sd^2 / ((10 t)^2 + sd^2), c_out = 10 t / sqrt((10 t)^2
  + sd^2) (sd = 0.5, no sd factor in c_out, diffusers #8547); the guidance embedding of w = guidance - 1;
  the skip-step grid t = k j - 1 (k = T / 50) and diffusers' LCMScheduler inference timestep rule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

LCM_SIGMA_DATA = 0.5
LCM_TIMESTEP_SCALING = 10.0


@dataclass(frozen=True)
class VPSchedule:
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000

    def betas(self) -> torch.Tensor:
        t = self.num_train_timesteps
        return torch.linspace(self.beta_start**0.5, self.beta_end**0.5, t, dtype=torch.float32) ** 2

    def alphas_cumprod(self) -> torch.Tensor:
        """alpha_bar_t for t = 0..T-1, float32 (computed as diffusers' schedulers compute it)."""
        return torch.cumprod(1.0 - self.betas(), dim=0)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.device, torch.float32).reshape(-1, *([1] * (like.ndim - 1)))


def alpha_sigma(alphas_cumprod: torch.Tensor, t: torch.Tensor, like: torch.Tensor):
    """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) at integer timesteps t, shaped to broadcast over `like`."""
    ab = alphas_cumprod.to(like.device)[t.to(like.device).long()]
    return _bcast(ab.sqrt(), like), _bcast((1 - ab).sqrt(), like)


def add_noise(x0: torch.Tensor, eps: torch.Tensor, alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    a, s = alpha_sigma(alphas_cumprod, t, x0)
    return a * x0.float() + s * eps.float()


def velocity(x0: torch.Tensor, eps: torch.Tensor, alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    a, s = alpha_sigma(alphas_cumprod, t, x0)
    return a * eps.float() - s * x0.float()


def to_x0_eps(out: torch.Tensor, z: torch.Tensor, alphas_cumprod: torch.Tensor, t: torch.Tensor,
              prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_0, eps) from a network output `out` at z_t: eps-prediction x_0 = (z - s eps) / a; v-prediction
    x_0 = a z - s v, eps = a v + s z."""
    a, s = alpha_sigma(alphas_cumprod, t, z)
    out, z = out.float(), z.float()
    if prediction_type == "epsilon":
        return (z - s * out) / a, out
    if prediction_type == "v_prediction":
        return a * z - s * out, a * out + s * z
    raise ValueError(f"prediction_type must be epsilon or v_prediction, got {prediction_type!r}")


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, alpha_bar_prev) -> torch.Tensor:
    """Deterministic DDIM (eta = 0): sqrt(alpha_bar_prev) x_0 + sqrt(1 - alpha_bar_prev) eps."""
    ab = torch.as_tensor(alpha_bar_prev, dtype=torch.float32)
    ab = _bcast(ab, x0) if ab.ndim else ab.to(x0.device)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps


def ddim_timesteps(steps: int, num_train_timesteps: int = 1000, steps_offset: int = 1) -> list[int]:
    """Stable Diffusion's DDIM inference timesteps ("leading" spacing with steps_offset 1):
    (T // steps) * (steps - 1 - i) + offset, e.g. 50 steps -> 981, 961, ..., 1."""
    ratio = num_train_timesteps // steps
    return [ratio * i + steps_offset for i in reversed(range(steps))]


# ----------------------------------------------------------------------------- LCM

def lcm_boundary_scalings(t: torch.Tensor, sigma_data: float = LCM_SIGMA_DATA,
                          timestep_scaling: float = LCM_TIMESTEP_SCALING) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) at integer timesteps: c_skip(0) = 1, c_out(0) = 0 (the LCM boundary condition)."""
    s = torch.as_tensor(t, dtype=torch.float32) * timestep_scaling
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s / (s**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def guidance_embedding(w: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """[sin, cos](1000 w e^{-ln(10^4) i / (dim/2 - 1)}), i < dim/2 (zero-padded when dim is odd): the
    embedding LCM passes as `timestep_cond`, with w = guidance_scale - 1."""
    w = torch.as_tensor(w, dtype=torch.float32).reshape(-1) * 1000.0
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freq[None, :].to(w.device)
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def skip_step_grid(num_train_timesteps: int = 1000, original_steps: int = 50) -> torch.Tensor:
    """The LCD solver's grid t_j = k j - 1, j = 1..original_steps, k = T / original_steps (19, 39, ..., 999)."""
    k = num_train_timesteps // original_steps
    return torch.arange(1, original_steps + 1, dtype=torch.long) * k - 1


def lcm_timesteps(steps: int, original_steps: int = 50, num_train_timesteps: int = 1000) -> list[int]:
    """diffusers' LCMScheduler.set_timesteps: floor(linspace(0, 50, N, endpoint=False)) indices into the reversed
    grid; N = 2 -> 999, 499; N = 4 -> 999, 759, 499, 259. (Never the older strided rule 999, 759, 519, 279.)"""
    grid = skip_step_grid(num_train_timesteps, original_steps).numpy()[::-1]
    if not 1 <= steps <= original_steps:
        from cmgen.errors import UserError
        raise UserError(f"--steps must be between 1 and {original_steps} (the LCM's original steps), got {steps}")
    idx = np.floor(np.linspace(0, len(grid), num=steps, endpoint=False)).astype(np.int64)
    return [int(v) for v in grid[idx]]
