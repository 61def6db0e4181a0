"""The latent proxy reward model (LRM) of RG-LCD (Li et al. 2024): R(z, c) = cos(img(z), txt(c)), scored on
latents so the student never sees the expert's gradients (which, for ImageReward, produce high-frequency
noise when optimised directly).

RG-LCD's LRM is a latent CLIP (a 4-channel latent ViT image tower and ViT-H's text tower) initialised from a
pretrained latent CLIP that has no public weights. Here the towers are small and trained from scratch: an
MLP (latents of at most 8x8) or a strided conv net (larger latents) for the image, a class embedding (class
labels) or a linear map of the mean text embedding (prompts) for the condition. The preference logits are
s cos with s = exp(learnable log-scale), CLIP's logit scale; the student's reward is the cosine alone.

Training (after every student step): for the triplet {student f, LCD target, real latent}, the expert's
rewards are pair logits and each of the 3 pairs adds KL(softmax(expert pair) || softmax(LRM pair)).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

PAIRS = ((0, 1), (0, 2), (1, 2))   # (student, target), (student, real), (target, real)


class LatentRewardModel(nn.Module):
    def __init__(self, latent_shape, num_classes: int = 0, width: int = 512, embed: int = 128,
                 cond_dim: Optional[int] = None):
        super().__init__()
        c, h, w = latent_shape
        if h * w <= 64:
            self.image = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, width), nn.SiLU(),
                                       nn.Linear(width, width), nn.SiLU(), nn.Linear(width, embed))
        else:
            ch = max(32, width // 8)
            self.image = nn.Sequential(nn.Conv2d(c, ch, 3, 2, 1), nn.SiLU(), nn.Conv2d(ch, 2 * ch, 3, 2, 1), nn.SiLU(),
                                       nn.Conv2d(2 * ch, 4 * ch, 3, 2, 1), nn.SiLU(), nn.AdaptiveAvgPool2d(1),
                                       nn.Flatten(), nn.Linear(4 * ch, embed))
        if cond_dim is not None:
            self.text = nn.Linear(cond_dim, embed)
        else:
            self.classes = nn.Embedding(max(1, num_classes + 1), embed)  # + the null label / unconditional
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def condition(self, cond, batch: int, device) -> torch.Tensor:
        if hasattr(self, "text"):
            return self.text(cond.float().mean(1))
        if cond is None:
            cond = torch.zeros(batch, dtype=torch.long, device=device)
        return self.classes(cond.long())

    def forward(self, z: torch.Tensor, cond=None, scaled: bool = True) -> torch.Tensor:
        """s cos(img(z), txt(c)): the preference logits the pairwise KL trains (scaled), or the bare cosine in
        [-1, 1] that the student maximises (scaled=False; RG-LCD's reward is the cosine, the CLIP logit scale
        only sharpens the preferences)."""
        img = nn.functional.normalize(self.image(z.float()), dim=-1)
        txt = nn.functional.normalize(self.condition(cond, len(z), z.device), dim=-1)
        cos = (img * txt).sum(-1)
        return self.log_scale.exp() * cos if scaled else cos


def build_lrm(latent_shape, num_classes: int, width: int = 512, cond_dim: Optional[int] = None):
    return LatentRewardModel(tuple(latent_shape), num_classes, width, cond_dim=cond_dim)


def pairwise_kl(expert: torch.Tensor, lrm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over the 3 pairs of the per-sample mean of KL(softmax(expert pair) || softmax(lrm pair)), as RG-LCD
    adds one F.kl_div(..., "batchmean") per pair; the fraction of pairs the LRM orders as the expert does).
    `expert` and `lrm` are [B, 3] logits; gradients reach `lrm`."""
    kls, agree = [], []
    for a, b in PAIRS:
        p_log = torch.log_softmax(expert[:, [a, b]].float(), 1)
        q_log = torch.log_softmax(lrm[:, [a, b]].float(), 1)
        kls.append((p_log.exp() * (p_log - q_log)).sum(1))
        agree.append(((expert[:, a] - expert[:, b]) * (lrm[:, a] - lrm[:, b]).detach() > 0).float())
    return torch.stack(kls, 1).sum(1).mean(), torch.stack(agree, 1).mean()


def pairwise_real_ce(lrm: torch.Tensor) -> torch.Tensor:
    """RG-LCD's alternative: cross-entropy with the real latent (index 2) the winner of its two pairs."""
    losses = [-torch.log_softmax(lrm[:, [a, 2]].float(), 1)[:, 1] for a in (0, 1)]
    return torch.stack(losses, 1).mean()

