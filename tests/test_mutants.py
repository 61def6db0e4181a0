"""Formulas the mutation run (tools/mutate.py) found untested: each test fails on the planted bug named."""

from pathlib import Path

import pytest
import torch
from conftest import TINY_UNET, random_image_folder, tiny_vae
from torch import nn

from cmgen.ema import EMA, TargetNetwork
from cmgen.rng import IndexSampler
from cmgen.sampling import consistency_multistep, per_image_noise
from cmgen.schedules import karras_sigmas


def test_karras_grid_uses_rho():  # mutant: rho ignored (every other test uses rho = 7)
    for rho in (1.0, 3.0):
        s = karras_sigmas(5, 0.5, 10.0, rho)
        i = torch.arange(5, dtype=torch.float64)
        want = (0.5 ** (1 / rho) + i / 4 * (10.0 ** (1 / rho) - 0.5 ** (1 / rho))) ** rho
        assert torch.allclose(s, want, rtol=1e-12)
    assert torch.allclose(karras_sigmas(5, 0.5, 10.0, 1.0), torch.linspace(0.5, 10.0, 5, dtype=torch.float64))


def test_every_epoch_is_a_new_permutation_of_all_examples():  # mutant: the permutation ignores the epoch
    s = IndexSampler(10, seed=3)
    epochs = [s.indices(step, 5, 0, 5) for step in range(6)]  # 2 steps per epoch
    first, second, third = (torch.cat(epochs[k:k + 2]) for k in (0, 2, 4))
    for e in (first, second, third):
        assert sorted(e.tolist()) == list(range(10))
    assert not torch.equal(first, second) and not torch.equal(second, third)
    # a step split across processes (offsets) reads the same positions of the same permutation
    assert torch.equal(torch.cat([s.indices(3, 5, 0, 2), s.indices(3, 5, 2, 3)]), s.indices(3, 5, 0, 5))


def test_multistep_clamps_every_estimate_and_renoises_from_the_clamped_one():  # mutants: no clamping, sigma_min
    seen = []

    def too_bright(x, sigma, labels=None):
        seen.append(x.clone())
        return torch.full_like(x, 3.0)

    noise = per_image_noise([1, 2], (1, 4, 4))
    out = consistency_multistep(too_bright, noise, [80.0, 0.5], sigma_min=0.3, clip_denoised=True)
    assert torch.equal(out, torch.ones_like(out))
    # the second input re-noises the *clamped* first estimate, with sqrt(sigma^2 - sigma_min^2) = 0.4
    assert torch.allclose(seen[1], 1.0 + 0.4 * noise(1), atol=1e-6)
    raw = consistency_multistep(too_bright, noise, [80.0, 0.5], sigma_min=0.3, clip_denoised=False)
    assert torch.equal(raw, torch.full_like(raw, 3.0))


def _lin(value: float) -> nn.Module:
    m = nn.Linear(2, 2)
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(value)
    return m


def test_ema_rule_shadow_moves_by_one_minus_decay_toward_the_weights():  # mutants: EMA frozen / reversed
    model = _lin(1.0)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(11.0)
    ema.update(model)
    assert all(torch.allclose(s, torch.full_like(s, 2.0)) for s in ema.shadow)  # 0.9 * 1 + 0.1 * 11
    ema.update(model)
    assert all(torch.allclose(s, torch.full_like(s, 2.9)) for s in ema.shadow)  # 0.9 * 2 + 0.1 * 11
    out = _lin(0.0)
    ema.copy_to(out)
    assert all(torch.allclose(p, torch.full_like(p, 2.9)) for p in out.parameters())


