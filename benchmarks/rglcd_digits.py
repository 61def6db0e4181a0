"""RG-LCD on digits: rewards and FD-digits of LCD / RG-LCD runs against plain LCD and the teacher's DDIM.

    python benchmarks/rglcd_digits.py --lcd runs/lcd_digits --runs runs/rglcd_digits_b05 runs/rglcd_digits \
        --teacher runs/ldm_digits --n 1000 --out runs/rglcd_table

Every model samples the same n images (seed j, label j % 10); rewards are compared with plain LCD's sample
by sample (paired), with a 95% Student-t CI of the mean difference. FD-digits is against all 1797 digits; FD to
teacher against the teacher's own 50-step DDIM samples (how far distillation plus reward moved from it).
Writes table.json, table.md and a grid per (run, steps) beside the teacher's 50-step DDIM.

    python benchmarks/rglcd_digits.py aggregate runs/rglcd_seeds runs/rglcd_table_s*/table.json

pools the tables of several training seeds (runs named *_s<k>) into mean ± std per row (seeds.md).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def samples(gen, steps: int, n: int, guidance: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    from cmgen.sampling import generate

    times = gen.times(steps)
    xs, ys = [], []
    for x, y in generate(gen, n, times, seed=0, batch_size=250, progress=False, guidance=guidance):
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def rewards(x: torch.Tensor, y: torch.Tensor) -> dict[str, np.ndarray]:
    from cmgen.rewards.differentiable import digit_class_probability, ink
    from cmgen.rewards.jpeg import jpeg_compressibility

    with torch.no_grad():
        return {"digit_class": digit_class_probability(x, y).double().numpy(),
                "jpeg_compressibility": jpeg_compressibility(x).double().numpy(),
                "ink": ink(x).double().numpy()}


def feature_stats(x: torch.Tensor):
    from cmgen.eval.features import digits_feature_net
    from cmgen.eval.frechet import FeatureStats
    from cmgen.eval.sources import to_uint8_nhwc

    s = FeatureStats()
    s.update(digits_feature_net((1, 8, 8)).embed(to_uint8_nhwc(x)))
    return s


def fd_digits(x: torch.Tensor, ref_stats) -> float:
    from cmgen.eval.frechet import fd_between

    return fd_between(feature_stats(x), ref_stats)


def reference_stats():
    from cmgen.data import load_digits

    return feature_stats(load_digits().x)


@torch.no_grad()
def lrm_agreement(run: str) -> dict:
    """The trained LRM against the expert on held-out triplets: each held-out real latent (never trained on) with a
    fresh 1-step and 2-step sample of its class (seeds unused in training); the fraction of the 3 pairs per
    triplet (ties excluded) that the LRM orders as the expert does."""
    from cmgen.checkpoint import load_tensors
    from cmgen.data import load_dataset
    from cmgen.pretrained import load_weights
    from cmgen.rewards.differentiable import build_reward
    from cmgen.rewards.lrm import PAIRS, build_lrm
    from cmgen.runs import load_model, resolve_checkpoint
    from cmgen.sampling import per_image_noise

    gen = load_model(run)
    m = gen.recipe.method
    lrm = build_lrm(gen.shape, gen.num_classes, m.lrm_width)
    load_weights(lrm, load_tensors(resolve_checkpoint(run) / "lrm.safetensors"), run)
    _, hold = load_dataset(gen.recipe.data, gen.recipe.train.seed)
    if hold is None:
        raise SystemExit(f"{run}: the LRM agreement needs held-out data (data.holdout > 0 in its recipe)")
    real, y = hold.x.float(), hold.labels
    n = len(real)
    seeds = (10**6 + torch.arange(2 * n)).tolist()
    run_s = lambda steps, sd: gen.sampler().run(gen.net, per_image_noise(sd, gen.shape), gen.times(steps), y,  # noqa
                                                gen, {})
    trip = [run_s(1, seeds[:n]), run_s(2, seeds[n:]), real]
    expert_fn = build_reward(m.reward, differentiable=False)
    decode = lambda z: gen.codec.decode(z)  # noqa: E731
    e = torch.stack([expert_fn(decode(z), y) for z in trip], 1)
    r = torch.stack([lrm(z, y) for z in trip], 1)
    agree, total = 0, 0
    for a, b in PAIRS:
        de, dr = e[:, a] - e[:, b], r[:, a] - r[:, b]
        keep = de != 0
        agree += int(((de * dr) > 0)[keep].sum())
        total += int(keep.sum())
    # pairs of held-out real digits of the same class: a measure that does not move with the student
    g = torch.Generator().manual_seed(0)
    i, j = torch.randint(n, (4000,), generator=g), torch.randint(n, (4000,), generator=g)
    same = (y[i] == y[j]) & (i != j)
    i, j = i[same], j[same]
    de, dr = e[i, 2] - e[j, 2], r[i, 2] - r[j, 2]
    keep = de != 0
    return {"lrm_agreement": agree / max(1, total), "lrm_pairs": total,
            "lrm_agreement_real": float(((de * dr) > 0)[keep].float().mean()), "lrm_pairs_real": int(keep.sum())}


def aggregate(tables: list[str], out: Path) -> list[dict]:
    """Mean and sample std over training seeds of each (run, steps) row of several table.json files; a run's seed
    suffix `_s<k>` is dropped so that its seeds pool. Writes seeds.json and seeds.md into `out`."""
    import re

    pooled: dict[tuple[str, int], list[dict]] = {}
    for t in tables:
        for r in json.loads(Path(t).read_text()):
            pooled.setdefault((re.sub(r"_s\d+ ", " ", r["run"]), r["steps"]), []).append(r)
    keys = ("digit_class", "jpeg_compressibility", "fd_digits", "fd_teacher", "lrm_agreement")
    rows = []
    for (run, steps), rs in pooled.items():
        row = {"run": run, "steps": steps, "seeds": len(rs)}
        for k in keys:
            v = np.array([r[k] for r in rs if k in r])
            if len(v):
                row[k] = [float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan")]
        rows.append(row)
    fmt = lambda r, k: "{:.3f} ± {:.3f}".format(*r[k]) if k in r else ""  # noqa: E731
    lines = ["| run | steps | seeds | digit-class | JPEG -kB | FD-digits | FD to teacher | LRM agreement |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['steps']} | {r['seeds']} | {fmt(r, 'digit_class')} | "
              f"{fmt(r, 'jpeg_compressibility')} | {fmt(r, 'fd_digits')} | {fmt(r, 'fd_teacher')} | "
              f"{fmt(r, 'lrm_agreement')} |" for r in rows]
    out.mkdir(parents=True, exist_ok=True)
    (out / "seeds.json").write_text(json.dumps(rows, indent=2))
    (out / "seeds.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


def teacher_samples(run: str, gen, n: int, cfg: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's 50-step DDIM samples, kept in its run folder (eval/) for the next seed's table."""
    from safetensors.torch import load_file, save_file

    path = Path(run) / "eval" / f"ddim50_cfg{cfg:g}_n{n}.safetensors"
    if path.is_file():
        t = load_file(str(path))
        return t["x"], t["y"]
    x, y = samples(gen, 50, n, guidance=cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"x": x.contiguous(), "y": y.contiguous()}, str(path))
    return x, y


