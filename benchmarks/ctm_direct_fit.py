"""How precise a 1-step map can CTM's student network learn at all? Direct regression (knowledge distillation, Luhman &
Luhman 2021) of G(x_T, T, sigma_min) onto the teacher's 17-step Heun endpoints of fresh noises, from the same start as
CTM (the teacher's weights, the s branch at zero), scored like benchmarks/ctm_checks.py: the RMSE of the 1-step jump
against a fine Heun solve of the teacher on the check's held-out noises, over the teacher's own 17-step Heun error.

    python benchmarks/ctm_direct_fit.py runs/ctm_digits --pairs 20000 --steps 3000 [--cache runs/ctm_checks_cache]

If direct regression onto exact ODE pairs levels off at the same ratio as CTM's trained jump, the ratio measures the
network and the budget, not CTM's bootstrapped targets. Batch 32, RAdam 1e-3, an EMA of 0.99 for the scores.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import ctm_checks as cc  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a ctm run (its recipe and teacher are used; its weights are not)")
    ap.add_argument("--pairs", type=int, default=20000, help="noises whose teacher ODE endpoints are the targets")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--n", type=int, default=100, help="held-out noises of the check (as ctm_checks.py --n)")
    ap.add_argument("--fine", type=int, default=100, help="Karras points of the fine solve (as ctm_checks.py)")
    ap.add_argument("--cache", default=None, help="ctm_checks.py's --cache folder, to reuse its fine solves")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
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
    y = torch.cat([cc.heun17(teacher, recipe, z[i:i + 500]) for i in range(0, args.pairs, 500)])
    print(f"{args.pairs} teacher 17-step Heun endpoints in {time.time() - start:.0f} s", flush=True)

    net = Generator.build(recipe, run.shape, run.num_classes).net
    init_from_teacher(net, teacher, recipe.method.teacher)
    _, holdout = training_data(recipe, False)
    d = cc.draws(recipe, holdout.x[:args.n].float())
    ref = cc.cached_references(teacher, recipe, d, args.fine, cc.cache_path(args.cache, recipe, args.n, args.fine))
    fine, heun17 = ref[f"fine_{p.sigma_min:g}"], cc.rms(ref["heun17"], ref[f"fine_{p.sigma_min:g}"])
    ema = torch.optim.swa_utils.AveragedModel(net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.99))
    opt = torch.optim.RAdam(net.parameters(), lr=1e-3)
    full = lambda n, v: torch.full((n,), float(v))  # noqa: E731
    gen = torch.Generator().manual_seed(0)
    for step in range(args.steps + 1):
        if step % max(1, args.steps // 5) == 0:
            with torch.no_grad():
                jump = ema.module(d["z"], full(len(d["z"]), p.sigma_max), full(len(d["z"]), p.sigma_min))
            r = cc.rms(jump, fine)
            print(f"step {step}: held-out 1-step RMSE {r:.4f} = {r / heun17:.1f}x the teacher's 17-step Heun "
                  f"({heun17:.4f}), {time.time() - start:.0f} s", flush=True)
        if step == args.steps:
            break
        i = torch.randint(args.pairs, (32,), generator=gen)
        loss = (net(z[i], full(32, p.sigma_max), full(32, p.sigma_min)) - y[i]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update_parameters(net)


if __name__ == "__main__":
    main()
