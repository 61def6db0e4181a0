"""CTM's GAN stage: a discriminator over a feature network, hinge losses and DiffAugment.

The paper's discriminator is Projected-GAN style: frozen ImageNet backbones (DeiT, EfficientNet) with
trainable heads per feature scale. Offline, the feature network is one of
- `own`: a small conv network trained here with the heads (no frozen backbone);
- `digits`: cmgen's digits classifier (eval/digits_net.py), frozen; `disc_weights` may name its file;
- `timm:NAME`: a timm backbone, frozen, from the weights file `disc_weights` (inputs resized to 224).
Hinge losses (Lim & Ye 2017), summed over heads: L_D = E relu(1 - D(real)) + E relu(1 + D(fake)),
L_G = -E D(fake). DiffAugment (Zhao et al. 2020): color, translation 1/8, cutout 0.2, drawn separately
for real and fake.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cmgen.errors import UserError

DIFFAUG_POLICIES = ("color", "translation", "cutout")
TRANSLATION_RATIO = 1 / 8
CUTOUT_RATIO = 0.2


# ----------------------------------------------------------------------------- DiffAugment

def diff_augment(x: torch.Tensor, rng, policy: str) -> torch.Tensor:
    """Differentiable augmentation with per-sample draws from `rng` (a BatchRNG)."""
    for name in [p.strip() for p in policy.split(",") if p.strip()]:
        x = {"color": _color, "translation": _translation, "cutout": _cutout}[name](x, rng)
    return x


def _u(rng, x):
    return rng.rand(1, 1, 1).to(x.device, x.dtype)


def _color(x, rng):
    x = x + (_u(rng, x) - 0.5)                                           # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_u(rng, x) * 2) + mean                             # saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_u(rng, x) + 0.5) + mean                        # contrast


def _translation(x, rng):
    b, _, h, w = x.shape
    sh, sw = int(h * TRANSLATION_RATIO + 0.5), int(w * TRANSLATION_RATIO + 0.5)
    dy = rng.randint(-sh, sh + 1).to(x.device)
    dx = rng.randint(-sw, sw + 1).to(x.device)
    ys = (torch.arange(h, device=x.device)[None, :] + dy[:, None] + 1).clamp(0, h + 1)   # into the padded image
    xs = (torch.arange(w, device=x.device)[None, :] + dx[:, None] + 1).clamp(0, w + 1)
    pad = F.pad(x, (1, 1, 1, 1))
    idx_b = torch.arange(b, device=x.device)[:, None, None]
    return pad.permute(0, 2, 3, 1)[idx_b, ys[:, :, None], xs[:, None, :]].permute(0, 3, 1, 2)


def _cutout(x, rng):
    b, _, h, w = x.shape
    ch, cw = int(h * CUTOUT_RATIO + 0.5), int(w * CUTOUT_RATIO + 0.5)
    cy = rng.randint(0, h + (1 - ch % 2)).to(x.device)
    cx = rng.randint(0, w + (1 - cw % 2)).to(x.device)
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    y0, x0 = (cy - ch // 2)[:, None, None], (cx - cw // 2)[:, None, None]
    inside = (ys >= y0) & (ys < y0 + ch) & (xs >= x0) & (xs < x0 + cw)
    return x * (~inside)[:, None].to(x.dtype)


# ----------------------------------------------------------------------------- losses

# Logits are one [B, positions] map per head. As in the reference code, the hinge applies to every logit of
# every position, is averaged within a head, then averaged over the heads.

def _head_mean(per_head: list[torch.Tensor]) -> torch.Tensor:
    return sum(h.mean() for h in per_head) / len(per_head)


def hinge_d(real_logits: list[torch.Tensor], fake_logits: list[torch.Tensor]) -> torch.Tensor:
    """mean over heads of E relu(1 - D(real)) + mean over heads of E relu(1 + D(fake)), E over batch and positions."""
    return _head_mean([F.relu(1 - r) for r in real_logits]) + _head_mean([F.relu(1 + f) for f in fake_logits])


def hinge_g(fake_logits: list[torch.Tensor]) -> torch.Tensor:
    """-(mean over heads of E D(fake))."""
    return -_head_mean(fake_logits)


def discriminator_loss(disc, real, fake, rng, policy: str) -> dict:
    real_logits = disc(diff_augment(real.float(), rng, policy))
    fake_logits = disc(diff_augment(fake.detach().float(), rng, policy))
    loss = hinge_d(real_logits, fake_logits)
    with torch.no_grad():
        return {"loss": loss, "d_real": _head_mean(real_logits), "d_fake": _head_mean(fake_logits)}


def generator_loss(disc, fake, rng, policy: str) -> torch.Tensor:
    return hinge_g(disc(diff_augment(fake.float(), rng, policy)))


# ----------------------------------------------------------------------------- networks

class Discriminator(nn.Module):
    """Trainable heads (conv 3x3, LeakyReLU, conv 1x1 -> one logit map) on each feature map of
    `features(x) -> list of [B, C_i, H_i, W_i]`; returns one [B, H_i * W_i] logit map per head."""

    def __init__(self, features: nn.Module, channels: list[int], width: int):
        super().__init__()
        self.features = features
        self.heads = nn.ModuleList(nn.Sequential(nn.Conv2d(c, width, 3, padding=1), nn.LeakyReLU(0.2),
                                                 nn.Conv2d(width, 1, 1)) for c in channels)

    def forward(self, x):
        return [h(f).flatten(1) for h, f in zip(self.heads, self.features(x))]


class OwnFeatures(nn.Module):
    """A small conv network trained with the heads: two scales (full and half resolution)."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.LeakyReLU(0.2))
        self.b = nn.Sequential(nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.LeakyReLU(0.2))

    def forward(self, x):
        a = self.a(x)
        return [a, self.b(a)]


