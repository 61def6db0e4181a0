"""Sample one exported model with cmgen and with the diffusers pipeline, side by side in one run.

    python benchmarks/bench_export.py [--run RUN] [--batch 64] [--repeats 7]

Without --run it trains a short ict_digits run first (--train-steps, default 20). The model is
exported to a temporary folder; cmgen samples it through `cmgen sample`'s engine
(cmgen.sampling.generate over the folder loaded by cmgen.runs.load_model) and diffusers through
`DiffusionPipeline.from_pretrained(folder)` (stock path) or CMGenPipeline (cmgen path), with the
same per-image seeds. Calls alternate (in alternating order), so both see the same machine state; the median time of
each is printed with the ratio cmgen / diffusers (below 1 means cmgen is faster) and the largest
absolute difference between the images on the pipeline's [0, 1] scale.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def prepare_run(args, tmp: Path) -> Path:
    if args.run:
        return Path(args.run)
    from cmgen.recipe import load_recipe
    from cmgen.train import train

    overrides = [f"train.steps={args.train_steps}", f"train.checkpoint_every={args.train_steps}",
                 "train.sample_n=4", f"model.norm={args.norm}"] + args.overrides
    print(f"training ict_digits for {args.train_steps} steps ({' '.join(overrides)}) ...", flush=True)
    return train(load_recipe("ict_digits", overrides), out_dir=tmp / "run", progress=False)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", help="a cmgen run or checkpoint folder (default: train a short ict_digits run)")
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--norm", default="group", choices=["group", "nsln"], help="model.norm of the trained run")
    p.add_argument("--batch", type=int, default=64, help="images per sampling call (both samplers)")
    p.add_argument("--repeats", type=int, default=15, help="timed calls per sampler and step count")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("overrides", nargs="*", help="extra recipe overrides for the trained run")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from cmgen.export import export_model
    from cmgen.runs import load_model
    from cmgen.sampling import generate

    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        tmp = Path(tmp)
        run = prepare_run(args, tmp)
        result = export_model(run, tmp / "pipe")
        lm = load_model(result.folder)
        pipe = load_pipeline(result)
        n, ncls = args.batch, (lm.num_classes if lm.recipe.model.class_conditional else 0)
        labels = torch.arange(n) % ncls if ncls else None

        def cmgen_call(steps):
            return lambda: next(generate(lm, n, lm.times(steps), seed=args.seed, batch_size=n, progress=False))[0]

        def diffusers_call(steps):
            kw = steps_kwargs(result, steps)
            return lambda: pipe(batch_size=n, class_labels=labels, output_type="pt",
                                generator=[torch.Generator().manual_seed(args.seed + j) for j in range(n)], **kw).images

        print(f"{result.pipeline_class} ({'stock diffusers' if result.stock else 'cmgen classes'}), "
              f"{sum(q.numel() for q in lm.net.parameters()) / 1e6:.2f}M parameters, batch {n}, "
              f"{args.threads} thread(s), median of {args.repeats}")
        print(f"{'steps':>5}  {'cmgen s':>9}  {'diffusers s':>11}  {'ratio':>6}  {'max |diff|':>10}")
        for steps in (1, 2):
            cm, df = cmgen_call(steps), diffusers_call(steps)
            cm(), df()  # warm-up
            times, images = {"cmgen": [], "diffusers": []}, {}
            for rep in range(args.repeats):
                order = ("cmgen", "diffusers") if rep % 2 == 0 else ("diffusers", "cmgen")  # no order bias
                for name in order:
                    t, images[name] = timed(cm if name == "cmgen" else df)
                    times[name].append(t)
            ours, theirs = images["cmgen"], images["diffusers"]
            a, b = statistics.median(times["cmgen"]), statistics.median(times["diffusers"])
            diff = ((ours / 2 + 0.5).clamp(0, 1) - theirs).abs().max().item()
            print(f"{steps:>5}  {a:>9.4f}  {b:>11.4f}  {a / b:>6.3f}  {diff:>10.3g}")


def load_pipeline(result):
    if result.stock:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(result.folder)
    else:
        from cmgen.pipelines import CMGenPipeline

        pipe = CMGenPipeline.from_pretrained(result.folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def steps_kwargs(result, steps: int) -> dict:
    if not result.stock:
        return {"num_inference_steps": steps}
    if steps == 1:
        return {"num_inference_steps": 1}
    return {"num_inference_steps": None, "timesteps": result.grid.two_step_timesteps}


if __name__ == "__main__":
    main()
