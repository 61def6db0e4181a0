"""EDM/CM preconditioning shared by every method and every sampler.

f(x, sigma) = c_skip(sigma) * x + c_out(sigma) * F(c_in(sigma) * x, c_noise(sigma))
with the boundary-shifted c_skip/c_out of Song et al. 2023 (CM, eq. 7 and App. C), so
f(x, sigma_min) = x exactly. c_noise = 1000 * 0.25 * ln(sigma) is the convention of
diffusers' CMStochasticIterativeScheduler, so a UNet trained here exports unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class PrecondConfig:
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    rho: float = 7.0


def c_skip(sigma, sigma_min: float, sigma_data: float):
    return sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)


def c_out(sigma, sigma_min: float, sigma_data: float):
    return (sigma - sigma_min) * sigma_data / (sigma**2 + sigma_data**2) ** 0.5


def c_in(sigma, sigma_data: float):
    return 1.0 / (sigma**2 + sigma_data**2) ** 0.5


def c_noise(sigma):
    # diffusers: 1000 * 0.25 * log(sigma + 1e-44)
    return 250.0 * torch.log(sigma + 1e-44)


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))


class ConsistencyDenoiser(nn.Module):
    """Wraps a backbone F(x_in, c_noise, class_labels) into the consistency function f.

    The backbone returns a tensor shaped like x. The scalings are computed in float32
    even under autocast, so the boundary condition holds to float precision.
    """

    def __init__(self, backbone: nn.Module, cfg: PrecondConfig = PrecondConfig()):
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels=None) -> torch.Tensor:
        cfg = self.cfg
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        s = _expand(sigma, x)
        x32 = x.float()
        out = self.backbone((c_in(s, cfg.sigma_data) * x32), c_noise(sigma), class_labels)
        return c_skip(s, cfg.sigma_min, cfg.sigma_data) * x32 + c_out(s, cfg.sigma_min, cfg.sigma_data) * out.float()
