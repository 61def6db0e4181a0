"""`cmgen eval fid | sweep | ref-stats | reward` (registered by cmgen.cli through `add_parser`)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from cmgen.cli import SAMPLER_HELP, at_least
from cmgen.errors import UserError

FEATURES_HELP = ("feature space: auto (digits for 8x8 grey images, points for 2-D data, inception otherwise), "
                 "inception (FID through clean-fid), clip (FD-CLIP), digits (FD-digits), points (FD-points + SWD/MMD)")
REF_HELP = ("reference: a named one (digits, cifar10-train, ring, moons), the run's own 'holdout' or 'train' split "
            "(holdout adds a real-vs-real floor row), a folder of images, an .npz of samples or a statistics file "
            "from `cmgen eval ref-stats` (default: the run's data)")


# ----------------------------------------------------------------------------- shared pieces

def parse_steps(text: str, flag: str = "--steps") -> list[int]:
    try:
        steps = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} must be comma-separated step counts like 1,2, got '{text}'") from None
    if not steps or any(s < 1 for s in steps):
        raise UserError(f"{flag} must be step counts of 1 or more like 1,2, got '{text}'")
    return steps


def is_model_path(p: Path) -> bool:
    from cmgen.runs import is_pipeline_dir

    return p.is_dir() and (is_pipeline_dir(p) or (p / "state.json").is_file() or (p / "checkpoints").is_dir())


def open_target(path: str, args, device):
    """('model', Generator) for a run / checkpoint / pipeline folder; ('samples', Source) for a folder or .npz."""
    from cmgen.eval.sources import folder_source, npz_source

    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"'{path}' does not exist; pass a run, checkpoint or pipeline folder, a folder of images "
                        "or an .npz of samples")
    if is_model_path(p):
        from cmgen.runs import load_model

        return "model", load_model(p, ema=not args.no_ema, device=device)
    if p.is_dir():
        return "samples", folder_source(p, args.batch_size, not args.no_progress, args.n)
    if p.suffix.lower() == ".npz":
        return "samples", npz_source(p, args.batch_size, args.n)
    raise UserError(f"'{path}' is neither a run/checkpoint/pipeline folder, a folder of images nor an .npz of samples")


def default_out_dir(path: str, kind: str) -> Path:
    p = Path(path).expanduser()
    if kind == "model":
        run = p.parent.parent if (p / "state.json").is_file() and p.parent.name == "checkpoints" else p
        return run / "eval"
    return Path(f"eval-{p.stem}")


def run_step_tag(obj) -> str:
    step = getattr(obj, "step", None)
    return f"_step{step}" if step is not None else ""


def _setup(args):
    from cmgen.cli import _device
    from cmgen.train import configure_threads

    if args.n is not None and args.n < 2:
        raise UserError(f"--n must be at least 2 (a covariance needs two samples), got {args.n}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    configure_threads(args.threads)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under `accelerate launch`: sample generation is split
        from accelerate import PartialState

        from cmgen.train import accelerator_present

        state = PartialState(cpu=not accelerator_present())
        return _device(args.device) if args.device else state.device
    return _device(args.device)


def _is_main() -> bool:
    from cmgen.eval.sources import process_shard

    return process_shard()[0] == 0


def _feature_net(args, shape, device):
    from cmgen.eval.features import build_feature_net

    return build_feature_net(args.features, tuple(shape), mode=args.mode, inception=args.inception, clip=args.clip,
                             device=device)


def _metric_options(args):
    from cmgen.eval.fid import MetricOptions

    if args.keep < 0 or args.k < 1 or args.kid_subsets < 1 or args.kid_subset_size < 2:
        raise UserError("--keep must be >= 0, --k >= 1, --kid-subsets >= 1 and --kid-subset-size >= 2")
    return MetricOptions(keep=args.keep, k=args.k, kid_subsets=args.kid_subsets,
                         kid_subset_size=args.kid_subset_size, seed=args.seed)


def _print_written(paths) -> None:
    for p in paths:
        if p is not None:
            print(f"  {p}")


# ----------------------------------------------------------------------------- fid / sweep

def judged_shape(obj) -> tuple:
    """The shape a target's samples are scored at: a latent model's decoded images, else its own."""
    return tuple(getattr(obj, "image_shape", obj.shape))


def compute_table(args, default_steps: str):
    """The table of `fid` and `sweep`: (table, kind, target object)."""
    from cmgen.eval.fid import DEFAULT_N, evaluate_model_steps, evaluate_samples
    from cmgen.eval.refstats import default_ref_for, resolve_reference

    steps = parse_steps(args.steps or default_steps)  # checked before any loading
    device = _setup(args)
    kind, obj = open_target(args.target, args, device)
    net = _feature_net(args, judged_shape(obj), device)
    opts = _metric_options(args)
    if kind == "model":
        n = args.n or DEFAULT_N[net.kind]
        ref_name = args.ref or default_ref_for(obj.recipe)
        splits = run_splits(obj.recipe, getattr(obj, "codec", None), ref_name) if ref_name in RUN_SPLITS else None
        if splits is not None:
            ref = split_reference(splits[ref_name], ref_name, net, opts, args.batch_size)
        else:
            ref = resolve_reference(ref_name, net, n=n, keep=opts.keep, batch_size=args.batch_size,
                                    progress=not args.no_progress)
        table = evaluate_model_steps(obj, steps, n, net, ref, opts, sampler=args.sampler, guidance=args.cfg,
                                     seed=args.seed, batch_size=args.batch_size,
                                     device=device, progress=not args.no_progress,
                                     extra_protocol={"model_weights": "EMA" if not args.no_ema else "raw"})
        if ref_name == "holdout":  # the floor: real training images scored the same way
            from cmgen.eval.fid import evaluate_source
            from cmgen.eval.sources import dataset_source

            real = splits["train"]
            src = dataset_source(real.x, "real training split", real.kind, args.batch_size, n=min(n, len(real)))
            table.rows.append({"steps": "real", "nfe": 0} | evaluate_source(src, net, ref, opts))
            if "vae" in splits:  # a latent run's floor: its training latents decoded by the VAE
                rec = splits["vae"]
                src = dataset_source(rec.x, "VAE reconstructions of the training split", "image", args.batch_size,
                                     n=min(n, len(rec)))
                table.rows.append({"steps": "vae", "nfe": 0} | evaluate_source(src, net, ref, opts))
    else:
        if args.steps:
            raise UserError("--steps applies to runs, checkpoints and pipelines, not to samples made elsewhere; "
                            "drop --steps")
        if not args.ref:
            raise UserError("--ref is required for a folder or .npz of samples: a named reference (digits, "
                            "cifar10-train, ring, moons), a folder of images or a statistics file")
        ref = resolve_reference(args.ref, net, n=obj.n, keep=opts.keep, batch_size=args.batch_size,
                                progress=not args.no_progress)
        table = evaluate_samples(obj, net, ref, opts)
    return table, kind, obj


RUN_SPLITS = ("holdout", "train")


def run_splits(recipe, codec=None, ref: str = "holdout") -> dict:
    """--ref holdout|train: the run's own data split, rebuilt from its recipe (data.holdout, train.seed); only
    holdout needs data.holdout > 0 (and brings a latent run's VAE floor)."""
    from cmgen.data import load_dataset

    if recipe.data.name == "latents":
        return latent_run_splits(recipe, with_reconstructions=ref == "holdout", codec=codec)
    train, held = load_dataset(recipe.data, recipe.train.seed)
    if held is None and ref == "holdout":
        raise UserError("--ref holdout needs a run trained with data.holdout > 0; pass another --ref "
                        "(a named reference, a folder of images or a statistics file)")
    return {"train": train, "holdout": held}


def latent_run_splits(recipe, with_reconstructions: bool = True, codec=None) -> dict:
    """A latent run's splits in image space: the cache's source images split as the run split its latents,
    plus `vae`, the training latents decoded by the VAE (the floor a latent model can reach) through
    `codec` (the model's own, else the cache's VAE loaded again)."""
    import torch

    from cmgen.data import Dataset, _split, image_folder, load_digits, latent_dataset
    from cmgen.latents import codec_for

    lat = latent_dataset(recipe.data.path)
    source = lat.name.removeprefix("latents of ")
    if source == "digits":
        images = load_digits()
    elif source.startswith("folder:"):
        images = image_folder(source.removeprefix("folder:"), None)
    else:
        raise UserError(f"--ref holdout|train of a latent run needs the cache's source images, which cmgen cannot "
                        f"reload for '{source}'; pass a named reference or a folder of images")
    if len(images) != len(lat):
        raise UserError("--ref holdout|train of a latent run needs a cache without flips (its latents must match "
                        "the source images one to one); pass a named reference or a folder of images")
    train, held = _split(images, recipe.data.holdout, recipe.train.seed)
    if held is None and with_reconstructions:
        raise UserError("--ref holdout needs a run trained with data.holdout > 0; pass another --ref "
                        "(a named reference, a folder of images or a statistics file)")
    if not with_reconstructions:
        return {"train": train, "holdout": held}
    lat_train, _ = _split(lat, recipe.data.holdout, recipe.train.seed)
    codec = codec if codec is not None and hasattr(codec, "vae") else codec_for(recipe)
    device = next(codec.vae.parameters()).device   # the run's codec may be on its GPU
    decoded = torch.cat([codec.decode(lat_train.x[i:i + 256].to(device)).cpu() for i in range(0, len(lat_train), 256)])
    vae = Dataset(decoded, lat_train.labels, lat_train.num_classes, "image", "VAE reconstructions")
    return {"train": train, "holdout": held, "vae": vae}


def split_reference(split, name: str, net, opts, batch_size: int):
    from cmgen.eval.refstats import Reference, accumulate
    from cmgen.eval.sources import dataset_source

    stats = accumulate(dataset_source(split.x, f"the run's {name} split", split.kind, batch_size), net, opts.keep)
    return Reference(stats, {"name": f"{name} split of the run's data", "n": stats.n})


def _sampler_tag(table, obj) -> str:
    """'_euler', '_cfg2' ...: tables of one run made with another sampler or guidance get their own files."""
    from cmgen.sampling.registry import DEFAULT_SAMPLER

    p = table.protocol
    default = DEFAULT_SAMPLER.get(getattr(obj, "parameterisation", ""), None)
    tag = f"_{p['sampler']}" if p.get("sampler") and p["sampler"] != default else ""
    return tag + (f"_cfg{p['guidance']:g}" if p.get("guidance", 1.0) != 1.0 else "")


def cmd_fid(args) -> int:
    from cmgen.eval.report import to_text, write_table

    table, kind, obj = compute_table(args, "1,2")
    if not _is_main():
        return 0
    out = Path(args.out) if args.out else default_out_dir(args.target, kind)
    stem = f"fid_{table.metric}{_sampler_tag(table, obj)}{run_step_tag(obj)}"
    written = write_table(table, out, stem, title=f"{table.metric} of {args.target}")
    print(to_text(table), end="")
    _print_written(written)
    return 0


def cmd_sweep(args) -> int:
    from cmgen.eval.report import save_sweep_plot, to_text, write_table

    p = Path(args.target).expanduser()
    if p.exists() and not is_model_path(p):
        raise UserError("cmgen eval sweep needs a run, checkpoint or pipeline folder (it samples at each --steps); "
                        "use cmgen eval fid for samples made elsewhere")
    table, kind, obj = compute_table(args, "1,2,4,8")
    if not _is_main():
        return 0
    out = Path(args.out) if args.out else default_out_dir(args.target, kind)
    stem = f"sweep_{table.metric}{_sampler_tag(table, obj)}{run_step_tag(obj)}"
    written = write_table(table, out, stem, title=f"{table.metric} vs NFE of {args.target}")
    written.append(save_sweep_plot(table, out / f"{stem}.png"))
    print(to_text(table), end="")
    _print_written(written)
    return 0


# ----------------------------------------------------------------------------- ref-stats

def cmd_ref_stats(args) -> int:
    from cmgen.eval.refstats import NAMED_REFS, accumulate, is_stats_file, named_source, save_stats
    from cmgen.eval.sources import folder_source, npz_source

    if Path(args.out).suffix != ".npz":
        raise UserError(f"--out '{args.out}' must end in .npz")
    device = _setup(args)
    p = Path(args.source).expanduser()
    if args.source in NAMED_REFS and not p.exists():
        source = named_source(args.source, args.batch_size, args.n, not args.no_progress)
    elif p.is_dir():
        source = folder_source(p, args.batch_size, not args.no_progress, args.n)
    elif p.is_file() and p.suffix.lower() == ".npz" and not is_stats_file(p):
        source = npz_source(p, args.batch_size, args.n)
    else:
        raise UserError(f"SOURCE '{args.source}' must be a named reference ({', '.join(NAMED_REFS)}), a folder of "
                        "images or an .npz of samples")
    net = _feature_net(args, source.shape, device)
    stats = accumulate(source, net, args.keep)
    path = save_stats(args.out, stats, net, source.name)
    print(f"cmgen: {net.metric} reference statistics of {source.name}: n={stats.n}, {stats.dim}-d features "
          f"({net.id}), {min(stats.n, args.keep)} feature rows kept -> {path}")
    if net.protocol.get("warning"):
        print(f"WARNING: {net.protocol['warning']}")
    return 0


# ----------------------------------------------------------------------------- reward

def _reward_sources(kind, obj, steps, n, args, device, label):
    """[(label, steps, nfe, Source)] for a model (one per step count) or samples made elsewhere."""
    from cmgen.eval.sources import model_source

    if kind == "samples":
        return [(label, None, None, obj)]
    out = []
    sampler = obj.sampler(getattr(args, "sampler", None)).name
    guidance = getattr(args, "cfg", 1.0)
    for s in steps:
        times = obj.times(s, sampler)
        out.append((label, s, obj.nfe(times, sampler, guidance),
                    model_source(obj, times, n, sampler=sampler, guidance=guidance, seed=args.seed,
                                 batch_size=args.batch_size, device=device, progress=not args.no_progress,
                                 name=str(obj.source))))
    return out


def cmd_reward(args) -> int:
    from cmgen.eval.reward_eval import reward_row, score_source, shift_fields, to_markdown, write_reward_report
    from cmgen.eval.rewards import build_reward

    device = _setup(args)
    reward = build_reward(args.reward, target_class=args.target_class, aesthetic=args.aesthetic, clip=args.clip,
                          device=device)
    kind, obj = open_target(args.target, args, device)
    if kind == "samples" and args.steps:
        raise UserError("--steps applies to runs, checkpoints and pipelines, not to samples made elsewhere; drop --steps")
    steps = parse_steps(args.steps or "1")
    n = args.n or 1000
    net = None
    base = None
    if args.base:
        base = open_target(args.base, args, device)
        if judged_shape(base[1]) != judged_shape(obj):
            raise UserError(f"--base samples have shape {judged_shape(base[1])} but '{args.target}' makes "
                            f"{judged_shape(obj)}; pass the model the run was tuned from")
        net = _feature_net(args, judged_shape(obj), device)
    rows = []
    for label, s, nfe, src in _reward_sources(kind, obj, steps, n, args, device, "tuned" if base else "model"):
        values, stats = score_source(src, reward, net, 0)
        row = reward_row(label, values, {"steps": s, "nfe": nfe})
        if base is not None:
            bkind, bobj = base
            (_, _, _, bsrc), = _reward_sources(bkind, bobj, [s] if s else [1], n, args, device, "base")
            bvalues, bstats = score_source(bsrc, reward, net, 0)
            brow = reward_row("base", bvalues, {"steps": s if bkind == "model" else None,
                                               "nfe": nfe if bkind == "model" else None})
            row |= shift_fields(row, brow, stats, bstats, net.metric)
            rows += [row, brow]
        else:
            rows.append(row)
    protocol = {"samples": str(args.target), "seed": args.seed, "model_weights": "EMA" if not args.no_ema else "raw"}
    if base is not None:
        protocol |= {"base": str(args.base), "shift_features": net.id, "shift_metric": net.metric}
    out = Path(args.out) if args.out else default_out_dir(args.target, kind)
    written = write_reward_report(rows, reward, protocol, out)
    print(to_markdown(rows, reward, protocol), end="")
    _print_written(written)
    return 0


# ----------------------------------------------------------------------------- parser

def _common(p, samples: bool = True) -> None:
    p.add_argument("--features", default="auto", help=FEATURES_HELP)
    p.add_argument("--mode", default="clean", choices=["clean", "legacy_tensorflow"],
                   help="clean-fid resize mode for Inception: clean (PIL bicubic, default) or legacy_tensorflow "
                        "(the TF graph's resize, the protocol of published CIFAR-10 consistency-model numbers)")
    p.add_argument("--inception", metavar="PATH", default=None,
                   help="local inception-2015-12-05.pt (default: $CMGEN_INCEPTION, ~/.cache/cmgen, /tmp)")
    p.add_argument("--clip", metavar="PATH", default=None, help="local CLIP weight file (default: $CMGEN_CLIP)")
    p.add_argument("--n", type=int, default=None, help="samples per row (default: 50000 for inception/clip, "
                   "2000 digits, 5000 points; all of a folder or .npz)")
    p.add_argument("--batch-size", type=int, default=256, help="images per sampling and feature batch (default 256)")
    p.add_argument("--seed", type=int, default=0, help="sample j uses seed + j; also seeds KID subsets (default 0)")
    p.add_argument("--keep", type=int, default=10000, help="feature rows kept per set for precision/recall and KID "
                   "(default 10000; moments always use all samples)")
    p.add_argument("--k", type=int, default=3, help="k of the k-NN precision/recall (default 3)")
    p.add_argument("--kid-subsets", type=int, default=100, help="KID subsets (default 100)")
    p.add_argument("--kid-subset-size", type=int, default=1000, help="KID subset size (default 1000)")
    p.add_argument("--no-ema", action="store_true", help="evaluate the raw training weights instead of the EMA")
    p.add_argument("--sampler", default=None, help=f"sampler of a model: {SAMPLER_HELP}")
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (models trained with "
                   "method.label_dropout; default 1 = off)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps or xpu (default: the first of cuda, mps, xpu present, else cpu)")
    p.add_argument("--threads", type=at_least(0), default=0, help="torch threads (default: one per core)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)


def add_parser(subparsers) -> None:
    ev = subparsers.add_parser("eval", help="FID/FD, precision/recall, KID, rewards and NFE sweeps of runs or samples")
    sub = ev.add_subparsers(dest="eval_command", metavar="EVAL_COMMAND", required=True)
    target_help = "run folder, checkpoints/step-N folder, diffusers pipeline folder, folder of images or .npz of samples"

    f = sub.add_parser("fid", help="Frechet distance (FID with Inception) at given step counts, with precision/"
                       "recall and KID; writes JSON and Markdown")
    f.add_argument("target", metavar="RUN_OR_SAMPLES", help=target_help)
    f.add_argument("--steps", default=None, help="comma-separated sampling step counts (default 1,2)")
    f.add_argument("--ref", default=None, help=REF_HELP)
    f.add_argument("--out", metavar="DIR", default=None, help="output folder (default: <run>/eval)")
    _common(f)
    f.set_defaults(func=cmd_fid)

    s = sub.add_parser("sweep", help="the Frechet distance against NFE: a table and a PNG")
    s.add_argument("target", metavar="RUN", help="run folder, checkpoints/step-N folder or pipeline folder")
    s.add_argument("--steps", default=None, help="comma-separated step counts (default 1,2,4,8)")
    s.add_argument("--ref", default=None, help=REF_HELP)
    s.add_argument("--out", metavar="DIR", default=None, help="output folder (default: <run>/eval)")
    _common(s)
    s.set_defaults(func=cmd_sweep)

    r = sub.add_parser("ref-stats", help="build a reference statistics file once (mean, covariance, feature rows)")
    r.add_argument("source", metavar="SOURCE", help="named reference (digits, cifar10-train, ring, moons), folder of "
                   "images or .npz of samples")
    r.add_argument("--out", required=True, metavar="FILE.npz", help="statistics file to write")
    _common(r)
    r.set_defaults(func=cmd_ref_stats)

    w = sub.add_parser("reward", help="a reward's mean and 95%% interval; with --base, how far the distribution moved")
    w.add_argument("target", metavar="RUN_OR_SAMPLES", help=target_help)
    w.add_argument("--reward", required=True, help="a reward of cmgen.rewards: jpeg-compressibility, "
                   "jpeg-incompressibility, brightness, digit-class, aesthetic (pickscore, hpsv2.1, imagereward and "
                   "clipscore score prompts and serve training)")
    w.add_argument("--target-class", type=int, default=None, help="digit-class: the class whose probability is the "
                   "reward (default: the top-class probability)")
    w.add_argument("--aesthetic", metavar="PATH", default=None, help="aesthetic: LAION predictor weights "
                   "(default: $CMGEN_AESTHETIC); needs --clip with CLIP ViT-L/14")
    w.add_argument("--base", metavar="RUN_OR_SAMPLES", default=None, help="the model before reward tuning: adds its "
                   "reward and the Frechet distance between the two sample sets (in --features space)")
    w.add_argument("--steps", default=None, help="comma-separated step counts (default 1)")
    w.add_argument("--out", metavar="DIR", default=None, help="output folder (default: <run>/eval)")
    _common(w)
    w.set_defaults(func=cmd_reward)