def test_target_network_follows_the_model_with_its_decay_of_the_step():  # mutant: decay inverted
    model = _lin(1.0)
    target = TargetNetwork(model, decay=lambda step: 0.0 if step == 0 else 0.75)
    assert not any(p.requires_grad for p in target.module.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(5.0)
    target.update(model, step=1)
    assert all(torch.allclose(p, torch.full_like(p, 2.0)) for p in target.module.parameters())  # .75*1 + .25*5
    target.update(model, step=0)  # decay 0: a copy
    assert all(torch.allclose(p, torch.full_like(p, 5.0)) for p in target.module.parameters())


def test_ict_curriculum_uses_the_stored_k_not_train_steps():  # mutant: K from train.steps
    from cmgen.generator import Generator
    from cmgen.methods import build_method, resolve_recipe
    from cmgen.recipe import load_recipe

    recipe = resolve_recipe(load_recipe("ict_digits", ["model.block_out_channels=[16,32]", "model.norm_num_groups=8",
                                                       "model.attention_head_dim=8", "method.total_steps=100",
                                                       "train.steps=1000", "method.s1=40"]))
    method = build_method(recipe, Generator.build(recipe, (1, 8, 8), 10))
    # K = 100, s0 = 10, s1 = 40: K' = floor(100 / 3) = 33
    assert [method.discretisation(k) for k in (0, 32, 33, 66, 99, 500)] == [11, 11, 21, 41, 41, 41]


def test_ict_teacher_is_under_stop_gradient_and_the_student_carries_the_gradient():  # mutant: no no_grad
    from cmgen.generator import Generator
    from cmgen.methods import Batch, build_method
    from cmgen.recipe import load_recipe
    from cmgen.rng import BatchRNG

    recipe = load_recipe("ict_digits", ["model.block_out_channels=[16,32]", "model.norm_num_groups=8",
                                        "model.attention_head_dim=8"])
    gen = Generator.build(recipe, (1, 8, 8), 10)
    method = build_method(recipe, gen)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    p = method.pair(gen.net, Batch(x, None, BatchRNG(0, 0, 4, 0, 4)), 0)
    assert not p.target.requires_grad and p.target.grad_fn is None
    assert p.pred.requires_grad


# ----------------------------------------------------------------------------- CTM, latent CT, AWM, RG-LCD

def test_ctm_pseudo_huber_distance_defaults_to_icts_c_for_the_sample_size():  # mutant: c of sqrt(1)
    from cmgen.methods.ctm import Config, distance_fn

    a, b = torch.zeros(2, 1, 8, 8), torch.full((2, 1, 8, 8), 0.01)
    c = 0.00054 * 8                                   # 0.00054 sqrt(d), d = 64
    got = distance_fn(Config(distance="pseudo_huber"), (1, 8, 8), "cpu")(a, b)
    assert torch.allclose(got, torch.full((2,), (64e-4 + c * c) ** 0.5 - c), rtol=1e-5)
    assert torch.allclose(distance_fn(Config(distance="pseudo_huber", huber_c=0.1), (1, 8, 8), "cpu")(a, b),
                          torch.full((2,), (64e-4 + 0.01) ** 0.5 - 0.1), rtol=1e-5)


def test_the_discriminator_step_gives_no_gradient_to_the_fakes():  # mutant: fake not detached
    from cmgen.methods.ctm_gan import discriminator_loss
    from cmgen.rng import BatchRNG

    lin = nn.Linear(64, 2)
    disc = lambda x: [lin(x.flatten(1))]   # noqa: E731  one head with two positions
    fake = torch.randn(4, 1, 8, 8, requires_grad=True)
    discriminator_loss(disc, torch.randn(4, 1, 8, 8), fake, BatchRNG(0, 0, 4, 0, 4), "")["loss"].backward()
    assert fake.grad is None
    assert lin.weight.grad.abs().sum() > 0      # the discriminator itself learns


def test_diffaugment_color_is_brightness_saturation_then_contrast_in_their_ranges():  # mutant: contrast range
    from cmgen.methods.ctm_gan import diff_augment
    from cmgen.rng import BatchRNG

    x = torch.randn(64, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    out = diff_augment(x, BatchRNG(0, 0, 64, 0, 64), "color")
    rng = BatchRNG(0, 0, 64, 0, 64)
    brightness, saturation, contrast = (rng.rand(1, 1, 1) for _ in range(3))
    want = x + brightness - 0.5                                       # DiffAugment: + U[-0.5, 0.5]
    mean = want.mean(1, keepdim=True)
    want = (want - mean) * (2 * saturation) + mean                    # x U[0, 2] about the channel mean
    mean = want.mean((1, 2, 3), keepdim=True)
    want = (want - mean) * (contrast + 0.5) + mean                    # x U[0.5, 1.5] about the image mean
    assert torch.allclose(out, want, atol=1e-5)
    # a grey image keeps its mean under saturation and contrast: only the brightness moves it
    grey = torch.full((64, 3, 4, 4), 0.25)
    moved = diff_augment(grey, BatchRNG(0, 0, 64, 0, 64), "color").mean((1, 2, 3))
    assert torch.allclose(moved, 0.25 + brightness.flatten() - 0.5, atol=1e-6)


def test_awm_loss_times_are_new_each_step_and_each_micro_batch():  # mutant: times not keyed by the step
    from types import SimpleNamespace

    from cmgen.methods.awm import Config, Method

    owner = SimpleNamespace(cfg=Config(rollout_steps=14, timesteps=4), times=torch.linspace(1.0, 0.0, 14))
    times = lambda step, offset=0: Method.loss_times(owner, SimpleNamespace(  # noqa: E731
        rng=SimpleNamespace(seed=0, step=step, offset=offset)))
    per_step = {tuple(times(s).tolist()) for s in range(8)}
    assert len(per_step) >= 6                                          # 3^4 stratified choices: repeats are rare
    assert torch.equal(times(3), times(3))                             # keyed: the same step draws the same times
    assert len({tuple(times(2, o).tolist()) for o in (0, 8, 16, 24)}) >= 3


def test_lrm_cross_entropy_makes_the_real_latent_the_winner_of_its_pairs():  # mutant: the generated latent wins
    from cmgen.rewards.lrm import pairwise_real_ce

    lrm = torch.tensor([[0.0, 1.0, 2.0], [3.0, -1.0, 0.5]], requires_grad=True)   # [B, (f, target, real)]
    want = torch.stack([torch.log1p(torch.exp(lrm[:, a] - lrm[:, 2])) for a in (0, 1)], 1).mean()
    got = pairwise_real_ce(lrm)
    assert torch.allclose(got, want)
    got.backward()
    assert (lrm.grad[:, 2] < 0).all() and (lrm.grad[:, :2] > 0).all()   # descent raises the real latent's score


# ----------------------------------------------------------------------------- evaluation, latents, rewards

def test_rbf_mmd_is_the_unbiased_sum_over_bandwidths_of_gaussian_kernels():  # mutant: h not squared
    import numpy as np

    from eval.metrics import mmd2_rbf

    x, y = np.array([[0.0], [0.3]]), np.array([[1.0], [1.5], [0.2]])
    k = lambda a, b, h: np.exp(-(a - b) ** 2 / (2 * h * h))  # noqa: E731
    want = 0.0
    for h in (0.2, 0.5):
        kxx = k(0.0, 0.3, h)                                            # the 2 off-diagonal pairs, each twice
        kyy = sum(k(a, b, h) for a in (1.0, 1.5, 0.2) for b in (1.0, 1.5, 0.2) if a != b) / 6
        kxy = np.mean([k(a, b, h) for a in (0.0, 0.3) for b in (1.0, 1.5, 0.2)])
        want += kxx + kyy - 2 * kxy
    assert mmd2_rbf(x, y, bandwidths=(0.2, 0.5)) == pytest.approx(want, rel=1e-12)


def test_sd_codec_encodes_to_shifted_scaled_latents_and_defaults_to_sds_scale():  # mutants: shift sign, default, maps
    from types import SimpleNamespace

    from cmgen.latents import LatentCodec, sd_factors

    vae = tiny_vae(scaling_factor=0.5, shift_factor=0.25)
    codec = LatentCodec.sd(vae, (4, 4, 4))
    z = torch.randn(3, 4, 4, 4)
    assert torch.allclose(codec.normalise(z), (z - 0.25) * 0.5)        # SD3's (z - shift) * scale
    assert torch.allclose(codec.denormalise(codec.normalise(z)), z, atol=1e-6)
    # its mean/std maps are the equivalent per-element statistics: sigma_d (z - mean) / std is the same map
    same = LatentCodec(vae, codec.mean, codec.std)
    assert torch.allclose(same.normalise(z), codec.normalise(z), atol=1e-6)
    assert sd_factors(SimpleNamespace(config=SimpleNamespace())) == (0.18215, 0.0)   # SD 1.x, no shift
    assert sd_factors(SimpleNamespace(config=SimpleNamespace(scaling_factor=1.5305, shift_factor=0.0609))) == \
        (1.5305, 0.0609)


def test_digit_reward_of_a_colour_image_is_that_of_its_itu_601_luma():  # mutant: luma weights
    from cmgen.data import load_digits
    from cmgen.rewards import build_reward

    grey = load_digits().x[:16].clone()
    rgb = torch.cat([grey, grey * 0.5, -grey], 1)                       # three different channels
    luma = (rgb * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    r = build_reward("digit-class")
    labels = torch.arange(16) % 10
    assert torch.allclose(r(rgb, labels), r(luma, labels), atol=1e-6)
    assert not torch.allclose(r(rgb, labels), r(rgb.mean(1, keepdim=True), labels), atol=1e-3)


def test_lct_pseudo_huber_baseline_takes_the_place_of_the_cauchy_term():  # mutant: cauchy either way
    from test_lct import _loss, _method, hand_pair

    from cmgen.methods.lct import adaptive_c

    m, _, _ = _method(["method.loss=pseudo_huber", "method.diffusion_weight=0"])
    torch.manual_seed(1)
    x = torch.randn(16, 4, 4, 4) * 0.5
    z = torch.randn_like(x)
    step = 69
    out, _, _ = _loss(m, x, step, z)
    n, _, s_t, s_s, pred, target, _ = hand_pair(m, x, z, step)
    c = adaptive_c(n)
    sq = (pred - target).flatten(1).pow(2).mean(1)
    assert out["loss"].item() == pytest.approx((1 / (s_s - s_t) * ((sq + c * c).sqrt() - c)).mean().item(), rel=1e-5)
    assert "pseudo_huber" in out and "cauchy" not in out


# ----------------------------------------------------------------------------- the training loop

def _edm_trainer(tmp_path, name, *extra):
    from cmgen.recipe import load_recipe
    from cmgen.train import Trainer

    over = TINY_UNET + ["train.batch_size=8", "train.sample_every=0", "train.checkpoint_every=100",
                        "optim.warmup_steps=0"]
    return Trainer(load_recipe("edm_digits", over + list(extra)), tmp_path / name, progress=False)


def _grads_at_each_step(tr, steps: int):
    """The gradients the model's optimizer steps with, for each of `steps` loop steps."""
    seen, opt = [], tr.parts["model"].optimizer
    step = opt.step

    def watched(*args, **kwargs):
        seen.append([p.grad.clone() for g in opt.param_groups for p in g["params"] if p.grad is not None])
        return step(*args, **kwargs)

    opt.step = watched
    terms = [tr.train_step() for _ in range(steps)]
    return seen, terms


def test_two_accumulated_micro_batches_log_and_step_as_their_global_batch(tmp_path):  # mutant: terms summed
    (ga,), (a,) = _grads_at_each_step(_edm_trainer(tmp_path, "one"), 1)
    (gb,), (b,) = _grads_at_each_step(_edm_trainer(tmp_path, "two", "train.grad_accum=2"), 1)
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["mse"] == pytest.approx(a["mse"], rel=1e-5)
    assert all(torch.allclose(x, y, rtol=1e-4, atol=1e-7) for x, y in zip(ga, gb))


def test_gradient_clipping_bounds_the_norm_the_optimizer_sees(tmp_path):  # mutant: clipping skipped
    def norms(tr):
        grads, _ = _grads_at_each_step(tr, 2)
        return [float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gs]))) for gs in grads]

    assert min(norms(_edm_trainer(tmp_path, "free"))) > 0.01             # the bound below bites
    assert max(norms(_edm_trainer(tmp_path, "clipped", "optim.grad_clip=0.01"))) <= 0.01 * (1 + 1e-5)


