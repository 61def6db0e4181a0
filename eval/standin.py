"""A tiny TorchScript stand-in for Inception's weight file, for tests and benchmarks without network.

It has the interface clean-fid's InceptionV3W uses: `base.layers(x)` on 299x299 inputs in
[-1, 1] gives 2048 features per image, and `base(x, return_features=True)` resizes raw
[0, 255] inputs itself (legacy_tensorflow mode). Its numbers mean nothing; never report them.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn


class _StandinLayers(nn.Module):
    """3x299x299 -> average-pool to 16x16 -> 3x3 conv to 8 channels -> tanh: 8*16*16 = 2048 features."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(16)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(self.pool(x))).flatten(1)


class _StandinInception(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = _StandinLayers()

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.layers((x - 128.0) / 128.0)


def save_standin_inception(folder, seed: int = 0) -> Path:
    """Write `<folder>/inception-2015-12-05.pt` (a few kB) and return its path."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = _StandinInception().eval()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "inception-2015-12-05.pt"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.*")  # deprecated in torch >= 2.13
        torch.jit.save(torch.jit.script(module), str(path))
    return path
