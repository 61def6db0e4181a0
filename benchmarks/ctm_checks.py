"""CTM's trajectory checks for a trained run against its teacher (issue "Must hold", research note sec. 6).

Prints, for the student at initialisation (the teacher's Euler step) and after training (EMA weights):
- the composition error: RMS of G(G(x_t, t, u), u, s) - G(x_t, t, s) over random grid triples t > u > s,
  x_t = x_0 + t z with held-out digits x_0;
- the 1-step jump G(x_T, T, sigma_min) against a fine ODE solve of the teacher (Heun, --fine steps on a
  Karras grid to sigma_min), beside the teacher's own 17-step Heun error against the same solve;
- jumps T -> s against the fine solve at three intermediate s, and the denoiser g(x, t, t) against the
  teacher's D(x, t);
- on 2-D points (ctm_toy2d), the research note's sample checks: sliced W2 of the 1-step samples, of the
  teacher's 17-step Heun samples and of training points against the held-out points (the noise floor), the
  share of samples within 3 std of their nearest mode and the largest deviation of a mode's mass from uniform.

    python benchmarks/ctm_checks.py runs/ctm_digits --n 200 --fine 200 [--cache runs/ctm_checks_cache]
    python benchmarks/ctm_checks.py runs/ctm_toy2d --n 2000 --fine 256 --every-checkpoint

The teacher's side (the fine solves) is computed once for both rows; --cache keeps it for later runs.
"""
from __future__ import annotations

import argparse
import json
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


def heun17(teacher, recipe, z):
    """The teacher's own 17-step Heun solve from z = x_T to sigma_min (NFE 35, EDM's setting)."""
    p = recipe.precond
    return heun(teacher, z, karras(18, p.sigma_min, p.sigma_max, p.rho))


def draws(recipe, x0, seed: int = 0):
    """The random draws of one check, the same for every row: grid triples (t, u, s), x_t and the noise z."""
    p = recipe.precond
    g = torch.Generator().manual_seed(seed)
    n = len(x0)
    grid = karras(recipe.method.grid, p.sigma_min, p.sigma_max, p.rho)
    # composition over random grid triples i < j <= l (t > u >= s), one triple per sample
    idx = torch.stack([torch.randperm(len(grid), generator=g)[:3].sort().values for _ in range(n)])
    t, u, s = (torch.tensor(grid)[idx[:, c]] for c in range(3))
    view = (-1,) + (1,) * (x0.ndim - 1)
    x_t = x0 + t.view(view) * torch.randn(x0.shape, generator=g)
    z = torch.randn(x0.shape, generator=g) * p.sigma_max
    sig = torch.exp(-1.2 + 1.2 * torch.randn(n, generator=g))
    noisy = x0 + sig.view(view) * torch.randn(x0.shape, generator=g)
    return {"t": t, "u": u, "s": s, "x_t": x_t, "z": z, "sig": sig, "noisy": noisy}


@torch.no_grad()
def references(teacher, recipe, d: dict, n_fine: int) -> dict:
    """The teacher's side, shared by every row: fine Heun solves from z = x_T to each s of JUMPS, its own
    17-step Heun solve, and its denoiser on the noisy digits."""
    p = recipe.precond
    ref = {f"fine_{s_to:g}": heun(teacher, d["z"], karras(n_fine, s_to, p.sigma_max, p.rho))
           for s_to in JUMPS + (p.sigma_min,)}
    ref["heun17"] = heun17(teacher, recipe, d["z"])
    ref["denoised"] = teacher(d["noisy"], d["sig"])
    return ref


JUMPS = (12.9, 1.92, 0.14)


@torch.no_grad()
def checks(student, recipe, d: dict, ref: dict) -> dict:
    n, (T, smin) = len(d["z"]), (recipe.precond.sigma_max, recipe.precond.sigma_min)
    full = lambda v: torch.full((n,), float(v))  # noqa: E731
    t, u, s, x_t = d["t"], d["u"], d["s"], d["x_t"]
    out = {"composition_rms": rms(student(student(x_t, t, u), u, s), student(x_t, t, s))}
    for s_to in JUMPS + (smin,):   # jumps from T against the fine ODE solve
        key = "jump_T_to_sigma_min_rmse" if s_to == smin else f"jump_T_to_{s_to:g}_rmse"
        out[key] = rms(student(d["z"], full(T), full(s_to)), ref[f"fine_{s_to:g}"])
    out["teacher_heun17_rmse"] = rms(ref["heun17"], ref[f"fine_{smin:g}"])
    out["denoiser_vs_teacher_rmse"] = rms(student.denoise(d["noisy"], d["sig"]), ref["denoised"])
    return out


