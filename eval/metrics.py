"""Sample-based metrics next to the Frechet distance: precision/recall, KID, SWD, MMD, confidence intervals."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch


def uniform_rows(x, m: int, rng: np.random.Generator):
    """m rows of `x` (array, tensor) drawn uniformly without replacement, kept in their order; `x` itself when
    it has no more. A set whose rows come sorted (by class, by folder) is not cut to its first groups."""
    if len(x) <= m:
        return x
    return x[np.sort(rng.choice(len(x), m, replace=False))]


def _pairwise_sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a_i - b_j||^2 in float64 through the Gram matrix (clamped at 0 against rounding)."""
    return ((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T).clamp_(min=0.0)


def knn_radii(feats: np.ndarray, k: int = 3, block: int = 1024) -> np.ndarray:
    """Squared distance from each point to its k-th nearest neighbour in the same set (itself excluded)."""
    x = torch.as_tensor(np.asarray(feats), dtype=torch.float64)
    if len(x) <= k:
        raise ValueError(f"k-NN radii with k={k} need more than {k} points, got {len(x)}")
    out = []
    for start in range(0, len(x), block):
        d = _pairwise_sq_dists(x[start:start + block], x)
        out.append(d.kthvalue(k + 1, dim=1).values)  # the (k+1)-th smallest is the k-th neighbour: 0 is the point itself
    return torch.cat(out).numpy()


def _coverage(queries: np.ndarray, support: np.ndarray, radii: np.ndarray, block: int = 1024) -> float:
    """Fraction of `queries` inside at least one ball B(support_j, radius_j)."""
    q = torch.as_tensor(np.asarray(queries), dtype=torch.float64)
    s = torch.as_tensor(np.asarray(support), dtype=torch.float64)
    r = torch.as_tensor(radii, dtype=torch.float64)
    inside = 0
    for start in range(0, len(q), block):
        d = _pairwise_sq_dists(q[start:start + block], s)
        inside += int((d <= r[None, :]).any(1).sum())
    return inside / len(q)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, eqs. 1-3) with k-NN manifolds.

    precision: share of generated samples inside the real manifold; recall: share of real
    samples inside the generated manifold.
    """
    precision = _coverage(fake, real, knn_radii(real, k))
    recall = _coverage(real, fake, knn_radii(fake, k))
    return precision, recall


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** 3  # k(x, y) = (x.y / d + 1)^3 (Binkowski et al. 2018)


def mmd2_unbiased_poly(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel (Binkowski et al. 2018, eq. 3 with equal sizes m)."""
    m = len(x)
    kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    off = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(off - 2.0 * kxy.sum() / (m * m))


def kernel_inception_distance(real: np.ndarray, fake: np.ndarray, num_subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID: mean and std of the unbiased polynomial MMD^2 over random subsets (seeded, no global RNG)."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    m = min(len(real), len(fake), subset_size)
    if m < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_subsets):
        x = real[rng.choice(len(real), m, replace=False)]
        y = fake[rng.choice(len(fake), m, replace=False)]
        values.append(mmd2_unbiased_poly(x, y))
    return float(np.mean(values)), float(np.std(values))


def random_directions(dim: int, count: int, seed: int = 0) -> np.ndarray:
    g = np.random.default_rng(seed)
    v = g.standard_normal((count, dim))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _quantiles(values: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Empirical quantile function of each column at `levels` (exact order statistics for equal sizes)."""
    s = np.sort(values, axis=0)
    n = len(s)
    idx = np.minimum((levels * n).astype(np.int64), n - 1)
    return s[idx]


def sliced_wasserstein(x: np.ndarray, y: np.ndarray, num_directions: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance (Rabin et al. 2011; Bonneel et al. 2015): sqrt of the mean over
    random unit directions of W2^2 between the 1-D projections, from their quantile functions."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    dirs = random_directions(x.shape[1], num_directions, seed)
    px, py = x @ dirs.T, y @ dirs.T
    n = max(len(x), len(y))
    levels = (np.arange(n) + 0.5) / n
    diff = _quantiles(px, levels) - _quantiles(py, levels)
    return float(np.sqrt((diff ** 2).mean()))


def mmd2_rbf(x: np.ndarray, y: np.ndarray, bandwidths: Sequence[float] = (0.05, 0.1, 0.2, 0.5, 1.0)) -> float:
    """Unbiased MMD^2 (Gretton et al. 2012, eq. 3) with a sum of Gaussian kernels exp(-|a-b|^2 / (2 h^2))."""
    x = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(y), dtype=torch.float64)
    n, m = len(x), len(y)
    dxx, dyy, dxy = _pairwise_sq_dists(x, x), _pairwise_sq_dists(y, y), _pairwise_sq_dists(x, y)
    total = 0.0
    for h in bandwidths:
        kxx, kyy, kxy = (torch.exp(-d / (2 * h * h)) for d in (dxx, dyy, dxy))
        total += float((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
                       + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1)) - 2 * kxy.mean())
    return total


def mean_confidence_interval(values, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval for the mean of i.i.d. values."""
    from scipy import stats

    v = np.asarray(values, np.float64)
    mean = float(v.mean())
    if len(v) < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return mean, mean - half, mean + half