# ----------------------------------------------------------------------------- flow matching, Flow-GRPO

def test_flow_matching_regresses_the_velocity_eps_minus_x0_at_the_interpolant():  # mutant: target sign
    from test_edm_flow import _batch, _method, _Nets

    method, _ = _method("fm_digits", ["data.name=toy2d", "model.arch=mlp", "model.class_conditional=false"])
    seen = {}

    def model(xt, t, labels):
        seen["xt"], seen["t"] = xt, t
        return 0.5 * xt

    x0 = torch.randn(512, 2)
    loss = method.loss(_Nets(model), _batch(x0), 0)["loss"]
    t = seen["t"].view(-1, 1)
    eps = (seen["xt"] - (1 - t) * x0) / t                             # x_t = (1 - t) x0 + t eps
    assert abs(eps.std() - 1) < 0.1
    assert torch.allclose(loss, (0.5 * seen["xt"] - (eps - x0)).pow(2).mean(), rtol=1e-4)


def test_a_flow_grpo_step_with_positive_advantages_raises_the_rollouts_log_probability(base_run, tmp_path):
    # mutant: the importance ratio inverted (its value is 1 on-policy either way; its gradient flips)
    from test_awm import round_of, trainer_for

    from cmgen.methods.flowgrpo import step_log_prob

    tr = trainer_for("flowgrpo_digits_class", base_run, tmp_path, "method.beta=0")
    b = round_of(tr, adv=1.0)
    xs, m = b.extra["trajectory"], tr.method

    def log_prob():
        with torch.no_grad():
            return sum(step_log_prob(xs[:, j + 1], *m._step(tr.nets.model, xs[:, j], j, b.labels)).mean()
                       for j in range(xs.shape[1] - 1))

    before = log_prob()
    tr.nets.model.zero_grad()
    m.loss(tr.nets, b, tr.step)["loss"].backward()
    with torch.no_grad():
        for q in tr.nets.model.parameters():
            if q.grad is not None:
                q.sub_(1e-3 * q.grad)
    assert log_prob() > before