def mode_checks(samples: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor) -> dict:
    """Modes of labelled points `ref` (class means, their largest per-coordinate std): the share of `samples`
    within 3 std of the nearest mode, and max over modes of |mass / (1/K) - 1| for the nearest-mode masses."""
    k = int(labels.max()) + 1
    centres = torch.stack([ref[labels == c].mean(0) for c in range(k)])
    std = max(float(ref[labels == c].std(0).max()) for c in range(k))
    dist, nearest = torch.cdist(samples.double(), centres.double()).min(1)
    mass = torch.bincount(nearest, minlength=k).double() / len(samples)
    return {"within_3std": float((dist <= 3 * std).double().mean()), "mode_mass_dev": float((mass * k - 1).abs().max())}


def point_checks(student, recipe, d: dict, ref: dict, holdout, train_x) -> dict:
    """Sliced W2 of the student's 1-step samples G(z, T, sigma_min) and of the teacher's 17-step Heun samples
    against the held-out points, training points against them (the noise floor), and mode_checks of both."""
    from cmgen.eval.metrics import sliced_wasserstein

    n, p = len(d["z"]), recipe.precond
    with torch.no_grad():
        one = student(d["z"], torch.full((n,), p.sigma_max), torch.full((n,), p.sigma_min))
    sw = lambda a: sliced_wasserstein(a.numpy(), holdout.x.numpy())  # noqa: E731
    out = {"sw2_1step": sw(one), "sw2_teacher_heun17": sw(ref["heun17"]), "sw2_data_floor": sw(train_x[:n])}
    for name, x in (("1step", one), ("teacher_heun17", ref["heun17"])):
        out |= {f"{key}_{name}": v for key, v in mode_checks(x, holdout.x, holdout.labels).items()}
    return out


def cached(path, compute):
    """compute(), read from / written to the file `path` when given (tensors, read with weights_only=True)."""
    if path is None:
        return compute()
    path = Path(path)
    if path.exists():
        return torch.load(path, weights_only=True)
    out = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out


def cached_references(teacher, recipe, d, n_fine: int, cache):
    """references(), read from / written to the file `cache` when given (keyed by teacher, n, fine, seed)."""
    return cached(cache, lambda: references(teacher, recipe, d, n_fine))


def cache_path(folder, recipe, n: int, n_fine: int, kind: str = "ctm_checks_ref"):
    """The file of a cached teacher computation `kind` in `folder` (None: no cache), keyed by teacher, grid, n and
    fine (cached_references(); ctm_direct_fit.py's ODE pairs)."""
    if not folder:
        return None
    import hashlib

    key = hashlib.sha256(f"{Path(recipe.method.teacher).resolve()}|{recipe.method.grid}|{n}|{n_fine}"
                         .encode()).hexdigest()[:16]
    return Path(folder) / f"{kind}_{key}.pt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a ctm run or checkpoint folder")
    ap.add_argument("--n", type=int, default=200, help="samples (held-out digits and noises)")
    ap.add_argument("--fine", type=int, default=200, help="Karras points of the fine Heun ODE solve")
    ap.add_argument("--out", default=None, help="JSON file (default <run>/eval/ctm_checks.json)")
    ap.add_argument("--cache", default=None, help="folder for the teacher's fine solves (reused by later calls with "
                    "the same teacher, --n and --fine)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--every-checkpoint", action="store_true", help="check every checkpoint of the run folder; "
                    "writes eval/ctm_checks_<step>.json and the ratios against the step, eval/ctm_checks_curve.png")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.every_checkpoint:
        from cmgen.checkpoint import list_checkpoints

        ckpts = list_checkpoints(Path(args.run))
        if not ckpts:
            raise SystemExit(f"{args.run} has no checkpoints; --every-checkpoint takes a run folder")
        results, shared = [], None   # the teacher's side is computed once for all checkpoints
        for c in ckpts:
            result, shared = check_run(c, args, Path(args.run) / "eval" / f"ctm_checks_{c.name}.json", shared)
            results.append(result)
        curve = Path(args.run) / "eval" / "ctm_checks_curve.png"
        save_check_curve([(r["step"], r["summary"]) for r in results], curve, Path(args.run).name)
        print(f"wrote {curve}")
    else:
        check_run(args.run, args, Path(args.out) if args.out else None)


