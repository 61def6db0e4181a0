"""CTM formulas: the jump and its scalings, the two-time network and its teacher initialisation, the time
draws, the teacher's Heun steps, which call carries the gradient, DSM, the adaptive weight, the GAN's hinge
loss and G/D alternation, and gamma-sampling's two limits."""
import dataclasses
import math

import pytest
import torch
from conftest import benchmark_module

from cmgen.errors import UserError
from cmgen.methods import Batch, Nets
from cmgen.methods import ctm as ctm_method
from cmgen.methods.ctm import adaptive_weight, dsm_karras_sigma, init_from_teacher, k_probs, output_layer
from cmgen.methods.ctm_gan import diff_augment, hinge_d, hinge_g
from cmgen.models.two_time import TwoTimeUNet2DModel
from cmgen.models.unet import UNetBackbone, unet_kwargs
from cmgen.precond import EDMDenoiser, PrecondConfig, TrajectoryJump, c_noise, edm_c_out, edm_c_skip, edm_loss_weight
from cmgen.rng import BatchRNG
from cmgen.sampling.ctm import ctm_gamma, ctm_times, gamma_target
from cmgen.sampling.edm import edm_heun
from cmgen.sampling.multistep import consistency_multistep
from cmgen.schedules import karras_sigmas

P = PrecondConfig(c_noise="edm")
TINY = ["model.block_out_channels=[16,32]", "model.norm_num_groups=8", "model.attention_head_dim=8"]


def tiny_recipe(*extra):
    from cmgen.recipe import load_recipe

    return load_recipe("ctm_digits", TINY + ["method.teacher=null", "train.batch_size=8", *extra])


def tiny_unet():
    from diffusers import UNet2DModel

    from cmgen.recipe import load_recipe

    torch.manual_seed(0)
    return UNet2DModel(**unet_kwargs(load_recipe("ctm_digits", TINY).model, 1, 8, 0))


def perturb(module, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module


class Probe(torch.nn.Module):
    """A two-time backbone that records its inputs and returns a fixed function of them."""
    two_time = True

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, nt, ns, y=None):
        self.calls.append((x.clone(), nt.clone(), ns.clone()))
        view = (-1,) + (1,) * (x.ndim - 1)
        return 0.3 * x + 0.1 * nt.view(view) - 0.2 * ns.view(view)


# ----------------------------------------------------------------------------- the jump

def test_jump_is_the_s_over_t_skip_around_an_edm_scaled_g():
    probe = Probe()
    net = TrajectoryJump(probe, P)
    x = torch.randn(3, 1, 4, 4)
    t, s = torch.tensor([0.5, 3.0, 60.0]), torch.tensor([0.1, 0.002, 20.0])
    out = net(x, t, s)
    xin, nt, ns = probe.calls[0]
    te = t.view(-1, 1, 1, 1)
    assert torch.allclose(xin, x / (te**2 + 0.25).sqrt())                  # c_in of t only
    assert torch.allclose(nt, c_noise(t, "edm")) and torch.allclose(ns, c_noise(s, "edm"))
    F = 0.3 * xin + 0.1 * nt.view(-1, 1, 1, 1) - 0.2 * ns.view(-1, 1, 1, 1)
    g = edm_c_skip(te, 0.5) * x + edm_c_out(te, 0.5) * F                  # EDM scalings of t, not s
    ratio = (s / t).view(-1, 1, 1, 1)
    assert torch.allclose(out, ratio * x + (1 - ratio) * g, atol=1e-6)
    assert torch.allclose(net(x, t, s, output="g"), g, atol=1e-6)
    # the denoiser is g at s = t, and differs from g at another s
    assert torch.allclose(net.denoise(x, t), net.g(x, t, t), atol=0)
    assert not torch.allclose(net.denoise(x, t), g)


def test_boundary_G_at_s_equal_t_is_the_identity_for_any_weights():
    torch.manual_seed(0)
    net = perturb(TrajectoryJump(UNetBackbone(tiny_unet()), P), 0.2)      # s branch non-zero too
    x = 3 * torch.randn(6, 1, 8, 8)
    for t in (0.002, 0.05, 1.0, 17.0, 80.0):
        tt = torch.full((6,), t)
        err = (net(x, tt, tt) - x).abs()
        assert (err <= 1e-6 * (1 + x.abs())).all(), (t, err.max())


def test_two_time_unet_s_branch_changes_the_output_and_reloads_by_diffusers_name(tmp_path):
    unet = perturb(TwoTimeUNet2DModel(**dict(tiny_unet().config)), 0.2)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1.0, 2.0])
    a = unet(x, t, torch.tensor([0.0, 0.5]), return_dict=False)[0]
    b = unet(x, t, torch.tensor([1.0, -0.5]), return_dict=False)[0]
    assert (a - b).abs().max() > 1e-3                                     # s reaches the output
    unet.save_pretrained(tmp_path / "u")
    again = TwoTimeUNet2DModel.from_pretrained(tmp_path / "u")
    assert torch.allclose(again(x, t, torch.tensor([0.0, 0.5]), return_dict=False)[0], a, rtol=0, atol=1e-5)
    names = {n for n, _ in unet.named_parameters()}
    assert "time_embedding_s.linear_1.weight" in names and "down_blocks.0.resnets.0.time_emb_proj.s.weight" in names
    assert "down_blocks.0.resnets.0.time_emb_proj.weight" in names                 # the teacher's name, kept