class DigitsFeatures(nn.Module):
    """cmgen's digits classifier (the file `weights`, else the cached one FD-digits uses), frozen: its two
    conv activations. The trunk is a copy: moving or training the discriminator leaves the FD-digits net as it is."""

    def __init__(self, weights):
        super().__init__()
        from cmgen.eval import digits_net as dn

        net = dn.DigitsNet()
        if weights:
            from cmgen.checkpoint import load_tensors

            try:
                net.load_state_dict(load_tensors(Path(weights)))
            except RuntimeError as exc:
                raise UserError(f"method.disc_weights '{weights}' is not a cmgen digits classifier "
                                f"({str(exc).splitlines()[1].strip()[:80]}); give a DigitsNet file or leave it null "
                                "for the cached one") from None
        else:
            net = dn.digits_net()
        self.trunk = copy.deepcopy(net.trunk).cpu().requires_grad_(False)

    def forward(self, x):
        a = self.trunk[1](self.trunk[0](x))
        return [a, self.trunk[3](self.trunk[2](a))]


class TimmFeatures(nn.Module):
    """A frozen timm backbone's feature maps (features_only), read from the weights file `weights`. As in
    Projected GAN / StyleGAN-XL: images in [-1, 1] go to [0, 1], are standardised with the backbone's own
    mean and std, and are resized (bilinear) to 224 x 224; grey images are repeated to RGB."""

    def __init__(self, name: str, weights: str):
        import timm

        super().__init__()

        def refuse(why: str):
            return UserError(f"method.disc_features=timm:{name} could not be built from method.disc_weights "
                             f"'{weights}' ({why[:100]}); give the weights file of that timm model, or use "
                             "method.disc_features=own")

        try:
            full = timm.create_model(name, pretrained=False)
        except Exception as exc:  # an unknown name
            raise refuse(str(exc).splitlines()[0]) from None
        from cmgen.checkpoint import read_weights

        try:  # the whole network, strictly: timm's features_only loading skips keys it does not find
            state = read_weights(weights)
            full.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        except Exception as exc:  # another network's file, a truncated file, a pickle of objects
            raise refuse(" ".join(str(exc).split())) from None
        self.net = timm.create_model(name, pretrained=True, features_only=True,
                                     pretrained_cfg_overlay=dict(state_dict=full.state_dict()))
        self.net.requires_grad_(False).eval()
        self.channels = list(self.net.feature_info.channels())
        cfg = self.net.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1))

    def train(self, mode: bool = True):  # frozen: batch norms keep their statistics in the discriminator's steps
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, x):
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        x = ((x + 1) / 2 - self.mean) / self.std
        return self.net(F.interpolate(x, size=224, mode="bilinear", align_corners=False))


def build_discriminator(cfg, shape) -> Discriminator:
    kind, w = cfg.disc_features, cfg.disc_channels
    if len(shape) != 3:
        raise UserError(f"method.gan_start needs image data (CTM's discriminator is convolutional), the data are "
                        f"points of shape {list(shape)}; set method.gan_start: null")
    if kind == "own":
        return Discriminator(OwnFeatures(shape[0], w), [w, 2 * w], w)
    if kind == "digits":
        if tuple(shape) != (1, 8, 8):
            raise UserError(f"method.disc_features=digits needs 1x8x8 digits, the data are {list(shape)}; use own")
        return Discriminator(DigitsFeatures(cfg.disc_weights), [32, 64], w)
    if kind.startswith("timm:"):
        if not cfg.disc_weights or not Path(cfg.disc_weights).is_file():
            raise UserError(f"method.disc_features={kind} needs its weights offline: set method.disc_weights to the "
                            "backbone's weights file, or use method.disc_features=own")
        try:
            import timm  # noqa: F401
        except ImportError:
            raise UserError(f"method.disc_features={kind} needs the timm package (pip install 'cmgen[ctm]'), or use "
                            "method.disc_features=own") from None
        feats = TimmFeatures(kind[5:], cfg.disc_weights)
        return Discriminator(feats, feats.channels, w)
    raise UserError(f"recipe key 'method.disc_features' must be own, digits or timm:NAME, got '{kind}'")