def teacher_side(trained, args) -> dict:
    """What every checkpoint of one run shares: the held-out data, the draws, the teacher's fine solves
    (cached_references) and the checks of the student at initialisation (the teacher's Euler step)."""
    from cmgen.data import training_data
    from cmgen.generator import Generator
    from cmgen.methods.ctm import init_from_teacher, load_teacher

    recipe = trained.recipe
    teacher = load_teacher(recipe.method, recipe, trained).eval()
    init = Generator.build(recipe, trained.shape, trained.num_classes)
    init_from_teacher(init.net, teacher, recipe.method.teacher)
    data, holdout = training_data(recipe, False)
    if holdout is None or len(holdout) < args.n:
        raise SystemExit(f"{trained.source}: the recipe holds out {0 if holdout is None else len(holdout)} examples, "
                         f"--n {args.n} needs at least as many (lower --n or raise data.holdout)")
    d = draws(recipe, holdout.x[:args.n].float())
    ref = cached_references(teacher, recipe, d, args.fine, cache_path(args.cache, recipe, args.n, args.fine))
    return {"data": data, "holdout": holdout, "d": d, "ref": ref, "init": checks(init.net.eval(), recipe, d, ref)}


def check_run(path, args, out, shared=None) -> tuple[dict, dict]:
    """The checks of one run or checkpoint folder against the student at initialisation, printed and written
    to `out` (default <run>/eval/ctm_checks.json); (result, the teacher_side it used, computed when `shared`
    is None)."""
    from cmgen.runs import load_model

    trained = load_model(path, ema=True)
    recipe = trained.recipe
    start = time.time()
    shared = shared or teacher_side(trained, args)
    data, holdout, d, ref = shared["data"], shared["holdout"], shared["d"], shared["ref"]
    rows = {"init": shared["init"], f"step {trained.step}": checks(trained.net, recipe, d, ref)}
    a, b = rows["init"], rows[f"step {trained.step}"]
    summary = {"composition_drop": a["composition_rms"] / b["composition_rms"],
               "jump_over_teacher_heun17": b["jump_T_to_sigma_min_rmse"] / b["teacher_heun17_rmse"],
               "jump_over_init_jump": b["jump_T_to_sigma_min_rmse"] / a["jump_T_to_sigma_min_rmse"]}
    if holdout.kind == "points":
        summary |= point_checks(trained.net, recipe, d, ref, holdout, data.x)
    keys = list(a)
    print(f"{'':28s}" + "".join(f"{k:>18s}" for k in rows))
    for k in keys:
        print(f"{k:28s}" + "".join(f"{r[k]:18.4f}" for r in rows.values()))
    print(f"composition error falls {summary['composition_drop']:.2f}x (must be >= 4); the 1-step jump's error is "
          f"{summary['jump_over_teacher_heun17']:.2f}x the teacher's 17-step Heun error (must be <= 1.5); "
          f"{args.n} samples, fine solve {args.fine} Karras points, {time.time() - start:.0f}s")
    if holdout.kind == "points":
        print("points: " + ", ".join(f"{k} {v:.4f}" for k, v in summary.items() if k not in rows["init"]))
    out = out or Path(trained.source).parents[1] / "eval" / "ctm_checks.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"rows": rows, "summary": summary, "n": args.n, "fine": args.fine, "source": str(trained.source),
              "step": trained.step}
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result, shared


def save_check_curve(points, path, title: str) -> None:
    """The issue's two ratios against the training step, each with its threshold, as one PNG."""
    from cmgen.plots import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), dpi=100)
    steps = [p[0] for p in points]
    for ax, key, bar, label in ((axes[0], "composition_drop", 4.0, "composition error at init / trained (>= 4)"),
                                (axes[1], "jump_over_teacher_heun17", 1.5,
                                 "1-step jump error / teacher's 17-step Heun error (<= 1.5)")):
        ax.plot(steps, [p[1][key] for p in points], "o-", lw=1)
        ax.axhline(bar, color="0.5", ls="--", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}: CTM trajectory checks", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