def test_student_starts_as_the_teachers_euler_step():
    teacher = perturb(EDMDenoiser(UNetBackbone(tiny_unet()), P), 0.05)
    torch.manual_seed(3)
    student = TrajectoryJump(UNetBackbone(tiny_unet()), P)
    perturb(student.backbone.unet.time_embedding_s, 0.5)                  # any s embedding: its projections are 0
    init_from_teacher(student, teacher, "test")
    x = torch.randn(5, 1, 8, 8) * 10
    t = torch.tensor([80.0, 10.0, 1.0, 0.3, 0.01])
    s = torch.tensor([0.002, 5.0, 0.5, 0.3, 0.002])
    with torch.no_grad():
        euler = x + (s - t).view(-1, 1, 1, 1) * (x - teacher(x, t)) / t.view(-1, 1, 1, 1)
        err = (student(x, t, s) - euler).abs().max()
    assert err <= 1e-5 * max(1.0, x.abs().max().item() / 10), err


def test_a_checkpoint_without_the_s_branch_is_one_clear_sentence():
    from cmgen.pretrained import load_weights

    teacher = EDMDenoiser(UNetBackbone(tiny_unet()), P)
    student = TrajectoryJump(UNetBackbone(tiny_unet()), P)
    with pytest.raises(UserError, match="no s branch.*method.teacher"):
        load_weights(student, teacher.state_dict(), "teacher-ckpt")
    other = EDMDenoiser(UNetBackbone(UNet2DModel_wide()), P)
    with pytest.raises(UserError, match="method.teacher 'x' does not fit"):
        init_from_teacher(student, other, "x")


def test_two_time_mlp_starts_as_the_teachers_euler_step_and_its_s_branch_reaches_the_output():
    from cmgen.models.mlp import MLPBackbone
    from cmgen.models.two_time import TwoTimeMLPBackbone
    from cmgen.pretrained import load_weights

    torch.manual_seed(0)
    teacher = perturb(EDMDenoiser(MLPBackbone(2, 32, 2), P), 0.05)
    student = TrajectoryJump(MLPBackbone(2, 32, 2), P)
    assert isinstance(student.backbone, TwoTimeMLPBackbone)
    perturb(student.backbone.time_embedding_s, 0.5)                       # any s embedding: its projections are 0
    init_from_teacher(student, teacher, "test")
    x = torch.randn(5, 2) * 10
    t = torch.tensor([80.0, 10.0, 1.0, 0.3, 0.01])
    s = torch.tensor([0.002, 5.0, 0.5, 0.3, 0.002])
    with torch.no_grad():
        euler = x + (s - t).view(-1, 1) * (x - teacher(x, t)) / t.view(-1, 1)
        assert (student(x, t, s) - euler).abs().max() <= 1e-5 * max(1.0, x.abs().max().item() / 10)
        for block in student.backbone.blocks:                              # every block's s projection counts
            perturb(block.emb_s, 0.2)
            a = student(x, t, s, output="g")
            b = student(x, t, s * 0.5, output="g")
            assert (a - b).abs().max() > 1e-3
            torch.nn.init.zeros_(block.emb_s.weight)
            torch.nn.init.zeros_(block.emb_s.bias)
        perturb(student, 0.2)
        err = (student(x, t, t) - x).abs()
        assert (err <= 1e-6 * (1 + x.abs())).all()
    with pytest.raises(UserError, match="no s branch.*method.teacher"):
        load_weights(student, teacher.state_dict(), "teacher-ckpt")


def test_ctm_on_points_trains_without_a_gan_and_refuses_one():
    from cmgen.recipe import load_recipe

    small = ["method.teacher=null", "model.hidden=32", "model.depth=2", "train.batch_size=16"]
    r = load_recipe("ctm_toy2d", small)
    m, nets = make_method_from(r)
    out = m.loss(nets, Batch(torch.randn(16, 2) * 0.5, None, BatchRNG(0, 1, 16, 0, 16)), 0)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["lambda_dsm"] > 0
    assert all(p.grad is not None for n, p in nets.model.named_parameters() if ".emb_s." in n)
    with pytest.raises(UserError, match="method.gan_start needs image data.*gan_start: null"):
        make_method_from(load_recipe("ctm_toy2d", small + ["method.gan_start=0"]))


def UNet2DModel_wide():
    from diffusers import UNet2DModel

    from cmgen.recipe import load_recipe

    r = load_recipe("ctm_digits", ["model.block_out_channels=[16,48]", "model.norm_num_groups=8",
                                   "model.attention_head_dim=8"])
    return UNet2DModel(**unet_kwargs(r.model, 1, 8, 0))


# ----------------------------------------------------------------------------- draws and teacher

def test_k_is_drawn_once_per_step_with_p_proportional_to_k():
    assert torch.allclose(k_probs(4), torch.tensor([1, 2, 3, 4], dtype=torch.float64) / 10)
    m = make_method()
    K = m.cfg.max_k
    counts = torch.zeros(K)
    for step in range(3000):
        ks = {m.draw(BatchRNG(0, step, 8, off, 4), 4)[0] for off in (0, 4)}   # two micro-batches of one step
        assert len(ks) == 1
        counts[ks.pop() - 1] += 1
    expect = 3000 * k_probs(K).float()
    chi2 = ((counts - expect) ** 2 / expect).sum()
    assert chi2 < 2 * K + 20, (counts, expect)                            # a uniform k would give chi2 ~ 700


def test_t_and_s_indices_are_uniform_over_their_ranges():
    m = make_method()
    N = m.cfg.grid
    ts, ss = [], []
    for step in range(400):
        k, i_t, i_s = m.draw(BatchRNG(1, step, 64, 0, 64), 64)
        assert (i_t >= 0).all() and (i_t + k <= N - 1).all()
        assert (i_s >= i_t + k).all() and (i_s <= N - 1).all()
        if k == N - 1:
            continue
        ts.append((i_t.float() / (N - 1 - k)).mean())                    # U{0..N-1-k}: mean 1/2 of its range
        span = (N - 1 - i_t - k).float()
        ok = span > 0
        if ok.any():
            ss.append(((i_s - i_t - k).float()[ok] / span[ok]).mean())      # U{n+k..N-1}: mean 1/2 of its range
    assert abs(torch.stack(ts).mean() - 0.5) < 0.02 and abs(torch.stack(ss).mean() - 0.5) < 0.02


