"""The digit-class reward: the digits classifier's probability of the conditioning class (the analogue
of prompt alignment for a class-conditional digits model)."""
from __future__ import annotations

import copy
from typing import Optional

import torch

from cmgen.errors import UserError
from cmgen.plots import LUMA_601
from cmgen.rewards import Reward, device_of


def _luma(x: torch.Tensor) -> torch.Tensor:
    """N1HW as is; N3HW to luma with ITU-R 601 weights (as the evaluation path's PIL 'L')."""
    if x.shape[1] == 3:
        w = torch.tensor(LUMA_601, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x * w).sum(1, keepdim=True)
    return x


def digit_class(target_class: Optional[int] = None, device="cpu") -> Reward:
    """p(class | image). The class is `cond` (one label per image) when given, else `target_class`;
    with neither, the top-class probability."""
    from cmgen.eval import digits_net as dn

    if target_class is not None and not 0 <= int(target_class) <= 9:
        raise UserError(f"--target-class must be a digit 0..9, got {target_class}")
    net = copy.deepcopy(dn.digits_net()).to(device).eval().requires_grad_(False)   # its own: a loop moves it

    def score(x: torch.Tensor, cond=None) -> torch.Tensor:
        if tuple(x.shape[2:]) != (8, 8):
            raise UserError(f"reward digit-class needs 8x8 digit images, got {x.shape[2]}x{x.shape[3]}")
        probs = net(_luma(x.float().clamp(-1, 1)).to(device_of(net))).softmax(1)
        if cond is None and target_class is not None:
            cond = torch.full((len(x),), int(target_class))
        if cond is None:
            return probs.max(1).values
        cond = torch.as_tensor(cond, device=probs.device).long().view(-1, 1)
        return probs.gather(1, cond)[:, 0]

    what = f"probability of class {target_class}" if target_class is not None else "probability of the condition"
    return Reward("digit-class", score, f"digits classifier ({dn.VERSION}) {what}",
                  details={"target_class": target_class, "classifier": dn.VERSION}, module=net)
