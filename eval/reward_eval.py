"""`cmgen eval reward`: a reward's mean with a 95% interval, and how far a tuned model moved from its base.

One pass over the samples computes both the per-image rewards and (with a base) the
features whose Frechet distance to the base model's samples measures the shift.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from cmgen.eval.features import FeatureNet
from cmgen.eval.frechet import FeatureStats, fd_between
from cmgen.eval.metrics import mean_confidence_interval
from cmgen.eval.rewards import Reward
from cmgen.eval.sources import Source, _as_channels


def score_source(source: Source, reward: Reward, net: Optional[FeatureNet] = None,
                 keep: int = 0) -> tuple[np.ndarray, Optional[FeatureStats]]:
    """Per-image rewards, and feature statistics when `net` is given (images are dropped batch by batch)."""
    if source.kind != "image":
        from cmgen.errors import UserError
        raise UserError(f"--reward {reward.name} scores images, but {source.name} holds points")
    values, stats = [], (FeatureStats(keep) if net is not None else None)
    for batch in source.batches(0):
        values.append(np.asarray(reward.fn(batch), np.float64))
        if stats is not None:
            stats.update(net.embed(_as_channels(batch, net.channels)))
    return np.concatenate(values), stats


def reward_row(label: str, values: np.ndarray, extra: Optional[dict] = None) -> dict:
    mean, low, high = mean_confidence_interval(values)
    return {"model": label, **(extra or {}), "n": int(len(values)), "mean": mean, "ci95_low": low,
            "ci95_high": high, "std": float(values.std(ddof=1)) if len(values) > 1 else None}


def shift_fields(tuned: dict, base: dict, tuned_stats: FeatureStats, base_stats: FeatureStats, metric: str) -> dict:
    return {"delta_vs_base": tuned["mean"] - base["mean"], "fd_to_base": fd_between(tuned_stats, base_stats),
            "fd_metric": metric}


def to_markdown(rows: list[dict], reward: Reward, protocol: dict) -> str:
    has_shift = any("fd_to_base" in r for r in rows)
    metric = next((r["fd_metric"] for r in rows if "fd_metric" in r), "FD")
    head = ["model", "steps", "NFE", "n", f"{reward.name} mean", "95% CI"]
    head += ["Δ vs base", f"{metric} to base"] if has_shift else []
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]

    def g(v, d=4):
        return "-" if v is None else (str(v) if isinstance(v, int) else f"{v:.{d}g}")

    for r in rows:
        cells = [r["model"], g(r.get("steps")), g(r.get("nfe")), g(r["n"]), g(r["mean"]),
                 f"[{g(r['ci95_low'])}, {g(r['ci95_high'])}]"]
        if has_shift:
            cells += [g(r.get("delta_vs_base")), g(r.get("fd_to_base"))]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"- reward: {reward.name}: {reward.description}"]
    lines += [f"- {k}: {v}" for k, v in protocol.items()]
    return "\n".join(lines) + "\n"


def write_reward_report(rows: list[dict], reward: Reward, protocol: dict, out_dir) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"reward-{reward.name}"
    js, md = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    js.write_text(json.dumps({"reward": reward.name, "description": reward.description, "details": reward.details,
                              "protocol": protocol, "rows": rows}, indent=2) + "\n")
    md.write_text(to_markdown(rows, reward, protocol))
    return [js, md]
