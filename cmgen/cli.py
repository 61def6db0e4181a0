"""`cmgen train | sample | eval | export | recipes`.

User errors print one line and exit with code 2; `--debug` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from cmgen.errors import UserError

# each parameterisation's samplers, its default first (a test checks this against cmgen.sampling.SAMPLERS)
SAMPLER_HELP = ("cm: multistep; edm: heun, euler; flow: euler, sde; ctm: gamma, multistep, heun; ldm: ddim; "
                "lcm: lcm (the first of a kind is its default, unless the recipe's sample.sampler names another)")

EPILOG = "Recipes are YAML files; `cmgen recipes` lists the shipped ones. Docs: README.md."


def _device(name: str | None):
    import torch

    if name:
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise UserError(f"--device '{name}' is not a device; use cpu, cuda or cuda:N") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but no CUDA device is available; use --device cpu")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    from accelerate.utils import is_mps_available, is_xpu_available

    return torch.device("mps" if is_mps_available() else "xpu" if is_xpu_available() else "cpu")


# ----------------------------------------------------------------------------- train

def cmd_train(args) -> int:
    from cmgen.recipe import dump_recipe, load_recipe
    from cmgen.train import Trainer, configure_threads, default_run_dir

    overrides = list(args.overrides)
    if args.smoke:
        return _smoke(args.recipe, overrides)
    recipe = load_recipe(args.recipe, overrides)
    if args.dry_run:
        print(dump_recipe(recipe), end="")
        return 0
    configure_threads(recipe.train.threads)
    out = Path(args.out) if args.out else default_run_dir(recipe)
    start = time.time()
    trainer = Trainer(recipe, out, resume=args.resume, progress=not args.no_progress)
    if trainer.is_main:
        print(f"cmgen: training '{trainer.recipe.name}' ({trainer.recipe.train.steps} steps, "
              f"{sum(p.numel() for p in trainer.model.parameters()) / 1e6:.2f}M parameters, "
              f"{trainer.world} process(es), {os.environ.get('OMP_NUM_THREADS') or __import__('torch').get_num_threads()} "
              f"thread(s) each) into {out}" + (f", resuming at step {trainer.step}" if trainer.step else ""))
    trainer.run(stop_after=args.stop_after)
    if trainer.is_main:
        minutes = (time.time() - start) / 60
        print(f"cmgen: run '{out}' is at step {trainer.step} after {minutes:.1f} min")
        for name in [f"samples_{s}step.png" for s in trainer.recipe.eval.steps] + ["loss.png"]:
            if (out / name).exists():
                print(f"  {out / name}")
        print(f"  checkpoints: {out / 'checkpoints'}   metrics: {out / 'metrics.jsonl'}")
        print(f"sample from it:  cmgen sample {out} --steps {trainer.recipe.eval.steps[-1]} --n 64 "
              f"--out {out / 'my_samples.png'}")
    return 0


def _smoke(recipe_path: str, overrides: list[str]) -> int:
    """Load a recipe, build its model and run 2 optimizer steps on random data of the right shape."""
    import tempfile

    import torch

    from cmgen.recipe import load_recipe
    from cmgen.train import Trainer, configure_threads

    base = load_recipe(recipe_path, overrides)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    small = ["train.steps=2", f"train.batch_size={2 * world * base.train.grad_accum}", "train.checkpoint_every=1000000",
             "train.log_every=1", "eval.every=0", "train.sample_every=0"]
    recipe = load_recipe(recipe_path, overrides + small)
    configure_threads(recipe.train.threads)
    with tempfile.TemporaryDirectory(prefix="cmgen-smoke-") as tmp:
        trainer = Trainer(recipe, Path(tmp), smoke=True, progress=False)
        n_params = sum(p.numel() for p in trainer.model.parameters())
        start = time.time()
        losses = []
        for _ in range(2):
            terms = trainer.train_step()
            # a step may update another part only (a GAN's discriminator step): its loss is "<part>/loss"
            losses.append(float("nan") if terms is None else
                          next(v for k, v in terms.items() if k == "loss" or k.endswith("/loss")))
        took = time.time() - start
    ok = all(torch.isfinite(torch.tensor(losses)))
    print(f"cmgen: smoke test of '{recipe.name}': {n_params / 1e6:.1f}M parameters, data shape "
          f"{list(trainer.data.shape)}, 2 steps at batch {trainer.recipe.train.batch_size} in {took:.1f}s, "
          f"losses {', '.join(f'{l:.4g}' for l in losses)} -> {'ok' if ok else 'NOT FINITE'}")
    return 0 if ok else 1


# ----------------------------------------------------------------------------- sample

def cmd_sample(args) -> int:
    import numpy as np
    import torch

    from cmgen.plots import save_samples, to_uint8
    from cmgen.runs import is_pipeline_dir, load_model
    from cmgen.sampling import generate, parse_sigmas
    from cmgen.train import configure_threads

    configure_threads(args.threads)
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be 1 or more, got {args.steps}")
    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".npz", ""):
        raise UserError(f"--out must end in .png or .npz (or have no suffix for both), got '{out.name}'")
    _check_output(out)
    device = _device(args.device)
    gen = load_model(args.run, ema=not args.no_ema, device=device)
    sampler = gen.sampler(args.sampler).name
    gen.check_guidance(args.cfg)
    options = {}
    if args.gamma is not None:
        if sampler != "gamma":
            raise UserError(f"--gamma applies to CTM's gamma sampler; this is a {gen.parameterisation} model "
                            f"sampled with {sampler}, drop --gamma")
        if not 0.0 <= args.gamma <= 1.0:
            raise UserError(f"--gamma must be in [0, 1] (0: deterministic jumps, 1: consistency multistep), "
                            f"got {args.gamma}")
        options["gamma"] = args.gamma
    if args.sigmas:
        if gen.parameterisation not in ("cm", "ctm") or sampler not in ("multistep", "gamma"):
            raise UserError(f"--sigmas applies to consistency models; this is a {gen.parameterisation} model, "
                            "use --steps")
        p = gen.recipe.precond
        times = parse_sigmas(args.sigmas, p.sigma_min, p.sigma_max)
        if args.steps is not None and args.steps != len(times):
            raise UserError(f"--steps {args.steps} disagrees with --sigmas ({len(times)} values); give one of them")
    else:
        times = gen.times(args.steps or gen.recipe.sample.steps, sampler)
    labels = None
    if args.class_label is not None:
        if not gen.conditional:
            raise UserError("--class-label was given but the model is not class-conditional")
        if not 0 <= args.class_label < gen.num_classes:
            raise UserError(f"--class-label must be in [0, {gen.num_classes}), got {args.class_label}")
        labels = torch.full((args.n,), args.class_label, dtype=torch.long)
    autocast = torch.bfloat16 if args.bf16 else None
    nfe = gen.nfe(times, sampler, args.cfg)
    steps = len(times) - (1 if sampler in ("heun", "euler", "sde") else 0)  # ODE/SDE time lists end at 0
    batches, ys = [], []
    for x, y in generate(gen, args.n, times, sampler=sampler, seed=args.seed, batch_size=args.batch_size,
                         labels=labels, guidance=args.cfg, device=device, autocast_dtype=autocast,
                         progress=not args.no_progress, desc=f"sampling {steps}-step {sampler}", **options):
        batches.append(x)
        if y is not None:
            ys.append(y)
    x = torch.cat(batches)
    written = []
    suffix = out.suffix.lower()
    shown = ", ".join(f"{s:.4g}" for s in times)
    cfg = f", cfg {args.cfg:g}" if args.cfg != 1.0 else ""
    if sampler == "gamma":
        cfg += f", gamma {options.get('gamma', gen.recipe.sample.gamma):g}"
    if suffix in (".png", ""):
        png = out if suffix == ".png" else out.with_suffix(".png")
        save_samples(x[:args.grid_max], png, title=f"{steps}-step {sampler} (NFE {nfe}{cfg})")
        written.append(png)
    if suffix in (".npz", ""):
        npz = out if suffix == ".npz" else out.with_suffix(".npz")
        arrays = {"samples": x.numpy(), "sigmas": np.asarray(times), "seed": np.asarray(args.seed),
                  "nfe": np.asarray(nfe)}
        if gen.kind == "image":
            arrays["images"] = to_uint8(x)
        if ys:
            arrays["labels"] = torch.cat(ys).numpy()
        np.savez(npz, **arrays)
        written.append(npz)
    weights = "the pipeline" if is_pipeline_dir(args.run) else ("raw weights of" if args.no_ema else "EMA weights of")
    print(f"cmgen: {args.n} samples, {steps} step(s) of {sampler} ({ {'flow': 'times', 'ldm': 'timesteps', 'lcm': 'timesteps'}.get(gen.parameterisation, 'sigmas')} "
          f"{shown}{cfg}), NFE {nfe}, {weights} {gen.source} -> {', '.join(map(str, written))}")
    return 0


def _check_output(out: Path) -> None:
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out '{out}' cannot be written ({exc.strerror}); choose another path") from None
    if not os.access(parent, os.W_OK):
        raise UserError(f"--out '{out}' cannot be written (no permission for '{parent}'); choose another path")


# ----------------------------------------------------------------------------- recipes

def cmd_recipes(args) -> int:
    from cmgen.recipe import list_recipes

    rows = list_recipes()
    width = max(len(n) for n, _ in rows)
    for name, desc in rows:
        print(f"{name.ljust(width)}  {desc}")
    return 0


# ----------------------------------------------------------------------------- parser

def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    import cmgen

    try:
        installed = version("cmgen")
    except PackageNotFoundError:
        installed = cmgen.__version__
    return f"cmgen {installed} (torch {_dist_version('torch')}, diffusers {_dist_version('diffusers')})"


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error for a bad flag (it would print the whole usage block first); every
    sub-command's parser is one (add_subparsers makes its parsers of the parent's class)."""

    def error(self, message):
        self.exit(2, f"cmgen: error: {message}; see `{self.prog} --help`\n")


