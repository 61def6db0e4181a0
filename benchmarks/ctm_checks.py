"""CTM's trajectory checks for a trained run against its teacher (issue "Must hold", research note sec. 6).

Prints, for the student at initialisation (the teacher's Euler step) and after training (EMA weights):
- the composition error: RMS of G(G(x_t, t, u), u, s) - G(x_t, t, s) over random grid triples t > u > s,
  x_t = x_0 + t z with held-out digits x_0;
- the 1-step jump G(x_T, T, sigma_min) against a fine ODE solve of the teacher (Heun, --fine steps on a
  Karras grid to sigma_min), beside the teacher's own 17-step Heun error against the same solve;
- jumps T -> s against the fine solve at three intermediate s, and the denoiser g(x, t, t) against the
  teacher's D(x, t).

    python benchmarks/ctm_checks.py runs/ctm_digits --n 200 --fine 200
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch


def rms(a, b) -> float:
    return float((a - b).pow(2).mean().sqrt())


@torch.no_grad()
def heun(teacher, x, times):
    """Heun on the PF-ODE along `times` (all > 0), the teacher's second-order step every time."""
    for t, t_next in zip(times[:-1], times[1:]):
        tt, tn = torch.full((len(x),), t), torch.full((len(x),), t_next)
        d = (x - teacher(x, tt)) / t
        x_e = x + (t_next - t) * d
        x = x + (t_next - t) * 0.5 * (d + (x_e - teacher(x_e, tn)) / t_next)
    return x


def karras(n, lo, hi, rho=7.0):
    from cmgen.schedules import karras_sigmas

    return [float(v) for v in karras_sigmas(n, lo, hi, rho).flip(0)]


@torch.no_grad()
def checks(student, teacher, recipe, x0, n_fine: int, seed: int = 0) -> dict:
    p = recipe.precond
    g = torch.Generator().manual_seed(seed)
    n = len(x0)
    full = lambda v: torch.full((n,), float(v))  # noqa: E731
    T, smin = p.sigma_max, p.sigma_min
    grid = karras(recipe.method.grid, smin, T, p.rho)
    # composition over random grid triples i < j <= l (t > u >= s), one triple per sample
    idx = torch.stack([torch.randperm(len(grid), generator=g)[:3].sort().values for _ in range(n)])
    t, u, s = (torch.tensor(grid)[idx[:, c]] for c in range(3))
    x_t = x0 + t.view(-1, 1, 1, 1) * torch.randn(x0.shape, generator=g)
    comp = rms(student(student(x_t, t, u), u, s), student(x_t, t, s))
    # jumps from T against the fine ODE solve
    z = torch.randn(x0.shape, generator=g) * T
    out = {"composition_rms": comp}
    for s_to in (12.9, 1.92, 0.14, smin):
        fine = heun(teacher, z, karras(n_fine, s_to, T, p.rho))
        key = "jump_T_to_sigma_min_rmse" if s_to == smin else f"jump_T_to_{s_to:g}_rmse"
        out[key] = rms(student(z, full(T), full(s_to)), fine)
        if s_to == smin:
            out["teacher_heun17_rmse"] = rms(heun(teacher, z, karras(18, smin, T, p.rho)), fine)
    sig = torch.exp(-1.2 + 1.2 * torch.randn(n, generator=g))
    noisy = x0 + sig.view(-1, 1, 1, 1) * torch.randn(x0.shape, generator=g)
    out["denoiser_vs_teacher_rmse"] = rms(student.denoise(noisy, sig), teacher(noisy, sig))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a ctm run or checkpoint folder")
    ap.add_argument("--n", type=int, default=200, help="samples (held-out digits and noises)")
    ap.add_argument("--fine", type=int, default=200, help="Karras points of the fine Heun ODE solve")
    ap.add_argument("--out", default=None, help="JSON file (default <run>/eval/ctm_checks.json)")
    args = ap.parse_args()

    from cmgen.data import training_data
    from cmgen.generator import Generator
    from cmgen.methods.ctm import init_from_teacher, load_teacher
    from cmgen.runs import load_model

    trained = load_model(args.run, ema=True)
    recipe = trained.recipe
    teacher = load_teacher(recipe.method, recipe, trained).eval()
    init = Generator.build(recipe, trained.shape, trained.num_classes)
    init_from_teacher(init.net, teacher, recipe.method.teacher)
    _, holdout = training_data(recipe, False)
    x0 = holdout.x[:args.n].float()
    start = time.time()
    rows = {"init": checks(init.net.eval(), teacher, recipe, x0, args.fine),
            f"step {trained.step}": checks(trained.net, teacher, recipe, x0, args.fine)}
    a, b = rows["init"], rows[f"step {trained.step}"]
    summary = {"composition_drop": a["composition_rms"] / b["composition_rms"],
               "jump_over_teacher_heun17": b["jump_T_to_sigma_min_rmse"] / b["teacher_heun17_rmse"]}
    keys = list(a)
    print(f"{'':28s}" + "".join(f"{k:>18s}" for k in rows))
    for k in keys:
        print(f"{k:28s}" + "".join(f"{r[k]:18.4f}" for r in rows.values()))
    print(f"composition error falls {summary['composition_drop']:.2f}x (must be >= 4); the 1-step jump's error is "
          f"{summary['jump_over_teacher_heun17']:.2f}x the teacher's 17-step Heun error (must be <= 1.5); "
          f"{args.n} samples, fine solve {args.fine} Karras points, {time.time() - start:.0f}s")
    out = Path(args.out) if args.out else Path(trained.source).parents[1] / "eval" / "ctm_checks.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "summary": summary, "n": args.n, "fine": args.fine,
                               "source": str(trained.source)}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
