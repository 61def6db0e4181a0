"""Per-sample distances with explicit reductions (sum over a sample, never elementwise)."""
from __future__ import annotations

import math

import torch


def ict_huber_c(dim: int) -> float:
    """iCT's pseudo-Huber constant c = 0.00054 * sqrt(d), d = elements per sample."""
    return 0.00054 * math.sqrt(dim)


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """sqrt(||a - b||_2^2 + c^2) - c with the norm over the whole sample; returns shape [B]."""
    sq = (a.float() - b.float()).flatten(1).pow(2).sum(1)
    return torch.sqrt(sq + c * c) - c