def test_each_flow_grpo_rollout_step_adds_its_own_keyed_noise(base_run, tmp_path):  # mutant: one noise for all
    from test_awm import round_of, trainer_for

    from cmgen.methods.rollout import keyed_noise

    tr = trainer_for("flowgrpo_digits_class", base_run, tmp_path)
    b = round_of(tr)
    xs, m, n = b.extra["trajectory"], tr.method, len(b.x)
    noise = keyed_noise(b.rng.seed, tr.step, tuple(b.x.shape[1:]), 0, n, "cpu")
    assert torch.allclose(xs[:, 0], noise(0))
    for j in range(xs.shape[1] - 1):
        with torch.no_grad():
            mean, std = m._step(tr.nets.model, xs[:, j], j, b.labels)
        assert torch.allclose((xs[:, j + 1] - mean) / std, noise(j + 1), atol=1e-4)


# ----------------------------------------------------------------------------- data

def test_uint8_images_map_0_and_255_to_minus_one_and_one():  # mutant: / 255
    from cmgen.data import to_float

    got = to_float(torch.tensor([0, 51, 255], dtype=torch.uint8))
    assert torch.allclose(got, torch.tensor([-1.0, 51 / 127.5 - 1.0, 1.0]))


def test_the_ring_has_eight_modes_at_multiples_of_a_quarter_pi_on_radius_0_7():  # mutant: spacing
    import math

    from cmgen.data import toy2d

    ds = toy2d("ring", 8000, seed=0)
    for k in range(8):
        centre = ds.x[ds.labels == k].mean(0)
        want = 0.7 * torch.tensor([math.cos(k * math.pi / 4), math.sin(k * math.pi / 4)])
        assert torch.allclose(centre, want, atol=0.01), (k, centre)


# ----------------------------------------------------------------------------- embeddings, rewards, evaluation

