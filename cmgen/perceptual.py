"""LPIPS (Zhang et al. 2018) as consistency models use it, built from local weight files (no download).

d(a, b) = sum over the VGG16 layers l in relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of
          mean over positions of  sum_c w_lc (f_l(a) - f_l(b))_c^2,  f_l = VGG features unit-normalised over
          channels (eps 1e-10), inputs mapped from [-1, 1] to [0, 1] and standardised with ImageNet's mean and std.
CM's and CTM's reference code calls piq's LPIPS with `replace_pooling=True`: VGG's max-pools become 2x2
average pools (`pooling="avg"`, the default here); `pooling="max"` is the original LPIPS network.

Weights, from one folder (`method.lpips_weights`):
- the VGG16 backbone: torchvision's `vgg16-397923af.pth` (as torchvision downloads it to
  ~/.cache/torch/hub/checkpoints/) or a `vgg16*.safetensors`; `features.N.*` keys (a whole VGG16) or `N.*`;
- the linear layers w_l: the lpips package's `vgg.pth` (v0.1) or piq's `lpips_weights.pt`; without either
  in the folder, the `vgg.pth` that ships inside an installed lpips package.
Both are read without unpickling objects (torch.load(weights_only=True) or safetensors).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from cmgen.checkpoint import read_weights
from cmgen.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TAPS = (3, 8, 15, 22, 29)            # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's vgg16().features
CHANNELS = (64, 128, 256, 512, 512)
VGG16 = (64, 64, "pool", 128, 128, "pool", 256, 256, 256, "pool", 512, 512, 512, "pool", 512, 512, 512)
EPS = 1e-10
POOLINGS = ("avg", "max")
BACKBONE_FILE = "vgg16-397923af.pth"
LIN_FILES = ("vgg.pth", "lpips_weights.pt")


def vgg16_features(pooling: str = "max") -> nn.Sequential:
    """torchvision's vgg16().features up to relu5_3, with its module indices (so its state dict keys)."""
    layers, channels = [], 3
    for width in VGG16:
        if width == "pool":
            layers.append(nn.AvgPool2d(2, 2) if pooling == "avg" else nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
            channels = width
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """Frozen LPIPS(VGG16); forward(a, b) -> [B] distances for images in [-1, 1] (any size; 1 or 3 channels)."""

    def __init__(self, backbone: dict[str, torch.Tensor], lin: list[torch.Tensor], pooling: str = "avg"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be avg or max, got {pooling!r}")
        self.features = vgg16_features(pooling)
        self.features.load_state_dict(backbone)
        self.lin = nn.ParameterList(nn.Parameter(w.reshape(1, -1, 1, 1).float(), requires_grad=False) for w in lin)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.requires_grad_(False).eval()

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five unit-normalised feature maps of images in [-1, 1]."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        h, out = ((x + 1) / 2 - self.mean) / self.std, []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in TAPS:
                f = h.float()
                out.append(f / (f.pow(2).sum(1, keepdim=True).sqrt() + EPS))
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        pairs = zip(self.taps(a), self.taps(b), self.lin)
        return sum(((fa - fb).pow(2) * w).sum(1).mean((1, 2)) for fa, fb, w in pairs)


def _backbone(folder: Path, fix: str) -> dict[str, torch.Tensor]:
    found = [folder / BACKBONE_FILE] if (folder / BACKBONE_FILE).is_file() else \
        sorted(folder.glob("vgg16*.safetensors"))
    if not found:
        raise UserError(f"method.lpips_weights '{folder}' holds no VGG16 backbone: put torchvision's {BACKBONE_FILE} "
                        f"(or a vgg16*.safetensors) there, {fix}")
    try:
        state = read_weights(found[0])
    except Exception as exc:  # a truncated file, a pickle of objects
        raise UserError(f"'{found[0]}' is not a readable VGG16 state dict ({str(exc).splitlines()[0][:80]}); "
                        f"replace it, {fix}") from None

    def index(key: str) -> int:  # features.N.weight or N.weight -> N; any other key -> -1
        head = key.removeprefix("features.").split(".")[0]
        return int(head) if head.isdigit() else -1

    state = {k.removeprefix("features."): v for k, v in state.items() if 0 <= index(k) <= TAPS[-1]} \
        if isinstance(state, dict) else {}
    want = set(vgg16_features().state_dict())
    if set(state) != want:
        raise UserError(f"'{found[0]}' is not torchvision's VGG16 (it lacks {sorted(want - set(state))[:3]}); "
                        f"replace it, {fix}")
    return state


def _lin(folder: Path, fix: str) -> list[torch.Tensor]:
    candidates = [folder / name for name in LIN_FILES]
    try:
        import lpips

        candidates.append(Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth")
    except ImportError:
        pass
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise UserError(f"method.lpips_weights '{folder}' holds no LPIPS linear layers: put the lpips package's "
                        f"vgg.pth (v0.1) or piq's lpips_weights.pt there (or pip install lpips), {fix}")
    try:
        raw = read_weights(path)
    except Exception as exc:
        raise UserError(f"'{path}' is not readable LPIPS weights ({str(exc).splitlines()[0][:80]}); {fix}") from None
    lin = [raw.get(f"lin{i}.model.1.weight") for i in range(5)] if isinstance(raw, dict) else list(raw)
    if len(lin) != 5 or any(w is None or w.numel() != c for w, c in zip(lin, CHANNELS)):
        raise UserError(f"'{path}' does not hold the five LPIPS-VGG linear layers ({', '.join(map(str, CHANNELS))} "
                        f"channels); {fix}")
    return lin


def load_lpips(folder: Optional[str], pooling: str = "avg",
               fix: str = "or set method.distance=pseudo_huber (or l2)") -> LPIPS:
    """LPIPS from the weight files in `folder` (see the module docstring); one sentence when they are missing."""
    if not folder or not Path(folder).is_dir():
        raise UserError(f"method.distance=lpips needs LPIPS weights offline: set method.lpips_weights to a folder "
                        f"holding torchvision's {BACKBONE_FILE} (and the lpips package's vgg.pth), {fix}")
    folder = Path(folder)
    backbone, lin = _backbone(folder, fix), _lin(folder, fix)
    try:
        return LPIPS(backbone, lin, pooling)
    except RuntimeError as exc:  # the right names with the wrong shapes
        raise UserError(f"the VGG16 weights in '{folder}' do not fit VGG16 ({' '.join(str(exc).split())[:100]}); "
                        f"replace them with torchvision's {BACKBONE_FILE}, {fix}") from None


def lpips_224(net: LPIPS):
    """The CM/CTM distance: both images bilinearly resized to 224 x 224, then LPIPS; [B] per pair."""
    def dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if net.mean.device != a.device:
            net.to(a.device)
        up = lambda v: F.interpolate(v.float(), size=224, mode="bilinear", align_corners=False)  # noqa: E731
        return net(up(a), up(b))

    return dist
