"""A small digits classifier whose penultimate layer is the feature space of FD-digits.

Inception sees nothing useful in 8x8 images, so cmgen trains this network once,
deterministically (fixed seeds, fixed schedule, full scikit-learn digits set), and caches
its weights under $CMGEN_CACHE (default ~/.cache/cmgen). Its classifier head also gives the
digit-class reward. Distances in its space are "FD-digits", never FID.
"""
from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cmgen.plots import LUMA_601

VERSION = "digits-cnn-v2"
FEATURE_DIM = 64
EPOCHS = 12
BATCH = 64
LR = 2e-3
SEED = 0


def cache_dir() -> Path:
    return Path(os.environ.get("CMGEN_CACHE") or Path.home() / ".cache" / "cmgen")


class DigitsNet(nn.Module):
    """conv(32) -> conv(64, stride 2) -> linear(64) features -> ReLU -> linear(10) logits, on 1x8x8 in [-1, 1].

    `features` are the penultimate activations standardised per dimension over the digits set, so
    that FD-digits and KID (whose cubic kernel assumes features of order one) have readable scales.
    """

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                                   nn.Linear(64 * 4 * 4, FEATURE_DIM))
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(FEATURE_DIM, 10))
        self.register_buffer("feature_mean", torch.zeros(FEATURE_DIM))
        self.register_buffer("feature_std", torch.ones(FEATURE_DIM))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return (self.trunk(x) - self.feature_mean) / self.feature_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def train_digits_net(epochs: int = EPOCHS, seed: int = SEED) -> DigitsNet:
    """Deterministic training: seeded init and shuffling through private generators, no global RNG use."""
    from cmgen.data import load_digits

    data = load_digits()
    x, y = data.x, data.labels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitsNet()
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    g = torch.Generator().manual_seed(seed + 1)
    net.train()
    with torch.enable_grad():  # first use may come from inside a no_grad caller (a reward in a rollout)
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=g)
            for start in range(0, len(x), BATCH):
                idx = order[start:start + BATCH]
                loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    net.eval()
    with torch.no_grad():
        raw = net.trunk(x)
        net.feature_mean.copy_(raw.mean(0))
        net.feature_std.copy_(raw.std(0).clamp(min=1e-6))
    return net


def weights_path() -> Path:
    return cache_dir() / f"{VERSION}-e{EPOCHS}-s{SEED}.safetensors"


def weights_digest(net: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def load_or_train(path: Path, build, train) -> nn.Module:
    """A small network cached as safetensors at `path`: `build()` loaded from the file, or else `train()`
    (with gradients on, whatever the caller's mode) and written atomically, so a concurrent reader never
    sees half a file."""
    from safetensors.torch import load_file, save_file

    if path.is_file():
        net = build()
        net.load_state_dict(load_file(str(path)))
        return net.eval()
    with torch.enable_grad():
        net = train()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
    return net


@lru_cache(maxsize=4)
def _load_or_train(path: str) -> DigitsNet:
    return load_or_train(Path(path), DigitsNet, lambda: train_digits_net())


def digits_net() -> DigitsNet:
    """The cached network (trained on first use, a few seconds on one core)."""
    return _load_or_train(str(weights_path()))


def to_digit_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC 8x8 (1 or 3 channels) -> float N1HW in [-1, 1]; RGB is reduced to luma (ITU-R 601, as PIL 'L')."""
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    if x.shape[-1] == 3:
        x = x @ torch.tensor(LUMA_601)
    else:
        x = x[..., 0]
    return x[:, None] / 127.5 - 1.0
