"""Datasets indexed by the loop's keyed sampler.

Every dataset is a `Dataset`: images NCHW float in [-1, 1] (or points [N, D]), optional
integer labels, and the metadata the models need. Image folders and CIFAR-10 are `ImageRows`:
uint8 images (in RAM or a memory-mapped cache, cmgen.data.cache) turned into floats one batch at
a time. The loop draws indices itself (cmgen.rng); DataLoader workers (cmgen.data.loader) only
read the rows it names, so there is no hidden global-RNG use.
"""
from __future__ import annotations

import functools
import json
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

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows `idx` as float (images in [-1, 1])."""
        return self.x[idx]

    def take(self, idx: torch.Tensor) -> "Dataset":
        return Dataset(self.x[idx], None if self.labels is None else self.labels[idx], self.num_classes, self.kind,
                       self.name)


class ImageRows(Dataset):
    """uint8 NCHW images (a numpy array or memory map) and an optional row subset; floats only per batch."""

    def __init__(self, images: np.ndarray, labels: Optional[torch.Tensor], num_classes: int, name: str,
                 rows: Optional[torch.Tensor] = None, cache: Optional[Path] = None):
        self.images, self.labels, self.num_classes, self.name = images, labels, num_classes, name
        self.rows, self.cache, self.kind = rows, cache, "image"

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else self.images.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def uint8(self, idx) -> torch.Tensor:
        idx = torch.as_tensor(idx)
        if self.rows is not None:
            idx = self.rows[idx]
        idx = idx.numpy()
        if len(idx) and (np.diff(idx) >= 0).all():  # sorted (a split): one read
            return torch.from_numpy(np.ascontiguousarray(self.images[idx]))
        order = np.argsort(idx, kind="stable")  # a memory map reads fastest in file order
        out = np.empty((len(idx), *self.images.shape[1:]), np.uint8)
        out[order] = self.images[idx[order]]
        return torch.from_numpy(out)

    def batch(self, idx) -> torch.Tensor:
        return to_float(self.uint8(idx))

    @property
    def x(self) -> torch.Tensor:
        """Every row as float (for small sets and whole-set tools; training reads `batch`)."""
        return self.batch(torch.arange(len(self)))

    def __getstate__(self):  # DataLoader workers under spawn: reopen the memory map, never copy it
        state = dict(self.__dict__)
        if self.cache is not None:
            state["images"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.images is None:
            self.images = np.load(self.cache / "images.npy", mmap_mode="r")

    def take(self, idx: torch.Tensor) -> "ImageRows":
        rows = idx if self.rows is None else self.rows[idx]
        return ImageRows(self.images, None if self.labels is None else self.labels[idx], self.num_classes, self.name,
                         rows=rows, cache=self.cache)


def to_float(u8: torch.Tensor) -> torch.Tensor:
    """uint8 images to float in [-1, 1] (as the pre-cache loaders computed them)."""
    return u8.float() / 127.5 - 1.0


def _split(ds: Dataset, holdout: int, seed: int) -> tuple[Dataset, Optional[Dataset]]:
    """Keep `holdout` examples out of training (a fixed, seeded choice) for evaluation."""
    if holdout <= 0:
        return ds, None
    if holdout >= len(ds):
        raise UserError(f"recipe key 'data.holdout' ({holdout}) must be smaller than the dataset ({len(ds)} examples)")
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed + 7919))
    held, kept = perm[:holdout].sort().values, perm[holdout:].sort().values
    return ds.take(kept), ds.take(held)


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


def open_image(path):
    """PIL's image at `path`, or one sentence naming the file when it is not an image PIL can read."""
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path)
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"image file '{path}' cannot be read ({type(exc).__name__}); remove or replace it") from None


def _decode(path: Path, resolution: Optional[int]) -> np.ndarray:
    from PIL import Image

    with open_image(path) as im:
        im = im.convert("RGB")
        if resolution:
            side = min(im.size)
            left, top = (im.width - side) // 2, (im.height - side) // 2
            im = im.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
        return np.asarray(im)