def test_mlp_time_embedding_is_diffusers_sinusoidal_with_cos_first():  # mutants: sin first, / (half - 1)
    import math

    from diffusers.models.embeddings import get_timestep_embedding

    from cmgen.models.mlp import sinusoidal_embedding

    t = torch.tensor([0.0, 0.3, -2.5, 40.0])
    got = sinusoidal_embedding(t, 16)
    assert torch.allclose(got, get_timestep_embedding(t, 16, flip_sin_to_cos=True, downscale_freq_shift=0), atol=1e-6)
    # by hand: column i < 8 is cos(t 10000^(-i/8)), column 8 + i its sine
    assert torch.allclose(got[:, 0], torch.cos(t)) and torch.allclose(got[:, 8], torch.sin(t))
    assert torch.allclose(got[:, 3], torch.cos(t * 10000 ** (-3 / 8)), atol=1e-6)
    assert torch.allclose(got[:, 15], torch.sin(t * math.exp(-math.log(10000) * 7 / 8)), atol=1e-6)


def test_reward_shift_is_tuned_minus_base():  # mutants: base - tuned, population std
    import numpy as np

    from cmgen.eval.frechet import FeatureStats
    from cmgen.eval.reward_eval import reward_row, shift_fields

    stats = FeatureStats(0)
    stats.update(np.random.default_rng(0).normal(size=(50, 3)))
    tuned, base = reward_row("tuned", np.array([0.9, 0.7, 0.8])), reward_row("base", np.array([0.1, 0.3, 0.2]))
    assert shift_fields(tuned, base, stats, stats, "FD")["delta_vs_base"] == pytest.approx(0.6)
    # the spread is the sample std (ddof 1) and the interval Student-t's: 0.8 -+ t(0.975, 2) 0.1 / sqrt(3)
    assert tuned["std"] == pytest.approx(0.1) and tuned["ci95_high"] == pytest.approx(0.8 + 0.2484138, rel=1e-6)


def test_jpeg_reward_enlarges_small_images_by_the_smallest_factor_reaching_32():  # mutant: factor floored
    from cmgen.rewards.jpeg import to_uint8

    for side, factor in ((8, 4), (12, 3), (20, 2), (32, 1), (40, 1)):
        x = torch.linspace(-1, 1, side * side).view(1, 1, side, side)
        u = to_uint8(x)
        assert u.shape == (1, side * factor, side * factor, 1)
        assert (u[0, ::factor, ::factor, 0] == u[0, factor - 1::factor, factor - 1::factor, 0]).all()
        assert u[0, 0, 0, 0] == 0 and u[0, -1, -1, 0] == 255


def test_jpeg_surrogate_predicts_kilobytes_on_their_scale_and_its_reward_is_minus_that():
    # mutants: the standardised output not scaled back by the sizes' std; the reward's sign
    from scipy.stats import spearmanr

    from cmgen.rewards.jpeg import jpeg_kb, jpeg_surrogate, surrogate, surrogate_training_images

    x = surrogate_training_images(seed=123)[::7]
    kb = jpeg_kb(x)
    with torch.no_grad():
        pred = surrogate()(x)
        reward = jpeg_surrogate()(x, None)
    assert (pred - kb).abs().mean() < 0.5 * kb.std()
    assert torch.allclose(reward, -pred)
    assert spearmanr(reward.numpy(), (-kb).numpy()).statistic > 0.8   # smaller files score higher


def test_uint8_conversion_clamps_then_rounds_to_nearest():  # mutant: no clamp (values outside [-1, 1] wrap)
    from cmgen.plots import to_uint8

    x = torch.tensor([-3.0, -1.0, -0.5, 0.5, 1.0, 2.5]).view(1, 1, 1, 6)   # (x + 1) 127.5: 63.75, 191.25
    assert to_uint8(x)[0, 0, :, 0].tolist() == [0, 0, 64, 191, 255, 255]


def test_rgb_reduced_to_grey_by_itu601_luma_for_the_digits_features():
    # mutants: reversed luma weights in eval/sources.py and eval/digits_net.py, 255 not halved
    import numpy as np

    from cmgen.eval.digits_net import to_digit_tensor
    from cmgen.eval.sources import _as_channels

    rgb = np.zeros((3, 8, 8, 3), np.uint8)
    for k in range(3):
        rgb[k, ..., k] = 255                                       # pure red, green, blue
    grey = _as_channels(rgb, 1)
    assert grey.shape == (3, 8, 8, 1) and grey[:, 0, 0, 0].tolist() == [76, 150, 29]
    want = torch.tensor([0.299, 0.587, 0.114]) * 255 / 127.5 - 1.0
    assert torch.allclose(to_digit_tensor(rgb)[:, 0, 0, 0], want, atol=1e-6)
    ends = to_digit_tensor(np.array([0, 255], np.uint8).reshape(2, 1, 1, 1))
    assert ends.shape == (2, 1, 1, 1) and ends.flatten().tolist() == [-1.0, 1.0]


def test_digits_features_are_standardised_over_the_digits():  # mutant: not divided by the std
    from cmgen.data import load_digits
    from cmgen.eval.digits_net import digits_net

    with torch.no_grad():
        f = digits_net().features(load_digits().x)
    assert f.mean(0).abs().max() < 1e-4
    live = f.std(0) > 1e-3                                           # dead ReLU units stay at 0
    assert live.sum() > f.shape[1] // 2 and torch.allclose(f.std(0)[live], torch.ones(int(live.sum())), atol=1e-3)


