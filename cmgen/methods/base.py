"""The method protocol: what a method adds to the one training loop.

A method module holds a frozen `Config` dataclass (its recipe section) and a `Method` class. Every
hook has a no-op default, so a method overrides only what it needs:

    class Method(cmgen.methods.Method):
        parameterisation = "cm"                 # the network the Generator wraps: cm | edm | flow
        def resolve(cls, recipe) -> recipe      # classmethod: fix run-length defaults at the run's start
        def __init__(self, cfg, recipe, gen)    # load frozen teachers / reward nets here
        def frozen(self) -> {name: module}      # never trained, never checkpointed (teachers, VAEs)
        def parts(self) -> {name: Part}         # extra trainable networks with their own optimizer / EMA
        def targets(self) -> {name: decay}      # EMA copies of the model that the loss runs forward
        def phases(self, step) -> ("model",)    # which optimizers this step updates, in order
        def collect(self, batches, nets, step, dist) -> batches   # once a step, no grad (rollouts, rewards)
        def loss(self, nets, batch, step) -> {"loss": ..., term: ...}   # per micro-batch and phase

The loop knows no method by name. Step gates (a term that switches on at step k) are recipe
fields a method reads in `phases` or `loss` (see `gate`), never a resume with an edited recipe.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from torch import nn


@dataclass
class Part:
    """An extra trainable network: its optimizer settings (a cmgen.recipe.OptimConfig) and optional EMA."""
    module: nn.Module
    optim: Any
    ema_decay: Optional[float] = None


@dataclass
class Batch:
    """One micro-batch of one phase: this process's slice of the global batch and its keyed randomness."""
    x: torch.Tensor
    labels: Optional[torch.Tensor]
    rng: Any                        # cmgen.rng.BatchRNG for (seed, step, phase)
    phase: str = "model"
    extra: dict = field(default_factory=dict)   # what `collect` added (rollouts, rewards, advantages)


class Nets(dict):
    """name -> network for the loss: 'model' (trained, wrapped for DDP), parts, targets and frozen nets."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Dist:
    """What `collect` may use across processes: world size, rank and an ordered gather."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.world, self.rank = accelerator.num_processes, accelerator.process_index

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenation over processes in rank order (identity on one process)."""
        return self.accelerator.gather(t.contiguous()) if self.world > 1 else t


Decay = Union[float, Callable[[int], float]]


def gate(step: int, start: Optional[int]) -> bool:
    """True once `step` reaches `start` (None = never)."""
    return start is not None and step >= start


class Method:
    parameterisation = "cm"

    def __init__(self, cfg, recipe, gen):
        self.cfg, self.recipe, self.gen = cfg, recipe, gen

    @classmethod
    def resolve(cls, recipe):
        """The recipe with defaults that depend on the run's length written out, once, at the run's
        start (iCT's curriculum length K = train.steps). A resume keeps the stored values, so a new
        `train.steps` never re-times a schedule."""
        return recipe

    def frozen(self) -> dict[str, nn.Module]:
        return {}

    def parts(self) -> dict[str, Part]:
        return {}

    def targets(self) -> dict[str, Decay]:
        return {}

    def phases(self, step: int) -> tuple[str, ...]:
        return ("model",)

    @torch.no_grad()
    def collect(self, batches: list[Batch], nets: Nets, step: int, dist: Dist) -> list[Batch]:
        return batches

    def loss(self, nets: Nets, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError
