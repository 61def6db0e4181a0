"""Datasets: in-memory tensors indexed by the loop's keyed sampler.

Every dataset is a `Dataset`: images NCHW float in [-1, 1] (or points [N, D]), optional
integer labels, and the metadata the models need. The loop draws indices itself
(cmgen.rng), so there is no DataLoader and no hidden global-RNG use.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from cmgen.errors import UserError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


@dataclass
class Dataset:
    x: torch.Tensor                  # [N, C, H, W] in [-1, 1], or [N, D] points
    labels: Optional[torch.Tensor]   # [N] int64 or None
    num_classes: int
    kind: str                        # "image" | "points"
    name: str

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])


def _split(ds: Dataset, holdout: int, seed: int) -> tuple[Dataset, Optional[Dataset]]:
    """Keep `holdout` examples out of training (a fixed, seeded choice) for evaluation."""
    if holdout <= 0:
        return ds, None
    if holdout >= len(ds):
        raise UserError(f"recipe key 'data.holdout' ({holdout}) must be smaller than the dataset ({len(ds)} examples)")
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed + 7919))
    held, kept = perm[:holdout].sort().values, perm[holdout:].sort().values

    def take(idx):
        return Dataset(ds.x[idx], None if ds.labels is None else ds.labels[idx], ds.num_classes, ds.kind, ds.name)

    return take(kept), take(held)


def load_digits() -> Dataset:
    """scikit-learn's 1797 8x8 handwritten digits (values 0..16), scaled to [-1, 1]."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    x = torch.from_numpy(d.images.astype(np.float32) / 8.0 - 1.0)[:, None]
    return Dataset(x, torch.from_numpy(d.target.astype(np.int64)), 10, "image", "digits")


def toy2d(kind: str, n: int, seed: int = 0) -> Dataset:
    """2-D toy distributions, scaled so that the per-coordinate std is about sigma_data = 0.5."""
    g = torch.Generator().manual_seed(seed)
    if kind == "ring":  # 8 Gaussians on a circle
        k = torch.randint(0, 8, (n,), generator=g)
        ang = k.float() * (2 * np.pi / 8)
        centers = torch.stack([torch.cos(ang), torch.sin(ang)], 1)
        x = centers * 0.7 + 0.04 * torch.randn(n, 2, generator=g)
        return Dataset(x, k, 8, "points", "ring")
    if kind == "moons":
        k = torch.randint(0, 2, (n,), generator=g)
        t = torch.rand(n, generator=g) * np.pi
        upper = torch.stack([torch.cos(t), torch.sin(t)], 1)
        lower = torch.stack([1 - torch.cos(t), 0.5 - torch.sin(t)], 1)
        x = torch.where(k[:, None] == 0, upper, lower) + 0.05 * torch.randn(n, 2, generator=g)
        x = (x - torch.tensor([0.5, 0.25])) * 0.5
        return Dataset(x, k, 2, "points", "moons")
    raise UserError(f"recipe key 'data.toy' must be ring or moons, got '{kind}'")