def test_teacher_takes_k_heun_steps_on_the_karras_grid():
    m = make_method()
    p = m.recipe.precond
    assert torch.allclose(m.times, karras_sigmas(m.cfg.grid, p.sigma_min, p.sigma_max, p.rho).flip(0))
    S = 0.6  # Gaussian data: D(x, t) = x S^2 / (S^2 + t^2)
    teacher = lambda x, t, y=None: x * (S**2 / (S**2 + t**2)).view(-1, 1, 1, 1)  # noqa: E731
    x = torch.randn(3, 1, 8, 8) * 20
    for i, k in ((0, 3), (5, 1), (2, 12)):
        got = m.teacher_heun(teacher, x, torch.full((3,), i), k)
        grid = [float(v) for v in m.times[i:i + k + 1]]
        ref = edm_heun(teacher, lambda j: x / grid[0], grid)
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)
        exact = x * math.sqrt(S**2 + grid[-1] ** 2) / math.sqrt(S**2 + grid[0] ** 2)
        assert (got - exact).abs().max() < 0.1 * exact.abs().max()


# ----------------------------------------------------------------------------- losses

def make_method(*extra):
    return make_method_from(tiny_recipe(*extra))[0]


def make_method_from(r):
    """(the method of recipe `r` on its data's shape, its nets)."""
    from cmgen.generator import Generator
    from cmgen.methods import build_method

    torch.manual_seed(0)
    gen = Generator.build(r, (2,) if r.data.name == "toy2d" else (1, 8, 8), 0)
    m = build_method(r, gen)
    return m, nets_of(m)


def nets_of(m, target_shift=0.0):
    import copy

    target = copy.deepcopy(m.gen.net).requires_grad_(False)
    perturb(target, target_shift, seed=7) if target_shift else None
    return Nets(model=m.gen.net, target=target, teacher=m.teacher.requires_grad_(False))


def test_estimate_has_the_gradient_of_the_inner_call_and_the_target_none():
    m = make_method()
    perturb(m.gen.net, 0.05)
    nets = nets_of(m, target_shift=0.05)                                    # theta- != theta
    x = torch.randn(4, 1, 8, 8).clamp(-1, 1)
    step = next(st for st in range(100) if m.times[m.draw(BatchRNG(0, st, 4, 0, 4), 4)[2]].max() > 1.0)
    est, tgt, (k, t, u, s) = m.estimate_and_target(nets, Batch(x, None, BatchRNG(0, step, 4, 0, 4)))
    assert est.requires_grad and not tgt.requires_grad and tgt.grad_fn is None
    # recompute with the same draws: estimate = G⁻(G(x_t, t, s), s, σmin), target = G⁻(G(x_u, u, s), s, σmin)
    rng = BatchRNG(0, step, 4, 0, 4)
    k2, i_t, i_s = m.draw(rng, 4)
    z = rng.randn(1, 8, 8)
    x_t = x + t.view(-1, 1, 1, 1) * z
    smin = torch.full((4,), 0.002)
    with torch.no_grad():
        x_u = m.teacher_heun(nets.teacher, x_t, i_t, k)
        ref_est = nets.target(nets.model(x_t, t, s), s, smin)
        ref_tgt = nets.target(nets.model(x_u, u, s), s, smin)
        wrong = nets.model(nets.model(x_t, t, s), s, smin)                 # outer call with theta instead of theta-
    assert k2 == k and torch.allclose(est, ref_est, atol=1e-6) and torch.allclose(tgt, ref_tgt, atol=1e-6)
    assert not torch.allclose(est, wrong, atol=1e-4)
    assert torch.equal(u, m.times[i_t + k].float()) and torch.equal(s, m.times[i_s].float())
    est.pow(2).sum().backward()
    assert all(p.grad is None for p in nets.target.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in nets.model.parameters())


