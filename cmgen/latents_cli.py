"""`cmgen latents encode DATA --vae VAE --out CACHE [--scaling sd]`: encode an image dataset once into a latent
cache (latent CT's per-element normalisation, or Stable Diffusion's scaling for SD teachers; a captioned folder's
captions travel with it)."""
from __future__ import annotations

import argparse
from pathlib import Path

from cmgen.cli import at_least
from cmgen.errors import UserError


def add_parser(subparsers) -> None:
    lat = subparsers.add_parser("latents", help="latent caches for latent consistency training")
    sub = lat.add_subparsers(dest="latents_command", metavar="ACTION", required=True)
    e = sub.add_parser("encode", help="encode an image dataset with a VAE into a cache (resumable)")
    e.add_argument("data", metavar="DATA", help="digits, cifar10 (torchvision root with --data-root), or a folder of "
                   "images: captioned (metadata.jsonl with file_name and text per line, or NAME.txt beside each "
                   "image) or one sub-folder per class for labels")
    e.add_argument("--vae", required=True, help="AutoencoderKL folder, pipeline folder with vae/, or a cached hub "
                   "id such as stabilityai/sd-vae-ft-ema")
    e.add_argument("--out", required=True, metavar="CACHE", help="cache folder (re-running resumes it)")
    e.add_argument("--resolution", type=at_least(1), default=None, help="folder images: resize to this side length")
    e.add_argument("--data-root", default=None, help="cifar10: torchvision root holding cifar-10-batches-py")
    e.add_argument("--hflip", action="store_true", help="also store latents of the horizontally flipped images")
    e.add_argument("--scaling", choices=("normalised", "sd"), default="normalised",
                   help="normalised: per-element std 0.5 (latent CT, default); sd: latents times the VAE's "
                   "scaling_factor (minus its shift_factor), what a Stable Diffusion teacher expects (LCD, RG-LCD)")
    e.add_argument("--seed", type=int, default=0, help="seed of the posterior samples (default 0)")
    e.add_argument("--batch-size", type=at_least(1), default=64)
    e.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    e.add_argument("--threads", type=at_least(0), default=0, help="torch threads (default: one per core)")
    e.add_argument("--no-progress", action="store_true")
    e.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    e.set_defaults(func=cmd_encode)

    v = sub.add_parser("train-vae", help="train a small AutoencoderKL on an image dataset (saved as a diffusers "
                       "folder)")
    v.add_argument("data", metavar="DATA", help="digits, cifar10 (with --data-root) or a folder of images")
    v.add_argument("--out", required=True, metavar="DIR", help="new folder for the diffusers VAE")
    v.add_argument("--resolution", type=at_least(1), default=None, help="folder images: resize to this side length")
    v.add_argument("--data-root", default=None, help="cifar10: torchvision root holding cifar-10-batches-py")
    v.add_argument("--steps", type=int, default=3000)
    v.add_argument("--batch-size", type=at_least(1), default=128)
    v.add_argument("--lr", type=float, default=1e-3)
    v.add_argument("--kl-weight", type=float, default=1e-3, help="weight of the KL term (default 1e-3)")
    v.add_argument("--channels", default="32,64", help="block_out_channels; len - 1 halvings (default 32,64)")
    v.add_argument("--latent-channels", type=at_least(1), default=4)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--threads", type=at_least(0), default=0, help="torch threads (default: one per core)")
    v.add_argument("--no-progress", action="store_true")
    v.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    v.set_defaults(func=cmd_train_vae)


def cmd_train_vae(args) -> int:
    import time

    from cmgen.train import configure_threads
    from cmgen.vae_train import VAEConfig, train_vae

    configure_threads(args.threads)
    try:
        channels = tuple(int(c) for c in args.channels.split(","))
    except ValueError:
        raise UserError(f"--channels must be comma-separated integers like 32,64, got '{args.channels}'") from None
    if args.steps < 1 or args.batch_size < 1 or args.lr <= 0 or args.kl_weight < 0:
        raise UserError("--steps and --batch-size must be at least 1, --lr positive and --kl-weight at least 0")
    ds, name = _dataset(args)
    cfg = VAEConfig(block_out_channels=channels, latent_channels=args.latent_channels, steps=args.steps,
                    batch_size=args.batch_size, lr=args.lr, kl_weight=args.kl_weight, seed=args.seed,
                    norm_num_groups=min(16, min(channels)))
    start = time.time()
    out = train_vae(ds.x, args.out, cfg, progress=not args.no_progress)
    info = __import__("json").loads((out / "cmgen_vae.json").read_text())
    print(f"cmgen: VAE trained on {name} in {(time.time() - start) / 60:.1f} min -> {out} (reconstruction MSE "
          f"{info['recon_mse_first32']:.4g} on the first 32 images; {out / 'recon.png'}, {out / 'loss.png'})")
    print(f"encode with it:  cmgen latents encode {args.data} --vae {out} --out CACHE")
    return 0


def _dataset(args):
    from cmgen.data import captioned_folder, cifar10, image_folder, is_captioned, load_digits

    if args.data == "digits":
        return load_digits(), "digits"
    if args.data == "cifar10":
        return cifar10(args.data_root), "cifar10"
    path = Path(args.data).expanduser()
    if not path.is_dir():
        raise UserError(f"DATA '{args.data}' is not digits, cifar10 or an existing folder of images; fix the path")
    if is_captioned(path):
        return captioned_folder(str(path), args.resolution), f"folder:{path.resolve()}"
    return image_folder(str(path), args.resolution), f"folder:{path.resolve()}"


def cmd_encode(args) -> int:
    import torch

    from cmgen.latents import CacheSpec, encode_dataset, read_cache, sd_factors, tensor_fingerprint, vae_fingerprint
    from cmgen.pretrained import load_vae
    from cmgen.train import configure_threads

    configure_threads(args.threads)
    ds, name = _dataset(args)
    if ds.kind != "image":
        raise UserError(f"DATA '{args.data}' holds {ds.kind}, not images")
    vae = load_vae(args.vae)
    if vae.config.in_channels != ds.shape[0]:
        raise UserError(f"--vae '{args.vae}' encodes {vae.config.in_channels}-channel images but DATA has "
                        f"{ds.shape[0]} channels; pass a VAE made for these images")
    local = Path(args.vae).expanduser()
    source = str(local.resolve()) if local.exists() else args.vae  # runs find the VAE from anywhere
    captions = getattr(ds, "captions", None)
    spec = CacheSpec(vae_source=source, vae_hash=vae_fingerprint(vae), dataset=name,
                     dataset_hash=tensor_fingerprint(ds.x, captions), resolution=int(ds.shape[-1]),
                     hflip=bool(args.hflip), seed=int(args.seed), scaling=args.scaling)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    folder = encode_dataset(ds.x, ds.labels, vae, args.out, spec=spec, batch_size=args.batch_size, device=device,
                            progress=not args.no_progress, num_classes=ds.num_classes, captions=captions)
    cache = read_cache(folder)
    if cache.scaling == "sd":
        scaling = (f"Stable Diffusion scaling (x {sd_factors(vae)[0]:g}), latent std "
                   f"{cache.latents.std():.3g}")
    else:
        scaling = f"per-element mean/std maps, latent std range {cache.std.min():.3g}..{cache.std.max():.3g}"
    print(f"cmgen: latent cache {folder}: {len(cache.latents)} latents of shape {list(cache.latents.shape[1:])} "
          f"from {len(ds)} images of {name}{' (+ flips)' if args.hflip else ''}"
          f"{' with captions' if cache.captions is not None else ''}; {scaling}")
    return 0
