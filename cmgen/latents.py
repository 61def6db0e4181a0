"""Latent data for latent consistency training (Dao et al. 2025) and latent consistency distillation: a VAE
codec and a cache of an image dataset encoded once.

The cache stores posterior *samples* of a diffusers `AutoencoderKL` (not the means), one per image
and, with `hflip`, one per flipped image, in one of two scalings:
- `normalised` (latent CT's): per-element mean/std maps over the whole set; models see
  x = sigma_d (z - mean) / std, so every latent element has std sigma_d = 0.5 (the VAE's scaling factor
  cancels out), and decode with vae.decode(x std / sigma_d + mean);
- `sd` (Stable Diffusion's, diffusers' training scripts): the stored latents are
  (z - shift_factor) * scaling_factor of the VAE's config (shift 0 when it has none), what an SD UNet was
  trained on; decoded with vae.decode(x / scaling_factor + shift_factor).
A captioned image folder (metadata.jsonl or NAME.txt captions) stores its captions beside the latents:
label i of the cache means captions[i].

Layout of a cache folder:
  cache.json              what made it: VAE (source and a hash of its config and weights), dataset
                          (name and a hash of its pixels), resolution, hflip, seed; refused in one
                          sentence when a later call names anything else
  part-NNNNN.safetensors  latents of images [k * CHUNK, (k + 1) * CHUNK), written atomically; an
                          interrupted encode resumes at the first missing part
  captions.json           the captions of a captioned folder (a JSON list; label i means caption i)
  latents.safetensors     all latents, labels, and (normalised) the mean/std maps (written last: its
                          presence means complete)
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
CAPTIONS = "captions.json"
SCALINGS = ("normalised", "sd")


# ----------------------------------------------------------------------------- the codec

class LatentCodec:
    """Model-space latents <-> images through a frozen VAE: `normalised` through the cache's per-element
    statistics, `sd` through the VAE's scaling_factor and shift_factor (`LatentCodec.sd`)."""

    def __init__(self, vae, mean: torch.Tensor, std: torch.Tensor, sigma_data: float = LATENT_STD,
                 image_shape: Optional[tuple] = None, scaling: str = "normalised"):
        self.vae = vae.eval().requires_grad_(False)
        self.mean, self.std, self.sigma_data = mean.float(), std.float(), float(sigma_data)
        self.scaling = scaling
        self.scaling_factor, self.shift_factor = sd_factors(vae)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_shape = tuple(image_shape) if image_shape else (
            vae.config.out_channels, mean.shape[-2] * factor, mean.shape[-1] * factor)

    @classmethod
    def sd(cls, vae, shape, image_shape: Optional[tuple] = None) -> "LatentCodec":
        """Stable Diffusion's scaling. Its mean/std are the equivalent constant maps (shift, sigma_d / scale),
        what an exported pipeline's latent statistics hold."""
        scale, shift = sd_factors(vae)
        return cls(vae, torch.full(tuple(shape), shift), torch.full(tuple(shape), LATENT_STD / scale),
                   image_shape=image_shape, scaling="sd")

    def to(self, device) -> "LatentCodec":
        self.vae.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents -> model space."""
        if self.scaling == "sd":
            return (z.float() - self.shift_factor) * self.scaling_factor
        return self.sigma_data * (z.float() - self.mean) / self.std

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        if self.scaling == "sd":
            return x.float() / self.scaling_factor + self.shift_factor
        return x.float() * self.std / self.sigma_data + self.mean

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Images in [-1, 1] -> model-space latents (posterior samples)."""
        return self.normalise(posterior_sample(self.vae, images, generator))

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space latents -> images in [-1, 1]."""
        z = self.denormalise(x).to(next(self.vae.parameters()).dtype)
        return self.vae.decode(z).sample.float().clamp(-1, 1)


def sd_factors(vae) -> tuple[float, float]:
    """(scaling_factor, shift_factor) of a VAE's config (diffusers' defaults 0.18215 and 0 when unset)."""
    cfg = vae.config
    scale = getattr(cfg, "scaling_factor", None)
    shift = getattr(cfg, "shift_factor", None)
    return float(0.18215 if scale is None else scale), float(shift or 0.0)


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
    scaling: str = "normalised"     # normalised | sd (see the module docstring)

    def to_json(self) -> dict:
        return {"version": CACHE_VERSION, **self.__dict__}


def vae_fingerprint(vae) -> str:
    """sha256 over the VAE's config and weights (a different VAE never reuses a cache)."""
    h = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for name, t in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def tensor_fingerprint(x: torch.Tensor, texts: Optional[list] = None) -> str:
    """sha256 over a tensor's values (and, for a captioned dataset, its captions)."""
    h = hashlib.sha256(x.detach().float().cpu().contiguous().numpy().tobytes())
    if texts is not None:
        h.update(json.dumps(list(texts)).encode())
    return h.hexdigest()[:16]


def _check_spec(folder: Path, spec: CacheSpec) -> None:
    meta = folder / META
    if not meta.is_file():
        return
    try:
        old = json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"latent cache '{folder}' has an unreadable {META}; delete the folder or pass a new --out") \
            from None
    old = {"scaling": "normalised", **old}   # caches from before the sd scaling
    for key, value in spec.to_json().items():
        if old.get(key) != value:
            what = {"vae_source": "another VAE", "vae_hash": "another VAE (weights differ)",
                    "dataset": "another dataset", "dataset_hash": "another dataset (its images or captions differ)",
                    "resolution": "another resolution", "hflip": "another data.hflip", "seed": "another seed",
                    "scaling": "another --scaling", "version": "another cmgen cache version"}[key]
            raise UserError(f"latent cache '{folder}' was made with {what} ({key} {old.get(key)!r}, now {value!r}); "
                            "pass a new --out or delete that folder")