def test_clip_input_is_scaled_to_0_1_and_normalised_by_clip_mean_and_std():  # mutants: swapped, no / 255
    import numpy as np

    from cmgen.eval.features import clip_preprocess

    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])
    x = clip_preprocess(np.stack([np.zeros((16, 16, 3), np.uint8), np.full((16, 16, 3), 255, np.uint8)]))
    assert x.shape == (2, 3, 224, 224)
    assert torch.allclose(x[0, :, 100, 100], -mean / std, atol=1e-5)
    assert torch.allclose(x[1, :, 100, 100], (1 - mean) / std, atol=1e-5)


def test_vae_loss_decodes_a_posterior_sample_mean_plus_std_times_noise():  # mutant: variance times noise
    from cmgen.vae_train import vae_loss

    vae = tiny_vae()
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        _, terms = vae_loss(vae, x, torch.Generator().manual_seed(5), kl_weight=0.5)
        post = vae.encode(x).latent_dist
        assert (post.std - post.var).abs().max() > 1e-3              # the two would otherwise agree
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(5))
        mse = (vae.decode(z).sample - x).pow(2).mean()
    assert terms["mse"].item() == pytest.approx(mse.item(), rel=1e-5)


def test_ldm_loss_drops_labels_to_the_null_label_at_the_recipe_rate():  # mutant: label dropout skipped
    from test_ldm_rewards import _ldm

    from cmgen.methods import Batch, Nets
    from cmgen.rng import BatchRNG

    m, gen = _ldm("epsilon", label_dropout=0.5)
    seen = {}

    def model(zt, t, labels):
        seen["labels"] = labels
        return torch.zeros_like(zt)

    labels = torch.arange(400) % 10
    m.loss(Nets(model=model), Batch(torch.zeros(400, 4, 4, 4), labels, BatchRNG(3, 7, 400, 0, 400)), 7)
    got = seen["labels"]
    dropped = got == gen.null_label
    assert 0.4 < dropped.float().mean() < 0.6
    assert torch.equal(got[~dropped], labels[~dropped])


# ------------------------------------------------------------------------------ round 9: checkpoints and resume

def test_checkpoint_ema_file_holds_the_ema_not_the_raw_weights(tmp_path, tiny_digits_overrides):
    # mutant: the EMA file written as raw weights (a resume then equals a straight run either way)
    from cmgen.checkpoint import list_checkpoints, load_tensors
    from cmgen.recipe import load_recipe
    from cmgen.train import Trainer

    recipe = load_recipe("ict_digits", tiny_digits_overrides + ["train.steps=3", "train.checkpoint_every=3",
                                                               "train.ema_decay=0.5"])
    tr = Trainer(recipe, tmp_path / "run", progress=False)
    tr.run()
    ckpt = list_checkpoints(tmp_path / "run")[-1]
    raw, ema = load_tensors(ckpt / "model.safetensors"), load_tensors(ckpt / "ema.safetensors")
    shadow = tr.parts["model"].ema.state_dict()
    assert shadow and all(torch.equal(ema[k], v) for k, v in shadow.items())
    assert any(not torch.equal(raw[k], v) for k, v in shadow.items())
    # buffers that the EMA does not average travel with it
    assert set(ema) == set(raw)


def test_resume_accepts_changed_eval_and_logging_keys_and_names_any_other(tmp_path, tiny_digits_overrides):
    # mutant: the 'eval.' prefix of RESUMABLE matched only as a whole key
    from cmgen.errors import UserError
    from cmgen.recipe import load_recipe
    from cmgen.train import Trainer, train

    base = tiny_digits_overrides + ["train.steps=2", "train.checkpoint_every=2"]
    run = train(load_recipe("ict_digits", base), tmp_path / "run", progress=False)
    changed = base + ["eval.every=5", "eval.n=16", "train.log_every=7", "train.steps=4"]
    tr = Trainer(load_recipe("ict_digits", changed), run, resume="auto", progress=False)
    assert tr.step == 2 and tr.recipe.eval.every == 5 and tr.recipe.eval.n == 16
    with pytest.raises(UserError, match="'optim.lr'"):
        Trainer(load_recipe("ict_digits", base + ["optim.lr=0.5"]), run, resume="auto", progress=False)


def test_a_resume_between_log_rows_logs_the_mean_of_the_straight_run(tmp_path, tiny_digits_overrides):
    # mutant: the loss sums accumulated since the last logged row are not restored on resume
    from cmgen.plots import read_metrics
    from cmgen.recipe import load_recipe
    from cmgen.train import train

    recipe = load_recipe("ict_digits", tiny_digits_overrides + ["train.steps=4", "train.checkpoint_every=1",
                                                               "train.log_every=4"])
    straight = train(recipe, tmp_path / "straight", progress=False)
    split = train(recipe, tmp_path / "split", progress=False, stop_after=2)   # steps 1, 2 summed, not yet logged
    train(recipe, split, resume="auto", progress=False)
    rows = read_metrics(straight / "metrics.jsonl")
    assert [r["step"] for r in rows] == [4] and rows == read_metrics(split / "metrics.jsonl")


