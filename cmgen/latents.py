"""Latent data for latent consistency training (Dao et al. 2025): a VAE codec and a cache of an
image dataset encoded once.

The cache stores posterior *samples* of a diffusers `AutoencoderKL` (not the means), one per image
and, with `hflip`, one per flipped image, plus per-element mean/std maps over the whole set. Models
see x = sigma_d (z - mean) / std, so every latent element has std sigma_d = 0.5 (the reference
code's normalisation; the VAE's scaling factor cancels out), and decode with
vae.decode(x std / sigma_d + mean).

Layout of a cache folder:
  cache.json              what made it: VAE (source and a hash of its config and weights), dataset
                          (name and a hash of its pixels), resolution, hflip, seed; refused in one
                          sentence when a later call names anything else
  part-NNNNN.safetensors  latents of images [k * CHUNK, (k + 1) * CHUNK), written atomically; an
                          interrupted encode resumes at the first missing part
  latents.safetensors     all latents, labels, and the mean/std maps (written last: its presence
                          means complete)
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from cmgen.errors import UserError

CACHE_VERSION = 1
LATENT_STD = 0.5  # models see latents normalised to this per-element std (sigma_data)
CHUNK = 1024
META = "cache.json"
FINAL = "latents.safetensors"


# ----------------------------------------------------------------------------- the codec

class LatentCodec:
    """Normalised latents <-> images through a frozen VAE and the cache's per-element statistics."""

    def __init__(self, vae, mean: torch.Tensor, std: torch.Tensor, sigma_data: float = LATENT_STD,
                 image_shape: Optional[tuple] = None):
        self.vae = vae.eval().requires_grad_(False)
        self.mean, self.std, self.sigma_data = mean.float(), std.float(), float(sigma_data)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_shape = tuple(image_shape) if image_shape else (
            vae.config.out_channels, mean.shape[-2] * factor, mean.shape[-1] * factor)

    def to(self, device) -> "LatentCodec":
        self.vae.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        return self.sigma_data * (z.float() - self.mean) / self.std

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() * self.std / self.sigma_data + self.mean

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Images in [-1, 1] -> normalised latents (posterior samples)."""
        return self.normalise(posterior_sample(self.vae, images, generator))

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> images in [-1, 1]."""
        z = self.denormalise(x).to(next(self.vae.parameters()).dtype)
        return self.vae.decode(z).sample.float().clamp(-1, 1)