def image_folder(path: str, resolution: Optional[int]) -> Dataset:
    """Every image under `path` (recursively), RGB, center-cropped and resized to `resolution`.

    Sub-folders name classes when there are at least two of them holding images.
    """
    from PIL import Image

    root = Path(path)
    if not root.is_dir():
        raise UserError(f"recipe key 'data.path': image folder '{path}' does not exist; point it at a folder of images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise UserError(f"recipe key 'data.path': folder '{path}' holds no images ({', '.join(sorted(IMAGE_EXTS))})")
    classes = sorted({p.parent.relative_to(root).as_posix() for p in files})
    arrays = []
    for p in files:
        with Image.open(p) as im:
            im = im.convert("RGB")
            if resolution:
                side = min(im.size)
                left, top = (im.width - side) // 2, (im.height - side) // 2
                im = im.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
            arrays.append(np.asarray(im))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise UserError(f"images in '{path}' differ in size {sorted(shapes)[:3]}; set data.resolution to resize them")
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if len(classes) >= 2:
        index = {c: i for i, c in enumerate(classes)}
        labels = torch.tensor([index[p.parent.relative_to(root).as_posix()] for p in files])
        return Dataset(x, labels, len(classes), "image", root.name)
    return Dataset(x, None, 0, "image", root.name)


CIFAR10_HINT = ("download 'cifar-10-python.tar.gz' from https://www.cs.toronto.edu/~kriz/cifar.html on a machine "
                "with network access and extract it so that '{root}/cifar-10-batches-py/' exists, "
                "or set data.path to the folder that holds it")


def cifar10(root: Optional[str]) -> Dataset:
    """CIFAR-10 train split through torchvision (never downloads: this machine may be offline)."""
    import torchvision

    root = root or str(Path.home() / ".cache" / "cmgen" / "cifar10")
    try:
        ds = torchvision.datasets.CIFAR10(root=root, train=True, download=False)
    except RuntimeError:
        raise UserError("CIFAR-10 is not under '" + root + "': " + CIFAR10_HINT.format(root=root)) from None
    x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return Dataset(x, torch.tensor(ds.targets), 10, "image", "cifar10")


def random_images(channels: int, resolution: int, num_classes: int, n: int = 256, seed: int = 0) -> Dataset:
    """Uniform noise images of a given shape: for smoke runs of GPU-sized recipes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, channels, resolution, resolution, generator=g) * 2 - 1
    labels = torch.randint(0, num_classes, (n,), generator=g) if num_classes else None
    return Dataset(x, labels, num_classes, "image", "random")


def load_dataset(cfg, seed: int = 0) -> tuple[Dataset, Optional[Dataset]]:
    """(train, held-out) for a recipe's data section."""
    if cfg.name == "prompts":  # prompt i is label i (text-to-image reward fine-tuning)
        from cmgen.models.sd3 import prompts_dataset
        return prompts_dataset(cfg), None
    if cfg.name == "digits":
        ds = load_digits()
    elif cfg.name == "toy2d":
        ds = toy2d(cfg.toy, cfg.n_points, seed)
    elif cfg.name == "folder":
        if not cfg.path:
            raise UserError("recipe key 'data.path' is required when data.name is folder")
        ds = image_folder(cfg.path, cfg.resolution)
    elif cfg.name == "cifar10":
        ds = cifar10(cfg.path)
    elif cfg.name == "random":
        ds = random_images(cfg.channels, cfg.resolution or 32, cfg.num_classes, seed=seed)
    elif cfg.name == "latents":
        ds = latent_dataset(cfg.path)
    else:
        raise UserError(f"recipe key 'data.name' must be digits, toy2d, folder, cifar10, random or latents, "
                        f"got '{cfg.name}'")
    return _split(ds, cfg.holdout, seed)


def latent_dataset(path: Optional[str]) -> Dataset:
    """A latent cache (cmgen latents encode) as normalised latents: per-element std LATENT_STD."""
    from cmgen.latents import LATENT_STD, read_cache

    if not path:
        raise UserError("recipe key 'data.path' must name a latent cache when data.name is latents; make one with "
                        "`cmgen latents encode DATA --vae VAE --out CACHE`")
    c = read_cache(path)
    x = LATENT_STD * (c.latents - c.mean) / c.std
    return Dataset(x, c.labels, c.num_classes, "latent", f"latents of {c.spec.get('dataset')}")


def shape_of(cfg) -> tuple[tuple[int, ...], int, str]:
    """(shape, num_classes, kind) a recipe's data will have, without loading it (for --smoke)."""
    if cfg.name == "digits":
        return (1, 8, 8), 10, "image"
    if cfg.name == "prompts":
        from cmgen.models.sd3 import prompts_shape
        return prompts_shape(cfg)
    if cfg.name == "toy2d":
        return (2,), (8 if cfg.toy == "ring" else 2), "points"
    if cfg.name == "cifar10":
        return (3, 32, 32), 10, "image"
    if cfg.name == "latents" and not (cfg.path and (Path(cfg.path) / "cache.json").is_file()):
        # no cache yet (--smoke): Stable Diffusion's VAE layout, 4 channels at 1/8 of the resolution
        side = (cfg.resolution or 256) // 8
        return (4, side, side), cfg.num_classes, "latent"
    if cfg.name == "random" or (cfg.name == "folder" and cfg.resolution):
        return (cfg.channels, cfg.resolution or 32, cfg.resolution or 32), cfg.num_classes, "image"
    ds, _ = load_dataset(cfg)
    return ds.shape, ds.num_classes, ds.kind


def training_data(recipe, smoke: bool = False) -> tuple[Dataset, Optional[Dataset]]:
    """(train, held-out) of a run; `smoke` swaps in random data of the recipe's shape (no files needed)."""
    r, t = recipe, recipe.train
    if not smoke:
        data, holdout = load_dataset(r.data, t.seed)
    else:
        shape, ncls, kind = shape_of(r.data)
        if kind == "points":
            data = toy2d(r.data.toy, 256, t.seed)
        else:
            data = random_images(shape[0], shape[1], ncls, n=max(8, t.batch_size), seed=t.seed)
            data.kind = kind
        holdout = None
    if r.model.class_conditional and not data.num_classes:
        raise UserError("recipe key 'model.class_conditional' is true but the data have no labels")
    return data, holdout
