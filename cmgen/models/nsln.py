"""NsLN: LayerNorm without scale (gamma fixed at 1), with a learnable per-element shift.

y = (x - mean) / sqrt(var + eps) + beta, with mean and var taken jointly over (C, H, W) of
each sample and beta of shape C x H x W (Outlier Suppression, Wei et al. 2022; used for every
norm of the latent CT UNet, Dao et al. 2025). `NsLNUNet2DModel` is diffusers' UNet2DModel with
every GroupNorm replaced by NsLN; it saves and loads like any diffusers model.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  diffusers looks this name up to load the class
from torch import nn


class NsLN(nn.Module):
    """Normalise each sample over all its non-batch elements, then add beta (shape C x H x W)."""

    def __init__(self, shape: tuple[int, ...], eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.bias = nn.Parameter(torch.zeros(shape))  # beta; gamma is the constant 1, not a parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.bias.numel()
        if x[0].numel() != n:
            raise ValueError(f"NsLN was built for {tuple(self.bias.shape)} per sample, got {tuple(x.shape[1:])}")
        # attention blocks pass (B, C, H*W): the flattened order equals that of (C, H, W)
        return F.layer_norm(x.flatten(1), (n,), None, self.bias.flatten(), self.eps).view(x.shape)

    def extra_repr(self) -> str:
        return f"{tuple(self.bias.shape)}, eps={self.eps}"


def _norm_input_shapes(unet: UNet2DModel) -> dict[str, tuple[int, ...]]:
    """(C, H, W) seen by every GroupNorm, found by one dry forward pass at the model's sample size."""
    modules = dict(unet.named_modules())
    norms = [name for name, m in modules.items() if isinstance(m, nn.GroupNorm)]
    # attention blocks flatten H, W before their norm: their own input still has (C, H, W)
    watched = set(norms) | {name.rpartition(".")[0] for name in norms}
    seen: dict[str, tuple[int, ...]] = {}

    def record(name):
        def hook(_module, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values())))
            seen[name] = tuple(x.shape[1:])
        return hook

    handles = [modules[name].register_forward_pre_hook(record(name), with_kwargs=True) for name in watched]
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, (list, tuple)) else (cfg.sample_size,) * 2
    device = next(unet.parameters()).device  # "meta" when diffusers builds the model before loading weights
    x = torch.zeros(1, cfg.in_channels, *size, device=device)
    labels = torch.zeros(1, dtype=torch.long, device=device) if cfg.num_class_embeds else None
    try:
        with torch.no_grad():
            unet(x, torch.zeros(1, device=device), class_labels=labels)
    finally:
        for h in handles:
            h.remove()
    return {name: seen[name] if len(seen[name]) == 3 else seen[name.rpartition(".")[0]] for name in norms}


def replace_group_norms(unet: UNet2DModel) -> UNet2DModel:
    """Swap every GroupNorm of `unet` for an NsLN over the (C, H, W) it normalises, in place."""
    for name, shape in _norm_input_shapes(unet).items():
        parent_name, _, attr = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        old = getattr(parent, attr)
        new = NsLN(shape, eps=old.eps)
        setattr(parent, attr, new.to(old.bias.device))
    return unet


class NsLNUNet2DModel(UNet2DModel):
    """UNet2DModel (same config keys) with every GroupNorm replaced by NsLN."""

    @functools.wraps(UNet2DModel.__init__)  # keeps UNet2DModel's signature: diffusers reads config keys from it
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        replace_group_norms(self)
