"""How precise a 1-step map can CTM's student network learn at all? Direct regression (knowledge distillation, Luhman &
Luhman 2021) of G(x_T, T, sigma_min) onto the teacher's 17-step Heun endpoints of fresh noises, from the same start as
CTM (the teacher's weights, the s branch at zero), scored like benchmarks/ctm_checks.py: the RMSE of the 1-step jump
against a fine Heun solve of the teacher on the check's held-out noises, over the teacher's own 17-step Heun error.

    python benchmarks/ctm_direct_fit.py runs/ctm_digits --pairs 20000 --steps 3000 [--cache runs/ctm_checks_cache]
    python benchmarks/ctm_direct_fit.py runs/ctm_digits --channels 64,128 --groups 32 [--batch 64 --lr 5e-4]

Each fit writes its curve to <run>/eval/ctm_direct_fit_<label>.json (--label, default from the options); --plot
draws several such files into one PNG, with the teacher's Heun error and the issue's 1.5x bound:

    python benchmarks/ctm_direct_fit.py --plot runs/ctm_init/eval/ctm_direct_fit_*.json --out direct_fit.png

--channels gives the student other block_out_channels (and --groups its norm_num_groups): such a student cannot
start from the teacher's weights, so it starts from its random draw (--scratch does the same for the teacher's
width, the control for the wider runs).

If direct regression onto exact ODE pairs levels off at the same ratio as CTM's trained jump, the ratio measures the
network and the budget, not CTM's bootstrapped targets. Batch 32, RAdam 1e-3, an EMA of 0.99 for the scores unless
--batch, --lr, --ema say otherwise.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import ctm_checks as cc  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", nargs="?", help="a ctm run (its recipe and teacher are used; its weights are not)")
    ap.add_argument("--pairs", type=int, default=20000, help="noises whose teacher ODE endpoints are the targets")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--n", type=int, default=100, help="held-out noises of the check (as ctm_checks.py --n)")
    ap.add_argument("--fine", type=int, default=100, help="Karras points of the fine solve (as ctm_checks.py)")
    ap.add_argument("--cache", default=None, help="ctm_checks.py's --cache folder, to reuse its fine solves")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--channels", default=None, help="the student's block_out_channels, e.g. 64,128 (random start)")
    ap.add_argument("--groups", type=int, default=None, help="the student's norm_num_groups with --channels")
    ap.add_argument("--scratch", action="store_true", help="start from the random draw, not the teacher's weights")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ema", type=float, default=0.99)
    ap.add_argument("--evals", type=int, default=5, help="how many times the fit is scored (besides step 0)")
    ap.add_argument("--decay", action="store_true", help="cosine learning-rate decay to zero over --steps")
    ap.add_argument("--label", default=None, help="name of this fit's curve file (default from the options)")
    ap.add_argument("--plot", nargs="+", metavar="JSON", help="draw these curve files into --out instead of fitting")
    ap.add_argument("--out", default="ctm_direct_fit.png", help="the PNG of --plot")
    args = ap.parse_args()
    if args.plot:
        return plot(args.plot, args.out)
    if not args.run:
        ap.error("give a ctm run, or --plot JSON...")
    if args.threads:
        torch.set_num_threads(args.threads)

    from cmgen.data import training_data
    from cmgen.generator import Generator
    from cmgen.methods.ctm import init_from_teacher, load_teacher
    from cmgen.runs import load_model

    run = load_model(args.run, ema=True)
    recipe, p = run.recipe, run.recipe.precond
    teacher = load_teacher(recipe.method, recipe, run).eval()
    start = time.time()
    z = torch.randn(args.pairs, *run.shape, generator=torch.Generator().manual_seed(123)) * p.sigma_max
    pairs = cc.cache_path(args.cache, recipe, args.pairs, 17, kind="ctm_direct_fit_pairs")
    read = pairs is not None and pairs.exists()
    y = cc.cached(pairs, lambda: torch.cat([cc.heun17(teacher, recipe, z[i:i + 500])
                                            for i in range(0, args.pairs, 500)]))
    print(f"{args.pairs} teacher 17-step Heun endpoints " + (f"read from {pairs}" if read else
          f"in {time.time() - start:.0f} s"), flush=True)

    student, start_from = recipe, "random" if args.channels or args.scratch else "teacher"
    if args.channels:
        channels = tuple(int(c) for c in args.channels.split(","))
        groups = args.groups or recipe.model.norm_num_groups
        student = dataclasses.replace(recipe, model=dataclasses.replace(
            recipe.model, block_out_channels=channels, norm_num_groups=groups))
    torch.manual_seed(0)
    net = Generator.build(student, run.shape, run.num_classes).net
    if start_from == "teacher":
        init_from_teacher(net, teacher, recipe.method.teacher)
    width, size = list(student.model.block_out_channels), sum(q.numel() for q in net.parameters())
    print(f"student {width}: {size / 1e6:.2f}M parameters, {start_from} start, batch {args.batch}, lr {args.lr:g}, "
          f"EMA {args.ema:g}", flush=True)
    _, holdout = training_data(recipe, False)
    d = cc.draws(recipe, holdout.x[:args.n].float())
    ref = cc.cached_references(teacher, recipe, d, args.fine, cc.cache_path(args.cache, recipe, args.n, args.fine))
    fine, heun17 = ref[f"fine_{p.sigma_min:g}"], cc.rms(ref["heun17"], ref[f"fine_{p.sigma_min:g}"])
    ema = torch.optim.swa_utils.AveragedModel(net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(args.ema))
    opt = torch.optim.RAdam(net.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps) if args.decay else None
    full = lambda n, v: torch.full((n,), float(v))  # noqa: E731
    gen = torch.Generator().manual_seed(0)
    label = args.label or (f"{'x'.join(map(str, width))}_{start_from}_b{args.batch}_lr{args.lr:g}"
                           + ("_cosine" if args.decay else "") + ("" if args.steps == ap.get_default("steps") else f"_{args.steps}"))
    curve = {"label": label, "channels": width, "start": start_from, "parameters": size, "batch": args.batch,
             "lr": args.lr, "decay": "cosine" if args.decay else "none", "ema": args.ema, "pairs": args.pairs,
             "teacher_heun17_rmse": heun17, "steps": [], "rmse": [], "train_rmse": []}
    seen = torch.arange(min(args.n, args.pairs))  # training pairs, scored like the held-out noises (vs their targets)
    out = Path(args.run) / "eval" / f"ctm_direct_fit_{label}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for step in range(args.steps + 1):
        if step % max(1, args.steps // args.evals) == 0:
            with torch.no_grad():
                jump = ema.module(d["z"], full(len(d["z"]), p.sigma_max), full(len(d["z"]), p.sigma_min))
                fit = ema.module(z[seen], full(len(seen), p.sigma_max), full(len(seen), p.sigma_min))
            r, t = cc.rms(jump, fine), cc.rms(fit, y[seen])
            print(f"step {step}: held-out 1-step RMSE {r:.4f} = {r / heun17:.1f}x the teacher's 17-step Heun "
                  f"({heun17:.4f}); on training pairs {t:.4f}; {time.time() - start:.0f} s", flush=True)
            curve["steps"].append(step)
            curve["rmse"].append(r)
            curve["train_rmse"].append(t)
            out.write_text(json.dumps(curve, indent=2))
        if step == args.steps:
            break
        i = torch.randint(args.pairs, (args.batch,), generator=gen)
        loss = (net(z[i], full(args.batch, p.sigma_max), full(args.batch, p.sigma_min)) - y[i]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched:
            sched.step()
        ema.update_parameters(net)
    print(f"wrote {out}")


def plot(files, out) -> None:
    """The 1-step RMSE against the step of each curve file, the teacher's 17-step Heun error and 1.5x it."""
    from cmgen.plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=100)
    curves = [json.loads(Path(f).read_text()) for f in files]
    for c in curves:
        decay = ", cosine lr" if c.get("decay") == "cosine" else ""
        line, = ax.plot(c["steps"][1:], c["rmse"][1:], marker="o", label=f"{c['channels']} {c['start']} start "
                        f"({c['parameters'] / 1e6:.1f}M, {c['pairs'] // 1000}k pairs{decay})")
        if c.get("train_rmse"):   # the same fit on 100 of its own training pairs, against their targets
            ax.plot(c["steps"][1:], c["train_rmse"][1:], ls=":", color=line.get_color())
    heun = curves[0]["teacher_heun17_rmse"]
    ax.axhline(heun, color="g", ls="--", label=f"teacher 17-step Heun ({heun:.3f})")
    ax.axhline(1.5 * heun, color="r", ls="--", label=f"1.5x the teacher's Heun ({1.5 * heun:.3f})")
    ax.set_ylim(0, None)
    ax.set_xlabel("step")
    ax.set_ylabel("1-step RMSE against the fine ODE solve")
    ax.set_title("direct regression onto the teacher's ODE endpoints (dotted: on its training pairs)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
