"""Precision/recall, KID, SWD, MMD and confidence intervals against brute-force references."""
import numpy as np
import pytest

from cmgen.eval.metrics import (kernel_inception_distance, knn_radii, mean_confidence_interval, mmd2_rbf,
                                mmd2_unbiased_poly, precision_recall, sliced_wasserstein)


def _brute_precision_recall(real, fake, k):
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    def cover(q, s, r):
        d = np.linalg.norm(q[:, None] - s[None], axis=-1)
        return float((d <= r[None]).any(1).mean())

    return cover(fake, real, radii(real)), cover(real, fake, radii(fake))


def test_precision_recall_matches_brute_force():
    g = np.random.default_rng(0)
    real = g.standard_normal((120, 5))
    fake = g.standard_normal((120, 5)) * 1.3 + 0.4
    p, r = precision_recall(real, fake, k=3)
    bp, br = _brute_precision_recall(real, fake, 3)
    assert (p, r) == pytest.approx((bp, br))
    assert 0 < p < 1 and 0 < r < 1


def test_precision_recall_detects_mode_dropping():
    g = np.random.default_rng(1)
    centers = np.array([[0.0, 0.0], [10.0, 0.0]])
    real = np.concatenate([c + 0.3 * g.standard_normal((100, 2)) for c in centers])
    half = centers[0] + 0.3 * g.standard_normal((200, 2))  # only one of the two modes
    p, r = precision_recall(real, half)
    assert p > 0.9 and r < 0.6
    same_p, same_r = precision_recall(real, real)
    assert same_p == 1.0 and same_r == 1.0
    far_p, far_r = precision_recall(real, half + 100.0)
    assert far_p == 0.0 and far_r == 0.0


def test_precision_recall_of_a_class_sorted_reference_use_a_draw_over_all_of_it():
    """sample_metrics makes the two sets equal in size by a seeded draw from the larger, not its first rows: a
    reference kept in class order (a class-sorted folder below --keep) is not cut to its first classes."""
    from cmgen.eval.features import FeatureNet
    from cmgen.eval.fid import MetricOptions, sample_metrics
    from cmgen.eval.frechet import FeatureStats
    from cmgen.eval.refstats import Reference

    g = np.random.default_rng(0)
    centres = g.standard_normal((5, 8)) * 6
    real = centres.repeat(400, 0) + g.standard_normal((2000, 8))           # 5 clusters, sorted
    fake = centres[np.arange(500) % 5] + g.standard_normal((500, 8))       # the same, interleaved
    ref, gen = FeatureStats(), FeatureStats()
    ref.update(real)
    gen.update(fake)
    net = FeatureNet("digits", "FD-test", lambda b: b, 1)
    row = sample_metrics(gen, Reference(ref, {"name": "sorted"}), net, MetricOptions())
    want_p, want_r = precision_recall(real, fake, 3)   # every cluster in both sets
    assert row["pr_n"] == 500 and row["precision"] > 0.6 and abs(row["recall"] - want_r) < 0.1, row
    assert row == sample_metrics(gen, Reference(ref, {"name": "sorted"}), net, MetricOptions())


def test_knn_radii_exclude_the_point_itself():
    x = np.array([[0.0], [1.0], [3.0], [7.0]])
    np.testing.assert_allclose(knn_radii(x, k=1), np.array([1.0, 1.0, 4.0, 16.0]))  # squared distances


def test_kid_agrees_with_cleanfid_kernel_distance():
    from cleanfid.fid import kernel_distance

    g = np.random.default_rng(2)
    a, b = g.standard_normal((80, 16)), g.standard_normal((80, 16)) + 0.3
    # with one subset of every sample the subset draw is only a permutation: both must agree exactly
    ours, _ = kernel_inception_distance(a, b, num_subsets=1, subset_size=80)
    np.random.seed(0)
    theirs = kernel_distance(a, b, num_subsets=1, max_subset_size=80)
    assert ours == pytest.approx(theirs, rel=1e-9)


def test_unbiased_poly_mmd_matches_a_loop():
    g = np.random.default_rng(3)
    x, y = g.standard_normal((12, 4)), g.standard_normal((12, 4)) + 1
    k = lambda a, b: (a @ b / 4 + 1) ** 3
    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    assert mmd2_unbiased_poly(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-9)


def test_kid_is_seeded_and_orders_distributions():
    g = np.random.default_rng(4)
    real = g.standard_normal((400, 8))
    same = g.standard_normal((400, 8))
    moved = g.standard_normal((400, 8)) + 0.5
    a = kernel_inception_distance(real, same, num_subsets=20, subset_size=100, seed=7)
    assert a == kernel_inception_distance(real, same, num_subsets=20, subset_size=100, seed=7)
    b = kernel_inception_distance(real, moved, num_subsets=20, subset_size=100, seed=7)
    assert abs(a[0]) < 3 * a[1] + 1e-3 and b[0] > 10 * max(abs(a[0]), 1e-4)


def test_kid_is_the_mean_and_std_over_subsets_drawn_at_random_from_both_sets():
    g = np.random.default_rng(6)
    real, fake = g.standard_normal((60, 5)), g.standard_normal((50, 5)) + 0.3
    got = kernel_inception_distance(real, fake, num_subsets=6, subset_size=20, seed=3)
    rng = np.random.default_rng(3)   # clean-fid's kernel_distance: a fresh draw of each set per subset, real first
    values = []
    for _ in range(6):
        x = real[rng.choice(60, 20, replace=False)]
        y = fake[rng.choice(50, 20, replace=False)]
        values.append(mmd2_unbiased_poly(x, y))
    assert got == pytest.approx((np.mean(values), np.std(values)), rel=1e-12)


def test_sliced_wasserstein_of_a_translation():
    g = np.random.default_rng(5)
    x = g.standard_normal((2000, 2)) * 0.2
    shift = np.array([0.6, 0.0])
    assert sliced_wasserstein(x, x) == 0.0
    # each projection moves by shift.theta, so SW2^2 = E[(shift.theta)^2] = |shift|^2 / 2 in 2-D
    assert sliced_wasserstein(x, x + shift, num_directions=2000) == pytest.approx(0.6 / np.sqrt(2), rel=0.03)
    # unequal sizes go through quantile functions
    assert sliced_wasserstein(x, x[:500] + shift) == pytest.approx(0.6 / np.sqrt(2), rel=0.1)


def test_mmd_rbf_separates_distributions():
    g = np.random.default_rng(6)
    a, b = g.standard_normal((300, 2)) * 0.3, g.standard_normal((300, 2)) * 0.3
    c = g.standard_normal((300, 2)) * 0.3 + 0.5
    near, far = mmd2_rbf(a, b), mmd2_rbf(a, c)
    assert abs(near) < 0.02 and far > 10 * abs(near)


def test_mean_confidence_interval_is_the_student_t_interval():
    from scipy import stats

    v = np.random.default_rng(7).standard_normal(30) + 2
    mean, low, high = mean_confidence_interval(v)
    lo, hi = stats.t.interval(0.95, len(v) - 1, loc=v.mean(), scale=stats.sem(v))
    assert mean == pytest.approx(v.mean()) and (low, high) == pytest.approx((lo, hi))
