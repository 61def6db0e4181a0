"""Rewards for evaluating reward-tuned models: each maps a uint8 NHWC batch to one number per image.

Offline ones: JPEG compressibility / incompressibility (file size at quality 95 in kB, as in
DDPO and RLCM: compressibility = -kB), brightness, the digits classifier's probability. The
aesthetic predictor (LAION's linear head on CLIP ViT-L/14 embeddings) needs weight files.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from cmgen.errors import UserError
from cmgen.eval.features import CLIP_L14_URL

REWARDS = ("jpeg-compressibility", "jpeg-incompressibility", "brightness", "digit-class", "aesthetic")
AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                 "sac+logos+ava1-l14-linearMSE.pth")


@dataclass
class Reward:
    name: str
    fn: Callable[[np.ndarray], np.ndarray]
    description: str
    details: dict = field(default_factory=dict)


def jpeg_kilobytes(images: np.ndarray, quality: int = 95) -> np.ndarray:
    """Size of each image as a JPEG at `quality`, in kB (1000 bytes)."""
    from PIL import Image

    sizes = []
    for im in np.asarray(images):
        buf = io.BytesIO()
        Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return np.asarray(sizes, np.float64)


def brightness(images: np.ndarray) -> np.ndarray:
    """Mean pixel value in [0, 1]."""
    return np.asarray(images, np.float64).reshape(len(images), -1).mean(1) / 255.0


def digit_class_reward(target_class: Optional[int], device="cpu") -> Reward:
    from cmgen.eval import digits_net as dn

    if target_class is not None and not 0 <= target_class <= 9:
        raise UserError(f"--target-class must be a digit 0..9, got {target_class}")
    net = dn.digits_net().to(device)

    @torch.no_grad()
    def fn(images: np.ndarray) -> np.ndarray:
        if tuple(images.shape[1:3]) != (8, 8):
            raise UserError(f"--reward digit-class needs 8x8 digit images, got {images.shape[1]}x{images.shape[2]}")
        probs = net(dn.to_digit_tensor(images).to(device)).softmax(1).double().cpu()
        return (probs[:, target_class] if target_class is not None else probs.max(1).values).numpy()

    what = f"probability of class {target_class}" if target_class is not None else "top-class probability"
    return Reward("digit-class", fn, f"digits classifier ({dn.VERSION}) {what}",
                  {"target_class": target_class, "classifier": dn.VERSION})


# ----------------------------------------------------------------------------- aesthetic

def linear_stack_from_state(state: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """LAION's predictor is Linear/Dropout layers with no activation: keep the (weight, bias) pairs in order."""
    pairs = []
    prefixes = sorted({k.rsplit(".", 1)[0] for k in state if k.endswith(".weight")},
                      key=lambda p: [int(t) if t.isdigit() else t for t in p.split(".")])
    for prefix in prefixes:
        w, b = state[f"{prefix}.weight"], state.get(f"{prefix}.bias")
        if w.ndim != 2:
            raise ValueError(f"'{prefix}.weight' is not a linear layer")
        pairs.append((w.double(), None if b is None else b.double()))
    if not pairs:
        raise ValueError("no linear layers found")
    return pairs


def load_aesthetic_head(explicit: Optional[str]) -> tuple[list, Path]:
    given = explicit or os.environ.get("CMGEN_AESTHETIC")
    if not given or not Path(given).expanduser().is_file():
        where = f"'{given}' is not a file; " if given else ""
        raise UserError(f"--reward aesthetic needs the predictor weights ({where}download {AESTHETIC_URL} and pass "
                        "it with --aesthetic PATH or CMGEN_AESTHETIC=PATH, plus CLIP ViT-L/14 from "
                        f"{CLIP_L14_URL} with --clip PATH)")
    path = Path(given).expanduser()
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        return linear_stack_from_state(state), path
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise UserError(f"--aesthetic '{path}' is not a state dict of linear layers ({exc.__class__.__name__}); "
                        f"download {AESTHETIC_URL}") from None


def aesthetic_reward(aesthetic: Optional[str], clip_path: Optional[str], device="cpu") -> Reward:
    from cmgen.eval.features import clip_preprocess, load_clip

    head, head_path = load_aesthetic_head(aesthetic)
    model, clip_file = load_clip(clip_path, device)

    @torch.no_grad()
    def fn(images: np.ndarray) -> np.ndarray:
        emb = model.encode_image(clip_preprocess(images).to(device)).double().cpu()
        x = emb / emb.norm(dim=-1, keepdim=True)  # the predictor was trained on unit-norm CLIP embeddings
        if x.shape[1] != head[0][0].shape[1]:
            raise UserError(f"--clip gives {x.shape[1]}-d embeddings but --aesthetic expects "
                            f"{head[0][0].shape[1]}-d (CLIP ViT-L/14); pass matching files")
        for w, b in head:
            x = x @ w.T + (0 if b is None else b)
        return x[:, 0].numpy()

    return Reward("aesthetic", fn, "LAION aesthetic predictor on CLIP image embeddings",
                  {"aesthetic_weights": str(head_path), "clip_weights": str(clip_file)})


# ----------------------------------------------------------------------------- registry

def build_reward(name: str, *, target_class: Optional[int] = None, aesthetic: Optional[str] = None,
                 clip: Optional[str] = None, device="cpu") -> Reward:
    key = name.strip().lower().replace("_", "-")
    if key == "jpeg-compressibility":
        return Reward(key, lambda im: -jpeg_kilobytes(im), "minus the JPEG size at quality 95 in kB (RLCM)")
    if key == "jpeg-incompressibility":
        return Reward(key, jpeg_kilobytes, "the JPEG size at quality 95 in kB (RLCM)")
    if key == "brightness":
        return Reward(key, brightness, "mean pixel value in [0, 1]")
    if key == "digit-class":
        return digit_class_reward(target_class, device)
    if key == "aesthetic":
        return aesthetic_reward(aesthetic, clip, device)
    raise UserError(f"--reward '{name}' is unknown; valid rewards: {', '.join(REWARDS)}")
