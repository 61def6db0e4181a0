"""`cmgen export RUN_OR_CHECKPOINT --to DIR [--no-ema]`: write a diffusers pipeline folder."""
from __future__ import annotations

import argparse

EPILOG = ("Plain UNet2DModel backbones become a stock ConsistencyModelPipeline (diffusers alone loads it, "
          "offline); others (e.g. model.norm=nsln) use cmgen's pipeline classes. See the folder's README.md.")


def add_parser(subparsers) -> None:
    e = subparsers.add_parser("export", help="write a run or checkpoint as a diffusers pipeline folder", epilog=EPILOG)
    e.add_argument("run", metavar="RUN_OR_CHECKPOINT",
                   help="run folder (its newest checkpoint) or checkpoints/step-N folder")
    e.add_argument("--to", required=True, metavar="DIR", help="new or empty output folder")
    e.add_argument("--no-ema", action="store_true", help="export the raw training weights instead of the EMA")
    e.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    e.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from cmgen.export import export_model

    result = export_model(args.run, args.to, ema=not args.no_ema)
    kind = "stock diffusers" if result.stock else "cmgen"
    print(f"cmgen: exported {'raw' if args.no_ema else 'EMA'} weights of {args.run} as a {kind} "
          f"{result.pipeline_class} -> {result.folder}")
    if result.stock:
        print(f"  load:   DiffusionPipeline.from_pretrained('{result.folder}')")
        if (result.folder / "lora").is_dir():
            print(f"  LoRA:   pipe.load_lora_weights('{result.folder / 'lora'}')")
        if result.grid is not None and result.grid.mid_index is not None:
            print(f"  2-step: pipe(num_inference_steps=None, timesteps={result.grid.two_step_timesteps}, ...)  "
                  f"(grid of {result.grid.num_train_timesteps}, {'exact' if result.grid.exact else 'approximate'})")
    else:
        print(f"  load:   from cmgen.pipelines import {result.pipeline_class}; "
              f"{result.pipeline_class}.from_pretrained('{result.folder}')")
    print(f"  card:   {result.folder / 'README.md'}")
    return 0
