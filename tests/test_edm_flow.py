"""EDM and flow-matching formulas: preconditioning, loss weights, time draws, samplers against closed forms
on Gaussian data where the exact denoiser and velocity are known."""
import math

import pytest
import torch

from cmgen.precond import (PrecondConfig, EDMDenoiser, FlowVelocity, c_noise, edm_c_out, edm_c_skip,
                           edm_loss_weight)
from cmgen.rng import BatchRNG
from cmgen.sampling.edm import edm_euler, edm_heun, edm_sigmas, heun_nfe
from cmgen.sampling.flow import flow_euler, flow_sde, flow_times, gaussian_log_prob, sde_step, shift_time
from cmgen.sampling.registry import guided

S = 0.7  # data std of the Gaussian test distribution


class Probe(torch.nn.Module):
    """Backbone that records its inputs and returns a fixed function of them."""

    def __init__(self, fn=lambda x, t: 0.3 * x + 0.1):
        super().__init__()
        self.fn, self.calls = fn, []

    def forward(self, x, t, y=None):
        self.calls.append((x.clone(), t.clone(), None if y is None else y.clone()))
        return self.fn(x, t)


def test_edm_scalings_and_weight_closed_form():
    sd, sigma = 0.5, torch.tensor([0.1, 1.0, 10.0])
    assert torch.allclose(edm_c_skip(sigma, sd), sd**2 / (sigma**2 + sd**2))
    assert torch.allclose(edm_c_out(sigma, sd), sigma * sd / (sigma**2 + sd**2).sqrt())
    # lambda = 1 / c_out^2: the effective target of F has unit weight at every sigma (EDM sec. 5)
    assert torch.allclose(edm_loss_weight(sigma, sd) * edm_c_out(sigma, sd) ** 2, torch.ones(3))
    assert torch.allclose(edm_loss_weight(torch.tensor(1.0), sd), torch.tensor((1 + 0.25) / 0.25))


def test_edm_denoiser_applies_cin_cskip_cout_and_the_noise_label():
    probe = Probe()
    net = EDMDenoiser(probe, PrecondConfig(c_noise="edm"))
    x, sigma = torch.randn(3, 2), torch.tensor([0.05, 0.8, 30.0])
    out = net(x, sigma)
    cin = 1 / (sigma**2 + 0.25).sqrt()
    xin, label, _ = probe.calls[0]
    assert torch.allclose(xin, cin[:, None] * x)
    assert torch.allclose(label, 0.25 * sigma.log())
    expect = edm_c_skip(sigma, 0.5)[:, None] * x + edm_c_out(sigma, 0.5)[:, None] * (0.3 * xin + 0.1)
    assert torch.allclose(out, expect, atol=1e-6)
    assert torch.allclose(c_noise(sigma, "cm"), 250 * sigma.log())


def test_flow_velocity_feeds_1000t_and_unscaled_x():
    probe = Probe(lambda x, t: x * 0 + t[:, None])
    v = FlowVelocity(probe)
    x, t = torch.randn(2, 3), torch.tensor([0.25, 0.9])
    out = v(x, t)
    assert torch.equal(probe.calls[0][0], x) and torch.allclose(out[:, 0], 1000 * t)


def _method(name, overrides=()):
    from cmgen.generator import Generator
    from cmgen.methods import build_method
    from cmgen.recipe import load_recipe

    recipe = load_recipe(name, ["model.hidden=16", "model.depth=1"] + list(overrides)) if "toy2d" in name else \
        load_recipe(name, list(overrides))
    gen = Generator.build(recipe, (2,), 0, "points")
    return build_method(recipe, gen), recipe


def _batch(x, step=0, labels=None):
    from cmgen.methods import Batch

    return Batch(x, labels, BatchRNG(0, step, x.shape[0], 0, x.shape[0]))


def test_edm_loss_draws_lognormal_sigma_noises_by_sigma_and_weights_by_lambda():
    method, recipe = _method("edm_digits", ["data.name=toy2d", "model.arch=mlp", "model.hidden=16", "model.depth=1"])
    seen = {}

    def model(x_in, sigma, labels):
        seen["x_in"], seen["sigma"] = x_in, sigma
        return x0 + 0.1  # constant error 0.1 per element

    x0 = torch.randn(20000, 2)
    terms = method.loss(_Nets(model), _batch(x0), 0)
    ln = seen["sigma"].log()
    assert abs(ln.mean() + 1.2) < 0.03 and abs(ln.std() - 1.2) < 0.03
    z = (seen["x_in"] - x0) / seen["sigma"][:, None]
    assert abs(z.std() - 1) < 0.02 and abs(z.mean()) < 0.02
    expect = (edm_loss_weight(seen["sigma"], 0.5) * 0.01).mean()
    assert torch.allclose(terms["loss"], expect, rtol=1e-5)


class _Nets(dict):
    def __init__(self, model):
        super().__init__(model=model)
        self.model = model