def posterior_sample(vae, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One sample of q(z | image) (the reference code stores samples, not means); raw VAE units."""
    dist = vae.encode(images.to(next(vae.parameters()).dtype)).latent_dist
    eps = torch.randn(dist.mean.shape, generator=generator, dtype=torch.float32).to(dist.mean.device)
    return dist.mean.float() + dist.std.float() * eps


# ----------------------------------------------------------------------------- the cache

@dataclass(frozen=True)
class CacheSpec:
    """What a cache is made of; two specs must agree for a cache to be reused."""
    vae_source: str
    vae_hash: str
    dataset: str
    dataset_hash: str
    resolution: int
    hflip: bool
    seed: int

    def to_json(self) -> dict:
        return {"version": CACHE_VERSION, **self.__dict__}


def vae_fingerprint(vae) -> str:
    """sha256 over the VAE's config and weights (a different VAE never reuses a cache)."""
    h = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for name, t in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def tensor_fingerprint(x: torch.Tensor) -> str:
    return hashlib.sha256(x.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _check_spec(folder: Path, spec: CacheSpec) -> None:
    meta = folder / META
    if not meta.is_file():
        return
    try:
        old = json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"latent cache '{folder}' has an unreadable {META}; delete the folder or pass a new --out") \
            from None
    for key, value in spec.to_json().items():
        if old.get(key) != value:
            what = {"vae_source": "another VAE", "vae_hash": "another VAE (weights differ)",
                    "dataset": "another dataset", "dataset_hash": "another dataset (its images differ)",
                    "resolution": "another resolution", "hflip": "another data.hflip", "seed": "another seed",
                    "version": "another cmgen cache version"}[key]
            raise UserError(f"latent cache '{folder}' was made with {what} ({key} {old.get(key)!r}, now {value!r}); "
                            "pass a new --out or delete that folder")


def _atomic_save(tensors: dict, path: Path, metadata: Optional[dict] = None) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def encode_dataset(images: torch.Tensor, labels: Optional[torch.Tensor], vae, out, *, spec: CacheSpec,
                   batch_size: int = 64, device="cpu", progress: bool = True, num_classes: int = 0) -> Path:
    """Encode `images` ([N, C, H, W] in [-1, 1]) into the cache folder `out`; resumes a partial one."""
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    folder = Path(out)
    _check_spec(folder, spec)
    if (folder / FINAL).is_file():
        return folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / META).write_text(json.dumps(spec.to_json(), indent=2) + "\n")
    except OSError as exc:
        raise UserError(f"--out '{folder}' cannot be written ({exc.strerror or exc}); choose another folder") from None
    vae = vae.to(device).eval()
    n = len(images)
    parts = []
    bar = tqdm(total=n * (2 if spec.hflip else 1), desc="encoding latents", unit="img", disable=not progress)
    for k, start in enumerate(range(0, n, CHUNK)):
        path = folder / f"part-{k:05d}.safetensors"
        parts.append(path)
        count = min(CHUNK, n - start)
        if path.is_file():
            bar.update(count * (2 if spec.hflip else 1))
            continue
        out_chunk = {}
        for flip in ((False, True) if spec.hflip else (False,)):
            # posterior noise keyed by (seed, chunk, flip): a resumed encode writes what a straight one does
            g = torch.Generator().manual_seed(spec.seed * 1_000_003 + 2 * k + int(flip))
            zs = []
            for b in range(start, start + count, batch_size):
                x = images[b:min(b + batch_size, start + count)].to(device)
                with torch.no_grad():
                    zs.append(posterior_sample(vae, x.flip(3) if flip else x, g).cpu())
                bar.update(len(x))
            out_chunk["flip" if flip else "latents"] = torch.cat(zs)
        _atomic_save(out_chunk, path)
    bar.close()
    chunks = [load_file(str(p)) for p in parts]
    z = torch.cat([c["latents"] for c in chunks])
    if spec.hflip:
        z = torch.cat([z, torch.cat([c["flip"] for c in chunks])])
    mean, std = z.mean(0), z.std(0).clamp(min=1e-6)  # per-element maps over the whole set
    final = {"latents": z, "mean": mean, "std": std}
    if labels is not None:
        final["labels"] = torch.cat([labels, labels]) if spec.hflip else labels.clone()
    _atomic_save(final, folder / FINAL, metadata={"n_images": str(n), "num_classes": str(num_classes),
                                                  "image_shape": json.dumps(list(images.shape[1:]))})
    for p in parts:
        p.unlink(missing_ok=True)
    return folder


@dataclass
class LatentCache:
    folder: Path
    spec: dict
    latents: torch.Tensor           # raw posterior samples [M, C, h, w]
    labels: Optional[torch.Tensor]
    mean: torch.Tensor
    std: torch.Tensor
    num_classes: int
    image_shape: tuple[int, ...]


def read_cache(folder) -> LatentCache:
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / META).is_file():
        raise UserError(f"'{folder}' is not a latent cache (no {META}); make one with `cmgen latents encode`")
    if not (folder / FINAL).is_file():
        raise UserError(f"latent cache '{folder}' is incomplete; run the same `cmgen latents encode` again to "
                        "finish it")
    from safetensors import safe_open

    spec = json.loads((folder / META).read_text())
    with safe_open(str(folder / FINAL), "pt") as f:
        meta = f.metadata() or {}
    t = load_file(str(folder / FINAL))
    return LatentCache(folder, spec, t["latents"], t.get("labels"), t["mean"], t["std"],
                       int(meta.get("num_classes", 0)), tuple(json.loads(meta.get("image_shape", "[]"))))


def codec_for(recipe, smoke: bool = False) -> LatentCodec:
    """The codec of a latent recipe: the VAE its cache was made with and the cache's statistics. Without
    a cache (`--smoke`), a tiny 8x-downsampling VAE built from a config with unit statistics."""
    from cmgen.data import shape_of
    from cmgen.pretrained import load_vae

    if recipe.model.arch == "sd3":  # the pipeline's own VAE
        from cmgen.models.sd3 import sd3_codec
        return sd3_codec(recipe)
    path = recipe.data.path
    if smoke and not (path and (Path(path) / META).is_file()):
        shape, _, _ = shape_of(recipe.data)
        return LatentCodec(tiny_vae(recipe.data.channels, shape[0]), torch.zeros(shape), torch.ones(shape))
    c = read_cache(path)
    vae = load_vae(c.spec["vae_source"], what=f"the VAE of latent cache '{c.folder}'")
    return LatentCodec(vae, c.mean, c.std, image_shape=c.image_shape or None)


def tiny_vae(image_channels: int = 3, latent_channels: int = 4):
    """A small AutoencoderKL with Stable Diffusion's layout (4 levels, 8x downsampling) for smoke runs."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=image_channels, out_channels=image_channels, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=8)
