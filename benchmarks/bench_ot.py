"""Cost and effect of latent CT's minibatch OT pairing, against an lct training step, in one run.

For each latent shape: the median time of `ot_pairing` (cdist + exact assignment) on a batch of
data and unit noise, the mean squared data-noise distance of the OT pairing against the random
one, and the median time of a full lct training step (OT off) at the same batch on this machine,
so the printed ratio is the share of a step that OT adds.

    python benchmarks/bench_ot.py [--batch 128] [--reps 10] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def median_time(fn, reps: int) -> float:
    fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def lct_step_time(shape, batch: int, reps: int, unet: dict) -> float:
    from cmgen.recipe import from_tree
    from cmgen.train import Trainer

    tree = {"name": "bench", "method": {"name": "lct", "ot": False},
            "data": {"name": "random", "channels": shape[0], "resolution": shape[1]},
            "model": {"arch": "unet", "norm": "nsln", **unet},
            "train": {"steps": 1000, "batch_size": batch, "log_every": 10**6, "checkpoint_every": 10**6,
                      "sample_every": 0}}
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(from_tree(tree), Path(tmp), smoke=True, progress=False)
        return median_time(tr.train_step, reps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from cmgen.methods.lct import ot_pairing

    cases = [("digits VAE latents", (4, 4, 4), {"block_out_channels": [32, 64], "norm_num_groups": 16,
                                                "attention_head_dim": 32}),
             ("SD-VAE latents, small UNet", (4, 32, 32), {"block_out_channels": [32, 64, 64],
                                                          "norm_num_groups": 16, "attention_head_dim": 32})]
    print(f"batch {args.batch}, {args.threads} thread(s), medians of {args.reps}")
    g = torch.Generator().manual_seed(0)
    for name, shape, unet in cases:
        x = torch.randn(args.batch, *shape, generator=g) * 0.5
        z = torch.randn(args.batch, *shape, generator=g)
        ot = median_time(lambda: ot_pairing(x, z), args.reps)
        paired = (x - z[ot_pairing(x, z)]).pow(2).flatten(1).sum(1).mean().item()
        rand = (x - z).pow(2).flatten(1).sum(1).mean().item()
        step = lct_step_time(shape, args.batch, args.reps, unet)
        print(f"  {name} {list(shape)} (d={x[0].numel()}): OT {ot * 1e3:.1f} ms, lct step {step * 1e3:.0f} ms, "
              f"OT / step {ot / step:.4f}; mean squared pair distance OT {paired:.1f} vs random {rand:.1f} "
              f"(ratio {paired / rand:.3f})")


if __name__ == "__main__":
    main()