def test_flow_loss_interpolates_and_regresses_eps_minus_x0():
    method, _ = _method("fm_toy2d")
    seen = {}

    def model(xt, t, labels):
        seen["xt"], seen["t"] = xt, t
        return torch.zeros_like(xt)

    x0 = torch.randn(4096, 2) * 2
    terms = method.loss(_Nets(model), _batch(x0), 3)
    t = seen["t"][:, None]
    eps = (seen["xt"] - (1 - t) * x0) / t
    assert abs(eps.std() - 1) < 0.03  # x_t = (1 - t) x0 + t eps with unit eps
    assert torch.allclose(terms["loss"], (eps - x0).pow(2).mean(), rtol=1e-4)
    assert abs(seen["t"].mean() - 0.5) < 0.02 and abs(seen["t"].std() - 1 / math.sqrt(12)) < 0.02  # uniform


def test_flow_logit_normal_and_shifted_times():
    from cmgen.methods.flow import Config, draw_times

    rng = BatchRNG(0, 0, 50000, 0, 50000)
    t = draw_times(rng, Config(t_dist="logit_normal", logit_mean=0.5, logit_std=0.8))
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean() - 0.5) < 0.02 and abs(logit.std() - 0.8) < 0.02
    assert shift_time(torch.tensor(0.5), 3.0) == pytest.approx(0.75)
    t2 = draw_times(BatchRNG(0, 0, 50000, 0, 50000), Config(t_dist="logit_normal", logit_mean=0.5, logit_std=0.8,
                                                             shift=3.0))
    assert torch.allclose(t2, shift_time(t, 3.0))


def test_label_dropout_replaces_labels_with_the_null_label():
    from cmgen.methods.edm import drop_labels

    labels = torch.arange(20000) % 10
    out = drop_labels(labels, BatchRNG(0, 1, 20000, 0, 20000), 0.1, 10)
    dropped = out == 10
    assert abs(dropped.float().mean() - 0.1) < 0.01 and torch.equal(out[~dropped], labels[~dropped])


# ---------------------------------------------------------------------------- samplers vs closed forms

def gaussian_denoiser(x, sigma, labels=None):
    """Exact D for data N(0, S^2 I): E[x0 | x] = S^2 / (S^2 + sigma^2) x."""
    s = sigma.view(-1, *([1] * (x.ndim - 1)))
    return S**2 / (S**2 + s**2) * x


def gaussian_velocity(x, t, labels=None):
    """Exact flow velocity for data N(0, S^2 I): E[eps - x0 | x_t] = (t - (1 - t) S^2) / var_t x."""
    t = t.view(-1, *([1] * (x.ndim - 1)))
    return (t - (1 - t) * S**2) / ((1 - t) ** 2 * S**2 + t**2) * x


def _noise(z):
    return lambda k: z if k == 0 else torch.zeros_like(z)


