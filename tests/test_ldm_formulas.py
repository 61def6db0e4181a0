"""Stable Diffusion's VP process and the LCM formulas, pinned against diffusers' own classes: the scaled-linear
schedule, eps/v conversions, DDIM (sampler and LCD's skip-step solver), LCMScheduler timesteps, boundary
scalings and steps, and the LCM pipeline's guidance embedding."""
import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler, LatentConsistencyModelPipeline

from cmgen.vp import (VPSchedule, add_noise, ddim_timesteps, guidance_embedding, lcm_boundary_scalings,
                      lcm_timesteps, skip_step_grid, to_x0_eps, velocity)

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _sd_ddim(prediction_type="epsilon", **kw):
    return DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                         prediction_type=prediction_type, **kw)


def test_scaled_linear_schedule_equals_diffusers_and_is_not_linear():
    ours = VPSchedule().alphas_cumprod()
    assert torch.equal(ours, DDPMScheduler(**SD).alphas_cumprod)
    linear = torch.cumprod(1 - torch.linspace(0.00085, 0.012, 1000), 0)
    assert (ours - linear).abs().max() > 1e-3
    betas = VPSchedule().betas()
    assert betas[0].item() == pytest.approx(0.00085, rel=1e-5) and betas[-1].item() == pytest.approx(0.012, rel=1e-5)


def test_add_noise_and_velocity_equal_diffusers_and_conversions_invert_them():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 4, 4, 4, generator=g), torch.randn(6, 4, 4, 4, generator=g)
    t = torch.tensor([0, 1, 250, 500, 900, 999])
    sched = DDPMScheduler(**SD)
    ac = sched.alphas_cumprod
    z = add_noise(x0, eps, ac, t)
    assert torch.allclose(z, sched.add_noise(x0, eps, t), atol=1e-6)
    v = velocity(x0, eps, ac, t)
    assert torch.allclose(v, sched.get_velocity(x0, eps, t), atol=1e-6)
    for out, kind in ((eps, "epsilon"), (v, "v_prediction")):
        x0_hat, eps_hat = to_x0_eps(out, z, ac, t, kind)
        assert torch.allclose(x0_hat[1:], x0[1:], atol=1e-4) and torch.allclose(eps_hat, eps, atol=1e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [1, 10, 50])
def test_ddim_sampler_equals_diffusers_ddim_with_sd_settings(prediction_type, steps):
    from cmgen.sampling.ddim import ddim

    g = torch.Generator().manual_seed(1)
    A = torch.randn(16, 16, generator=g) * 0.2

    def net(z, t, labels=None):  # any deterministic function of (z, t)
        tt = (t.float() / 1000).view(-1, 1, 1, 1)
        return torch.tanh((z.flatten(1) @ A).view_as(z)) * (1 - tt) + 0.3 * tt * z

    z0 = torch.randn(3, 1, 4, 4, generator=g)
    sched = _sd_ddim(prediction_type)
    sched.set_timesteps(steps)
    assert [int(t) for t in sched.timesteps] == ddim_timesteps(steps)
    z = z0.clone()
    for t in sched.timesteps:
        z = sched.step(net(z, t.expand(3)), t, z).prev_sample
    ours = ddim(net, lambda k: z0, ddim_timesteps(steps), VPSchedule().alphas_cumprod(), prediction_type)
    assert torch.allclose(ours, z, atol=1e-5)


def test_lcd_solver_step_equals_diffusers_ddim_on_the_trailing_50_step_grid():
    """LCD's guided skip-step solver: t_s = 20(n+1) - 1 -> t_e = t_s - 20 (alpha_bar_0 for n = 0) is DDIMScheduler's
    step on the trailing 50-step grid with the CFG'd eps, eps_c + w (eps_c - eps_u)."""
    from cmgen.methods.lcd import guided_solver_step

    grid = skip_step_grid()
    assert grid[0] == 19 and grid[-1] == 999 and len(grid) == 50
    sched = DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing")
    sched.set_timesteps(50)
    assert torch.equal(sched.timesteps.flip(0), grid)
    g = torch.Generator().manual_seed(2)
    ac = VPSchedule().alphas_cumprod()
    for n in (0, 1, 17, 49):
        z = torch.randn(2, 4, 4, 4, generator=g)
        eps_c, eps_u = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
        w = torch.tensor([1.5, 7.0])
        t = grid[n].expand(2)
        fake = {"c": eps_c, "u": eps_u}
        teacher = lambda zz, tt, c: to_x0_eps(fake[c], zz, ac, tt, "epsilon")  # noqa: E731
        ours = guided_solver_step(teacher, z, t, "c", "u", w, n, grid, ac)
        for i in range(2):
            e = eps_c[i] + w[i] * (eps_c[i] - eps_u[i])
            ref = sched.step(e[None], grid[n], z[i:i + 1]).prev_sample
            assert torch.allclose(ours[i:i + 1], ref, atol=2e-5), n


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8, 50])
def test_lcm_timesteps_equal_lcm_scheduler(steps):
    sched = LCMScheduler(**SD)
    sched.set_timesteps(steps)
    assert lcm_timesteps(steps) == [int(t) for t in sched.timesteps]


