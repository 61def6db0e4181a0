"""Rewards shared by reward fine-tuning (AWM, Flow-GRPO) and `cmgen eval reward`.

A reward scores a batch of images, NCHW float in [-1, 1], one number per image:
`reward(images, cond)`. `cond` is the condition the images were generated for (class labels, or a
list of prompts for text models); a reward with `needs_condition` scores against it. The flag
`differentiable` says whether the score keeps torch's graph (gradients reach the images).
`reward.fn(uint8 NHWC)` is the numpy path of `cmgen eval reward`. A weight-backed reward scores on the
device of its network, `reward.module`, which a training loop places (cmgen.methods.base: Method.frozen).

The registry below maps a name to "module:factory" and the two flags; a factory takes keyword
options (target_class, device, weight paths) and returns a Reward. A new reward is one line.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from cmgen.errors import UserError


@dataclass
class Reward:
    name: str
    score: Callable          # (images NCHW float in [-1, 1], cond or None) -> float tensor [N]
    description: str
    differentiable: bool = False
    needs_condition: bool = False
    details: dict = field(default_factory=dict)
    module: Optional[torch.nn.Module] = field(default=None, repr=False)  # its network: `score` runs where it is
    logit_scale: Optional[float] = None      # score x this = the model's preference logit (CLIP's logit scale)
    evaluate: Optional[Callable] = field(default=None, repr=False)  # (uint8 NHWC, cond) -> scores: `fn`'s own path

    def __call__(self, images: torch.Tensor, cond=None) -> torch.Tensor:
        return self.score(images, cond)

    def fn(self, images: np.ndarray, cond=None) -> np.ndarray:
        """uint8 NHWC -> float64 per-image rewards (the evaluation path)."""
        if self.evaluate is not None:
            return np.asarray(self.evaluate(np.asarray(images), cond), np.float64)
        x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        with torch.no_grad():
            return self.score(x, cond).detach().double().cpu().numpy()


def device_of(module: torch.nn.Module) -> torch.device:
    """Where a reward's network is now (a training loop may have moved it): its inputs go there."""
    return next(module.parameters()).device


@dataclass(frozen=True)
class Entry:
    factory: str             # "module:function" returning a Reward
    differentiable: bool
    needs_condition: bool
    help: str


REWARDS: dict[str, Entry] = {}


def register(name: str, factory: str, *, differentiable: bool, needs_condition: bool, help: str) -> None:
    REWARDS[name] = Entry(factory, differentiable, needs_condition, help)


register("jpeg-compressibility", "cmgen.rewards.image:jpeg_compressibility", differentiable=False,
         needs_condition=False, help="minus the JPEG size at quality 95 in kB (DDPO, RLCM)")
register("jpeg-incompressibility", "cmgen.rewards.image:jpeg_incompressibility", differentiable=False,
         needs_condition=False, help="the JPEG size at quality 95 in kB")
register("brightness", "cmgen.rewards.image:brightness", differentiable=True, needs_condition=False,
         help="mean pixel value in [0, 1] (the ink of white-on-black digits)")
register("digit-class", "cmgen.rewards.digits:digit_class", differentiable=True, needs_condition=True,
         help="the digits classifier's probability of the conditioning class (prompt alignment's analogue)")
register("jpeg-surrogate", "cmgen.rewards.jpeg:jpeg_surrogate", differentiable=True, needs_condition=False,
         help="minus the JPEG size in kB predicted by a small CNN trained here (differentiable)")
register("aesthetic", "cmgen.rewards.weights:aesthetic", differentiable=True, needs_condition=False,
         help="LAION aesthetic predictor on CLIP ViT-L/14 (weights: --aesthetic, --clip)")
register("pickscore", "cmgen.rewards.weights:pickscore", differentiable=True, needs_condition=True,
         help="PickScore logit / 26 (weights: CMGEN_PICKSCORE = a CLIP model folder)")
register("hpsv2.1", "cmgen.rewards.weights:hpsv21", differentiable=True, needs_condition=True,
         help="HPSv2.1 (weights: CMGEN_HPSV21 = HPS_v2.1_compressed.pt, needs open_clip)")
register("imagereward", "cmgen.rewards.weights:imagereward", differentiable=True, needs_condition=True,
         help="ImageReward (weights: CMGEN_IMAGEREWARD = ImageReward.pt, needs image-reward)")
register("hpsv2.1+0.1imagereward", "cmgen.rewards.weights:hpsv21_imagereward", differentiable=True,
         needs_condition=True, help="RG-LCD's weighted reward HPSv2.1 + 0.1 min(ImageReward, 2) (weights: "
         "CMGEN_HPSV21 and CMGEN_IMAGEREWARD)")
register("clipscore", "cmgen.rewards.weights:clipscore", differentiable=True, needs_condition=True,
         help="CLIPScore 100 max(cos, 0) (weights: CMGEN_CLIPSCORE = a CLIP model folder)")


def reward_names() -> list[str]:
    return list(REWARDS)


def canonical(name: str, field_name: str = "--reward") -> str:
    key = str(name).strip().lower().replace("_", "-")
    if key not in REWARDS:
        match = difflib.get_close_matches(key, list(REWARDS), n=1)
        hint = f" (did you mean '{match[0]}'?)" if match else ""
        raise UserError(f"{field_name} '{name}' is unknown{hint}; valid rewards: {', '.join(REWARDS)}")
    return key


def build_reward(name: str, field_name: str = "--reward", **options) -> Reward:
    """The named reward; options a factory does not take are ignored (None values too)."""
    key = canonical(name, field_name)
    entry = REWARDS[key]
    module, func = entry.factory.split(":")
    factory = getattr(importlib.import_module(module), func)
    accepted = inspect.signature(factory).parameters
    reward = factory(**{k: v for k, v in options.items() if k in accepted and v is not None})
    reward.name, reward.differentiable, reward.needs_condition = key, entry.differentiable, entry.needs_condition
    return reward


__all__ = ["Reward", "REWARDS", "register", "build_reward", "reward_names", "canonical", "device_of"]
