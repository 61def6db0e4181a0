"""Exponential moving average of the trainable weights: shadow <- decay shadow + (1 - decay) weights.

Used for the evaluation EMA of every trainable part; frozen parameters (a LoRA base) are not copied."""
from __future__ import annotations

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.shadow = [p.detach().clone().float() for p in _trainable(model)]

    def to(self, device) -> "EMA":
        """Keep the average where the weights it follows live (the loop moves it with its network)."""
        self.shadow = [s.to(device) for s in self.shadow]
        return self

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        params = [p.detach().float() for p in _trainable(model)]
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
        for p, s in zip(_trainable(model), self.shadow):
            p.copy_(s.to(p.dtype))


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class TargetNetwork:
    """A frozen copy of the model that the loss runs forward (CTM's theta^-, LCD's target), updated
    after every model step with its own decay, a number or a function of the step."""

    def __init__(self, model: torch.nn.Module, decay):
        import copy

        self.module = copy.deepcopy(model).requires_grad_(False)
        self.decay = decay

    def decay_at(self, step: int) -> float:
        return float(self.decay(step) if callable(self.decay) else self.decay)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        ours = list(self.module.parameters())
        theirs = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ours, [p.to(q.dtype) for p, q in zip(theirs, ours)], 1.0 - self.decay_at(step))