def test_lcm_timesteps_golden_values_and_not_the_strided_rule():
    assert lcm_timesteps(2) == [999, 499]
    assert lcm_timesteps(4) == [999, 759, 499, 259]
    assert lcm_timesteps(8) == [999, 879, 759, 639, 499, 379, 259, 139]
    assert lcm_timesteps(4) != [999, 759, 519, 279]


def test_boundary_scalings_equal_lcm_scheduler_and_golden_values():
    sched = LCMScheduler(**SD)
    t = torch.tensor([0, 1, 19, 259, 499, 999])
    c_skip, c_out = lcm_boundary_scalings(t)
    for i, tt in enumerate(t.tolist()):
        ref_skip, ref_out = sched.get_scalings_for_boundary_condition_discrete(tt)
        assert c_skip[i].item() == pytest.approx(float(ref_skip), rel=1e-6)
        assert c_out[i].item() == pytest.approx(float(ref_out), rel=1e-6)
    assert c_skip[0] == 1 and c_out[0] == 0
    assert c_skip[2].item() == pytest.approx(0.25 / (190**2 + 0.25), rel=1e-6)       # ~6.9e-6
    assert c_out[3].item() == pytest.approx(2590 / math.sqrt(2590**2 + 0.25), rel=1e-7)  # no sigma_data factor


def test_guidance_embedding_equals_the_lcm_pipeline():
    w = torch.tensor([0.0, 1.0, 2.5, 7.0])
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=256)
    assert torch.allclose(guidance_embedding(w, 256), ref, atol=1e-6)
    i = torch.arange(128, dtype=torch.float64)
    by_hand = 1000 * 2.5 * torch.exp(-math.log(1e4) * i / 127)  # arguments up to 2500 rad: float32 keeps ~3e-4
    assert torch.allclose(guidance_embedding(torch.tensor([2.5]), 256)[0].double(),
                          torch.cat([by_hand.sin(), by_hand.cos()]), atol=1e-3)
    assert torch.allclose(guidance_embedding(w, 255), LatentConsistencyModelPipeline.get_guidance_scale_embedding(
        None, w, embedding_dim=255), atol=1e-6)


def _tiny_student(prediction_type="epsilon"):
    from diffusers import UNet2DConditionModel

    from cmgen.models.ldm_unet import CondUNetBackbone, LatentConsistency

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                up_block_types=("AttnUpBlock2D", "UpBlock2D"), mid_block_type="UNetMidBlock2D",
                                norm_num_groups=8, attention_head_dim=8, cross_attention_dim=32, num_class_embeds=11,
                                time_cond_proj_dim=256)
    return LatentConsistency(CondUNetBackbone(unet), VPSchedule(), prediction_type).eval(), unet


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_student_is_lcm_scheduler_denoised_of_the_unet_with_the_w_embedding(prediction_type):
    net, unet = _tiny_student(prediction_type)
    sched = LCMScheduler(**SD, prediction_type=prediction_type)
    sched.set_timesteps(4)
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([3, 10])
    w = 2.5
    emb = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.tensor([w, w]), embedding_dim=256)
    with torch.no_grad():
        for t in sched.timesteps[:2]:
            out = unet(z, t, encoder_hidden_states=None, class_labels=labels, timestep_cond=emb).sample
            sched._step_index = None
            ref = sched.step(out, t, z).denoised
            assert torch.allclose(net(z, t.expand(2), labels, w), ref, atol=1e-5)
        # the w-embedding reaches the output
        assert not torch.allclose(net(z, 999, labels, 0.0), net(z, 999, labels, 3.0))


def test_lcm_sampler_equals_lcm_scheduler_loop_with_its_noise():
    from cmgen.sampling.lcm import lcm_multistep

    net, unet = _tiny_student()
    labels = torch.tensor([1, 7])
    w = 1.5
    emb = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.tensor([w, w]), embedding_dim=256)
    sched = LCMScheduler(**SD)
    sched.set_timesteps(4)
    g = torch.Generator().manual_seed(4)
    z = torch.randn(2, 4, 4, 4, generator=g)
    state = g.get_state()
    draws = {0: z.clone()}
    g2 = torch.Generator()
    g2.set_state(state)

    def noise(k):
        if k not in draws:
            draws[k] = torch.randn(2, 4, 4, 4, generator=g2)
        return draws[k]

    with torch.no_grad():
        for t in sched.timesteps:
            out = unet(z, t, encoder_hidden_states=None, class_labels=labels, timestep_cond=emb).sample
            z, denoised = sched.step(out, t, z, generator=g, return_dict=False)
        ours = lcm_multistep(net, noise, lcm_timesteps(4), VPSchedule().alphas_cumprod(), w=w, class_labels=labels)
    assert torch.allclose(ours, denoised, atol=1e-5)
    with torch.no_grad():  # one step is deterministic: f at t = 999
        one = lcm_multistep(net, noise, [999], VPSchedule().alphas_cumprod(), w=w, class_labels=labels)
    assert torch.allclose(one, net(draws[0], 999, labels, w), atol=1e-6)
