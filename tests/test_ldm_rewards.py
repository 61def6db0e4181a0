"""The latent diffusion teacher's loss (eps and v targets, label dropout) against diffusers' DDPMScheduler, and
the RG-LCD rewards: digit-class probability of the sample's own label, ink, JPEG compressibility and its
differentiable surrogate."""
import io

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from cmgen.methods import Batch, Nets
from cmgen.rng import BatchRNG

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _ldm(prediction_type, label_dropout=0.1):
    from cmgen.generator import Generator
    from cmgen.methods import build_method
    from cmgen.recipe import from_tree

    tree = {"name": "t", "method": {"name": "ldm", "prediction_type": prediction_type, "label_dropout": label_dropout},
            "data": {"name": "random", "channels": 4, "resolution": 4, "num_classes": 10},
            "model": {"arch": "unet", "block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8,
                      "attention_head_dim": 8, "class_conditional": True}, "train": {"batch_size": 16}}
    recipe = from_tree(tree)
    torch.manual_seed(0)
    gen = Generator.build(recipe, (4, 4, 4), 10, "image")
    return build_method(recipe, gen), gen


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ldm_loss_is_mse_to_eps_or_v_at_a_uniform_timestep(prediction_type):
    m, gen = _ldm(prediction_type, label_dropout=0.0)
    x0 = torch.randn(16, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(16) % 10
    got = m.loss(Nets(model=gen.net), Batch(x0, labels, BatchRNG(3, 7, 16, 0, 16)), 7)["loss"]
    rng = BatchRNG(3, 7, 16, 0, 16)
    t, eps = rng.randint(0, 1000), rng.randn(4, 4, 4)
    sched = DDPMScheduler(**SD, prediction_type=prediction_type)
    zt = sched.add_noise(x0, eps, t)
    target = eps if prediction_type == "epsilon" else sched.get_velocity(x0, eps, t)
    with torch.no_grad():
        want = (gen.net(zt, t, labels) - target).pow(2).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert (t.max() - t.min()) > 500   # uniform over 0..999, not a fixed level


def test_label_dropout_uses_the_null_label_about_ten_percent_of_the_time():
    from cmgen.methods.edm import drop_labels

    m, gen = _ldm("epsilon")
    assert gen.null_label == 10 and gen.net.backbone.unet.config.num_class_embeds == 11
    labels = torch.zeros(4000, dtype=torch.long)
    dropped = drop_labels(labels, BatchRNG(0, 0, 4000, 0, 4000), m.cfg.label_dropout, gen.null_label)
    frac = (dropped == 10).float().mean().item()
    assert 0.085 < frac < 0.115 and set(dropped.unique().tolist()) == {0, 10}


def test_ldm_samples_with_ddim_and_classifier_free_guidance_through_the_generator():
    """gen.sample with --cfg s runs DDIM on eps_u + s (eps_c - eps_u), the null label being num_classes."""
    from cmgen.sampling.ddim import ddim
    from cmgen.vp import ddim_timesteps

    _, gen = _ldm("epsilon")
    gen.net.eval()
    z0 = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    labels = torch.tensor([1, 2, 3])
    times = gen.times(5)
    assert times == [float(t) for t in ddim_timesteps(5)] and gen.sampler().name == "ddim"

    def cfg(z, t, c):
        e_c, e_u = gen.net(z, t, c), gen.net(z, t, torch.full_like(c, 10))
        return e_u + 2.0 * (e_c - e_u)

    want = ddim(cfg, lambda k: z0, ddim_timesteps(5), gen.net.alphas_cumprod, "epsilon", class_labels=labels)
    got = gen.sample(lambda k: z0, times, labels=labels, guidance=2.0)
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(gen.sample(lambda k: z0, times, labels=labels), want, atol=1e-3)


def test_digit_class_reward_is_the_probability_of_each_samples_own_label():
    from cmgen.eval.digits_net import digits_net
    from cmgen.rewards.differentiable import build_reward, digit_class_probability

    from cmgen.data import load_digits

    d = load_digits()
    x, y = d.x[:40], d.labels[:40]
    probs = digits_net()(x).softmax(1)
    r = build_reward("digit-class")(x, y)
    assert torch.allclose(r, probs[torch.arange(40), y], atol=1e-6)
    wrong = digit_class_probability(x, (y + 1) % 10)
    assert r.mean() > 0.9 and wrong.mean() < 0.1
    assert torch.allclose(build_reward("digit-class", target_class=3)(x, None), probs[:, 3], atol=1e-6)
    xg = x.clone().requires_grad_(True)
    build_reward("digit-class")(xg, y).sum().backward()
    assert xg.grad.abs().sum() > 0


def test_ink_is_mean_brightness_in_unit_range():
    from cmgen.rewards.differentiable import ink

    x = torch.full((2, 1, 8, 8), -1.0)
    x[1, :, :4] = 1.0
    assert torch.allclose(ink(x), torch.tensor([0.0, 0.5]))


def test_jpeg_compressibility_is_minus_pil_kilobytes_of_the_enlarged_image():
    from PIL import Image

    from cmgen.data import load_digits
    from cmgen.rewards.jpeg import jpeg_compressibility

    x = load_digits().x[:3]
    got = jpeg_compressibility(x)
    for i in range(3):
        u8 = ((x[i, 0] + 1) * 127.5).round().to(torch.uint8).numpy()
        big = np.kron(u8, np.ones((4, 4), np.uint8))   # 8x8 -> 32x32 by repetition
        buf = io.BytesIO()
        Image.fromarray(big).save(buf, format="JPEG", quality=95)
        assert got[i].item() == pytest.approx(-buf.tell() / 1000.0)


def test_jpeg_surrogate_ranks_held_out_images_like_the_real_encoder_and_has_gradients():
    from scipy.stats import spearmanr

    from cmgen.rewards.jpeg import jpeg_kb, surrogate, surrogate_training_images

    x = surrogate_training_images(seed=123)[::7]   # other perturbations than the training set's (seed 0)
    net = surrogate()
    with torch.no_grad():
        pred = net(x)
    rho = spearmanr(pred.numpy(), jpeg_kb(x).numpy()).statistic
    assert rho > 0.8
    xg = x[:8].clone().requires_grad_(True)
    net(xg).sum().backward()
    assert xg.grad.abs().sum() > 0