def test_a_run_folder_loads_its_newest_checkpoint(tmp_path, tiny_digits_overrides):
    # mutant: resolve_checkpoint takes the oldest complete checkpoint
    from cmgen.checkpoint import load_tensors
    from cmgen.recipe import load_recipe
    from cmgen.runs import load_model, resolve_checkpoint
    from cmgen.train import train

    recipe = load_recipe("ict_digits", tiny_digits_overrides + ["train.steps=3", "train.checkpoint_every=1",
                                                               "train.keep_last=3"])
    run = train(recipe, tmp_path / "run", progress=False)
    assert len(list((run / "checkpoints").iterdir())) == 3
    assert resolve_checkpoint(run).name == "step-00000003"
    gen = load_model(run)
    own = gen.net.state_dict()
    assert gen.step == 3
    assert all(torch.equal(own[k], v) for k, v in load_tensors(resolve_checkpoint(run) / "ema.safetensors").items())


# ------------------------------------------------------------------------------ round 9: export, SD3 codec

def test_export_refuses_to_publish_a_folder_holding_pickled_weights(tiny_run, tmp_path, monkeypatch):
    # mutant: the check for pickles before the folder is published skipped
    from diffusers import ConsistencyModelPipeline

    from cmgen.export import export_model

    real = ConsistencyModelPipeline.save_pretrained

    def save_with_a_pickle(self, folder, **kw):
        real(self, folder, **kw)
        torch.save({"w": torch.zeros(1)}, folder / "unet" / "diffusion_pytorch_model.bin")

    monkeypatch.setattr(ConsistencyModelPipeline, "save_pretrained", save_with_a_pickle)
    out = tmp_path / "pipe"
    with pytest.raises(RuntimeError, match="pickled weights"):
        export_model(tiny_run, out)
    assert not out.exists() and not list(tmp_path.glob(".pipe.tmp-*"))


def test_sd3_codec_normalises_like_the_sd3_pipeline_and_decodes_its_own_latents():
    # mutants: decode shifts before unscaling, encode's shift sign
    pytest.importorskip("transformers")
    import copy

    from cmgen.eval.digits_net import cache_dir
    from cmgen.models.sd3 import SD3Codec, load_pipeline, tiny_sd3_pipeline

    vae = copy.deepcopy(load_pipeline(str(tiny_sd3_pipeline(cache_dir() / "tiny-sd3-v1" / "pipeline"))).vae).eval()
    codec = SD3Codec(copy.deepcopy(vae))
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor
    assert scale != 1 and shift != 0
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        mode = vae.encode(x).latent_dist.mode()
        z = codec.encode(x)
        assert torch.allclose(z, (mode - shift) * scale, atol=1e-6)
        # StableDiffusion3Pipeline decodes latents / scaling_factor + shift_factor
        assert torch.allclose(codec.decode(z), vae.decode(z / scale + shift).sample.clamp(-1, 1), atol=1e-6)
        assert torch.allclose(codec.decode(z), vae.decode(mode).sample.clamp(-1, 1), atol=1e-5)


# ------------------------------------------------------------------------------ round 9: UNet levels

def test_unet_attention_works_at_the_same_resolutions_on_the_way_down_and_up():
    # mutants: the default attention level is the first, not the last; up blocks listed in down order
    from dataclasses import replace

    from diffusers import UNet2DModel

    from cmgen.models.unet import unet_kwargs
    from cmgen.recipe import load_recipe

    m = load_recipe("ict_digits").model          # the digits preset: 2 levels, attention at the second
    three = replace(m, block_out_channels=(32, 32, 64))
    kw = unet_kwargs(three, 1, 8, 0)             # a third level, attention_levels unset: the last level
    assert kw["down_block_types"] == ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D")
    assert kw["up_block_types"] == ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")

    kw = unet_kwargs(replace(three, attention_levels=(0,)), 1, 8, 0)
    unet = UNet2DModel(**kw)
    sizes = {"down": [], "up": []}
    for name, mod in unet.named_modules():
        if type(mod).__name__ == "Attention":
            side = "down" if name.startswith(("down_blocks", "mid_block")) else "up"
            if not name.startswith("mid_block"):
                mod.register_forward_hook(lambda mod, args, out, s=side: sizes[s].append(args[0].shape[-1]))
    with torch.no_grad():
        unet(torch.zeros(1, 1, 8, 8), torch.tensor([1.0]))
    assert set(sizes["down"]) == set(sizes["up"]) == {8}


# ------------------------------------------------------------------------------ round 9: the image cache

