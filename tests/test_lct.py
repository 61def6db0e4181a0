"""Latent CT (Dao et al. 2025): Cauchy loss and its reduction, adaptive c, the low-noise diffusion
loss and its mask, OT pairing, and the loss wiring against a hand computation."""
import math

import numpy as np
import pytest
import torch

from cmgen.methods import Batch
from cmgen.methods.lct import adaptive_c, cauchy, ot_pairing, pseudo_huber_mean
from cmgen.rng import BatchRNG, keyed_generator
from cmgen.schedules import karras_sigmas, lognormal_index_probs


def _method(overrides=(), shape=(4, 4, 4)):
    from cmgen.generator import Generator
    from cmgen.methods import build_method
    from cmgen.recipe import from_tree, parse_overrides

    tree = {"name": "t", "method": {"name": "lct"}, "data": {"name": "random", "channels": shape[0],
                                                             "resolution": shape[1]},
            "model": {"arch": "unet", "block_out_channels": [8, 16], "norm_num_groups": 4, "attention_head_dim": 4},
            "train": {"steps": 70, "batch_size": 8}}
    recipe = from_tree(tree, parse_overrides(overrides))
    gen = Generator.build(recipe, shape, 0, "image")
    return build_method(recipe, gen), recipe, gen


def test_cauchy_is_the_log_of_one_plus_the_per_sample_mean_over_two_c_squared():
    a = torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    b = torch.zeros_like(a)
    c = 0.5
    got = cauchy(a, b, c)
    assert torch.allclose(got, torch.tensor([math.log(1 + (9 / 4) / (2 * c * c)), 0.0]))  # mean, not sum
    assert torch.allclose(pseudo_huber_mean(a, b, c), torch.tensor([math.sqrt(9 / 4 + c * c) - c, 0.0]))
    # dL/dr for one element of a 1-element sample is 2r/(2c^2 + r^2): largest at r = sqrt(2) c, then ~2/r
    r = torch.tensor([[math.sqrt(2) * c], [10.0]], requires_grad=True)
    cauchy(r, torch.zeros_like(r), c).sum().backward()
    assert torch.allclose(r.grad[:, 0], 2 * r.detach()[:, 0] / (2 * c * c + r.detach()[:, 0] ** 2))


def test_cauchy_downweights_outlier_rows_far_more_than_pseudo_huber():
    torch.manual_seed(0)
    d = torch.randn(512, 64) * 0.1
    d[:51, :4] += 10.0  # 10% of rows carry a spike
    shares = {}
    for name, fn in (("cauchy", cauchy), ("huber", pseudo_huber_mean)):
        x = d.clone().requires_grad_(True)
        fn(x, torch.zeros_like(x), 0.01).sum().backward()
        g = x.grad.flatten(1).norm(dim=1)
        shares[name] = (g[:51].sum() / g.sum()).item()
    assert shares["cauchy"] <= 0.1 * shares["huber"]


@pytest.mark.parametrize("n,c", [(21, 0.01364), (41, 0.00614), (81, 0.00277), (161, 0.00125), (321, 0.000562),
                                 (641, 0.000253)])
def test_adaptive_c_golden_values(n, c):
    assert adaptive_c(n) == pytest.approx(c, rel=2e-3)


def test_stage_c_is_c0_in_the_first_stage_then_adaptive_or_fixed():
    m, _, _ = _method(shape=(4, 32, 32))
    assert m.c0 == pytest.approx(0.03456, rel=1e-6)            # 0.00054 sqrt(4096), the paper's latents
    small, _, _ = _method(shape=(4, 4, 4))
    assert small.c0 == m.c0                                    # per element under the mean: not scaled by sqrt(d)
    assert small.c0 > adaptive_c(21)                           # so c falls from stage to stage at any d
    assert m.huber_c(11) == m.c0 and m.huber_c(21) == adaptive_c(21) and m.huber_c(641) == adaptive_c(641)
    fixed, _, _ = _method(["method.adaptive_c=false", "method.c=0.002"], shape=(4, 32, 32))
    assert fixed.huber_c(11) == fixed.huber_c(641) == 0.002


