"""The Frechet distance against clean-fid and independent computations; streaming statistics."""
import warnings

import numpy as np
import pytest
import scipy.linalg

from cmgen.eval.frechet import FeatureStats, fd_between, frechet_distance, trace_sqrt_product


def _features(seed, n=400, d=32, shift=0.0, scale=1.0):
    g = np.random.default_rng(seed)
    mix = g.standard_normal((d, d)) / np.sqrt(d)
    return (g.standard_normal((n, d)) @ mix) * scale + shift


def _moments(f):
    return f.mean(0), np.cov(f, rowvar=False)


def test_agrees_with_cleanfid_frechet_distance():
    from cleanfid.fid import frechet_distance as cleanfid_fd

    a, b = _features(0), _features(1, shift=0.3, scale=1.2)
    ours = frechet_distance(*_moments(a), *_moments(b))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's sqrtm(disp=) deprecation inside clean-fid
        theirs = cleanfid_fd(*_moments(a), *_moments(b))
    assert ours > 1.0
    assert ours == pytest.approx(float(theirs), rel=1e-6)


def test_agrees_with_scipy_sqrtm_of_the_product():
    a, b = _features(2, d=16), _features(3, d=16, shift=-0.5, scale=0.7)
    (m1, s1), (m2, s2) = _moments(a), _moments(b)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    independent = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(independent, rel=1e-6)


def test_closed_form_for_diagonal_gaussians():
    # commuting covariances: Tr((S1 S2)^1/2) = sum sqrt(a_i b_i), so FD = |dmu|^2 + sum (sqrt a - sqrt b)^2
    g = np.random.default_rng(4)
    a, b = g.uniform(0.1, 3, 10), g.uniform(0.1, 3, 10)
    m1, m2 = g.standard_normal(10), g.standard_normal(10)
    expected = ((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_identity_translation_and_symmetry():
    (m, s), (m2, s2) = _moments(_features(5)), _moments(_features(6))
    assert frechet_distance(m, s, m, s) == pytest.approx(0.0, abs=1e-9)
    shift = np.full_like(m, 0.25)
    assert frechet_distance(m, s, m + shift, s) == pytest.approx((shift ** 2).sum(), rel=1e-8)
    assert frechet_distance(m, s, m2, s2) == pytest.approx(frechet_distance(m2, s2, m, s), rel=1e-9)


def test_singular_covariances_stay_finite():
    # fewer samples than dimensions: rank-deficient covariances, where sqrtm of the product is ill-posed
    a, b = _features(7, n=10, d=40), _features(8, n=10, d=40, shift=1.0)
    (m1, s1), (m2, s2) = _moments(a), _moments(b)
    v = frechet_distance(m1, s1, m2, s2)
    assert np.isfinite(v) and v > 40 * 0.9  # the mean shift alone is 40 * 1.0^2
    # the eigen route agrees with the direct definition on rank-deficient inputs too
    assert trace_sqrt_product(s1, s2) == pytest.approx(np.trace(scipy.linalg.sqrtm(s1 @ s2)).real, rel=1e-5)


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_streaming_statistics_equal_the_batch_ones():
    f = _features(9, n=257, d=12, shift=1e4)  # a large offset: the naive sum-of-squares formula loses digits here
    stats = FeatureStats(keep=100)
    for start, stop in [(0, 1), (1, 50), (50, 51), (51, 200), (200, 257)]:
        stats.update(f[start:stop])
    assert stats.n == 257
    np.testing.assert_allclose(stats.mean, f.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(f, rowvar=False), rtol=1e-8, atol=1e-10)
    once = FeatureStats(keep=100)
    once.update(f)
    np.testing.assert_array_equal(stats.kept, once.kept)  # the kept draw does not depend on the batching
    rows = {r.tobytes() for r in f.astype(np.float32)}
    assert len({r.tobytes() for r in stats.kept}) == 100 and all(r.tobytes() in rows for r in stats.kept)


def test_fd_between_stats_matches_cleanfid_on_features():
    from cleanfid.fid import fid_from_feats

    a, b = _features(10, n=300, d=20), _features(11, n=350, d=20, scale=1.5)
    sa, sb = FeatureStats(), FeatureStats()
    for chunk in np.array_split(a, 7):
        sa.update(chunk)
    for chunk in np.array_split(b, 3):
        sb.update(chunk)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = fid_from_feats(a, b)
    assert fd_between(sa, sb) == pytest.approx(float(theirs), rel=1e-6)


def test_kept_features_are_a_seeded_uniform_draw_not_the_first_rows():
    from cmgen.eval.frechet import FeatureStats

    # a class-sorted stream: 10 classes of 100 rows each, feature 0 = class, feature 1 = row index
    rows = np.stack([np.repeat(np.arange(10), 100), np.arange(1000)], 1).astype(np.float64)

    def kept(batch, seed=0):
        st = FeatureStats(keep=100, seed=seed)
        for i in range(0, len(rows), batch):
            st.update(rows[i:i + batch])
        return st.kept

    a = kept(64)
    assert a.shape == (100, 2) and len(np.unique(a[:, 1])) == 100  # distinct rows of the stream
    assert set(np.unique(a[:, 0]).astype(int)) == set(range(10))   # every class, not the first one
    assert 350 < a[:, 1].mean() < 650                               # uniform over the stream
    assert np.array_equal(a, kept(64)) and np.array_equal(a, kept(256))  # seeded; batching does not matter
    assert not np.array_equal(a, kept(64, seed=1))
    few = FeatureStats(keep=100)
    few.update(rows[:30])
    assert np.array_equal(few.kept, rows[:30].astype(np.float32))   # fewer rows than keep: all of them
