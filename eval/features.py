"""Feature networks: uint8 NHWC image batches (or float points) -> float64 feature rows.

- inception: clean-fid's TorchScript Inception (its resize and quantisation, `clean` or
  `legacy_tensorflow` mode), from a local weight file only. Distances are "FID".
- clip: clean-fid's CLIP path (the `clip` package with a local ViT weight file). "FD-CLIP".
- digits: the small cached network of cmgen.eval.digits_net. "FD-digits".
- points: the 2-D coordinates themselves. "FD-points", next to SWD and MMD.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from cmgen.errors import UserError
from cmgen.eval.digits_net import cache_dir

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)   # CLIP's normalisation

FEATURE_CHOICES = ("auto", "inception", "clip", "digits", "points")
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_SHA256 = "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4"
INCEPTION_MODES = ("clean", "legacy_tensorflow")
CLEANFID_DIR = Path("/tmp")   # where clean-fid itself keeps the Inception file
CLIP_FILE = "ViT-B-32.pt"
CLIP_URL = ("https://openaipublic.azureedge.net/clip/models/"
            "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt")
CLIP_L14_URL = ("https://openaipublic.azureedge.net/clip/models/"
                "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt")


@dataclass
class FeatureNet:
    kind: str                        # inception | clip | digits | points
    metric: str                      # what its Frechet distance is called: FID, FD-CLIP, FD-digits, FD-points
    embed: Callable[[np.ndarray], np.ndarray]   # a batch -> float64 [B, D]
    channels: int                    # image channels it wants (3, 1), 0 for points
    protocol: dict = field(default_factory=dict)  # what a reader needs to reproduce the number

    @property
    def id(self) -> str:
        """Identifies the feature space: statistics files must match it to be compared."""
        p = self.protocol
        return "/".join(str(p[k]) for k in ("features", "mode", "weights_sha256") if p.get(k))


def detect_features(shape: tuple[int, ...]) -> str:
    """--features auto: digits for 8x8 one-channel images, points for 2-D data, Inception otherwise.

    `shape` is a sample's shape: (C, H, W) images or (D,) points.
    """
    if len(shape) == 1:
        if shape[0] != 2:
            raise UserError(f"--features auto knows 2-D points only, the data are {shape[0]}-D; "
                            "pass --features points to compare the raw coordinates")
        return "points"
    if tuple(shape) == (1, 8, 8):
        return "digits"
    return "inception"


def build_feature_net(name: str, shape: tuple[int, ...], *, mode: str = "clean", inception: Optional[str] = None,
                      clip: Optional[str] = None, device="cpu") -> FeatureNet:
    if name not in FEATURE_CHOICES:
        raise UserError(f"--features must be one of {', '.join(FEATURE_CHOICES)}, got '{name}'")
    if name == "auto":
        name = detect_features(shape)
    if name != "inception" and mode != "clean":
        raise UserError(f"--mode {mode} applies to --features inception only; drop --mode")
    if name == "points":
        return points_net(shape)
    if len(shape) != 3:
        raise UserError(f"--features {name} needs images, the data are points of shape {tuple(shape)}; "
                        "use --features points")
    if name == "digits":
        return digits_feature_net(shape, device)
    if name == "clip":
        return clip_feature_net(clip, device)
    return inception_feature_net(inception, mode, device)


# ----------------------------------------------------------------------------- points

def points_net(shape) -> FeatureNet:
    if len(shape) != 1:
        raise UserError(f"--features points needs 2-D points, the data are images of shape {tuple(shape)}; "
                        "use --features auto")
    return FeatureNet("points", "FD-points", lambda x: np.asarray(x, np.float64), 0,
                      {"features": "points", "dim": int(shape[0])})


# ----------------------------------------------------------------------------- digits

def digits_feature_net(shape, device="cpu") -> FeatureNet:
    from cmgen.eval import digits_net as dn

    if tuple(shape[1:]) != (8, 8):
        raise UserError(f"--features digits needs 8x8 images, the data are {shape[1]}x{shape[2]}; "
                        "use --features inception")
    net = dn.digits_net().to(device)

    @torch.no_grad()
    def embed(images: np.ndarray) -> np.ndarray:
        return net.features(dn.to_digit_tensor(images).to(device)).double().cpu().numpy()

    return FeatureNet("digits", "FD-digits", embed, 1,
                      {"features": dn.VERSION, "weights": str(dn.weights_path()),
                       "weights_sha256": dn.weights_digest(net)[:16], "dim": dn.FEATURE_DIM})


# ----------------------------------------------------------------------------- inception

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def find_inception(explicit: Optional[str] = None) -> Path:
    """--inception, then $CMGEN_INCEPTION, then $CMGEN_CACHE (~/.cache/cmgen), then clean-fid's own /tmp copy."""
    given = explicit or os.environ.get("CMGEN_INCEPTION")
    if given:
        p = Path(given).expanduser()
        if p.is_dir():
            p = p / INCEPTION_FILE
        if not p.is_file():
            flag = "--inception" if explicit else "CMGEN_INCEPTION"
            raise UserError(f"{flag} points at '{given}', which holds no file '{INCEPTION_FILE}'; "
                            f"download it from {INCEPTION_URL} and pass its path")
        return p
    for cand in (cache_dir() / INCEPTION_FILE, CLEANFID_DIR / INCEPTION_FILE):
        if cand.is_file():
            return cand
    raise UserError(f"--features inception needs the TorchScript weight file '{INCEPTION_FILE}' (download it "
                    f"from {INCEPTION_URL} on a machine with network access and save it as "
                    f"{cache_dir() / INCEPTION_FILE}), or point cmgen at a local copy with --inception PATH "
                    "or the environment variable CMGEN_INCEPTION=PATH")