class LabelRecorder(torch.nn.Module):
    """Calls the wrapped net unconditionally and records the class labels it was given (its last argument)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.seen = net, []

    def forward(self, *args):
        self.seen.append(args[-1])
        return self.net(*args[:-1], None)


def test_every_call_of_the_estimate_and_the_target_carries_the_batchs_labels():
    m = make_method()
    nets = nets_of(m)
    rec = Nets({name: LabelRecorder(net) for name, net in nets.items()})
    x, y = torch.randn(4, 1, 8, 8).clamp(-1, 1), torch.tensor([3, 1, 4, 1])
    step = next(st for st in range(100) if m.draw(BatchRNG(0, st, 4, 0, 4), 4)[0] >= 2)   # k >= 2 teacher steps
    m.estimate_and_target(rec, Batch(x, y, BatchRNG(0, step, 4, 0, 4)))
    for name in ("model", "target", "teacher"):   # the teacher's Heun steps included: a class-conditional teacher
        assert rec[name].seen and all(torch.equal(v, y) for v in rec[name].seen), name


def test_the_discriminator_step_scores_real_data_against_the_ctm_estimate():
    from cmgen.methods.ctm_gan import discriminator_loss

    m = make_method("method.gan_start=0")
    perturb(m.gen.net, 0.05)
    nets = nets_of(m, target_shift=0.05)
    nets["disc"] = m.disc
    x = torch.randn(4, 1, 8, 8).clamp(-1, 1)
    got = m.loss(nets, Batch(x, None, BatchRNG(0, 3, 4, 0, 4), phase="disc"), 1)["loss"]
    with torch.no_grad():
        rng = BatchRNG(0, 3, 4, 0, 4)
        est, _, _ = m.estimate_and_target(nets, Batch(x, None, rng), with_target=False)
        want = discriminator_loss(nets.disc, x, est, rng, m.cfg.diffaug)["loss"]
        rng = BatchRNG(0, 3, 4, 0, 4)
        inner, _, _ = m.inner_and_target(nets, Batch(x, None, rng), with_target=False)
        inner_fake = discriminator_loss(nets.disc, x, inner, rng, m.cfg.diffaug)["loss"]
    assert torch.allclose(got, want, atol=1e-6) and not torch.allclose(got, inner_fake, atol=1e-4)


def test_the_discriminator_sees_real_and_fake_through_diffaugment_in_that_order():
    from cmgen.methods.ctm_gan import discriminator_loss

    disc = make_method("method.gan_start=0").disc
    real, fake = torch.rand(4, 1, 8, 8) * 2 - 1, torch.rand(4, 1, 8, 8) * 2 - 1
    policy = "color,translation,cutout"
    got = discriminator_loss(disc, real, fake, BatchRNG(0, 5, 4, 0, 4), policy)["loss"]
    rng = BatchRNG(0, 5, 4, 0, 4)
    real_aug = diff_augment(real, rng, policy)
    fake_aug = diff_augment(fake, rng, policy)
    assert torch.allclose(got, hinge_d(disc(real_aug), disc(fake_aug)), atol=1e-6)
    assert not torch.allclose(got, hinge_d(disc(real), disc(diff_augment(fake, BatchRNG(0, 5, 4, 0, 4), policy))),
                              atol=1e-4)


def test_dsm_sigma_draws_and_edm_weighting():
    m = make_method()
    assert dsm_karras_sigma(torch.tensor(0.0), 0.002, 80, 7) == pytest.approx(80.0)
    assert dsm_karras_sigma(torch.tensor(1.0), 0.002, 80, 7) == pytest.approx(0.002)
    assert dsm_karras_sigma(torch.tensor(0.7), 0.002, 80, 7) == pytest.approx(0.3183, abs=2e-4)
    # the first half of the global batch is lognormal(-1.2, 1.2), the second Karras(r), r ~ U[0, 0.7]
    sig = m.dsm_sigmas(BatchRNG(0, 3, 8, 0, 8))
    rng = BatchRNG(0, 3, 8, 0, 8)
    z, r = rng.randn(), rng.rand()
    assert torch.allclose(sig[:4], torch.exp(-1.2 + 1.2 * z[:4]))
    assert torch.allclose(sig[4:], dsm_karras_sigma(0.7 * r[4:], 0.002, 80.0, 7.0))
    # a micro-batch holding the second half only draws Karras levels (the split is by global index)
    late = m.dsm_sigmas(BatchRNG(0, 3, 8, 4, 4))
    assert torch.allclose(late, sig[4:])
    big = torch.cat([m.dsm_sigmas(BatchRNG(0, st, 512, 0, 512)) for st in range(4)]).view(4, 512)
    assert big[:, 256:].min() >= 0.3183 - 1e-3 and big[:, 256:].max() <= 80
    ln = big[:, :256].log()
    assert abs(ln.mean() + 1.2) < 0.1 and abs(ln.std() - 1.2) < 0.1
    # the DSM term: mean of lambda(sigma) ||g(x_sigma, sigma, sigma) - x||^2 with lambda = 1 / c_out^2
    x = torch.randn(8, 1, 8, 8).clamp(-1, 1)
    nets = nets_of(m)
    loss, mse = m.dsm(nets, Batch(x, None, BatchRNG(0, 3, 8, 0, 8)))
    rng = BatchRNG(0, 3, 8, 0, 8)
    sigma = m.dsm_sigmas(rng)
    noisy = x + rng.randn(1, 8, 8) * sigma.view(-1, 1, 1, 1)
    with torch.no_grad():
        per = (nets.model.g(noisy, sigma, sigma) - x).pow(2).flatten(1).mean(1)
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    assert torch.allclose(edm_loss_weight(sigma, 0.5), lam)
    assert torch.allclose(loss, (lam * per).mean(), rtol=1e-5)


def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_output_layer():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([0.6, 0.8])
    lam = adaptive_weight((a * w).sum(), (b * w).sum(), w, 0.0, 1e4)
    assert lam.item() == pytest.approx(5.0 / (1.0 + 1e-4)) and not lam.requires_grad
    assert adaptive_weight((a * w).sum(), (b * w).sum() * 1e-3, w, 0.01, 10.0).item() == 10.0   # clip high
    assert adaptive_weight((a * w).sum() * 1e-6, (b * w).sum(), w, 0.01, 10.0).item() == pytest.approx(0.01)   # clip low

    m = make_method()
    net = m.gen.net
    assert m.layer is net.backbone.unet.conv_out.weight                  # found by tracing, not by name

    class Late(torch.nn.Module):                                         # registration order != execution order
        def __init__(self):
            super().__init__()
            self.last = torch.nn.Linear(3, 3)
            self.first = torch.nn.Linear(3, 3)

        def forward(self, x):
            return self.last(self.first(x))

    late = Late()
    assert output_layer(late, torch.zeros(1, 3)) is late.last.weight

    # the loss's lambda_DSM from the gradients of L_CTM and L_DSM at conv_out
    perturb(net, 0.05)
    nets = nets_of(m)
    x = torch.randn(8, 1, 8, 8).clamp(-1, 1)
    terms = m.loss(nets, Batch(x, None, BatchRNG(0, 9, 8, 0, 8)), 9)
    _, _, l_ctm, l_dsm = written_out_terms(m, nets, x, 9)
    W = net.backbone.unet.conv_out.weight
    g1, g2 = grad_norm(l_ctm, W), grad_norm(l_dsm, W)
    assert terms["lambda_dsm"].item() == pytest.approx((g1 / (g2 + 1e-4)).item(), rel=1e-4)
    assert terms["loss"].item() == pytest.approx((l_ctm + terms["lambda_dsm"] * l_dsm).item(), rel=1e-5)
    other = [p for n, p in net.named_parameters() if "conv_in" in n][0]
    g1o, g2o = grad_norm(l_ctm, other), grad_norm(l_dsm, other)
    assert abs(g1o / (g2o + 1e-4) - g1 / (g2 + 1e-4)) > 1e-3 * (g1 / g2)    # the layer matters
    assert_same_gradient(net, terms["loss"], l_ctm + terms["lambda_dsm"] * l_dsm)


def written_out_terms(m, nets, x, step):
    """(rng, estimate, L_CTM, L_DSM) written out from the method's parts with the draws of its loss at `step`."""
    rng = BatchRNG(0, step, 8, 0, 8)
    est, tgt, _ = m.estimate_and_target(nets, Batch(x, None, rng))
    l_ctm = (est - tgt).pow(2).flatten(1).mean(1).mean()
    l_dsm, _ = m.dsm(nets, Batch(x, None, rng))
    return rng, est, l_ctm, l_dsm


