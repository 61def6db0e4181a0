"""Offline image rewards: JPEG size (DDPO / RLCM: compressibility = -kB at quality 95) and brightness."""
from __future__ import annotations

import io

import numpy as np
import torch

from cmgen.rewards import Reward


def jpeg_kilobytes(images: np.ndarray, quality: int = 95) -> np.ndarray:
    """Size of each uint8 NHWC image as a JPEG at `quality`, in kB (1000 bytes)."""
    from PIL import Image

    sizes = []
    for im in np.asarray(images):
        buf = io.BytesIO()
        Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return np.asarray(sizes, np.float64)


def jpeg_size(x: torch.Tensor) -> torch.Tensor:
    """kB at quality 95 of images in [-1, 1], images under 32 pixels enlarged first (cmgen.rewards.jpeg: an 8x8
    digit alone is one JPEG block, almost all header, whose size hardly depends on the digit)."""
    from cmgen.rewards.jpeg import jpeg_kb

    return jpeg_kb(x).double().cpu()


def jpeg_compressibility() -> Reward:
    return Reward("jpeg-compressibility", lambda x, cond=None: -jpeg_size(x),
                  "minus the JPEG size at quality 95 in kB (RLCM)")


def jpeg_incompressibility() -> Reward:
    return Reward("jpeg-incompressibility", lambda x, cond=None: jpeg_size(x),
                  "the JPEG size at quality 95 in kB (RLCM)")


def brightness_of(x: torch.Tensor) -> torch.Tensor:
    """Mean pixel value mapped from [-1, 1] to [0, 1], per image; differentiable."""
    return ((x.float().clamp(-1, 1) + 1) / 2).flatten(1).mean(1)


def brightness() -> Reward:
    return Reward("brightness", lambda x, cond=None: brightness_of(x), "mean pixel value in [0, 1]")
