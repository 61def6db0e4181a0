"""The evaluation harness: samples -> streamed features -> FD, precision/recall, KID (or SWD/MMD for points)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from cmgen.eval.features import FeatureNet
from cmgen.eval.frechet import FeatureStats, fd_between
from cmgen.eval.metrics import (kernel_inception_distance, mmd2_rbf, precision_recall, sliced_wasserstein,
                                uniform_rows)
from cmgen.eval.refstats import Reference, accumulate
from cmgen.eval.sources import Source

DEFAULT_N = {"inception": 50000, "clip": 50000, "digits": 2000, "points": 5000}
MMD_MAX = 2000      # points per set for the O(n^2) MMD


@dataclass
class MetricOptions:
    keep: int = 10000               # features kept per set for precision/recall and KID
    k: int = 3                      # k-NN of improved precision/recall
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    seed: int = 0                   # subset and projection draws
    swd_directions: int = 256


@dataclass
class Table:
    metric: str                     # FID, FD-digits, FD-CLIP, FD-points
    protocol: dict
    rows: list[dict] = field(default_factory=list)


def sample_metrics(stats: FeatureStats, ref: Reference, net: FeatureNet, opts: MetricOptions) -> dict:
    """All numbers for one set of samples against the reference."""
    row = {"n": stats.n, "fd": fd_between(stats, ref.stats)}
    fake, real = stats.kept, ref.stats.kept
    m = min(len(fake), len(real))
    rng = np.random.default_rng(opts.seed)   # equal-sized sets: a seeded draw from the larger, not its first rows
    if m > opts.k:
        row["precision"], row["recall"] = precision_recall(uniform_rows(real, m, rng), uniform_rows(fake, m, rng),
                                                           opts.k)
        row["pr_n"] = m
    else:
        row["precision"] = row["recall"] = None  # e.g. a reference file without feature rows
    if net.kind == "points":
        row["swd"] = sliced_wasserstein(fake, real, opts.swd_directions, opts.seed) if m else None
        row["mmd2"] = mmd2_rbf(uniform_rows(fake, MMD_MAX, rng), uniform_rows(real, MMD_MAX, rng)) if m > 1 else None
    elif m > 1:
        row["kid"], row["kid_std"] = kernel_inception_distance(real, fake, opts.kid_subsets, opts.kid_subset_size,
                                                               opts.seed)
    else:
        row["kid"] = row["kid_std"] = None
    return row


def evaluate_source(source: Source, net: FeatureNet, ref: Reference, opts: MetricOptions) -> dict:
    return sample_metrics(accumulate(source, net, opts.keep), ref, net, opts)


def protocol_of(net: FeatureNet, ref: Reference, n: int, extra: Optional[dict] = None,
                keep: Optional[int] = None) -> dict:
    from cmgen.eval.frechet import SUBSAMPLE_SEED

    p = {"metric": net.metric, **{k: v for k, v in net.protocol.items()}, "n": n, "reference": ref.description}
    p.setdefault("mode", "n/a")
    if keep is not None:
        p["subsample"] = {"keep": keep, "seed": SUBSAMPLE_SEED}
    return p | (extra or {})


def evaluate_model_steps(gen, steps_list: Sequence[int], n: int, net: FeatureNet, ref: Reference,
                         opts: MetricOptions, *, sampler: Optional[str] = None, guidance: float = 1.0, seed: int = 0,
                         batch_size: int = 256, device="cpu", progress: bool = True,
                         extra_protocol: Optional[dict] = None) -> Table:
    """One row per step count, with the sampler's network evaluations (NFE) beside it."""
    from cmgen.eval.sources import model_source

    spec = gen.sampler(sampler)
    extra = {"samples": f"{gen.source}", "seed": seed, "sampler": spec.name} | (extra_protocol or {})
    if guidance != 1.0:
        extra["guidance"] = guidance
    table = Table(net.metric, protocol_of(net, ref, n, extra, keep=opts.keep))
    for steps in steps_list:
        times = gen.times(steps, spec.name)
        src = model_source(gen, times, n, sampler=spec.name, guidance=guidance, seed=seed, batch_size=batch_size,
                           device=device, progress=progress, name=str(gen.source))
        row = {"steps": steps, "nfe": gen.nfe(times, spec.name, guidance), "sigmas": [float(s) for s in times]}
        table.rows.append(row | evaluate_source(src, net, ref, opts))
    return table


def evaluate_samples(source: Source, net: FeatureNet, ref: Reference, opts: MetricOptions) -> Table:
    """Samples made elsewhere (a folder or an .npz): one row, steps unknown."""
    table = Table(net.metric, protocol_of(net, ref, source.n, {"samples": source.name}, keep=opts.keep))
    table.rows.append({"steps": None, "nfe": None} | evaluate_source(source, net, ref, opts))
    return table
