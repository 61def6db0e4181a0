"""Reward and FD-digits of reward-tuned digits runs against their base, on the same noise and labels.

    python benchmarks/awm_eval.py --base runs/fm_digits --reward digit-class --threads 1 runs/awm_digits_class ...

Each model draws n samples (image j: seed j, class j % 10) with the Euler ODE; the reward of image j
is scored against its class; the table gives the mean with a 95% t-interval, the paired difference
to the base (same noise and class per image) with its interval, and FD-digits to the held-out real
digits (297 images). Writes a markdown table, JSON and a sample grid per model under --out.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def samples(gen, n: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    from cmgen.sampling import generate

    xs, ys = zip(*generate(gen, n, gen.times(steps), seed=0, batch_size=250, progress=False))
    return torch.cat(xs), torch.cat(ys)


def fd_digits(x: torch.Tensor, ref: torch.Tensor) -> float:
    from cmgen.eval import digits_net as dn
    from cmgen.eval.frechet import frechet_distance

    net = dn.digits_net()
    with torch.no_grad():
        a, b = net.features(x.clamp(-1, 1)).double().numpy(), net.features(ref).double().numpy()
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def main(argv=None) -> int:
    from cmgen.data import load_dataset
    from cmgen.eval.metrics import mean_confidence_interval
    from cmgen.plots import save_grid
    from cmgen.recipe import DataConfig
    from cmgen.rewards import build_reward
    from cmgen.runs import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="tuned run folders")
    ap.add_argument("--base", required=True, help="the base run folder")
    ap.add_argument("--reward", default="digit-class", help="a cmgen.rewards name")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--weights", choices=("ema", "raw"), default="ema",
                    help="the evaluation EMA (default) or the raw trained weights of the tuned runs")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--out", default="runs/awm_eval")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    _, held = load_dataset(DataConfig(name="digits", holdout=297), 0)
    reward = build_reward(a.reward)
    rows, base_r = [], None
    for label, path in [("base", a.base)] + [(Path(p).name, p) for p in a.runs]:
        gen = load_model(path, ema=a.weights == "ema" or path == a.base)
        x, y = samples(gen, a.n, a.steps)
        with torch.no_grad():
            r = reward(x, y if reward.needs_condition else None).double().numpy()
        mean, lo, hi = mean_confidence_interval(r)
        row = {"model": label, "path": str(path), "step": gen.step, "n": a.n, "mean": mean, "ci95": [lo, hi],
               "fd_digits": fd_digits(x, held.x)}
        if base_r is None:
            base_r = r
        else:
            d, dlo, dhi = mean_confidence_interval(r - base_r)
            row |= {"delta": d, "delta_ci95": [dlo, dhi]}
        rows.append(row)
        save_grid(x[:100], out / f"samples-{label}.png", nrow=10)
    base_fd = rows[0]["fd_digits"]
    lines = [f"| model | step | {a.reward} mean [95% CI] | paired Δ vs base [95% CI] | FD-digits | FD / base FD |",
             "|---|---|---|---|---|---|"]
    for w in rows:
        delta = f"{w['delta']:+.4f} [{w['delta_ci95'][0]:+.4f}, {w['delta_ci95'][1]:+.4f}]" if "delta" in w else "-"
        lines.append(f"| {w['model']} | {w['step']} | {w['mean']:.4f} [{w['ci95'][0]:.4f}, {w['ci95'][1]:.4f}] | "
                     f"{delta} | {w['fd_digits']:.3f} | {w['fd_digits'] / base_fd:.2f} |")
    lines.append(f"\n{a.n} samples per model, {a.steps}-step Euler ODE, {a.weights.upper()} weights (the base: EMA), "
                 "image j: seed j, class j % 10; FD-digits to the 297 held-out digits.")
    text = "\n".join(lines) + "\n"
    (out / f"eval-{a.reward}.md").write_text(text)
    (out / f"eval-{a.reward}.json").write_text(json.dumps(rows, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