@pytest.mark.parametrize("n,frac", [(11, 0.244), (21, 0.366), (81, 0.366), (641, 0.366)])
def test_diffusion_mask_selects_the_low_noise_quarter_with_the_papers_fractions(n, frac):
    m, recipe, _ = _method()
    p = recipe.precond
    sigmas = karras_sigmas(n, p.sigma_min, p.sigma_max, p.rho)
    probs = lognormal_index_probs(sigmas, -1.1, 2.0)
    i = torch.arange(n - 1)
    mask = m.diffusion_mask(i, n)
    assert float(probs[mask].sum()) == pytest.approx(frac, abs=0.03)
    student = sigmas[i + 1]
    if n >= 21:
        assert student[mask].max() <= 0.1701 and student[~mask].min() > 0.1701
    assert torch.equal(mask, student <= student[mask].max())


class Linear(torch.nn.Module):
    """f(x, sigma) = w(sigma) x with a scalar parameter: loss terms computable by hand."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.9))

    def forward(self, x, sigma, labels=None):
        return x * (self.a / (1 + sigma.view(-1, 1, 1, 1)))


def _loss(m, x, step, z=None):
    from cmgen.methods import Nets

    batch = Batch(x, None, BatchRNG(3, step, len(x), 0, len(x)))
    if z is not None:
        batch.extra["z"] = z
    net = Linear()
    out = m.loss(Nets(model=net), batch, step)
    out["loss"].backward()
    return out, net.a.grad.clone(), batch


def hand_pair(m, x, z, step):
    """The loss's pair for `Linear` computed by hand: (N, index i, sigma_i, sigma_{i+1}, student output at
    sigma_{i+1}, teacher output at sigma_i under stop-gradient, the scalar parameter a they share)."""
    n = m.discretisation(step)
    sigmas, probs = m.grid(n)
    i = BatchRNG(3, step, len(x), 0, len(x)).multinomial(probs)  # the loss's first draw
    a = torch.tensor(0.9, requires_grad=True)
    s_t, s_s = sigmas[i].float(), sigmas[i + 1].float()
    v = lambda s: s.view(-1, 1, 1, 1)  # noqa: E731
    pred = (x + v(s_s) * z) * (a / (1 + v(s_s)))
    target = ((x + v(s_t) * z) * (a / (1 + v(s_t)))).detach()  # stop-gradient teacher
    return n, i, s_t, s_s, pred, target, a


def test_loss_is_lambda_cauchy_plus_five_times_the_masked_diffusion_term_with_grad_through_the_student():
    m, recipe, _ = _method()
    torch.manual_seed(1)
    x = torch.randn(16, 4, 4, 4) * 0.5
    z = torch.randn_like(x)
    step = 69  # last stage: N = 641
    out, grad, _ = _loss(m, x, step, z)
    n, i, s_t, s_s, pred, target, a = hand_pair(m, x, z, step)
    c = adaptive_c(n)
    cm = (1 / (s_s - s_t) * torch.log1p((pred - target).flatten(1).pow(2).mean(1) / (2 * c * c))).mean()
    mask = (n - 2 - i) >= math.floor(0.75 * n)
    per = (1 / s_s**2 + 1 / 0.25) * (pred - x).flatten(1).pow(2).mean(1)
    diff = per[mask].mean() if mask.any() else torch.tensor(0.0)
    expect = cm + 5 * diff
    expect.backward()
    assert out["loss"].item() == pytest.approx(expect.item(), rel=1e-5)
    assert grad.item() == pytest.approx(a.grad.item(), rel=1e-4)
    assert out["c"].item() == pytest.approx(c) and out["N"].item() == n


def test_an_empty_diffusion_mask_contributes_zero_not_nan():
    m, _, _ = _method(["method.diffusion_from=1.0"])  # no student index reaches N: never selected
    out, grad, _ = _loss(m, torch.randn(4, 4, 4, 4), 0)
    assert out["diffusion"].item() == 0.0 and math.isfinite(out["loss"].item()) and math.isfinite(grad.item())
    off, _, _ = _method(["method.diffusion_weight=0"])
    assert "diffusion" not in _loss(off, torch.randn(4, 4, 4, 4), 0)[0]


def test_ot_pairing_is_the_exact_minimum_cost_permutation():
    from scipy.optimize import linear_sum_assignment

    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g)
    perm = ot_pairing(x, z)
    assert sorted(perm.tolist()) == list(range(64))
    cost = torch.cdist(x.double(), z.double()).pow(2).numpy()
    r, c = linear_sum_assignment(cost)
    assert cost[np.arange(64), perm.numpy()].sum() == pytest.approx(cost[r, c].sum(), abs=1e-6)
    # the note's criterion: at d <= 8 the mean squared pair distance falls by at least half
    x, z = torch.randn(128, 2, generator=g), torch.randn(128, 2, generator=g)
    ratio = (x - z[ot_pairing(x, z)]).pow(2).sum(1).mean() / (x - z).pow(2).sum(1).mean()
    assert ratio < 0.5


class OneProcess:
    world, rank = 1, 0

    def gather(self, t):
        return t


def _batches(x, step, micro):
    n = len(x)
    return [Batch(x[o:o + micro], None, BatchRNG(5, step, n, o, micro)) for o in range(0, n, micro)]


def test_ot_collect_pairs_the_global_batch_once_whatever_the_micro_batching():
    m, _, _ = _method()
    x = torch.randn(8, 4, 4, 4)
    whole = m.collect(_batches(x, 3, 8), None, 3, OneProcess())
    split = m.collect(_batches(x, 3, 4), None, 3, OneProcess())
    z_whole = whole[0].extra["z"]
    z_split = torch.cat([b.extra["z"] for b in split])
    assert torch.equal(z_whole, z_split)
    fresh = torch.randn(x.shape, generator=keyed_generator(5, 3, "ot-noise"))
    assert torch.equal(z_whole, fresh[ot_pairing(x, fresh)])       # the step's keyed noise, OT-permuted
    assert not torch.equal(z_whole, m.collect(_batches(x, 4, 8), None, 4, OneProcess())[0].extra["z"])
    off, _, _ = _method(["method.ot=false"])
    assert "z" not in off.collect(_batches(x, 3, 8), None, 3, OneProcess())[0].extra


class TwoRanks:
    """Rank `rank` of two: gather returns the micro-batch's rows of both ranks in rank order."""
    world = 2

    def __init__(self, x, micro, rank):
        self.x, self.micro, self.rank, self.calls = x, micro, rank, 0

    def gather(self, t):
        o = 2 * self.micro * self.calls
        self.calls += 1
        assert torch.equal(t, self.x[o + self.rank * self.micro:o + (self.rank + 1) * self.micro])
        return self.x[o:o + 2 * self.micro]


