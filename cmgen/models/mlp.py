"""A residual MLP backbone for 2-D (or any flat) data."""
from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer-style embedding of a scalar per sample (cos first, as diffusers' flip_sin_to_cos)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class _Block(nn.Module):
    def __init__(self, width: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width * 2)
        self.fc2 = nn.Linear(width * 2, width)
        self.emb = nn.Linear(width, width * 2)
        self.drop = nn.Dropout(dropout)

    def forward(self, h, emb, emb_s=None):
        y = self.fc1(self.norm(h)) + self.emb(emb)
        if emb_s is not None:   # a two-time block (cmgen.models.two_time.TwoTimeMLPBackbone) adds its s projection
            y = y + self.emb_s(emb_s)
        return h + self.fc2(self.drop(nn.functional.silu(y)))


class MLPBackbone(nn.Module):
    def __init__(self, dim: int, width: int = 256, depth: int = 4, num_classes: int = 0, dropout: float = 0.0):
        super().__init__()
        self.width = width
        self.config = {"dim": dim, "width": width, "depth": depth, "num_classes": num_classes, "dropout": dropout}
        self.inp = nn.Linear(dim, width)
        self.time = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.classes = nn.Embedding(num_classes, width) if num_classes else None
        self.blocks = nn.ModuleList(_Block(width, dropout) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, dim)

    def embed(self, noise_label, class_labels=None):
        """silu(time MLP(sinusoidal(noise_label)) + class embedding), the input of every block's projection."""
        emb = self.time(sinusoidal_embedding(noise_label, self.width))
        if self.classes is not None:
            if class_labels is None:
                raise ValueError("this model is class-conditional: pass class_labels")
            emb = emb + self.classes(class_labels)
        return nn.functional.silu(emb)

    def trunk(self, x, emb, emb_s=None):
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb, emb_s)
        return self.out(self.out_norm(h))

    def forward(self, x, noise_label, class_labels=None):
        return self.trunk(x, self.embed(noise_label, class_labels))
