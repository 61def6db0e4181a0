"""AWM against the Flow-GRPO baseline on the digits base model: samples needed to reach the halfway reward.

    python benchmarks/awm_vs_flowgrpo.py --base runs/fm_digits --reward brightness --lrs 3e-4,1e-3,3e-3 \
        --seeds 0,1,2,3,4 --threads 1

Both methods start from the same base, draw the same number of rollouts per round (train.batch_size,
groups of method.group_size per class) with the same reward and advantage function, and take one
optimizer step per round; no penalty for either (the optimisation ceiling, flow_grpo #23): beta = 0 for
both and AWM's previous-policy penalty beta_prev = 0 too, since the baseline has none. AWM rolls out
with the 10-step Euler ODE, the baseline with the 10-step SDE it needs for its log-probabilities.
Every --every steps the current policy (raw weights) is scored on the same fixed noise and classes
(n images, 10-step Euler ODE). Each method's lr is tuned separately on --tune-seed over the grid: the
lr with the highest mean reward over its evaluated curve (the area under it, which rewards speed and
does not tie when both saturate); while the best lr sits at an edge of the grid, the grid is extended
by a half decade on that side (at most --max-extend times), so the chosen lr is bracketed. Per seed, tau
is halfway between the base reward and AWM's final reward at its lr (the note's criterion); the table
gives the samples each method needed to first reach tau. Each run is stored as JSON under --out (keyed
by its settings), so an interrupted sweep resumes.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

RECIPES = {"awm": "awm_digits_class", "flowgrpo": "flowgrpo_digits_class"}
NO_PENALTY = {"awm": ["method.beta=0", "method.beta_prev=0"], "flowgrpo": ["method.beta=0"]}


def policy_reward(trainer, reward, n: int) -> float:
    from cmgen.sampling import generate

    gen = trainer.gen
    net = trainer.accelerator.unwrap_model(trainer.model)
    was = net.training
    net.eval()
    xs, ys = zip(*generate(gen, n, gen.times(10, "euler"), sampler="euler", seed=10_000, batch_size=256,
                           progress=False))
    net.train(was)
    x, y = torch.cat(xs), torch.cat(ys)
    with torch.no_grad():
        return float(reward(x, y if reward.needs_condition else None).mean())


def run_overrides(method, lr, seed, a) -> list[str]:
    """One sweep run's recipe overrides: the shared base, reward and lr, and no penalty (NO_PENALTY)."""
    return [f"method.base={a.base}", f"method.reward={a.reward}", *NO_PENALTY[method], f"optim.lr={lr}",
            f"train.seed={seed}", f"train.steps={a.steps}", "train.sample_every=0", "train.checkpoint_every=100000",
            f"train.threads={a.threads}"]


def one_run(method, lr, seed, a, out: Path) -> dict:
    path = out / f"{method}-lr{lr:g}-seed{seed}.json"
    settings = {"base": a.base, "reward": a.reward, "steps": a.steps, "every": a.every, "n": a.n,
                "penalties": NO_PENALTY[method]}
    if path.is_file():
        row = json.loads(path.read_text())
        if row.get("settings") == settings:
            return row
    from cmgen.recipe import load_recipe
    from cmgen.rewards import build_reward
    from cmgen.train import Trainer

    r = load_recipe(RECIPES[method], run_overrides(method, lr, seed, a))
    tr = Trainer(r, out / "runs" / path.stem, progress=False)
    reward = build_reward(a.reward)
    curve = [(0, policy_reward(tr, reward, a.n))]
    for step in range(1, a.steps + 1):
        tr.train_step()
        if step % a.every == 0:
            curve.append((step, policy_reward(tr, reward, a.n)))
            print(f"{method} lr {lr:g} seed {seed} step {step}: {curve[-1][1]:.4f}", flush=True)
    row = {"method": method, "lr": lr, "seed": seed, "batch": r.train.batch_size, "curve": curve,
           "settings": settings}
    path.write_text(json.dumps(row))
    return row


def samples_to(curve, tau: float, batch: int, interpolate: bool = False):
    """Samples at the first evaluation with reward >= tau; or, interpolated linearly between that
    evaluation and the one before, where the curve crosses tau."""
    for (s0, v0), (step, v) in zip([curve[0]] + curve[:-1], curve):
        if v >= tau:
            if interpolate and step > s0 and v > v0:
                return (s0 + (step - s0) * (tau - v0) / (v - v0)) * batch
            return step * batch
    return None


def curve_score(row) -> float:
    """Mean reward over the evaluated curve (its area); a diverged run (NaN) scores -inf."""
    v = float(np.mean([r for _, r in row["curve"]]))
    return v if np.isfinite(v) else -np.inf


def half_decade(lr: float, up: bool) -> float:
    """The next point of the 1-3-10 grid above (or below) lr: 3e-4 -> 1e-3 -> 3e-3 -> 1e-2."""
    e = np.floor(np.log10(lr) + 1e-9)
    three = lr / 10**e > 2
    if up:
        return float(f"{10 ** (e + 1) if three else 3 * 10**e:.3g}")
    return float(f"{10**e if three else 3 * 10 ** (e - 1):.3g}")


