"""JPEG compressibility (DDPO, RLCM): minus the size in kB of an image saved as JPEG at quality 95, and a
small CNN trained here to predict it, a differentiable surrogate for direct reward guidance.

Images smaller than 32 pixels are enlarged by nearest-neighbour repetition to at least 32 first: an 8x8
digit is a single JPEG block whose file is almost all header (0.394 +- 0.003 kB over the digits), while
at 32x32 the sizes spread (0.78 +- 0.07 kB) and follow the image's content.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

VERSION = "jpeg-surrogate-v1"
MIN_SIDE = 32
QUALITY = 95


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """NCHW in [-1, 1] -> NHWC uint8, enlarged by an integer factor to a side of at least MIN_SIDE."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    f = max(1, -(-MIN_SIDE // min(x.shape[-2:])))
    if f > 1:
        x = x.repeat_interleave(f, 2).repeat_interleave(f, 3)
    return x.permute(0, 2, 3, 1).numpy()


def jpeg_kb(images: torch.Tensor) -> torch.Tensor:
    from cmgen.rewards.image import jpeg_kilobytes

    return torch.from_numpy(jpeg_kilobytes(to_uint8(images), QUALITY)).float().to(images.device)


@torch.no_grad()
def jpeg_compressibility(images: torch.Tensor) -> torch.Tensor:
    """-kB at quality 95 (no gradient: PIL's encoder)."""
    return -jpeg_kb(images)


class JPEGSurrogate(nn.Module):
    """conv(16) -> conv(32, stride 2) -> global mean -> linear(1): predicted kB, on NCHW images in [-1, 1]."""

    def __init__(self, channels: int = 1):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(channels, 16, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.SiLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 1))
        self.register_buffer("kb_mean", torch.zeros(()))
        self.register_buffer("kb_std", torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float())[:, 0] * self.kb_std + self.kb_mean


def surrogate_training_images(seed: int = 0) -> torch.Tensor:
    """The digits and perturbed digits (noise, blur, contrast, mixtures): the sizes generated digits take."""
    from cmgen.data import load_digits

    g = torch.Generator().manual_seed(seed)
    x = load_digits().x
    n = len(x)
    noisy = (x + torch.rand(n, 1, 1, 1, generator=g) * 0.6 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    blur = nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    contrast = (x * (0.3 + 0.7 * torch.rand(n, 1, 1, 1, generator=g))).clamp(-1, 1)
    lam = torch.rand(n, 1, 1, 1, generator=g)
    mix = lam * x + (1 - lam) * x[torch.randperm(n, generator=g)]
    return torch.cat([x, noisy, blur, contrast, mix])


def train_surrogate(steps: int = 800, seed: int = 0) -> JPEGSurrogate:
    """Deterministic regression of the real kB (MSE on standardised sizes)."""
    x = surrogate_training_images(seed)
    y = jpeg_kb(x)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = JPEGSurrogate(x.shape[1])
    net.kb_mean.fill_(float(y.mean()))
    net.kb_std.fill_(float(y.std()))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=g)
        loss = ((net.net(x[idx])[:, 0] - (y[idx] - net.kb_mean) / net.kb_std) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval()


def weights_path() -> Path:
    from cmgen.eval.digits_net import cache_dir

    return cache_dir() / f"{VERSION}.safetensors"


@lru_cache(maxsize=2)
def _load_or_train(path: str) -> JPEGSurrogate:
    from cmgen.eval.digits_net import load_or_train

    return load_or_train(Path(path), JPEGSurrogate, train_surrogate)


def surrogate() -> JPEGSurrogate:
    """The cached surrogate (trained on first use, about ten seconds on one core)."""
    return _load_or_train(str(weights_path()))


def surrogate_reward():
    net = surrogate().requires_grad_(False)
    return lambda x, c: -net.to(x.device)(x)


def jpeg_surrogate(device="cpu"):
    """Registry factory (cmgen.rewards): the surrogate as a differentiable Reward, minus predicted kB."""
    from cmgen.rewards import Reward

    return Reward("jpeg-surrogate", surrogate_reward(), f"minus the JPEG size in kB predicted by {VERSION}",
                  differentiable=True)