def at_least(low: int):
    """An argparse type: a whole number >= low (--batch-size 0 would fail deep inside as a traceback)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got '{text}'") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = f"a whole number >= {low}"
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="cmgen", description="Consistency and diffusion generative models: "
                                "train from recipes, sample in one or two steps, evaluate, export to diffusers.",
                                epilog=EPILOG)
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    t = sub.add_parser("train", help="train from a recipe file", epilog=EPILOG)
    t.add_argument("recipe", metavar="RECIPE", help="recipe YAML file or shipped recipe name (e.g. ict_digits)")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.steps=2000 optim.lr=2e-4")
    t.add_argument("--out", metavar="DIR", help="run folder (default: runs/<recipe name>)")
    t.add_argument("--resume", metavar="auto|PATH", help="continue from the newest checkpoint in --out (auto) or from PATH")
    t.add_argument("--stop-after", type=int, metavar="N", help="stop after N steps of this invocation (schedules still "
                   "follow train.steps); resume later with --resume auto")
    t.add_argument("--smoke", action="store_true", help="build the model and run 2 steps on random data of the right shape")
    t.add_argument("--dry-run", action="store_true", help="print the resolved recipe and exit")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="draw samples from a run, checkpoint or diffusers pipeline folder", epilog=EPILOG)
    s.add_argument("run", metavar="RUN_OR_CHECKPOINT", help="run folder, checkpoints/step-N folder or pipeline folder")
    s.add_argument("--steps", type=int, default=None, help="number of sampling steps (default: the recipe's "
                   "sample.steps; consistency models take 1 or 2 from the recipe's sigmas)")
    s.add_argument("--sampler", default=None, help=SAMPLER_HELP)
    s.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (class-conditional models "
                   "trained with method.label_dropout; default 1 = off)")
    s.add_argument("--sigmas", metavar="S1,S2,...", help="consistency models: explicit decreasing noise levels, "
                   "e.g. 80,0.821")
    s.add_argument("--gamma", type=float, default=None, help="ctm: gamma-sampling's gamma in [0, 1] (0: deterministic "
                   "jumps, 1: consistency multistep; default: the recipe's sample.gamma)")
    s.add_argument("--n", type=at_least(1), default=64, help="number of samples (default 64)")
    s.add_argument("--seed", type=int, default=0, help="sample j uses seed + j (default 0)")
    s.add_argument("--out", required=True, metavar="FILE", help="FILE.png (grid), FILE.npz (uint8 NHWC 'images' and "
                   "float NCHW 'samples'), or FILE without suffix for both")
    s.add_argument("--no-ema", action="store_true", help="use the raw training weights instead of the EMA")
    s.add_argument("--class-label", type=int, default=None, help="class for every sample (class-conditional models)")
    s.add_argument("--batch-size", type=at_least(1), default=256, help="samples per forward pass (default 256)")
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps or xpu (default: the first of cuda, mps, xpu present, else cpu)")
    s.add_argument("--bf16", action="store_true", help="sample under bf16 autocast")
    s.add_argument("--grid-max", type=at_least(1), default=256, help="at most this many samples in the PNG grid (default 256)")
    s.add_argument("--threads", type=at_least(0), default=0, help="torch threads (default: one per core)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_sample)

    rc = sub.add_parser("recipes", help="list the shipped recipes")
    rc.set_defaults(func=cmd_recipes)

    _optional_commands(sub)
    return p


def _optional_commands(sub) -> None:
    """Commands whose modules register themselves: `cmgen eval ...`, `cmgen export ...`, `cmgen latents ...`."""
    import importlib

    for module in ("cmgen.eval.cli", "cmgen.export_cli", "cmgen.latents_cli"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("cmgen"):
                continue
            raise
        mod.add_parser(sub)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:   # --help, --version, or a bad flag (one line from Parser.error)
        return exc.code if isinstance(exc.code, int) else 2
    debug = getattr(args, "debug", False) or "--debug" in argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.func(args)
    except UserError as exc:
        if debug:
            raise
        print(f"cmgen: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:   # a path the user gave that cannot be read or written (--out in a missing folder, ...)
        if debug or exc.filename is None:
            raise
        print(f"cmgen: error: cannot read or write '{exc.filename}' ({exc.strerror or exc}); check that path (an --out "
              "in a missing folder, or onto a file where a folder goes?)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cmgen: interrupted; the newest complete checkpoint is intact (resume with --resume auto)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