def grad_norm(loss, param):
    return torch.autograd.grad(loss, param, retain_graph=True)[0].norm()


def assert_same_gradient(net, got, want):
    """The loss the method returns (surrogates through theta⁻) has the gradient of the written-out terms."""
    params = [p for p in net.parameters() if p.requires_grad]
    a = torch.cat([g.flatten() for g in torch.autograd.grad(got, params, retain_graph=True)])
    b = torch.cat([g.flatten() for g in torch.autograd.grad(want, params, retain_graph=True)])
    assert (a - b).norm() <= 1e-4 * b.norm() and b.norm() > 0


# ----------------------------------------------------------------------------- GAN

def test_hinge_losses_apply_per_position_average_each_head_then_the_heads():
    # two heads with [B=2, positions] logit maps of different sizes, as the discriminator returns them
    real = [torch.tensor([[2.0, 0.0], [0.5, -1.0]]), torch.tensor([[3.0], [-1.0]])]
    fake = [torch.tensor([[-2.0, 1.0], [0.3, -0.5]]), torch.tensor([[-0.5], [2.0]])]
    # head 0 real: relu(1-l) = 0, 1, .5, 2 -> mean .875; head 1 real: 0, 2 -> 1
    # head 0 fake: relu(1+l) = 0, 2, 1.3, .5 -> mean .95; head 1 fake: .5, 3 -> 1.75
    assert hinge_d(real, fake).item() == pytest.approx((0.875 + 1.0) / 2 + (0.95 + 1.75) / 2)
    # the hinge of each position, not of a head's mean logit: head 0's real mean logit .375 would give .625
    assert hinge_g(fake).item() == pytest.approx(-((-2.0 + 1.0 + 0.3 - 0.5) / 4 + (-0.5 + 2.0) / 2) / 2)


def test_diffaugment_translates_and_cuts_out_with_keyed_draws():
    x = torch.arange(64.0).view(1, 1, 8, 8).repeat(4, 1, 1, 1)
    t = diff_augment(x, BatchRNG(0, 0, 4, 0, 4), "translation")
    rng = BatchRNG(0, 0, 4, 0, 4)
    dy, dx = rng.randint(-1, 2), rng.randint(-1, 2)
    for b in range(4):
        shifted = torch.zeros(10, 10)
        shifted[1:9, 1:9] = x[b, 0]
        ys, xs = torch.arange(8) + dy[b] + 1, torch.arange(8) + dx[b] + 1
        assert torch.equal(t[b, 0], shifted[ys][:, xs])
    c = diff_augment(x + 1, BatchRNG(0, 0, 4, 0, 4), "cutout")
    holes = (c == 0).flatten(1).sum(1)                                   # a 2x2 hole (0.2 * 8 rounds to 2), cut at borders
    assert (holes >= 1).all() and (holes <= 4).all() and (holes == 4).any()
    fake = torch.randn(4, 1, 8, 8, requires_grad=True)
    diff_augment(fake, BatchRNG(0, 0, 4, 0, 4), "color,translation,cutout").sum().backward()
    assert fake.grad.abs().sum() > 0


def test_gan_alternates_g_and_d_steps_and_the_emas_move_on_g_steps_only(tmp_path):
    from cmgen.train import Trainer

    r = tiny_recipe("method.gan_start=2", "train.steps=6", "train.ema_decay=0.5", "method.target_decay=0.5",
                    "train.checkpoint_every=100", "train.sample_every=0", "method.max_k=2")
    tr = Trainer(r, tmp_path / "run", progress=False)
    assert [tr.method.phases(s) for s in range(6)] == [("model",)] * 3 + [("disc",), ("model",), ("disc",)]
    snap = lambda mod: [p.detach().clone() for p in mod.parameters()]  # noqa: E731
    changed = lambda a, b: any(not torch.equal(x, y) for x, y in zip(a, b))  # noqa: E731
    for step in range(6):
        model, disc, ema = snap(tr.model), snap(tr.parts["disc"].module), [s.clone() for s in tr.parts["model"].ema.shadow]
        target = snap(tr.targets["target"].module)
        terms = tr.train_step()
        g_step = step < 2 or step % 2 == 0
        assert changed(model, snap(tr.model)) == g_step
        assert changed(ema, tr.parts["model"].ema.shadow) == g_step
        assert changed(target, snap(tr.targets["target"].module)) == g_step
        assert changed(disc, snap(tr.parts["disc"].module)) == (not g_step)
        if step >= 2 and g_step:
            assert 0.01 <= terms["lambda_gan"] <= 10 and "gan_g" in terms
        if not g_step:
            assert "disc/loss" in terms
    assert ctm_method.GAN_WEIGHT_RANGE == (0.01, 10.0) and ctm_method.DSM_WEIGHT_RANGE == (0.0, 1e4)


def test_the_target_takes_its_gan_stage_decay_from_gan_start_on(tmp_path):
    from cmgen.train import Trainer

    r = tiny_recipe("method.gan_start=2", "train.steps=6", "method.target_decay=0.5", "method.target_decay_gan=0.9",
                    "train.checkpoint_every=100", "train.sample_every=0", "method.max_k=2")
    tr = Trainer(r, tmp_path / "run", progress=False)
    for step in range(5):
        before = [p.detach().clone() for p in tr.targets["target"].module.parameters()]
        tr.train_step()
        if tr.method.phases(step) != ("model",):
            continue
        mu = 0.9 if step >= 2 else 0.5                  # the G steps 0, 1 before the GAN; 2, 4 in it
        for old, new, p in zip(before, tr.targets["target"].module.parameters(), tr.model.parameters()):
            assert torch.allclose(new, mu * old + (1 - mu) * p.detach(), atol=1e-6)
    assert [tr.method.target_decay_at(s) for s in (0, 1, 2, 3)] == [0.5, 0.5, 0.9, 0.9]
    assert make_method("method.target_decay=0.3").targets() == {"target": 0.3}   # theta⁻'s own, not train.ema_decay


def test_logged_terms_are_means_over_the_steps_of_their_phase(tmp_path):
    """G and D steps alternate: each logged term averages the steps that reported it, not every step."""
    import json

    from cmgen.train import train

    r = tiny_recipe("method.gan_start=0", "train.steps=4", "train.log_every=4", "train.checkpoint_every=100",
                    "train.sample_every=0", "method.max_k=2", "optim.lr=3e-4", "method.disc_lr=2e-3")
    run = train(r, tmp_path / "run", progress=False)
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["step"] == 4 and row["lr"] == pytest.approx(3e-4) and row["disc/lr"] == pytest.approx(2e-3)


def test_the_generator_loss_adds_the_clipped_adaptive_gan_term():
    from cmgen.methods.ctm_gan import generator_loss

    m = make_method("method.gan_start=0")
    perturb(m.gen.net, 0.05)
    nets = nets_of(m)
    nets["disc"] = m.disc
    x = torch.randn(8, 1, 8, 8).clamp(-1, 1)
    terms = m.loss(nets, Batch(x, None, BatchRNG(0, 0, 8, 0, 8)), 0)
    rng, est, l_ctm, l_dsm = written_out_terms(m, nets, x, 0)
    l_g = generator_loss(nets.disc, est, rng, m.cfg.diffaug)
    g1, g_gan, g_dsm = (grad_norm(loss, m.layer) for loss in (l_ctm, l_g, l_dsm))
    lam_gan = (g1 / (g_gan + 1e-4)).clamp(0.01, 10.0)
    lam_dsm = g1 / (g_dsm + 1e-4)
    assert terms["lambda_gan"].item() == pytest.approx(lam_gan.item(), rel=1e-4)
    want = l_ctm + lam_dsm * l_dsm + lam_gan * l_g
    assert terms["loss"].item() == pytest.approx(want.item(), rel=1e-4)
    assert_same_gradient(m.gen.net, terms["loss"], want)


# ----------------------------------------------------------------------------- gamma-sampling

def jump_net():
    torch.manual_seed(0)
    return perturb(TrajectoryJump(UNetBackbone(tiny_unet()), P), 0.05).eval()


def seeded(n=4, seed=0):
    from cmgen.sampling.multistep import per_image_noise

    return per_image_noise(list(range(seed, seed + n)), (1, 8, 8))


def test_gamma_one_is_consistency_multistep():
    net = jump_net()
    times = [80.0, 5.0, 0.7, 0.1]
    a = ctm_gamma(net, seeded(), times, gamma=1.0)
    f = lambda x, t, y=None: net(x, t, torch.full_like(t, 0.002), y)   # noqa: E731  f(x, t) = G(x, t, sigma_min)
    b = consistency_multistep(f, seeded(), times, sigma_min=0.002)
    assert torch.allclose(a, b, atol=1e-6)


def test_gamma_zero_is_deterministic_jumps_along_the_times():
    net = jump_net()
    times = ctm_times(3)
    a = ctm_gamma(net, seeded(), times, gamma=0.0, clip_denoised=False)
    other = seeded(seed=100)
    b = ctm_gamma(net, lambda k: seeded()(0) if k == 0 else other(k), times, gamma=0.0, clip_denoised=False)
    assert torch.equal(a, b)                                             # no renoising noise used
    x = seeded()(0) * times[0]
    with torch.no_grad():
        for t, s in zip(times, times[1:] + [0.002]):
            x = net(x, torch.full((4,), t), torch.full((4,), s))
    assert torch.allclose(a, x, atol=1e-6)
    assert ctm_times(2) == pytest.approx([80.0, 2.5152], abs=1e-3)      # the reference's 2-step midpoint


def test_intermediate_gamma_jumps_to_s_and_renoises_to_the_next_time():
    calls = []

    def jump(x, t, s, y=None):
        calls.append((t[0].item(), s[0].item(), x.clone()))
        return torch.zeros_like(x)

    times, gamma = [80.0, 10.0, 1.0], 0.6
    noise = seeded()
    ctm_gamma(jump, noise, times, gamma=gamma)
    for n, (t, s, x_in) in enumerate(calls):
        t_next = times[n + 1] if n + 1 < len(times) else 0.002
        want_s = math.sqrt(1 - gamma**2) * (t_next - 0.002) + 0.002 if n + 1 < len(times) else 0.002
        assert t == pytest.approx(times[n]) and s == pytest.approx(want_s, rel=1e-6)
        if n > 0:   # the previous jump returned 0: the input is the renoising alone, std sqrt(t^2 - s_prev^2)
            s_prev = calls[n - 1][1]
            assert torch.allclose(x_in, math.sqrt(t**2 - s_prev**2) * noise(n), rtol=1e-5)
    assert gamma_target(5.0, 0.0, 0.002) == pytest.approx(5.0) and gamma_target(5.0, 1.0, 0.002) == 0.002


def test_cli_samples_a_ctm_run_with_gamma(tmp_path, capsys):
    import numpy as np

    from cmgen.cli import main
    from cmgen.runs import load_model
    from cmgen.train import train

    run = train(tiny_recipe("train.steps=2", "train.checkpoint_every=2", "train.sample_n=4", "method.max_k=2"),
                tmp_path / "run", progress=False)
    for gamma in ("0", "1"):
        assert main(["sample", str(run), "--steps", "3", "--gamma", gamma, "--n", "4", "--out",
                     str(tmp_path / f"g{gamma}"), "--no-progress"]) == 0
    gen = load_model(run)
    times = ctm_times(3)
    for gamma in (0.0, 1.0):
        got = np.load(tmp_path / f"g{int(gamma)}.npz")["samples"]
        want = ctm_gamma(gen.net, seeded(), times, gamma=gamma)
        assert np.allclose(got, want.numpy(), atol=1e-5)
    assert main(["sample", str(run), "--gamma", "1.5", "--n", "2", "--out", str(tmp_path / "bad"), "--no-progress"]) != 0
    assert "--gamma must be in [0, 1]" in capsys.readouterr().err


def test_bad_recipe_fields_name_the_field():
    with pytest.raises(UserError, match="method.max_k"):
        tiny_recipe("method.max_k=17")
    with pytest.raises(UserError, match="method.distance"):
        tiny_recipe("method.distance=l1")
    with pytest.raises(UserError, match="method.lpips_weights"):
        make_method("method.distance=lpips")
    with pytest.raises(UserError, match="method.disc_weights"):
        make_method("method.gan_start=0", "method.disc_features=timm:deit_base_distilled_patch16_224")
    with pytest.raises(UserError, match="method.teacher 'nowhere' does not exist"):
        make_method("method.teacher=nowhere")
    from cmgen.generator import Generator

    with pytest.raises(UserError, match="model.arch: mlp, or unet with model.norm: group"):
        Generator.build(tiny_recipe("model.norm=nsln"), (1, 8, 8), 0)


def test_export_samples_equal_cmgen_sample_for_both_gammas(tmp_path):
    import numpy as np

    from cmgen.cli import main
    from cmgen.pipelines import CMGenCTMPipeline
    from cmgen.train import train

    run = train(tiny_recipe("train.steps=2", "train.checkpoint_every=2", "train.sample_n=4", "method.max_k=2"),
                tmp_path / "run", progress=False)
    assert main(["export", str(run), "--to", str(tmp_path / "pipe")]) == 0
    pipe = CMGenCTMPipeline.from_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    for gamma, steps in ((0.0, 1), (0.0, 3), (1.0, 3)):
        out = tmp_path / f"s{gamma}-{steps}.npz"
        assert main(["sample", str(run), "--steps", str(steps), "--gamma", str(gamma), "--n", "3", "--out", str(out),
                     "--no-progress"]) == 0
        ours = torch.from_numpy(np.load(out)["samples"] / 2 + 0.5).clamp(0, 1)
        gens = [torch.Generator().manual_seed(j) for j in range(3)]
        theirs = pipe(batch_size=3, num_inference_steps=steps, gamma=gamma, generator=gens, output_type="pt").images
        assert torch.allclose(ours.float(), theirs.float(), atol=1e-5), (gamma, steps)
    # the export loads back as a CTM Generator (cmgen sample on the pipeline folder)
    assert main(["sample", str(tmp_path / "pipe"), "--steps", "2", "--gamma", "0.5", "--n", "2", "--out",
                 str(tmp_path / "back.npz"), "--no-progress"]) == 0


def test_export_of_a_run_whose_default_sampler_is_multistep_or_heun(tmp_path, capsys):
    """The pipeline's default is the run's: multistep is gamma-sampling at gamma = 1, so the pipeline's default call
    equals `cmgen sample`; heun, which the pipeline does not run, is one sentence and writes nothing."""
    import numpy as np

    from cmgen.cli import main
    from cmgen.pipelines import CMGenCTMPipeline
    from cmgen.train import train

    run = train(tiny_recipe("train.steps=2", "train.checkpoint_every=2", "train.sample_n=4", "method.max_k=2",
                            "sample.sampler=multistep"), tmp_path / "run", progress=False)
    assert main(["export", str(run), "--to", str(tmp_path / "pipe")]) == 0
    pipe = CMGenCTMPipeline.from_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    assert main(["sample", str(run), "--steps", "3", "--n", "3", "--out", str(tmp_path / "s.npz"), "--no-progress"]) == 0
    ours = torch.from_numpy(np.load(tmp_path / "s.npz")["samples"] / 2 + 0.5).clamp(0, 1)
    theirs = pipe(batch_size=3, num_inference_steps=3, generator=[torch.Generator().manual_seed(j) for j in range(3)],
                  output_type="pt").images
    assert pipe.config.default_gamma == 1.0 and torch.allclose(ours.float(), theirs.float(), atol=1e-5)
    recipe = run / "checkpoints" / "step-00000002" / "recipe.yaml"   # the recipe a checkpoint loads with
    recipe.write_text(recipe.read_text().replace("sampler: multistep", "sampler: heun"))
    capsys.readouterr()
    assert main(["export", str(run), "--to", str(tmp_path / "heun")]) == 2
    err = capsys.readouterr().err.strip()
    assert "sample.sampler=heun" in err and str(recipe) in err and len(err.splitlines()) == 1
    assert not (tmp_path / "heun").exists()


