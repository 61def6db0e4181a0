"""Frechet distance between Gaussians fitted to features, and streaming feature statistics.

Everything is float64. The matrix square root goes through symmetric eigendecompositions
(numpy `eigh`/`eigvalsh`), so no scipy option (e.g. `sqrtm(disp=)`, removed in scipy 1.18) is used.
"""
from __future__ import annotations

from typing import Optional

import numpy as np


def _symmetric(a: np.ndarray) -> np.ndarray:
    return (a + a.T) / 2


def psd_sqrt(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (tiny negative eigenvalues from rounding -> 0)."""
    vals, vecs = np.linalg.eigh(_symmetric(np.asarray(a, np.float64)))
    return (vecs * np.sqrt(vals.clip(min=0.0))) @ vecs.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((S1 S2)^1/2) = Tr((S1^1/2 S2 S1^1/2)^1/2): S1 S2 is similar to the symmetric PSD middle matrix."""
    root1 = psd_sqrt(sigma1)
    middle = _symmetric(root1 @ np.asarray(sigma2, np.float64) @ root1)
    return float(np.sqrt(np.linalg.eigvalsh(middle).clip(min=0.0)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Frechet (2-Wasserstein) distance between N(mu1, S1) and N(mu2, S2).

    Heusel et al. 2017, eq. (6): ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"feature statistics do not match: means {mu1.shape} vs {mu2.shape}, "
                         f"covariances {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    return max(0.0, float(value))  # >= 0 by definition; rounding can leave -1e-12 for identical sets


SUBSAMPLE_SEED = 0


class FeatureStats:
    """Mean and covariance of features accumulated batch by batch, plus a seeded uniform random
    subset of at most `keep` features.

    The batches are merged with the pairwise update of Chan, Golub & LeVeque (1979), which
    avoids the cancellation of the sum-of-squares formula. The kept features serve the
    metrics that need samples rather than moments (precision/recall, KID, SWD, MMD). They are a
    reservoir sample (Vitter's algorithm R) drawn with a generator seeded by `seed`: every row of
    the stream is kept with probability keep / n, so a class-sorted folder is covered evenly, and
    the same stream always keeps the same rows.
    """

    def __init__(self, keep: int = 10000, seed: int = SUBSAMPLE_SEED):
        self.keep = int(keep)
        self.seed = int(seed)
        self.n = 0
        self._mean: Optional[np.ndarray] = None
        self._m2: Optional[np.ndarray] = None   # sum of outer products of deviations from the mean
        self._kept: list[np.ndarray] = []
        self._n_kept = 0
        self._rng = np.random.default_rng(seed)

    def update(self, feats) -> None:
        f = np.asarray(feats, np.float64)
        if f.ndim != 2 or len(f) == 0:
            raise ValueError(f"features must be a non-empty [batch, dim] array, got shape {f.shape}")
        b = len(f)
        mean_b = f.mean(0)
        dev = f - mean_b
        m2_b = dev.T @ dev
        if self.n == 0:
            self._mean, self._m2 = mean_b, m2_b
        else:
            if f.shape[1] != self._mean.size:
                raise ValueError(f"feature dimension changed from {self._mean.size} to {f.shape[1]}")
            total = self.n + b
            delta = mean_b - self._mean
            self._mean = self._mean + delta * (b / total)
            self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (self.n * b / total)
        first = self.n  # stream index of this batch's first row
        self.n += b
        self._reservoir(f, first)

    def _reservoir(self, f: np.ndarray, first: int) -> None:
        fill = min(len(f), max(0, self.keep - self._n_kept))
        if fill:
            self._kept.append(f[:fill].astype(np.float32))
            self._n_kept += fill
        if fill == len(f) or self.keep == 0:
            return
        # row with stream index i >= keep replaces slot j ~ U{0..i} when j < keep
        idx = np.arange(first + fill, first + len(f))
        slots = self._rng.integers(0, idx + 1)
        kept = self.kept
        for row, slot in zip(range(fill, len(f)), slots):
            if slot < self.keep:
                kept[slot] = f[row]

    @property
    def dim(self) -> int:
        return 0 if self._mean is None else self._mean.size

    @property
    def mean(self) -> np.ndarray:
        self._need_data()
        return self._mean

    @property
    def cov(self) -> np.ndarray:
        """Unbiased sample covariance (the n - 1 normalisation of np.cov)."""
        self._need_data()
        if self.n < 2:
            raise ValueError("a covariance needs at least 2 samples")
        return self._m2 / (self.n - 1)

    @property
    def kept(self) -> np.ndarray:
        if not self._kept:
            return np.zeros((0, self.dim), np.float32)
        if len(self._kept) > 1:
            self._kept = [np.concatenate(self._kept)]
        return self._kept[0]

    def _need_data(self) -> None:
        if self.n == 0:
            raise ValueError("no features were accumulated")

    @classmethod
    def from_moments(cls, mean, cov, n: int, kept=None) -> "FeatureStats":
        """Statistics loaded from a file: moments, and optionally a feature subset."""
        s = cls(keep=0 if kept is None else len(kept))
        s.n = int(n)
        s._mean = np.asarray(mean, np.float64)
        s._m2 = np.asarray(cov, np.float64) * max(1, s.n - 1)
        if kept is not None and len(kept):
            s._kept, s._n_kept = [np.asarray(kept, np.float32)], len(kept)
        return s


def fd_between(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(a.mean, a.cov, b.mean, b.cov)
