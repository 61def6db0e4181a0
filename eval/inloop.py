"""The small evaluation the training loop runs every `eval.every` steps.

Each call samples `eval.n` images (seeds 0..n-1, the same every time, so the curve follows
the model and not the noise) for each step count in `eval.steps`, appends one row to
`<run>/eval.jsonl`, redraws `<run>/eval.png` and returns the numbers.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from cmgen.eval.features import FeatureNet, build_feature_net, detect_features
from cmgen.eval.fid import MetricOptions, evaluate_source
from cmgen.eval.refstats import Reference, accumulate, resolve_reference
from cmgen.eval.report import primary_key, save_step_curves
from cmgen.eval.sources import dataset_source, model_source

_NETS: dict = {}
_REFS: dict = {}
REPORTED = ("fd", "precision", "recall", "kid", "swd", "mmd2")


def _feature_net(recipe, shape, device) -> FeatureNet:
    name = recipe.eval.features if recipe.eval.features != "auto" else detect_features(tuple(shape))
    mode = recipe.eval.mode if name == "inception" else "clean"   # eval.mode is Inception's resizing
    key = (name, mode, tuple(shape), str(device))
    if key not in _NETS:
        _NETS[key] = build_feature_net(name, tuple(shape), mode=mode, device=device)
    return _NETS[key]


def _reference(recipe, data, holdout, net: FeatureNet, opts: MetricOptions, out_dir: Path) -> Reference:
    """eval.ref if set; else fresh true-distribution samples (2-D toys), the held-out split, or the training data."""
    key = (str(out_dir), net.id, recipe.eval.ref, recipe.eval.n)
    if key in _REFS:
        return _REFS[key]
    if recipe.eval.ref:
        ref = resolve_reference(recipe.eval.ref, net, n=recipe.eval.n, keep=opts.keep, progress=False)
    elif data.kind == "points" and recipe.data.name == "toy2d":
        ref = resolve_reference(recipe.data.toy, net, n=recipe.eval.n, keep=opts.keep, progress=False)
    else:
        ds, name = (holdout, "held-out split") if holdout is not None and len(holdout) > 1 else (data, "training data")
        src = dataset_source(ds.x, f"{ds.name} {name} ({len(ds)})", ds.kind)
        ref = Reference(accumulate(src, net, opts.keep), {"name": f"{ds.name} {name}", "n": len(ds)})
    _REFS[key] = ref
    return ref


def _append_row(path: Path, row: dict) -> list[dict]:
    """Rows of earlier steps are kept; rows at or after this step (from a crashed, resumed run) are replaced."""
    from cmgen.plots import read_metrics

    rows = [old for old in read_metrics(path) if old.get("step", -1) < row["step"]] + [row]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)
    return rows


def evaluate_during_training(gen, recipe, data, holdout, step: int, out_dir, device="cpu", dist=None) -> dict:
    """Returns {'fd_1step': ..., 'precision_1step': ..., ...} and records it in eval.jsonl / eval.png.

    Every process of a run calls it: each samples its share of eval.n (model_source) and computes the
    same numbers; only the main one (rank 0 of `dist`) writes."""
    out_dir = Path(out_dir)
    e = recipe.eval
    opts = MetricOptions(keep=max(e.n, 2), kid_subsets=50)
    if data.kind == "latent":  # judged on images: the cache's source images, split as the run split its latents
        from cmgen.eval.cli import latent_run_splits

        splits = latent_run_splits(recipe, with_reconstructions=False)
        data, holdout = splits["train"], splits["holdout"]
    net = _feature_net(recipe, data.shape, device)
    ref = _reference(recipe, data, holdout, net, opts, out_dir)
    numbers = {}
    for steps in e.steps:
        src = model_source(gen, gen.times(steps), e.n, seed=0, device=device, progress=False, name=f"step {step}")
        metrics = evaluate_source(src, net, ref, opts)
        numbers |= {f"{k}_{steps}step": metrics[k] for k in REPORTED if metrics.get(k) is not None}
    row = {"step": int(step), "metric": net.metric, "n": e.n, "reference": ref.description.get("name")} | numbers
    if dist is not None and dist.rank != 0:
        return numbers
    rows = _append_row(out_dir / "eval.jsonl", row)
    key = primary_key(net.metric)
    label = "SWD" if key == "swd" else net.metric
    save_step_curves(rows, [f"{key}_{s}step" for s in e.steps], out_dir / "eval.png", label,
                     f"{recipe.name}: {label} vs step (n={e.n}, ref: {row['reference']})")
    return numbers

