"""Exponential moving average of the weights, for evaluation (iCT keeps its teacher EMA at 0)."""
from __future__ import annotations

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, p in model.named_parameters()]
        self.shadow = [p.detach().clone().float() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        params = [p.detach().float() for p in model.parameters()]
        torch._foreach_lerp_(self.shadow, params, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadow))

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise KeyError(f"EMA weights lack {missing[0]}")
        for i, n in enumerate(self.names):
            self.shadow[i].copy_(tensors[n])

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for p, s in zip(model.parameters(), self.shadow):
            p.copy_(s.to(p.dtype))