def tune_lr(run, lrs: list[float], max_extend: int = 2) -> tuple[float, list[dict]]:
    """(best lr, the rows tried): run(lr) over the grid, extended a half decade at a time while the best
    lr is the grid's smallest or largest (at most max_extend points)."""
    grid = sorted(lrs)
    rows = {lr: run(lr) for lr in grid}
    for _ in range(max_extend):
        best = max(rows.values(), key=curve_score)["lr"]
        if len(grid) > 1 and best not in (grid[0], grid[-1]):
            break
        new = half_decade(grid[-1], True) if best == grid[-1] else half_decade(grid[0], False)
        grid = sorted(grid + [new])
        rows[new] = run(new)
    best = max(rows.values(), key=curve_score)["lr"]
    return best, [rows[lr] for lr in grid]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--reward", default="brightness")
    ap.add_argument("--lrs", default="3e-4,1e-3,3e-3")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tune-seed", type=int, default=0, help="the seed whose curves pick each method's lr")
    ap.add_argument("--max-extend", type=int, default=2, help="grid points added while the best lr is at an edge")
    ap.add_argument("--out", default="runs/awm_vs_flowgrpo")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    lrs, seeds = [float(v) for v in a.lrs.split(",")], [int(v) for v in a.seeds.split(",")]
    best, tried = {}, {}
    for method in RECIPES:   # tune: the lr with the largest area under the reward curve on the tuning seed
        best[method], tried[method] = tune_lr(lambda lr: one_run(method, lr, a.tune_seed, a, out), lrs, a.max_extend)
    runs = {(m, s): one_run(m, best[m], s, a, out) for m in RECIPES for s in seeds}
    names = {"awm": "AWM", "flowgrpo": "Flow-GRPO"}
    table = ["| seed | base | AWM final | tau | AWM samples to tau | Flow-GRPO samples to tau | ratio | "
             "interpolated: AWM / Flow-GRPO / ratio |", "|---|---|---|---|---|---|---|---|"]
    ratios, inter_ratios = [], []
    for s in seeds:
        awm, grpo = runs[("awm", s)], runs[("flowgrpo", s)]
        base, final = awm["curve"][0][1], awm["curve"][-1][1]
        tau = (base + final) / 2
        na, ng = samples_to(awm["curve"], tau, awm["batch"]), samples_to(grpo["curve"], tau, grpo["batch"])
        ratio = (na / ng) if (na and ng) else None
        ratios.append(ratio)
        never = f"> {a.steps * grpo['batch']}"
        ia, ig = samples_to(awm["curve"], tau, awm["batch"], True), samples_to(grpo["curve"], tau, grpo["batch"], True)
        inter_ratios.append(ia / ig if (ia and ig) else None)
        inter = f"{ia:.0f} / {ig:.0f} / {ia / ig:.2f}" if (ia and ig) else "-"
        table.append(f"| {s} | {base:.4f} | {final:.4f} | {tau:.4f} | {na} | {ng or never} | "
                     f"{'-' if ratio is None else f'{ratio:.2f}'} | {inter} |")
    hits = [sum(1 for r in rs if r is not None and r <= 0.5) for rs in (ratios, inter_ratios)]
    table.append(f"\nAWM needs <= 0.5x the baseline's samples in {hits[0]} of {len(seeds)} seeds at the evaluation grid, "
                 f"{hits[1]} of {len(seeds)} interpolated (the note's criterion: >= 4 of 5).")
    table += ["", f"lr tuning on seed {a.tune_seed} (mean reward over the curve / final reward; grid given {lrs}):", "",
              "| method | " + " | ".join(f"lr {w['lr']:g}" for w in tried["awm"]) + " |",
              "|---|" + "---|" * len(tried["awm"])]
    for m in RECIPES:
        cells = [f"{curve_score(w):.4f} / {w['curve'][-1][1]:.4f}" + (" (best)" if w["lr"] == best[m] else "")
                 for w in tried[m]]
        table.append(f"| {names[m]} | " + " | ".join(cells) + " |")
        if [w["lr"] for w in tried[m]] != [w["lr"] for w in tried["awm"]]:
            table[-1] += " lrs " + ", ".join(f"{w['lr']:g}" for w in tried[m])
    table.append(f"\nreward {a.reward}; chosen lr: AWM {best['awm']:g}, Flow-GRPO {best['flowgrpo']:g}; "
                 f"{runs[('awm', seeds[0])]['batch']} rollouts per round, {a.steps} rounds; policy scored every "
                 f"{a.every} steps on {a.n} fixed 10-step Euler samples.")
    text = "\n".join(table) + "\n"
    (out / "table.md").write_text(text)
    print(text)
    from cmgen.plots import _pyplot
    plt = _pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4), dpi=100)
    for (m, s), w in runs.items():
        st, v = zip(*w["curve"])
        ax.plot(np.array(st) * w["batch"], v, "-" if m == "awm" else "--", color="C0" if m == "awm" else "C3",
                alpha=0.8, zorder=3 if m == "awm" else 2, label=f"{names[m]} lr {best[m]:g}" if s == seeds[0] else None)
    ax.set_title(f"AWM vs Flow-GRPO on fm_digits, {len(seeds)} seeds, each at its tuned lr")
    for m, style in (("awm", "-"), ("flowgrpo", "--")):
        for k, w in enumerate(tried[m]):
            st, v = zip(*w["curve"])
            ax2.plot(np.array(st) * w["batch"], v, style, color=f"C{k}", label=f"{names[m]} lr {w['lr']:g}")
    ax2.set_title(f"lr tuning, seed {a.tune_seed}")
    for x in (ax, ax2):
        x.set_xlabel("rollout samples")
        x.set_ylabel(f"{a.reward} (10-step ODE, n={a.n})")
        x.grid(alpha=0.3)
        x.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