def image_folder(path: str, resolution: Optional[int], cache: Optional[str] = None, workers: int = 0) -> Dataset:
    """Every image under `path` (recursively), RGB, center-cropped and resized to `resolution`, as uint8.

    Sub-folders name classes when there are at least two of them holding images. `cache` ('auto' or a
    folder) keeps the decoded set as a memory-mapped file (cmgen.data.cache) instead of in RAM;
    `workers` threads decode it.
    """
    root, files = _image_files(path)
    classes = sorted({p.parent.relative_to(root).as_posix() for p in files})
    labels = None
    if len(classes) >= 2:
        index = {c: i for i, c in enumerate(classes)}
        labels = torch.tensor([index[p.parent.relative_to(root).as_posix()] for p in files])
    ncls = len(classes) if labels is not None else 0
    first = _decode(files[0], resolution)
    shape = (first.shape[2], first.shape[0], first.shape[1])
    fill = _filler(files, first, resolution, path)
    if cache:
        from cmgen.data.cache import cached_images

        images, _, folder = cached_images(root, files, {"kind": "folder", "resolution": resolution}, shape,
                                          lambda out, w: fill(out, w), setting=cache, workers=workers)
        return ImageRows(images, labels, ncls, root.name, cache=folder)
    images = np.empty((len(files), *shape), np.uint8)
    fill(images, workers)
    return ImageRows(images, labels, ncls, root.name)


def _image_files(path: str, what: str = "recipe key 'data.path'") -> tuple[Path, list[Path]]:
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"{what}: image folder '{path}' does not exist; point it at a folder of images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise UserError(f"{what}: folder '{path}' holds no images ({', '.join(sorted(IMAGE_EXTS))})")
    return root, files


def _filler(files: list[Path], first: np.ndarray, resolution: Optional[int], path: str):
    """fill(out, workers): decode every file into the uint8 array out [N, C, H, W] (one size for all)."""
    def fill(out: np.ndarray, workers: int) -> None:
        def one(i: int) -> None:
            a = _decode(files[i], resolution)
            if a.shape != first.shape:
                raise UserError(f"images in '{path}' differ in size ({files[0].name}: {first.shape[:2]}, "
                                f"{files[i].name}: {a.shape[:2]}); set data.resolution (or --resolution) to "
                                "resize them")
            out[i] = a.transpose(2, 0, 1)

        if workers > 0:  # PIL decodes and resizes without the GIL: threads scale
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(one, range(len(files)), chunksize=64))
        else:
            for i in range(len(files)):
                one(i)

    return fill


# ----------------------------------------------------------------------------- captioned image folders

METADATA = "metadata.jsonl"   # Hugging Face imagefolder: one {"file_name": ..., "text": ...} per line


def is_captioned(path) -> bool:
    """A folder with a metadata.jsonl, or with a caption file NAME.txt beside an image NAME.ext."""
    root = Path(path)
    if (root / METADATA).is_file():
        return True
    return any(p.with_suffix(".txt").is_file() for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS)


