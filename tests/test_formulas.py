"""Every iCT formula against its definition (Song & Dhariwal 2023; EDM; CM)."""
import math

import pytest
import torch
from torch import nn

from cmgen.losses import ict_huber_c, pseudo_huber
from cmgen.precond import ConsistencyDenoiser, PrecondConfig, c_in, c_noise, c_out, c_skip
from cmgen.schedules import ict_curriculum, ict_stage_length, karras_sigmas, lognormal_index_probs


class _Wild(nn.Module):
    """A backbone with large, input-dependent outputs: the boundary must hold regardless."""

    def forward(self, x, t, labels=None):
        return 100 * torch.sin(x * 3 + t.view(-1, *[1] * (x.ndim - 1)))


def test_boundary_condition_f_at_sigma_min_is_identity():
    f = ConsistencyDenoiser(_Wild(), PrecondConfig())
    x = torch.randn(5, 1, 8, 8)
    out = f(x, torch.full((5,), 0.002))
    assert torch.equal(out, x)
    # and away from the boundary the network matters
    assert not torch.allclose(f(x, torch.full((5,), 0.5)), x)


def test_scalings_match_their_definitions():
    s = torch.tensor([0.002, 0.1, 1.0, 80.0], dtype=torch.float64)
    sd, smin = 0.5, 0.002
    assert torch.allclose(c_skip(s, smin, sd), sd**2 / ((s - smin) ** 2 + sd**2))
    assert torch.allclose(c_out(s, smin, sd), (s - smin) * sd / torch.sqrt(s**2 + sd**2))
    assert torch.allclose(c_in(s, sd), 1 / torch.sqrt(s**2 + sd**2))
    assert c_skip(s, smin, sd)[0] == 1 and c_out(s, smin, sd)[0] == 0


def test_c_noise_is_the_diffusers_convention():
    from diffusers import CMStochasticIterativeScheduler

    sched = CMStochasticIterativeScheduler(num_train_timesteps=40)
    sig = torch.tensor(sched.sigmas[:-1].tolist())
    assert torch.allclose(c_noise(sig), torch.as_tensor(sched.sigma_to_t(sig.numpy())).float(), rtol=1e-5)


def test_karras_grid_is_ascending_with_exact_ends():
    s = karras_sigmas(11)
    assert s[0].item() == pytest.approx(0.002, rel=1e-12) and s[-1].item() == pytest.approx(80.0, rel=1e-12)
    assert torch.all(s[1:] > s[:-1])
    i = 4  # sigma_i = (smin^(1/rho) + i/(N-1) (smax^(1/rho) - smin^(1/rho)))^rho
    assert s[i].item() == pytest.approx((0.002 ** (1 / 7) + i / 10 * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7)


@pytest.mark.parametrize("K,expected_kprime", [(400_000, 50_000), (800_000, 100_000), (3000, 375)])
def test_curriculum_stage_length(K, expected_kprime):
    assert ict_stage_length(K, 10, 1280) == expected_kprime == math.floor(K / (math.log2(1280 // 10) + 1))


def test_curriculum_values_at_stage_boundaries():
    K = 400_000
    for stage in range(8):
        first, last = stage * 50_000, (stage + 1) * 50_000 - 1
        want = min(10 * 2**stage, 1280) + 1
        assert ict_curriculum(first, K) == want
        assert ict_curriculum(last, K) == want
    assert [ict_curriculum(k * 50_000, K) for k in range(8)] == [11, 21, 41, 81, 161, 321, 641, 1281]
    assert ict_curriculum(10**7, K) == 1281  # capped at s1 + 1
    # a capped short run: K = 3000, s1 = 160 -> K' = floor(3000 / 5) = 600
    assert [ict_curriculum(k, 3000, 10, 160) for k in (0, 599, 600, 1200, 2400, 2999)] == [11, 11, 21, 41, 161, 161]


def test_index_probabilities_sum_to_one_and_peak_where_the_note_says():
    for n in (11, 21, 161, 1281):
        s = karras_sigmas(n)
        p = lognormal_index_probs(s)
        assert p.shape == (n - 1,)
        assert p.sum().item() == pytest.approx(1.0, abs=1e-12)
        assert torch.all(p > 0)
    # N = 11: the indices whose (teacher) sigma_i is in ~[0.017, 0.32] carry about 64% of the mass
    s = karras_sigmas(11)
    p = lognormal_index_probs(s)
    band = (s[:-1] >= 0.015) & (s[:-1] <= 0.33)
    assert p[band].sum().item() == pytest.approx(0.64, abs=0.03)
    # N = 1281: the density per unit log-sigma peaks near sigma = exp(P_mean) ~ 0.33 and mass per
    # interval peaks near sigma ~ 0.19 (the Karras spacing grows with sigma)
    s = karras_sigmas(1281)
    p = lognormal_index_probs(s)
    peak = s[p.argmax()].item()
    assert 0.12 < peak < 0.3
    # and it is the lognormal mass: compare to a direct CDF difference
    cdf = lambda v: 0.5 * (1 + math.erf((math.log(v) + 1.1) / (2.0 * math.sqrt(2))))
    i = 700
    raw = cdf(s[i + 1].item()) - cdf(s[i].item())
    total = cdf(80.0) - cdf(0.002)
    assert p[i].item() == pytest.approx(raw / total, rel=1e-9)


def test_pseudo_huber_constant_and_per_sample_norm():
    assert ict_huber_c(3 * 32 * 32) == pytest.approx(0.0299, abs=5e-5)
    assert ict_huber_c(3 * 64 * 64) == pytest.approx(0.0599, abs=5e-5)
    a, b = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    c = 0.1
    want = torch.sqrt(((a - b) ** 2).flatten(1).sum(1) + c * c) - c
    got = pseudo_huber(a, b, c)
    assert got.shape == (4,)
    assert torch.allclose(got, want)
    elementwise = (torch.sqrt((a - b) ** 2 + c * c) - c).flatten(1).sum(1)
    assert not torch.allclose(got, elementwise)  # the norm is over the whole sample, not per element