def _rank_batches(x, step, micro, rank):
    n = len(x)
    return [Batch(x[o:o + micro], None, BatchRNG(5, step, n, o, micro))
            for o in range(rank * micro, n, 2 * micro)]   # offset (m * world + rank) * micro, as the loop's


def test_ot_on_two_processes_pairs_the_gathered_global_batch_like_one_process():
    m, _, _ = _method()
    x = torch.randn(8, 4, 4, 4)
    one = m.collect(_batches(x, 3, 8), None, 3, OneProcess())[0].extra["z"]
    for rank in (0, 1):
        got = m.collect(_rank_batches(x, 3, 2, rank), None, 3, TwoRanks(x, 2, rank))
        for b in got:   # each rank's slice of the one global pairing, not a pairing of its own rows
            o = b.rng.offset
            assert torch.equal(b.extra["z"], one[o:o + 2])


def test_lct_curriculum_defaults_are_the_papers_s0_10_s1_640():
    from cmgen.methods.lct import Config

    assert (Config().s0, Config().s1) == (10, 640)


@pytest.mark.parametrize("override,needle", [("method.loss=l2", "method.loss"), ("method.c=-1", "method.c"),
                                             ("method.diffusion_from=0", "diffusion_from")])
def test_bad_lct_fields_are_one_sentence(override, needle):
    from cmgen.errors import UserError

    with pytest.raises(UserError, match=needle):
        _method([override])