def test_paper_settings_of_the_ctm_gpu_recipes():
    from cmgen.recipe import load_recipe

    c = load_recipe("ctm_cifar10")
    m = c.method
    assert (m.grid, m.max_k, m.distance, m.target_decay, m.p_mean, m.p_std, m.dsm_karras_r) == \
        (18, 17, "lpips", 0.999, -1.2, 1.2, 0.7)
    assert (c.optim.name, c.optim.lr, c.train.batch_size, m.gan_start, m.disc_lr, m.disc_betas, m.gan_period) == \
        ("radam", 4e-4, 256, 50000, 2e-3, (0.5, 0.9), 2)
    assert m.target_decay_gan == 0.9999                  # the unconditional CIFAR-10 GAN run's theta⁻
    i = load_recipe("ctm_imagenet64")
    teacher = load_recipe("edm_imagenet64")   # the recipe of its teacher run (runs/edm_imagenet64)
    assert i.method.teacher == "runs/edm_imagenet64" and teacher.method.__module__.endswith("edm")
    assert dataclasses.replace(teacher.model, dropout=i.model.dropout) == i.model   # load_teacher's shape check
    assert (teacher.precond, teacher.data) == (i.precond, i.data)                  # c_noise cm, sigma_data
    assert (teacher.train.batch_size, teacher.optim.lr, teacher.model.dropout) == (4096, 2e-4, 0.1)
    assert teacher.train.ema_decay == pytest.approx(0.5 ** (4096 / 50e6), abs=1e-6)   # half-life 50M images
    assert (i.method.grid, i.method.max_k, i.train.batch_size, i.model.class_conditional, i.precond.c_noise) == \
        (40, 39, 1440, True, "cm")


@pytest.mark.slow
@pytest.mark.parametrize("name,extra", [
    ("ctm_cifar10", ["method.gan_start=0"]),
    ("ctm_imagenet64", ["train.mixed_precision=no"])])
def test_ctm_gpu_recipes_smoke_on_the_cpu(capsys, name, extra):
    """The real models, 2 steps on random data; a random teacher (no teacher run here), K = 2 to keep the
    teacher's Heun steps few, L2 (no LPIPS weights here); for CIFAR-10 the GAN stage from step 0 (a G step, then a D step)."""
    from cmgen.cli import main

    code = main(["train", name, "method.teacher=null", "method.max_k=2", "method.distance=l2", *extra, "--smoke"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "-> ok" in out


def test_a_resumed_gan_run_equals_a_straight_one(tmp_path):
    """The target theta-, the discriminator and its optimizer are checkpointed: 2 + 2 steps equal 4."""
    from cmgen.checkpoint import load_tensors
    from cmgen.train import train

    extra = ("method.gan_start=1", "train.steps=4", "train.checkpoint_every=2", "train.sample_every=0",
             "train.sample_n=4", "method.max_k=2")
    straight = train(tiny_recipe(*extra), tmp_path / "a", progress=False)
    train(tiny_recipe(*extra), tmp_path / "b", progress=False, stop_after=2)
    resumed = train(tiny_recipe(*extra), tmp_path / "b", resume="auto", progress=False)
    for name in ("model", "ema", "target-target", "disc", "disc-optimizer"):
        a = load_tensors(straight / "checkpoints" / "step-00000004" / f"{name}.safetensors")
        b = load_tensors(resumed / "checkpoints" / "step-00000004" / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), name


def test_only_estimates_at_sigma_min_are_clipped():
    skip = lambda x, t, s, y=None: x * (s / t).view(-1, 1, 1, 1)  # noqa: E731  G = (s/t) x exactly (g = 0)
    times = ctm_times(4)
    z = seeded()(0)
    out = ctm_gamma(skip, seeded(), times, gamma=0.0, clip_denoised=True)
    assert torch.allclose(out, (0.002 * z).clamp(-1, 1), atol=1e-6)      # intermediate states (|x| >> 1) not clipped
    out1 = ctm_gamma(skip, seeded(), times, gamma=1.0, clip_denoised=True)
    assert out1.abs().max() <= 1.0


def test_ctm_checks_count_samples_near_modes_and_each_modes_mass():
    mode_checks = benchmark_module("ctm_checks").mode_checks

    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    labels = torch.arange(4).repeat(500)
    ref = centres[labels] + 0.05 * torch.randn(2000, 2, generator=g)
    on = centres[torch.tensor([0] * 300 + [1] * 100 + [2] * 100)] + 0.05 * torch.randn(500, 2, generator=g)
    off = torch.zeros(500, 2)                                           # between the modes, 1 from each
    got = mode_checks(torch.cat([on, off]), ref, labels)
    inside = 1 - math.exp(-4.5)                  # P(|z| <= 3) for a 2-D standard normal z
    assert abs(got["within_3std"] - 0.5 * inside) < 0.01
    # nearest-mode masses: the 500 at the centre tie and go to mode 0 (800 of 1000), mode 3 holds none
    assert got["mode_mass_dev"] > 1.0
    even = mode_checks(ref, ref, labels)
    assert abs(even["within_3std"] - inside) < 0.005 and even["mode_mass_dev"] < 1e-9
