"""Multistep latent consistency sampling (Luo et al. 2023, Algorithm 1), step for step what diffusers'
LCMScheduler does: denoised = f(z, t_k, c, w); before every step but the first, z = sqrt(ab_{t_k}) denoised +
sqrt(1 - ab_{t_k}) noise(k); the last denoised is the sample (one step is deterministic). Timesteps come from
LCMScheduler's rule (cmgen.vp.lcm_timesteps), never the older strided rule."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch


@torch.no_grad()
def lcm_multistep(net, noise: Callable[[int], torch.Tensor], timesteps: Sequence[int], alphas_cumprod: torch.Tensor,
                  *, w: float, class_labels: Optional[torch.Tensor] = None, callback=None) -> torch.Tensor:
    """`net(z, t, c, w)` is the consistency function; `w` = guidance scale - 1 (LCM's w-form)."""
    denoised = None
    for k, t in enumerate(timesteps):
        z = noise(k).float()
        if k > 0:
            ab = alphas_cumprod[int(t)].to(z.device)
            z = ab.sqrt() * denoised + (1 - ab).sqrt() * z
        t_vec = torch.full((z.shape[0],), int(t), device=z.device, dtype=torch.long)
        denoised = net(z, t_vec, class_labels, w).float()
        if callback is not None:
            callback({"i": k, "t": int(t), "denoised": denoised})
    return denoised