def _atomic_save(tensors: dict, path: Path, metadata: Optional[dict] = None) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def encode_dataset(images: torch.Tensor, labels: Optional[torch.Tensor], vae, out, *, spec: CacheSpec,
                   batch_size: int = 64, device="cpu", progress: bool = True, num_classes: int = 0,
                   captions: Optional[list] = None) -> Path:
    """Encode `images` ([N, C, H, W] in [-1, 1]) into the cache folder `out`; resumes a partial one. With
    `captions` (one per image; label i means captions[i]) they are stored beside the latents."""
    if spec.scaling not in SCALINGS:
        raise UserError(f"--scaling must be {' or '.join(SCALINGS)}, got '{spec.scaling}'")
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
    scale, shift = sd_factors(vae)
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
                    z = posterior_sample(vae, x.flip(3) if flip else x, g)
                    zs.append(((z - shift) * scale if spec.scaling == "sd" else z).cpu())
                bar.update(len(x))
            out_chunk["flip" if flip else "latents"] = torch.cat(zs)
        _atomic_save(out_chunk, path)
    bar.close()
    chunks = [load_file(str(p)) for p in parts]
    z = torch.cat([c["latents"] for c in chunks])
    if spec.hflip:
        z = torch.cat([z, torch.cat([c["flip"] for c in chunks])])
    final = {"latents": z}
    if spec.scaling == "normalised":  # per-element maps over the whole set
        final |= {"mean": z.mean(0), "std": z.std(0).clamp(min=1e-6)}
    if labels is not None:
        final["labels"] = torch.cat([labels, labels]) if spec.hflip else labels.clone()
    if captions is not None:
        if labels is None or len(captions) != n:
            raise ValueError("captions need one entry per image and labels indexing them")
        tmp = folder / f".{CAPTIONS}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(list(captions), ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, folder / CAPTIONS)
    _atomic_save(final, folder / FINAL, metadata={"n_images": str(n), "num_classes": str(num_classes),
                                                  "image_shape": json.dumps(list(images.shape[1:])),
                                                  "scaling": spec.scaling})
    for p in parts:
        p.unlink(missing_ok=True)
    return folder


@dataclass
class LatentCache:
    folder: Path
    spec: dict
    latents: torch.Tensor           # normalised: raw posterior samples; sd: samples in SD's scaling [M, C, h, w]
    labels: Optional[torch.Tensor]
    mean: Optional[torch.Tensor]    # normalised only: the per-element maps
    std: Optional[torch.Tensor]
    num_classes: int
    image_shape: tuple[int, ...]
    scaling: str = "normalised"
    captions: Optional[list] = None  # label i means captions[i] (a captioned folder)

    def model_latents(self) -> torch.Tensor:
        """What models see: per-element std LATENT_STD (normalised) or the stored SD-scaled latents (sd)."""
        if self.scaling == "sd":
            return self.latents
        return LATENT_STD * (self.latents - self.mean) / self.std


def _complete(folder) -> Path:
    folder = Path(folder)
    if not (folder / META).is_file():
        raise UserError(f"'{folder}' is not a latent cache (no {META}); make one with `cmgen latents encode`")
    if not (folder / FINAL).is_file():
        raise UserError(f"latent cache '{folder}' is incomplete; run the same `cmgen latents encode` again to "
                        "finish it")
    return folder


def read_spec(folder) -> dict:
    """The cache.json of a complete cache."""
    try:
        return json.loads((_complete(folder) / META).read_text())
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"latent cache '{folder}' has a corrupt {META}; encode it again with `cmgen latents encode`") \
            from None


def cache_scaling(folder) -> str:
    """The scaling of a complete cache (caches made before the sd scaling: normalised)."""
    return read_spec(folder).get("scaling", "normalised")


def read_captions(folder) -> Optional[list]:
    """The captions of a complete cache (label i means caption i), or None for a cache without them."""
    path = _complete(folder) / CAPTIONS
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def read_cache(folder) -> LatentCache:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    folder = _complete(folder)
    spec = read_spec(folder)
    try:
        with safe_open(str(folder / FINAL), "pt") as f:
            meta = f.metadata() or {}
        t = load_file(str(folder / FINAL))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:   # a truncated or foreign file
        raise UserError(f"latent cache '{folder}' has an unreadable {FINAL} ({type(exc).__name__}); encode it again "
                        "with `cmgen latents encode`") from None
    return LatentCache(folder, spec, t["latents"], t.get("labels"), t.get("mean"), t.get("std"),
                       int(meta.get("num_classes", 0)), tuple(json.loads(meta.get("image_shape", "[]"))),
                       spec.get("scaling", "normalised"), read_captions(folder))


def codec_for(recipe, smoke: bool = False) -> LatentCodec:
    """The codec of a latent recipe: the VAE its cache was made with and the cache's scaling (statistics).
    Without a cache (`--smoke`), a tiny 8x-downsampling VAE built from a config with unit statistics."""
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
    if c.scaling == "sd":
        return LatentCodec.sd(vae, c.latents.shape[1:], image_shape=c.image_shape or None)
    return LatentCodec(vae, c.mean, c.std, image_shape=c.image_shape or None)


def tiny_vae(image_channels: int = 3, latent_channels: int = 4):
    """A small AutoencoderKL with Stable Diffusion's layout (4 levels, 8x downsampling) for smoke runs."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=image_channels, out_channels=image_channels, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=8)