def read_captions(path) -> tuple[list[Path], list[str]]:
    """(image files, one caption each) of a captioned folder: the `text` of the image's metadata.jsonl line
    (Hugging Face's imagefolder convention, `file_name` relative to the folder), else NAME.txt beside it."""
    root, files = _image_files(str(path), "DATA")
    meta, where = {}, root / METADATA
    if where.is_file():
        for n, line in enumerate(where.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name, text = row["file_name"], row["text"]
            except (ValueError, TypeError, KeyError):
                raise UserError(f"{where} line {n} is not a JSON object with 'file_name' and 'text'; fix that "
                                "line") from None
            image = (root / name).resolve()
            if not image.is_file():
                raise UserError(f"{where} line {n} names '{name}', which is not a file in '{root}'; fix the line "
                                "or add the image")
            meta[image] = str(text)
    captions = []
    for f in files:
        text = meta.get(f.resolve())
        if text is None and f.with_suffix(".txt").is_file():
            text = f.with_suffix(".txt").read_text(encoding="utf-8").strip()
        if text is None:
            rel = f.relative_to(root).as_posix()
            raise UserError(f"image '{rel}' in '{root}' has no caption; add the line "
                            f"{{\"file_name\": \"{rel}\", \"text\": \"...\"}} to {METADATA} or a file "
                            f"'{f.with_suffix('.txt').name}' beside it")
        captions.append(text)
    return files, captions


def captioned_folder(path: str, resolution: Optional[int], workers: int = 0) -> "ImageRows":
    """A captioned image folder (`read_captions`) as uint8 images; label i is image i, whose caption is
    `captions[i]` (the attribute the latent cache stores)."""
    files, captions = read_captions(path)
    first = _decode(files[0], resolution)
    images = np.empty((len(files), first.shape[2], first.shape[0], first.shape[1]), np.uint8)
    _filler(files, first, resolution, path)(images, workers)
    ds = ImageRows(images, torch.arange(len(files)), len(files), Path(path).name)
    ds.captions = captions
    return ds


CIFAR10_HINT = ("download 'cifar-10-python.tar.gz' from https://www.cs.toronto.edu/~kriz/cifar.html on a machine "
                "with network access and extract it so that '{root}/cifar-10-batches-py/' exists, "
                "or set data.path to the folder that holds it")


def cifar10(root: Optional[str], cache: Optional[str] = None) -> Dataset:
    """CIFAR-10 train split through torchvision (never downloads: this machine may be offline), as uint8;
    `cache` keeps it memory-mapped (cmgen.data.cache) so the processes of a run share one copy."""
    import torchvision

    root = root or str(Path.home() / ".cache" / "cmgen" / "cifar10")

    def load():
        try:
            return torchvision.datasets.CIFAR10(root=root, train=True, download=False)
        except RuntimeError:
            raise UserError("CIFAR-10 is not under '" + root + "': " + CIFAR10_HINT.format(root=root)) from None

    if not cache:
        ds = load()
        return ImageRows(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)), torch.tensor(ds.targets), 10, "cifar10")
    from cmgen.data.cache import cached_images

    batches = Path(root) / "cifar-10-batches-py"
    files = sorted(batches.glob("data_batch_*")) if batches.is_dir() else []
    if not files:
        load()  # the one-sentence error

    get = functools.cache(load)  # read once when the cache is built: its size, then its images

    def fill(out: np.ndarray, workers: int) -> np.ndarray:
        out[:] = get().data.transpose(0, 3, 1, 2)
        return np.asarray(get().targets)

    images, labels, folder = cached_images(batches, files, {"kind": "cifar10-train"}, (3, 32, 32), fill,
                                           setting=cache, count=lambda: len(get().data))
    return ImageRows(images, torch.from_numpy(labels), 10, "cifar10", cache=folder)


def random_images(channels: int, resolution: int, num_classes: int, n: int = 256, seed: int = 0) -> Dataset:
    """Uniform noise images of a given shape: for smoke runs of GPU-sized recipes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, channels, resolution, resolution, generator=g) * 2 - 1
    labels = torch.randint(0, num_classes, (n,), generator=g) if num_classes else None
    return Dataset(x, labels, num_classes, "image", "random")


def _cache_setting(cfg) -> Optional[str]:
    """data.cache: 'auto' | 'off' | a folder (None = decode into this process's RAM)."""
    return None if cfg.cache == "off" else cfg.cache


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
        ds = image_folder(cfg.path, cfg.resolution, cache=_cache_setting(cfg), workers=cfg.num_workers)
    elif cfg.name == "cifar10":
        ds = cifar10(cfg.path, cache=_cache_setting(cfg))
    elif cfg.name == "random":
        ds = random_images(cfg.channels, cfg.resolution or 32, cfg.num_classes, seed=seed)
    elif cfg.name == "latents":
        ds = latent_dataset(cfg.path)
    else:
        raise UserError(f"recipe key 'data.name' must be digits, toy2d, folder, cifar10, random or latents, "
                        f"got '{cfg.name}'")
    return _split(ds, cfg.holdout, seed)


def latent_dataset(path: Optional[str]) -> Dataset:
    """A latent cache (cmgen latents encode) as model-space latents: per-element std LATENT_STD (normalised) or
    Stable Diffusion's scaling (sd)."""
    from cmgen.latents import read_cache

    if not path:
        raise UserError("recipe key 'data.path' must name a latent cache when data.name is latents; make one with "
                        "`cmgen latents encode DATA --vae VAE --out CACHE`")
    c = read_cache(path)
    return Dataset(c.model_latents(), c.labels, c.num_classes, "latent", f"latents of {c.spec.get('dataset')}")


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
    if r.data.hflip and r.data.name == "latents":   # checked here, not in validate: stored recipes still load
        raise UserError("recipe key 'data.hflip' must be false when data.name is latents: a flipped latent is not "
                        "the latent of the flipped image; store the flips in the cache with `cmgen latents encode "
                        "... --hflip` (resume such a run with data.hflip=false)")
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
