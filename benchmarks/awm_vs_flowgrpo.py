"""AWM against the Flow-GRPO baseline on the digits base model: samples needed to reach the halfway reward.

    python benchmarks/awm_vs_flowgrpo.py --base runs/fm_digits --reward brightness --lrs 1e-4,3e-4 --seeds 0,1,2

Both methods start from the same base, draw the same number of rollouts per round (train.batch_size,
groups of method.group_size per class) with the same reward and advantage function, and take one
optimizer step per round; beta = 0 for both (the optimisation ceiling, flow_grpo #23). AWM rolls out
with the 10-step Euler ODE, the baseline with the 10-step SDE it needs for its log-probabilities.
Every --every steps the current policy (raw weights) is scored on the same fixed noise and classes
(n images, 10-step Euler ODE). Per seed, tau is halfway between the base reward and AWM's final
reward at its best learning rate (the note's criterion); the table gives the samples each method
needed to first reach tau. Each run is stored as JSON under --out, so an interrupted sweep resumes.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

RECIPES = {"awm": "awm_digits_class", "flowgrpo": "flowgrpo_digits_class"}


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


def one_run(method, lr, seed, a, out: Path) -> dict:
    path = out / f"{method}-lr{lr:g}-seed{seed}.json"
    if path.is_file():
        return json.loads(path.read_text())
    from cmgen.recipe import load_recipe
    from cmgen.rewards import build_reward
    from cmgen.train import Trainer

    over = [f"method.base={a.base}", f"method.reward={a.reward}", "method.beta=0", f"optim.lr={lr}",
            f"train.seed={seed}", f"train.steps={a.steps}", "train.sample_every=0", "train.checkpoint_every=100000",
            f"train.threads={a.threads}"]
    r = load_recipe(RECIPES[method], over)
    tr = Trainer(r, out / "runs" / path.stem, progress=False)
    reward = build_reward(a.reward)
    curve = [(0, policy_reward(tr, reward, a.n))]
    for step in range(1, a.steps + 1):
        tr.train_step()
        if step % a.every == 0:
            curve.append((step, policy_reward(tr, reward, a.n)))
            print(f"{method} lr {lr:g} seed {seed} step {step}: {curve[-1][1]:.4f}", flush=True)
    row = {"method": method, "lr": lr, "seed": seed, "batch": r.train.batch_size, "curve": curve}
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--reward", default="brightness")
    ap.add_argument("--lrs", default="1e-4,3e-4")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tune-seed", type=int, default=0, help="the seed whose final reward picks each method's lr")
    ap.add_argument("--out", default="runs/awm_vs_flowgrpo")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    lrs, seeds = [float(v) for v in a.lrs.split(",")], [int(v) for v in a.seeds.split(",")]
    best = {}
    for method in RECIPES:   # tune: the lr with the highest final reward on the tuning seed
        rows = [one_run(method, lr, a.tune_seed, a, out) for lr in lrs]
        best[method] = max(rows, key=lambda w: w["curve"][-1][1])["lr"]
    runs = {(m, s): one_run(m, best[m], s, a, out) for m in RECIPES for s in seeds}
    table = ["| seed | base | AWM final | tau | AWM samples to tau | Flow-GRPO samples to tau | ratio | "
             "interpolated: AWM / Flow-GRPO / ratio |", "|---|---|---|---|---|---|---|---|"]
    ratios = []
    for s in seeds:
        awm, grpo = runs[("awm", s)], runs[("flowgrpo", s)]
        base, final = awm["curve"][0][1], awm["curve"][-1][1]
        tau = (base + final) / 2
        na, ng = samples_to(awm["curve"], tau, awm["batch"]), samples_to(grpo["curve"], tau, grpo["batch"])
        ratio = (na / ng) if (na and ng) else None
        ratios.append(ratio)
        never = f"> {a.steps * grpo['batch']}"
        ia, ig = samples_to(awm["curve"], tau, awm["batch"], True), samples_to(grpo["curve"], tau, grpo["batch"], True)
        inter = f"{ia:.0f} / {ig:.0f} / {ia / ig:.2f}" if (ia and ig) else "-"
        table.append(f"| {s} | {base:.4f} | {final:.4f} | {tau:.4f} | {na} | {ng or never} | "
                     f"{'-' if ratio is None else f'{ratio:.2f}'} | {inter} |")
    table.append(f"\nreward {a.reward}; lr grid {lrs} tuned on seed {a.tune_seed}: AWM {best['awm']:g}, "
                 f"Flow-GRPO {best['flowgrpo']:g}; {runs[('awm', seeds[0])]['batch']} rollouts per round; policy "
                 f"scored every {a.every} steps on {a.n} fixed 10-step Euler samples.")
    text = "\n".join(table) + "\n"
    (out / "table.md").write_text(text)
    print(text)
    from cmgen.plots import _pyplot
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=100)
    for (m, s), w in runs.items():
        st, v = zip(*w["curve"])
        ax.plot(np.array(st) * w["batch"], v, color="C0" if m == "awm" else "C3", alpha=0.8,
                label=f"{'AWM' if m == 'awm' else 'Flow-GRPO'} lr {best[m]:g}" if s == seeds[0] else None)
    ax.set_xlabel("rollout samples")
    ax.set_ylabel(f"{a.reward} (10-step ODE, n={a.n})")
    ax.set_title(f"AWM vs Flow-GRPO on fm_digits, {len(seeds)} seeds")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