def test_edm_sigmas_follow_karras_and_end_at_zero():
    s = edm_sigmas(5, 0.002, 80.0, 7.0)
    assert len(s) == 6 and s[0] == pytest.approx(80.0) and s[4] == pytest.approx(0.002) and s[5] == 0.0
    i = 2
    assert s[i] == pytest.approx((80 ** (1 / 7) + i / 4 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7)


def test_one_heun_and_one_euler_step_match_their_closed_forms():
    z = torch.randn(8, 3)
    s0, s1 = 5.0, 1.5
    x0 = z * s0
    slope = lambda s: s / (S**2 + s**2)  # (x - D) / sigma = slope x for the Gaussian denoiser
    euler = x0 + (s1 - s0) * slope(s0) * x0
    heun = x0 + (s1 - s0) * 0.5 * (slope(s0) * x0 + slope(s1) * euler)
    assert torch.allclose(edm_euler(gaussian_denoiser, _noise(z), [s0, s1]), euler, atol=1e-6)
    assert torch.allclose(edm_heun(gaussian_denoiser, _noise(z), [s0, s1]), heun, atol=1e-6)


def test_heun_converges_at_second_order_to_the_exact_ode_solution():
    z = torch.randn(64, 4)
    exact = z * 80.0 * math.sqrt((S**2 + 0.002**2) / (S**2 + 80.0**2))  # x(sigma) proportional to sqrt(S^2 + sigma^2)
    errs = []
    for n in (8, 16, 32):
        sig = edm_sigmas(n)[:-1]  # stop at sigma_min so every step is a Heun step
        x = edm_heun(gaussian_denoiser, _noise(z), sig)
        errs.append((x - exact).abs().max().item())
    assert errs[0] / errs[1] > 3.0 and errs[1] / errs[2] > 3.0, errs  # halving h divides the error by ~4
    assert errs[2] < 0.02 * exact.abs().max().item()


def test_heun_nfe_and_churn():
    calls = []

    def counting(x, s, y=None):
        calls.append(1)
        return gaussian_denoiser(x, s)

    sig = edm_sigmas(6)
    edm_heun(counting, _noise(torch.randn(2, 2)), sig)
    assert len(calls) == heun_nfe(sig) == 11
    z = torch.randn(4, 2)
    plain = edm_heun(gaussian_denoiser, _noise(z), sig)
    outside = edm_heun(gaussian_denoiser, lambda k: z if k == 0 else torch.ones_like(z), sig, churn=10, s_tmin=100)
    inside = edm_heun(gaussian_denoiser, lambda k: z if k == 0 else torch.ones_like(z), sig, churn=10)
    assert torch.allclose(plain, outside) and not torch.allclose(plain, inside)



def test_heun_churn_is_edm_algorithm_2():
    """One stochastic step by hand: gamma = min(S_churn / N, sqrt(2) - 1), t_hat = (1 + gamma) t,
    x_hat = x + sqrt(t_hat^2 - t^2) S_noise eps, then a Heun step from t_hat to t_next."""
    z, eps = torch.randn(3, 2), torch.randn(3, 2)

    def slope(x, s):                                   # (x - D(x, s)) / s for the Gaussian's exact D
        return x * s / (S**2 + s**2)

    sigmas = [2.0, 1.0, 0.5]                           # N = 2 steps
    for churn, s_noise, gamma in ((0.4, 1.0, 0.2), (5.0, 1.007, math.sqrt(2.0) - 1.0)):
        want = z * sigmas[0]
        for t, t_next in zip(sigmas, sigmas[1:]):
            t_hat = t * (1 + gamma)
            x_hat = want + math.sqrt(t_hat**2 - t**2) * s_noise * eps
            x_euler = x_hat + (t_next - t_hat) * slope(x_hat, t_hat)
            want = x_hat + (t_next - t_hat) * 0.5 * (slope(x_hat, t_hat) + slope(x_euler, t_next))
        got = edm_heun(gaussian_denoiser, lambda k: z if k == 0 else eps, sigmas, churn=churn, s_noise=s_noise)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the added noise keeps the marginals: stochastic sampling of N(0, S^2) still ends at std S (64 steps:
    # 1.024 S here, 1.008 S without churn; S_noise 0.9 / 1.1 would give 0.92 S / 1.13 S)
    g = torch.Generator().manual_seed(0)
    draws = [torch.randn(20000, 1, generator=g) for _ in range(65)]
    x = edm_heun(gaussian_denoiser, lambda k: draws[k], edm_sigmas(64)[:-1], churn=40)
    assert abs(x.std().item() / S - 1) < 0.04, x.std().item()

def test_flow_euler_step_and_convergence_to_the_exact_transport():
    z = torch.randn(64, 3)
    ts = [1.0, 0.6]
    one = flow_euler(gaussian_velocity, _noise(z), ts)
    assert torch.allclose(one, z + (0.6 - 1.0) * gaussian_velocity(z, torch.full((64,), 1.0)), atol=1e-6)
    errs = [(flow_euler(gaussian_velocity, _noise(z), flow_times(n)) - S * z).abs().max().item() for n in (50, 200)]
    assert errs[1] < 0.02 and errs[0] / errs[1] > 3.0, errs  # x(t) = sqrt(var_t) z, var_0 = S^2; first order


def test_flow_times_are_evenly_spaced_then_shifted():
    assert flow_times(4) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert flow_times(2, 3.0) == pytest.approx([1.0, 0.75, 0.0])


def test_sde_step_formula_and_log_prob_equal_torch_normal():
    x, v, z = torch.randn(5, 3), torch.randn(5, 3), torch.randn(5, 3)
    t, tn, a = 0.6, 0.4, 0.7
    nxt, mean, std = sde_step(x, v, t, tn, z, a=a)
    sig = a * math.sqrt(t / (1 - t))
    dt = tn - t
    assert torch.allclose(mean, x * (1 + sig**2 / (2 * t) * dt) + v * (1 + sig**2 * (1 - t) / (2 * t)) * dt)
    assert std == pytest.approx(sig * math.sqrt(-dt)) and torch.allclose(nxt, mean + std * z)
    lp = gaussian_log_prob(nxt, mean, std)
    ref = torch.distributions.Normal(mean, std).log_prob(nxt).sum(1)
    assert torch.allclose(lp, ref, atol=1e-5)


def test_sde_sampler_keeps_the_odes_marginals_on_gaussian_data():
    from cmgen.sampling import per_image_noise

    n = 20000
    noise = per_image_noise(list(range(n)), (1,))
    x = flow_sde(gaussian_velocity, noise, flow_times(200))
    assert abs(x.std().item() - S) < 0.02 and abs(x.mean().item()) < 0.02
    x2, lps = flow_sde(gaussian_velocity, per_image_noise(list(range(8)), (1,)), flow_times(10),
                       return_log_prob=True)
    assert len(lps) == 10 and all(torch.isfinite(l).all() for l in lps)


def test_classifier_free_guidance_combination():
    def net(x, t, y):
        return x * 0 + y[:, None].float()

    x, t, y = torch.zeros(3, 2), torch.ones(3), torch.tensor([2, 4, 6])
    out = guided(net, 3.0, 10)(x, t, y)
    assert torch.allclose(out, 10 + 3.0 * (y[:, None].float() - 10))  # uncond + w (cond - uncond)
    assert guided(net, 1.0, 10) is net
