"""A small diffusers AutoencoderKL trained here, so the latent path runs offline end to end.

Loss per batch: mean squared reconstruction error of a posterior sample's decoding, plus `kl_weight`
times KL(q(z|x) || N(0, I)) summed over a sample's latent elements and divided by its pixel count
(so the weight does not depend on the resolution). Adam with a constant learning rate. The result
is saved as a diffusers folder (safetensors) with `recon.png` (inputs above their reconstructions)
and `loss.png` beside it; `cmgen latents encode DATA --vae FOLDER` then uses it.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cmgen.errors import UserError


@dataclass(frozen=True)
class VAEConfig:
    block_out_channels: tuple[int, ...] = (32, 64)   # len - 1 downsamplings: 8x8 digits -> 4x4 latents
    latent_channels: int = 4
    layers_per_block: int = 1
    norm_num_groups: int = 16
    steps: int = 3000
    batch_size: int = 128
    lr: float = 1e-3
    kl_weight: float = 1e-3
    seed: int = 0


def build_vae(channels: int, cfg: VAEConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.block_out_channels)
    return AutoencoderKL(in_channels=channels, out_channels=channels, latent_channels=cfg.latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
                         norm_num_groups=cfg.norm_num_groups)


def vae_loss(vae, x: torch.Tensor, generator: torch.Generator, kl_weight: float) -> tuple[torch.Tensor, dict]:
    post = vae.encode(x).latent_dist
    z = post.mean + post.std * torch.randn(post.mean.shape, generator=generator)
    recon = vae.decode(z).sample
    mse = (recon - x).pow(2).mean()
    kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).flatten(1).sum(1).mean() / x[0].numel()
    return mse + kl_weight * kl, {"mse": mse.detach(), "kl": kl.detach()}


def train_vae(images: torch.Tensor, out, cfg: VAEConfig = VAEConfig(), progress: bool = True) -> Path:
    """Train on images [N, C, H, W] in [-1, 1]; writes the diffusers folder `out` atomically."""
    from tqdm.auto import tqdm

    from cmgen.plots import save_curve, save_grid

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out '{out}' exists and is not empty; pass a new folder")
    side = images.shape[-1]
    if side % 2 ** (len(cfg.block_out_channels) - 1):
        raise UserError(f"images of side {side} cannot be downsampled {len(cfg.block_out_channels) - 1} times; "
                        "use fewer block_out_channels")
    torch.manual_seed(cfg.seed)
    vae = build_vae(images.shape[1], cfg).train()
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    rows = []
    bar = tqdm(range(cfg.steps), desc="training the VAE", unit="step", disable=not progress)
    for step in bar:
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=g)
        loss, terms = vae_loss(vae, images[idx], g, cfg.kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == cfg.steps - 1:
            rows.append({"step": step, "loss": loss.item(), **{k: v.item() for k, v in terms.items()}})
            bar.set_postfix(mse=f"{rows[-1]['mse']:.4f}", kl=f"{rows[-1]['kl']:.3f}")
    vae.eval()
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(tmp, safe_serialization=True)
    with torch.no_grad():
        x = images[:32]
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        mse = (recon - x).pow(2).mean().item()
    save_grid(torch.cat([x, recon]), tmp / "recon.png", nrow=16)
    (tmp / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    save_curve(rows, "loss", tmp / "loss.png", title="VAE training loss")
    (tmp / "cmgen_vae.json").write_text(json.dumps({**asdict(cfg), "recon_mse_first32": mse}, indent=2) + "\n")
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out