def test_image_cache_refuses_a_file_rewritten_in_place_with_the_same_size(tmp_path):
    # mutant: the source fingerprint ignores modification times
    import os

    from cmgen.data import image_folder
    from cmgen.errors import UserError

    src = random_image_folder(tmp_path / "imgs")
    image_folder(str(src), 8, cache=str(tmp_path / "cache"))
    victim = src / "b" / "010.png"                   # not the file the size probe decodes
    data, st = bytearray(victim.read_bytes()), victim.stat()
    data[len(data) // 2] ^= 0xFF                     # one byte inside the image data: same size, new content
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert victim.stat().st_size == st.st_size
    with pytest.raises(UserError, match="changed"):
        image_folder(str(src), 8, cache=str(tmp_path / "cache"))


def test_image_cache_of_one_folder_at_two_resolutions_keeps_two_caches(tmp_path):
    # mutant: the cache key leaves out what is cached (the resolution)
    from cmgen.data import image_folder

    src = random_image_folder(tmp_path / "imgs")
    for res in (8, 6, 8):
        cached = image_folder(str(src), res, cache=str(tmp_path / "cache"))
        assert cached.x.shape[-2:] == (res, res)
        assert torch.equal(cached.x, image_folder(str(src), res).x)
    assert len(list((tmp_path / "cache").glob("*/meta.json"))) == 2


# ------------------------------------------------------------------------------ round 9: references

@pytest.mark.parametrize("toy", ["ring", "moons"])
def test_a_toy_reference_is_fresh_draws_not_the_training_points(toy):
    # mutant: the named 2-D reference drawn with the training seed
    import numpy as np

    from cmgen.data import load_dataset
    from cmgen.eval.refstats import TOY_REF_MIN, named_source
    from cmgen.recipe import load_recipe

    r = load_recipe("ict_toy2d", [f"data.toy={toy}"])
    train, _ = load_dataset(r.data, r.train.seed)
    assert named_source(r.data.toy).n == TOY_REF_MIN  # at least this many fresh points
    src = named_source(r.data.toy, n=len(train))     # as many points as the training set (eval.n)
    ref = np.concatenate(list(src.batches(2)))
    assert src.kind == "points" and len(ref) == len(train) > TOY_REF_MIN
    seen = {row.tobytes() for row in train.x.numpy()}
    assert not any(row.tobytes() in seen for row in ref.astype(np.float32))   # no training point among them
    assert abs(ref.std() - train.x.double().std().item()) < 0.05   # same distribution


# ------------------------------------------------------------------ round 10: loading, the CLIs, evaluation tables

def test_weights_of_another_shape_are_one_sentence_and_leave_the_model_as_it_was():  # mutant: shapes unchecked
    from cmgen.errors import UserError
    from cmgen.pretrained import load_weights

    m = _lin(0.5)
    with pytest.raises(UserError, match=r"'weight' has shape \(2, 3\), the recipe builds \(2, 2\)"):
        load_weights(m, {"weight": torch.zeros(2, 3), "bias": torch.zeros(2)}, "w.safetensors")
    assert torch.equal(m.weight, torch.full((2, 2), 0.5)) and torch.equal(m.bias, torch.full((2,), 0.5))


def test_a_vae_folder_holding_another_network_is_refused_by_its_class(tmp_path):  # mutant: any class accepted
    import json

    from cmgen.errors import UserError
    from cmgen.pretrained import load_vae

    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(UserError, match="holds a UNet2DModel, not an AutoencoderKL"):
        load_vae(str(tmp_path / "unet"))


def test_collapsed_samples_have_high_precision_and_low_recall():  # mutant: precision and recall swapped
    from types import SimpleNamespace

    import numpy as np

    from cmgen.eval.fid import MetricOptions, sample_metrics
    from cmgen.eval.frechet import FeatureStats
    from cmgen.eval.refstats import Reference

    rng = np.random.default_rng(0)
    real, fake = FeatureStats(), FeatureStats()
    real.update(rng.normal(size=(400, 2)))
    fake.update(0.1 * rng.normal(size=(400, 2)))  # every sample in the densest part of the data: mode collapse
    row = sample_metrics(fake, Reference(real, {"name": "real"}), SimpleNamespace(kind="points"), MetricOptions())
    assert row["precision"] > 0.9 and row["recall"] < 0.3, row


def test_tables_of_a_checkpoint_go_to_its_runs_eval_folder(tmp_path):  # mutant: inside the checkpoint
    from cmgen.eval.cli import default_out_dir

    ckpt = tmp_path / "run" / "checkpoints" / "step-00000004"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text("{}")
    assert default_out_dir(str(ckpt), "model") == tmp_path / "run" / "eval"
    assert default_out_dir(str(tmp_path / "run"), "model") == tmp_path / "run" / "eval"
    assert default_out_dir(str(tmp_path / "x.npz"), "samples") == Path("eval-x")


def test_kid_is_reported_times_1e3():  # mutant: the x1e3 of the column header not applied
    from cmgen.eval.fid import Table
    from cmgen.eval.report import to_markdown

    row = {"steps": 1, "nfe": 1, "fd": 1.0, "precision": 0.5, "recall": 0.5, "kid": 0.0123, "kid_std": 0.0004}
    md = to_markdown(Table("FD-digits", {}, [row]))
    assert md.splitlines()[0].endswith("| KID x1e3 |") and md.splitlines()[2].endswith("| 12.3 ± 0.4 |")


def test_a_class_label_must_be_below_the_class_count(base_run, tmp_path, capsys):  # mutant: num_classes accepted
    from cmgen.cli import main

    argv = ["sample", str(base_run), "--n", "2", "--steps", "1", "--no-progress", "--threads", "1"]
    assert main(argv + ["--class-label", "10", "--out", str(tmp_path / "a.png")]) == 2  # 10 is the null label
    assert "--class-label must be in [0, 10), got 10" in capsys.readouterr().err
    assert main(argv + ["--class-label", "9", "--out", str(tmp_path / "b.png")]) == 0
