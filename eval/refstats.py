"""Reference statistics: built from a source, saved as .npz (no pickle), resolved from a --ref string.

A statistics file holds mu and sigma (float64), n, up to `keep` feature rows for the
sample-based metrics ('feats'), and a JSON 'protocol' naming the feature space. clean-fid's
own stats files (mu, sigma only) are accepted too.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from cmgen.errors import UserError
from cmgen.eval.features import FeatureNet
from cmgen.eval.frechet import FeatureStats
from cmgen.eval.sources import Source, dataset_source, folder_source, npz_source

NAMED_REFS = ("digits", "cifar10-train", "ring", "moons")
TOY_REF_SEED = 1_000_003   # fresh draws of the true 2-D distribution, never the training seed
TOY_REF_MIN = 5000


@dataclass
class Reference:
    stats: FeatureStats
    description: dict          # name, n, where it came from


def accumulate(source: Source, net: FeatureNet, keep: int = 10000) -> FeatureStats:
    """Features of every batch folded into running moments: the images themselves are dropped at once."""
    if (source.kind == "points") != (net.kind == "points"):
        raise UserError(f"{source.name} holds {source.kind} but --features {net.kind} needs "
                        f"{'points' if net.kind == 'points' else 'images'}; use --features auto")
    stats = FeatureStats(keep=keep)
    for batch in source.batches(net.channels):
        stats.update(net.embed(batch))
    return stats


# ----------------------------------------------------------------------------- files

def save_stats(path, stats: FeatureStats, net: FeatureNet, source_name: str) -> Path:
    path = Path(path)
    if path.suffix != ".npz":
        raise UserError(f"--out '{path}' must end in .npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    protocol = dict(net.protocol, metric=net.metric, feature_id=net.id, n=stats.n, source=source_name)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez_compressed(tmp, mu=stats.mean, sigma=stats.cov, n=np.asarray(stats.n), feats=stats.kept,
                        protocol=np.asarray(json.dumps(protocol)))
    os.replace(tmp, path)
    return path


def is_stats_file(path) -> bool:
    try:
        with np.load(path, allow_pickle=False) as z:
            return "mu" in z.files and "sigma" in z.files
    except zipfile.BadZipFile:   # an .npz cut short: neither statistics nor samples can be read from it
        raise UserError(f"'{path}' is not a readable .npz (it may be truncated); write it again (`cmgen eval "
                        "ref-stats`, `cmgen sample --out X.npz`) or pass another file") from None
    except (OSError, ValueError):
        return False


def load_stats(path, net: FeatureNet) -> Reference:
    """A saved statistics file; its feature space must be the one in use."""
    try:
        with np.load(path, allow_pickle=False) as z:
            mu, sigma = z["mu"], z["sigma"]
            protocol = json.loads(str(z["protocol"])) if "protocol" in z.files else None
            n = int(z["n"]) if "n" in z.files else None
            feats = z["feats"] if "feats" in z.files else None
    except (zipfile.BadZipFile, OSError, KeyError, ValueError, EOFError) as exc:
        raise UserError(f"--ref '{path}' is not a readable statistics file ({type(exc).__name__}); rebuild it with "
                        "`cmgen eval ref-stats`") from None
    if protocol is not None and protocol.get("feature_id") != net.id:
        raise UserError(f"--ref '{path}' was computed with features '{protocol.get('feature_id')}' but this "
                        f"evaluation uses '{net.id}'; rebuild it with `cmgen eval ref-stats` and the same --features")
    dim = net.protocol.get("dim")
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size) or (dim and mu.size != dim):
        raise UserError(f"--ref '{path}' holds {mu.size}-dimensional statistics, the {net.kind} features are "
                        f"{dim}-dimensional; pass statistics built with the same --features")
    stats = FeatureStats.from_moments(mu, sigma, n or 2, feats)
    desc = {"name": str(path), "n": n, "protocol": protocol or "not recorded (e.g. a clean-fid stats file)"}
    return Reference(stats, desc)


# ----------------------------------------------------------------------------- --ref

def _cached_named(name: str, net: FeatureNet, build, keep: int) -> Reference:
    """Named references over large sets are computed once per feature space and cached in $CMGEN_CACHE."""
    from cmgen.eval.digits_net import cache_dir
    from cmgen.eval.frechet import SUBSAMPLE_SEED

    # the kept-row policy is part of the key: caches from before the seeded draw are not reused
    key = hashlib.sha1(f"{net.id}|keep={keep}|reservoir-seed{SUBSAMPLE_SEED}".encode()).hexdigest()[:12]
    path = cache_dir() / "refstats" / f"{name}-{net.kind}-{key}.npz"
    if path.is_file():
        ref = load_stats(path, net)
        ref.description["name"] = f"{name} (cached {path})"
        return ref
    source = build()
    stats = accumulate(source, net, keep)
    save_stats(path, stats, net, source.name)
    return Reference(stats, {"name": name, "n": stats.n, "source": source.name})


def _cleanfid_published(net: FeatureNet) -> Optional[Path]:
    """clean-fid's published CIFAR-10 train statistics, if the user placed them in clean-fid's stats folder."""
    if net.kind != "inception" or net.protocol.get("warning"):
        return None
    import cleanfid

    path = Path(cleanfid.__file__).parent / "stats" / f"cifar10_{net.protocol['mode']}_train_32.npz"
    return path if path.is_file() else None


def named_source(name: str, batch_size: int = 256, n: Optional[int] = None, progress: bool = False) -> Source:
    from cmgen.data import cifar10, load_digits, toy2d

    if name == "digits":
        d = load_digits()
        return dataset_source(d.x, "digits (all 1797 scikit-learn digits)", "image", batch_size, progress=progress)
    if name == "cifar10-train":
        d = cifar10(None)
        return dataset_source(d.x, "cifar10-train (50000 images)", "image", batch_size, progress=progress)
    if name in ("ring", "moons"):
        count = max(n or 0, TOY_REF_MIN)
        d = toy2d(name, count, TOY_REF_SEED)
        return dataset_source(d.x, f"{name}: {count} fresh samples of the true distribution (seed {TOY_REF_SEED})",
                              "points", batch_size)
    raise UserError(f"--ref '{name}' is not a named reference ({', '.join(NAMED_REFS)}), a folder or a file")


def resolve_reference(ref: str, net: FeatureNet, *, n: Optional[int] = None, keep: int = 10000,
                      batch_size: int = 256, progress: bool = True) -> Reference:
    """--ref: a named reference, a statistics file, an .npz of samples, or a folder of images."""
    p = Path(ref).expanduser()
    if ref in NAMED_REFS and not p.exists():
        if ref == "cifar10-train":
            published = _cleanfid_published(net)
            if published is not None:
                ref_obj = load_stats(published, net)
                ref_obj.description["name"] = f"cifar10-train (clean-fid's published statistics {published})"
                return ref_obj
            return _cached_named(ref, net, lambda: named_source(ref, batch_size, progress=progress), keep)
        source = named_source(ref, batch_size, n, progress)
    elif p.is_file():
        if is_stats_file(p):
            return load_stats(p, net)
        source = npz_source(p, batch_size)
    elif p.is_dir():
        source = folder_source(p, batch_size, progress)
    else:
        raise UserError(f"--ref '{ref}' is not a named reference ({', '.join(NAMED_REFS)}), an existing folder of "
                        "images, an .npz of samples or a statistics file from `cmgen eval ref-stats`")
    stats = accumulate(source, net, keep)
    return Reference(stats, {"name": ref, "n": stats.n, "source": source.name})


def default_ref_for(recipe) -> str:
    """The reference a run is compared with when --ref is not given: recipe eval.ref, else its data."""
    if recipe.eval.ref:
        return recipe.eval.ref
    d = recipe.data
    if d.name == "digits":
        return "digits"
    if d.name == "toy2d":
        return d.toy
    if d.name == "cifar10":
        return "cifar10-train"
    if d.name == "folder" and d.path:
        return d.path
    raise UserError(f"the run's data ('{d.name}') have no reference to compare with; pass --ref "
                    f"({', '.join(NAMED_REFS)}, a folder of images or a statistics file)")
