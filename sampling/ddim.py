"""DDIM sampling (Song et al. 2021, eta = 0) of an eps- or v-prediction network on the discrete VP process,
with Stable Diffusion's scheduler settings (leading timesteps with offset 1, alpha_bar_0 below t = 0):
the same steps as diffusers' DDIMScheduler configured like SD's."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from cmgen.vp import ddim_step, to_x0_eps


@torch.no_grad()
def ddim(net, noise: Callable[[int], torch.Tensor], timesteps: Sequence[int], alphas_cumprod: torch.Tensor,
         prediction_type: str, *, class_labels: Optional[torch.Tensor] = None, callback=None) -> torch.Tensor:
    """z_T = noise(0); each step z <- sqrt(ab_prev) x_0 + sqrt(1 - ab_prev) eps with (x_0, eps) from net(z, t, c);
    ab_prev is alpha_bar at the next listed timestep, alpha_bar_0 after the last."""
    z = noise(0).float()
    ac = alphas_cumprod.to(z.device)
    for i, t in enumerate(timesteps):
        t_vec = torch.full((z.shape[0],), int(t), device=z.device, dtype=torch.long)
        x0, eps = to_x0_eps(net(z, t_vec, class_labels), z, ac, t_vec, prediction_type)
        prev = int(timesteps[i + 1]) if i + 1 < len(timesteps) else -1
        z = ddim_step(x0, eps, ac[prev] if prev >= 0 else ac[0])
        if callback is not None:
            callback({"i": i, "t": int(t), "denoised": x0})
    return z
