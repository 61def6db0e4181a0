"""Rewards as torch functions R(images, cond) -> [B] for reward-guided training (RG-LCD's direct mode and
its LRM expert). Images are NCHW floats, about [-1, 1]; `cond` is the batch's class labels (or None).

Differentiable: `digit-class` (the digits classifier's probability of the sample's own class, or of
`target_class`), `ink` (mean brightness in [0, 1]), `jpeg-surrogate` (minus the JPEG size in kB predicted
by a small CNN trained here, cmgen.rewards.jpeg). Not differentiable (experts for the LRM):
`jpeg-compressibility` (minus the real JPEG size in kB, cmgen.rewards.jpeg). Weight-backed (the
cmgen.rewards registry, differentiable): `hpsv2.1`, `pickscore` and `clipscore` (here, as RG-LCD trains on them,
the bare cosine of their CLIP model, not the registry's logit / 26 and 100 max(cos, 0)), `imagereward` (capped at
2 here, as RG-LCD trains on it), `aesthetic`, `hpsv2.1+0.1imagereward`. A reward's network (`.module`) is built on
the CPU; the method hands it to the loop (Method.frozen), which moves it to the run's device.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from cmgen.errors import UserError

RewardFn = Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def digit_class_probability(images: torch.Tensor, cond: Optional[torch.Tensor], target_class: Optional[int] = None,
                            net=None) -> torch.Tensor:
    """p(class | image) under the digits classifier: the class of `cond` (a class-conditional model's own
    label), else `target_class`, else the top class."""
    from cmgen.eval.digits_net import digits_net

    net = net or digits_net()
    if tuple(images.shape[1:]) != (1, 8, 8):
        raise UserError(f"reward 'digit-class' needs 1x8x8 digit images, got {tuple(images.shape[1:])}; "
                        "use it with the digits recipes")
    net = net.to(images.device)
    probs = net(images.float()).softmax(1)
    if cond is not None and not cond.is_floating_point():
        return probs.gather(1, cond.long().clamp(max=9).view(-1, 1))[:, 0]
    if target_class is not None:
        return probs[:, target_class]
    return probs.max(1).values


def ink(images: torch.Tensor, cond=None) -> torch.Tensor:
    """Mean brightness in [0, 1] (the digits' ink is bright)."""
    return ((images.float() + 1) / 2).flatten(1).mean(1)


def _refuse_gradient_free(name: str):
    raise UserError(f"reward '{name}' has no gradient; use it as the LRM expert (method.reward_mode: lrm) or a "
                    "differentiable reward such as 'jpeg-surrogate' in direct mode")


def build_reward(name: str, *, target_class: Optional[int] = None, differentiable: bool = True,
                 device="cpu") -> RewardFn:
    """The reward `name` as R(images, cond) -> [B]; `differentiable` refuses the ones without gradients. Every name but
    `ink` (the registry's `brightness`, under its RG-LCD recipe name) comes from the cmgen.rewards registry, in
    RG-LCD's form: `pickscore` and `clipscore` as their bare CLIP cosine, `imagereward` capped at 2."""
    key = (name or "").strip().lower().replace("_", "-")
    if target_class is not None and not 0 <= target_class <= 9:
        raise UserError(f"recipe key 'method.target_class' must be a digit 0..9, got {target_class}")
    from cmgen import rewards as shared

    if key == "ink":
        return ink
    if key in shared.REWARDS:
        if differentiable and not shared.REWARDS[key].differentiable:
            _refuse_gradient_free(key)
        reward = shared.build_reward(key, "method.reward", target_class=target_class, device=device, cosine=True)
        if key == "imagereward":
            from cmgen.rewards.weights import capped_imagereward

            return capped_imagereward(reward)
        return reward
    known = ["ink", *shared.REWARDS]
    raise UserError(f"recipe key 'method.reward' names an unknown reward '{name}'; use one of {', '.join(known)}")