@lru_cache(maxsize=4)
def _file_digest(path: str, mtime: float) -> str:
    return _sha256(Path(path))


def _inception_dir(path: Path) -> Path:
    """clean-fid's InceptionV3W loads '<dir>/inception-2015-12-05.pt'; a file of another name is linked into the cache."""
    if path.name == INCEPTION_FILE:
        return path.parent
    link_dir = cache_dir() / "inception-links" / hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    link_dir.mkdir(parents=True, exist_ok=True)
    link = link_dir / INCEPTION_FILE
    if not link.exists():
        link.symlink_to(path.resolve())
    return link_dir


def inception_feature_net(explicit: Optional[str], mode: str, device="cpu") -> FeatureNet:
    if mode not in INCEPTION_MODES:
        raise UserError(f"--mode must be one of {', '.join(INCEPTION_MODES)}, got '{mode}'")
    path = find_inception(explicit)
    from cleanfid.inception_torchscript import InceptionV3W
    from cleanfid.resize import build_resizer

    legacy = mode == "legacy_tensorflow"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.*")  # deprecated in torch >= 2.13 (-> torch.export)
        try:
            net = InceptionV3W(str(_inception_dir(path)), download=False, resize_inside=legacy).to(device).eval()
        except (RuntimeError, ValueError) as exc:
            raise UserError(f"--inception file '{path}' is not a TorchScript Inception ({str(exc).splitlines()[0]}); "
                            f"download the right file from {INCEPTION_URL}") from None
    resize = build_resizer(mode)  # clean: PIL bicubic on float to 299x299, no quantisation after

    @torch.no_grad()
    def embed(images: np.ndarray) -> np.ndarray:
        images = as_rgb(images)
        if legacy:  # the network resizes inside (the TF graph's bilinear), on uint8 values as floats
            batch = torch.from_numpy(images.astype(np.float32)).permute(0, 3, 1, 2)
        else:
            batch = torch.from_numpy(np.stack([resize(im) for im in images])).permute(0, 3, 1, 2)
        return net(batch.to(device)).double().cpu().numpy()

    digest = _file_digest(str(path), path.stat().st_mtime)
    protocol = {"features": "inception-2015-12-05 (clean-fid)", "mode": mode, "weights": str(path),
                "weights_sha256": digest[:16], "dim": 2048}
    if digest != INCEPTION_SHA256:
        protocol["warning"] = ("the Inception file is not the published one (sha256 differs): "
                               "numbers are not comparable with papers")
    return FeatureNet("inception", "FID", embed, 3, protocol)


def as_rgb(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC with 1 or 3 channels -> 3 channels (grey replicated, as PIL's convert('RGB'))."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    if images.shape[-1] == 1:
        return np.repeat(images, 3, axis=-1)
    if images.shape[-1] != 3:
        raise UserError(f"images must have 1 or 3 channels, got {images.shape[-1]}")
    return images


# ----------------------------------------------------------------------------- clip

def find_clip(explicit: Optional[str]) -> Path:
    given = explicit or os.environ.get("CMGEN_CLIP")
    if given and Path(given).expanduser().is_file():
        return Path(given).expanduser()
    where = f"'{given}' is not a file; " if given else ""
    raise UserError(f"--features clip needs a local CLIP weight file ({where}download {CLIP_URL} and pass it with "
                    "--clip PATH or CMGEN_CLIP=PATH; the 'clip' package is also needed: pip install clip-anytorch)")


def load_clip(explicit: Optional[str], device="cpu"):
    """The openai `clip` model from a local file (as clean-fid's CLIP_fx does, but never downloading)."""
    path = find_clip(explicit)
    try:
        import clip  # noqa: F401  (openai CLIP; PyPI: clip-anytorch)
    except ImportError:
        raise UserError("--features clip needs the 'clip' package, which is not installed; "
                        "pip install clip-anytorch") from None
    model, _ = clip.load(str(path), device=device, jit=False)
    return model.float().eval(), path


def clip_preprocess(images: np.ndarray) -> torch.Tensor:
    """clean-fid's CLIP input (img_preprocess_clip), bit for bit: each image through PIL, its short side resized
    to 224 (bicubic), centre-cropped to 224, kept as uint8; then / 255 and CLIP's normalisation."""
    import torchvision.transforms.functional as TF
    from PIL import Image

    def one(img: np.ndarray) -> np.ndarray:
        pil = TF.center_crop(TF.resize(Image.fromarray(img), 224, interpolation=TF.InterpolationMode.BICUBIC), 224)
        return np.asarray(pil)

    x = torch.from_numpy(np.stack([one(img) for img in as_rgb(images)])).permute(0, 3, 1, 2)
    x = x.float() / 255.0
    return TF.normalize(x, CLIP_MEAN, CLIP_STD)


def clip_feature_net(explicit: Optional[str], device="cpu") -> FeatureNet:
    model, path = load_clip(explicit, device)

    @torch.no_grad()
    def embed(images: np.ndarray) -> np.ndarray:
        return model.encode_image(clip_preprocess(images).to(device)).double().cpu().numpy()

    digest = _file_digest(str(path), path.stat().st_mtime)
    return FeatureNet("clip", "FD-CLIP", embed, 3,
                      {"features": f"clip:{path.name}", "weights": str(path), "weights_sha256": digest[:16]})
