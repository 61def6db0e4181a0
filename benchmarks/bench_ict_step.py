"""Time one iCT training step against the ideal for the same backbone and batch.

ideal = one no-grad forward + one forward-backward of the bare network (the two passes iCT
needs), measured in the same run, interleaved with cmgen's full step (data indexing, keyed
noise draws, preconditioning, loss, optimizer step, EMA). Also 1-step sampling per image
against one bare forward. Prints medians and ratios.

    python benchmarks/bench_ict_step.py [--recipe ict_digits] [--batch 64] [--reps 20] [KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def timed(fn, sync):
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def ideal_step(net, x, t, y):
    """The two passes iCT needs, on the bare network: one no-grad forward, one forward-backward."""
    def ideal():
        with torch.no_grad():
            net(x, t, y)
        net(x, t, y).float().pow(2).mean().backward()
        for p in net.parameters():
            p.grad = None
    return ideal


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="ict_digits")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from cmgen.recipe import load_recipe
    from cmgen.sampling import generate
    from cmgen.train import Trainer, configure_threads

    recipe = load_recipe(args.recipe, args.overrides + [f"train.batch_size={args.batch}", "train.log_every=1000000",
                                                        "train.checkpoint_every=1000000"])
    threads = configure_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(recipe, tmp, progress=False, smoke=recipe.data.name not in ("digits", "toy2d"))
        device = tr.device
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        net = tr.accelerator.unwrap_model(tr.model).backbone  # the bare network F
        shape = tr.data.shape
        x = torch.randn(args.batch, *shape, device=device)
        t = torch.randn(args.batch, device=device) * 100
        y = (torch.arange(args.batch, device=device) % max(1, tr.data.num_classes)
             if recipe.model.class_conditional else None)

        ideal = ideal_step(net, x, t, y)

        from cmgen.train import make_optimizer

        bare_opt = make_optimizer(net.parameters(), recipe.optim)

        def ideal_with_optimizer():
            with torch.no_grad():
                net(x, t, y)
            net(x, t, y).float().pow(2).mean().backward()
            bare_opt.step()
            bare_opt.zero_grad(set_to_none=True)

        def cmgen_step():
            tr.train_step()

        gen = tr.eval_generator()

        def bare_forward():
            with torch.no_grad():
                net.eval()(x, t, y)
            net.train()

        def one_step_sampling():
            for _ in generate(gen, args.batch, gen.times(1), seed=0, batch_size=args.batch, device=device,
                              progress=False):
                pass

        for fn in (ideal, ideal_with_optimizer, cmgen_step, bare_forward, one_step_sampling):  # warm-up
            fn()
        res = {k: [] for k in ("ideal", "ideal_opt", "cmgen", "fwd", "sample")}
        for _ in range(args.reps):  # interleaved, so drift in machine load hits both sides alike
            res["ideal"].append(timed(ideal, sync))
            res["ideal_opt"].append(timed(ideal_with_optimizer, sync))
            res["cmgen"].append(timed(cmgen_step, sync))
            res["fwd"].append(timed(bare_forward, sync))
            res["sample"].append(timed(one_step_sampling, sync))
    med = {k: statistics.median(v) for k, v in res.items()}
    n_params = sum(p.numel() for p in net.parameters())
    print(f"recipe {recipe.name}: {n_params / 1e6:.2f}M parameters, batch {args.batch}, data {list(shape)}, "
          f"device {device}, {threads} thread(s), {args.reps} interleaved reps (medians)")
    print(f"  ideal (no-grad fwd + fwd/bwd of F): {med['ideal'] * 1e3:8.1f} ms")
    print(f"  ideal + {recipe.optim.name} step{' ' * (21 - len(recipe.optim.name))}: {med['ideal_opt'] * 1e3:8.1f} ms")
    print(f"  cmgen iCT training step           : {med['cmgen'] * 1e3:8.1f} ms   ratio {med['cmgen'] / med['ideal']:.3f}"
          f" to the ideal, {med['cmgen'] / med['ideal_opt']:.3f} to ideal + optimizer step")
    print(f"  bare forward of F                 : {med['fwd'] * 1e3:8.1f} ms")
    print(f"  cmgen 1-step sampling             : {med['sample'] * 1e3:8.1f} ms   ratio {med['sample'] / med['fwd']:.3f}"
          f"   ({med['sample'] / args.batch * 1e3:.2f} ms per image)")


if __name__ == "__main__":
    main()
