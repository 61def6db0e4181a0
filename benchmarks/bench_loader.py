"""Images per second the data path delivers against images per second a training step consumes.

Writes a synthetic class-folder of JPEGs (ImageNet's layout) at --source-res, then measures in one run:
  decode + resize into the uint8 cache (cmgen.data.cache), with --workers threads;
  the loader over the cache: the keyed sampler's batches read and converted, in the loop (0 workers)
  and through DataLoader workers (--workers processes);
  a training step of --recipe on data of the same shape (Trainer.train_step, the model the recipe names,
  overridable), i.e. the rate the loader has to keep up with.

    python benchmarks/bench_loader.py [--images 2048] [--res 64] [--batch 64] [--workers 2] [KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def make_folder(root: Path, n: int, side: int, classes: int = 10) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (8, side, side, 3), dtype=np.uint8)  # JPEG-compressible, not pure noise
    for i in range(n):
        d = root / f"n{i % classes:08d}"
        d.mkdir(parents=True, exist_ok=True)
        img = np.roll(base[i % 8], (i * 7) % side, axis=1)
        Image.fromarray(img).save(d / f"{i:06d}.JPEG", quality=90)


def loader_rate(data, sampler, batch: int, workers: int, steps: int) -> float:
    from cmgen.data import to_float
    from cmgen.data.loader import keyed_batches

    if workers == 0:
        t = time.perf_counter()
        for s in range(steps):
            to_float(data.uint8(sampler.indices(s, batch, 0, batch)))
        return steps * batch / (time.perf_counter() - t)
    it = keyed_batches(data, sampler, 0, batch, [0], batch, workers)
    next(it)  # worker start-up is paid once per run, not per step
    t = time.perf_counter()
    for _ in range(steps):
        _, _, x, _ = next(it)
        to_float(x)
    rate = steps * batch / (time.perf_counter() - t)
    del it
    return rate


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--source-res", type=int, default=80, help="side of the JPEGs (resized to --res)")
    ap.add_argument("--res", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30, help="loader batches timed")
    ap.add_argument("--train-steps", type=int, default=5, help="training steps timed")
    ap.add_argument("--recipe", default="ict_imagenet64")
    ap.add_argument("overrides", nargs="*", help="recipe overrides for the training step (e.g. a smaller model)")
    args = ap.parse_args()

    from cmgen.data import image_folder
    from cmgen.recipe import load_recipe
    from cmgen.rng import IndexSampler
    from cmgen.train import Trainer, accelerator_present, configure_threads

    threads = configure_threads(0)
    tmp = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    try:
        make_folder(tmp / "images", args.images, args.source_res)
        t = time.perf_counter()
        data = image_folder(str(tmp / "images"), args.res, cache=str(tmp / "cache"), workers=args.workers)
        build = args.images / (time.perf_counter() - t)
        t = time.perf_counter()
        data = image_folder(str(tmp / "images"), args.res, cache=str(tmp / "cache"))
        reopen = time.perf_counter() - t
        sampler = IndexSampler(len(data), 0)
        rates = {w: loader_rate(data, sampler, args.batch, w, args.steps) for w in sorted({0, args.workers})}

        recipe = load_recipe(args.recipe, [f"train.batch_size={args.batch}", "data.name=random",
                                           f"data.resolution={args.res}", "train.log_every=1000000",
                                           "train.checkpoint_every=1000000", "eval.every=0",
                                           # bf16 autocast is emulated (slow) on the CPU
                                           *([] if accelerator_present() else ["train.mixed_precision=no"]),
                                           *args.overrides])
        tr = Trainer(recipe, tmp / "run", progress=False, smoke=True)
        sync = torch.cuda.synchronize if tr.device.type == "cuda" else (lambda: None)
        tr.train_step()
        sync()
        t = time.perf_counter()
        for _ in range(args.train_steps):
            tr.train_step()
        sync()
        need = args.train_steps * args.batch / (time.perf_counter() - t)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n_params = sum(p.numel() for p in tr.gen.net.parameters())
    print(f"{args.images} JPEGs {args.source_res}px -> {args.res}px, batch {args.batch}, device {tr.device}, "
          f"{threads} torch thread(s)")
    print(f"  cache build (decode + resize, {args.workers} threads)   : {build:9.0f} images/s  "
          f"(reopen {reopen * 1e3:.0f} ms, fingerprint check included)")
    for w, r in rates.items():
        label = "in the loop (data.num_workers=0)" if w == 0 else f"DataLoader, data.num_workers={w}"
        print(f"  loader from the cache, {label:33s}: {r:9.0f} images/s   {r / need:7.1f}x the step's need")
    print(f"  training step of {recipe.name} ({n_params / 1e6:.1f}M parameters)       : {need:9.1f} images/s")


if __name__ == "__main__":
    main()