def main(argv=None) -> int:
    from cmgen.eval.metrics import mean_confidence_interval
    from cmgen.plots import read_metrics, save_curve, save_grid
    from cmgen.runs import load_model

    if argv is None:
        import sys

        argv = sys.argv[1:]
    if argv and argv[0] == "aggregate":   # python benchmarks/rglcd_digits.py aggregate OUT TABLE.json...
        aggregate(argv[2:], Path(argv[1]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lcd", required=True, help="plain LCD run (the baseline)")
    p.add_argument("--runs", nargs="*", default=[], help="RG-LCD runs to compare")
    p.add_argument("--teacher", help="the ldm teacher run (50-step DDIM reference)")
    p.add_argument("--teacher-cfg", type=float, default=None, help="teacher guidance scale (default: the LCD's)")
    p.add_argument("--steps", type=int, nargs="*", default=[2, 4])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--out", default="runs/rglcd_table")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ref = reference_stats()
    rows, base, teacher_stats = [], {}, None
    lcd = load_model(a.lcd)
    if a.teacher:
        tg = load_model(a.teacher)
        cfg = a.teacher_cfg or lcd.recipe.method.guidance
        x, y = teacher_samples(a.teacher, tg, a.n, cfg)
        r = rewards(x, y)
        teacher_stats = feature_stats(x)   # the distribution LCD distils: FD to it is the note's drift measure
        rows.append({"run": f"{Path(a.teacher).name} (DDIM, cfg {cfg:g})", "steps": 50,
                     **{k: float(v.mean()) for k, v in r.items()}, "fd_digits": fd_digits(x, ref)})
        save_grid(x[:100], out / "teacher_50step.png")
    for run in [a.lcd] + list(a.runs):
        gen = lcd if run == a.lcd else load_model(run)
        m = gen.recipe.method
        label = f"{Path(run).name} ({m.reward_mode}, beta {m.reward_scale if m.reward_mode != 'none' else 0:g})"
        for steps in a.steps:
            x, y = samples(gen, steps, a.n)
            r = rewards(x, y)
            row = {"run": label, "steps": steps, **{k: float(v.mean()) for k, v in r.items()},
                   "fd_digits": fd_digits(x, ref)}
            if teacher_stats is not None:
                row["fd_teacher"] = fd_digits(x, teacher_stats)
            if m.reward_mode == "lrm" and steps == a.steps[0]:
                row |= lrm_agreement(run)
            if run == a.lcd:
                base[steps] = r
            else:
                for k, v in r.items():
                    row[f"{k}_gain_ci95"] = mean_confidence_interval(v - base[steps][k])
            rows.append(row)
            print(json.dumps(row))
            save_grid(x[:100], out / f"{Path(run).name}_{steps}step.png")
        metrics = read_metrics(Path(run) / "metrics.jsonl")
        for key in ("lcd", "reward", "lrm/agree", "lrm/loss"):
            save_curve(metrics, key, out / f"{Path(run).name}_{key.replace('/', '_')}.png", logy=key == "lcd",
                       title=f"{Path(run).name}: {key}")
    (out / "table.json").write_text(json.dumps(rows, indent=2))
    lines = ["| run | steps | digit-class | JPEG -kB | ink | FD-digits | FD to teacher | digit-class gain (95% CI) "
             "| JPEG gain (95% CI) | LRM agreement |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        g = lambda k: ("{:+.4f} [{:+.4f}, {:+.4f}]".format(*r[k]) if k in r else "")  # noqa: E731
        lines.append(f"| {r['run']} | {r['steps']} | {r['digit_class']:.4f} | {r['jpeg_compressibility']:.4f} | "
                     f"{r['ink']:.4f} | {r['fd_digits']:.3f} | {r.get('fd_teacher', float('nan')):.3f} | "
                     f"{g('digit_class_gain_ci95')} | "
                     f"{g('jpeg_compressibility_gain_ci95')} | "
                     f"{'{:.3f} of {}'.format(r['lrm_agreement'], r['lrm_pairs']) if 'lrm_agreement' in r else ''} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
