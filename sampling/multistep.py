"""Consistency multistep sampling (Song et al. 2023, Algorithm 1).

x = f(sigma_0 z_0, sigma_0); for each later sigma_k: x = f(x + sqrt(sigma_k^2 - sigma_min^2) z_k, sigma_k).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch


def per_image_noise(seeds: Sequence[int], shape: tuple[int, ...], device="cpu") -> Callable[[int], torch.Tensor]:
    """Unit noise for step k, one generator per image seeded by its own seed.

    Draw order per image: the initial noise, then one draw per later step, which is the order
    of diffusers' ConsistencyModelPipeline with a list of per-image generators. An image
    therefore depends only on its seed, never on the batch it was sampled in.
    """
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    drawn: dict[int, torch.Tensor] = {}

    def noise(k: int) -> torch.Tensor:
        if k not in drawn:
            drawn[k] = torch.stack([torch.randn((1, *shape), generator=g)[0] for g in gens]).to(device)
        return drawn[k]

    return noise


@torch.no_grad()
def consistency_multistep(model, noise: Callable[[int], torch.Tensor], sigmas: Sequence[float], *,
                          sigma_min: float = 0.002, class_labels: Optional[torch.Tensor] = None,
                          clip_denoised: bool = True, callback=None) -> torch.Tensor:
    """Samples from a consistency function `model(x, sigma, class_labels)` over decreasing `sigmas`.

    `noise(k)` returns unit Gaussian noise for step k (k = 0 is the initial draw). With
    `clip_denoised` every intermediate estimate is clamped to [-1, 1] (image data), as diffusers'
    CMStochasticIterativeScheduler(clip_denoised=True) does.
    """
    x = None
    for k, sigma in enumerate(sigmas):
        sigma = float(sigma)
        z = noise(k)
        x_in = z * sigma if k == 0 else x + (sigma**2 - sigma_min**2) ** 0.5 * z
        sig = torch.full((z.shape[0],), sigma, device=z.device, dtype=torch.float32)
        x = model(x_in, sig, class_labels).float()
        if clip_denoised:
            x = x.clamp(-1, 1)
        if callback is not None:
            callback({"i": k, "sigma": sigma, "denoised": x})
    return x
