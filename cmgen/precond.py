"""The parameterisations every method and sampler share, each in one place.

- consistency (`cm`): f(x, sigma) = c_skip x + c_out F(c_in x, c_noise) with the boundary-shifted
  c_skip/c_out of Song et al. 2023 (CM, eq. 7 and App. C), so f(x, sigma_min) = x exactly;
- EDM denoiser (`edm`): D(x, sigma) with Karras et al. 2022 (Table 1) scalings,
  c_skip = sigma_d^2/(sigma^2+sigma_d^2), c_out = sigma sigma_d/sqrt(sigma^2+sigma_d^2);
- CTM jump (`ctm`): G(x, t, s) = (s/t) x + (1 - s/t) g(x, t, s), g EDM-scaled in t (TrajectoryJump);
- flow velocity (`flow`): v(x, t) = F(x, 1000 t), x_t = (1 - t) x_0 + t eps (SD3's timestep scale).

c_noise follows the backbone convention named by `precond.c_noise`: `cm` = 1000 * 0.25 ln(sigma), the
convention of diffusers' CMStochasticIterativeScheduler (so a UNet trained here exports unchanged);
`edm` = 0.25 ln(sigma), EDM's and diffusers' EDMEulerScheduler's.
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
    c_noise: str = "cm"             # cm: 250 ln(sigma) | edm: 0.25 ln(sigma)


def sampling_sigmas_ok(values, sigma_min: float, sigma_max: float) -> bool:
    """Whether `values` can be a sampling schedule: at least one, strictly decreasing, in (sigma_min, sigma_max]
    (recipe key sample.sigmas and `cmgen sample --sigmas`)."""
    values = list(values)
    return (bool(values) and all(sigma_min < v <= sigma_max for v in values)
            and all(a > b for a, b in zip(values, values[1:])))


def c_skip(sigma, sigma_min: float, sigma_data: float):
    return sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)


def c_out(sigma, sigma_min: float, sigma_data: float):
    return (sigma - sigma_min) * sigma_data / (sigma**2 + sigma_data**2) ** 0.5


def c_in(sigma, sigma_data: float):
    return 1.0 / (sigma**2 + sigma_data**2) ** 0.5


def c_noise(sigma, convention: str = "cm"):
    # diffusers: 1000 * 0.25 * log(sigma + 1e-44) (CM), 0.25 * log(sigma) (EDMEulerScheduler)
    if convention == "edm":
        return 0.25 * torch.log(sigma)
    return 250.0 * torch.log(sigma + 1e-44)


def edm_c_skip(sigma, sigma_data: float):
    return sigma_data**2 / (sigma**2 + sigma_data**2)


def edm_c_out(sigma, sigma_data: float):
    return sigma * sigma_data / (sigma**2 + sigma_data**2) ** 0.5


def edm_loss_weight(sigma, sigma_data: float):
    """lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 = 1 / c_out^2 (EDM eq. 8, Table 1)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def _per_sample(sigma, x: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))


class Parameterised(nn.Module):
    """A backbone F with the recipe's noise constants; subclasses define the parameterisation."""

    def __init__(self, backbone: nn.Module, cfg: PrecondConfig = PrecondConfig()):
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg


class ConsistencyDenoiser(Parameterised):
    """Wraps a backbone F(x_in, c_noise, class_labels) into the consistency function f.

    The backbone returns a tensor shaped like x. The scalings are computed in float32
    even under autocast, so the boundary condition holds to float precision.
    """

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels=None) -> torch.Tensor:
        cfg = self.cfg
        sigma = _per_sample(sigma, x)
        s = _expand(sigma, x)
        x32 = x.float()
        out = self.backbone((c_in(s, cfg.sigma_data) * x32), c_noise(sigma, cfg.c_noise), class_labels)
        return c_skip(s, cfg.sigma_min, cfg.sigma_data) * x32 + c_out(s, cfg.sigma_min, cfg.sigma_data) * out.float()


class EDMDenoiser(Parameterised):
    """D(x, sigma) = c_skip x + c_out F(c_in x, c_noise, y) with EDM's unshifted scalings (D(x, 0) = x)."""

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels=None) -> torch.Tensor:
        sd = self.cfg.sigma_data
        sigma = _per_sample(sigma, x)
        s = _expand(sigma, x)
        x32 = x.float()
        out = self.backbone(c_in(s, sd) * x32, c_noise(sigma, self.cfg.c_noise), class_labels)
        return edm_c_skip(s, sd) * x32 + edm_c_out(s, sd) * out.float()


FLOW_TIME_SCALE = 1000.0  # the backbone sees 1000 t, as SD3 and FlowMatchEulerDiscreteScheduler do


class FlowVelocity(Parameterised):
    """v(x, t) = F(x, 1000 t, y): the velocity eps - x_0 of x_t = (1 - t) x_0 + t eps, t in [0, 1]."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels=None) -> torch.Tensor:
        t = _per_sample(t, x)
        return self.backbone(x.float(), FLOW_TIME_SCALE * t, class_labels).float()


class TrajectoryJump(Parameterised):
    """CTM's jump G(x, t, s) = (s/t) x + (1 - s/t) g(x, t, s) (Kim et al. 2024, eq. 4), with
    g(x, t, s) = c_skip(t) x + c_out(t) F(c_in(t) x, c_noise(t), c_noise(s), y) in EDM's scalings of t only.
    G(x, t, t) = x by construction; D(x, t) = g(x, t, t) is the denoiser. The backbone is made two-time."""

    def __init__(self, backbone: nn.Module, cfg: PrecondConfig = PrecondConfig()):
        from cmgen.models.two_time import two_time_backbone

        super().__init__(backbone if getattr(backbone, "two_time", False) else two_time_backbone(backbone), cfg)

    def g(self, x: torch.Tensor, t, s, class_labels=None) -> torch.Tensor:
        sd, conv = self.cfg.sigma_data, self.cfg.c_noise
        t, s = _per_sample(t, x), _per_sample(s, x)
        te, x32 = _expand(t, x), x.float()
        out = self.backbone(c_in(te, sd) * x32, c_noise(t, conv), c_noise(s, conv), class_labels)
        return edm_c_skip(te, sd) * x32 + edm_c_out(te, sd) * out.float()

    def denoise(self, x: torch.Tensor, t, class_labels=None) -> torch.Tensor:
        """D(x, t) = g(x, t, t)."""
        return self.g(x, t, t, class_labels)

    def forward(self, x: torch.Tensor, t, s, class_labels=None, output: str = "G") -> torch.Tensor:
        """G(x, t, s); `output="g"` returns g(x, t, s) (one call that works through DDP wrappers)."""
        if output == "g":
            return self.g(x, t, s, class_labels)
        t, s = _per_sample(t, x), _per_sample(s, x)
        ratio = _expand(s / t, x)
        return ratio * x.float() + (1.0 - ratio) * self.g(x, t, s, class_labels)


NETWORKS = {"cm": ConsistencyDenoiser, "edm": EDMDenoiser, "flow": FlowVelocity, "ctm": TrajectoryJump}
