"""LCD and RG-LCD through the loop on a tiny latent teacher: the loss against a hand computation with
diffusers' DDIM for the solver, the EMA target (0.95), the student's non-strict initialisation, beta = 0
equal to plain LCD bit for bit, the reward term's sign and carrier, and the LRM's pairwise KL and phase."""

import pytest
import torch
from conftest import tiny_vae
from diffusers import DDIMScheduler

from cmgen.cli import main as cli
from cmgen.errors import UserError

FAST = ["--threads", "1", "--no-progress", "--device", "cpu"]
MODEL = {"arch": "unet", "block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8,
         "attention_head_dim": 8, "class_conditional": True}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    vae = tiny_vae()
    folder = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(folder, safe_serialization=True)
    out = tmp_path_factory.mktemp("cache") / "digits"
    assert cli(["latents", "encode", "digits", "--vae", str(folder), "--out", str(out)] + FAST) == 0
    return out


@pytest.fixture(scope="module")
def teacher(cache, tmp_path_factory):
    from cmgen.recipe import from_tree
    from cmgen.train import train

    tree = {"name": "ldm_tiny", "method": {"name": "ldm"}, "data": {"name": "latents", "path": str(cache)},
            "model": MODEL, "train": {"steps": 2, "batch_size": 8, "checkpoint_every": 2, "sample_n": 4},
            "eval": {"steps": [2]}}
    return train(from_tree(tree), tmp_path_factory.mktemp("teacher") / "run", progress=False)


def lcd_recipe(cache, teacher, **method):
    from cmgen.recipe import from_tree

    tree = {"name": "lcd_tiny", "method": {"name": "lcd", "teacher": str(teacher), "w_min": 0.5, "w_max": 2.0,
                                           "guidance": 2.0, **method},
            "data": {"name": "latents", "path": str(cache)}, "model": MODEL,
            "train": {"steps": 3, "batch_size": 8, "checkpoint_every": 3, "sample_n": 4, "ema_decay": 0.95,
                      "threads": 1},
            "optim": {"name": "adamw", "lr": 1e-3}, "eval": {"steps": [1, 2]}}
    return from_tree(tree)


def trainer(cache, teacher, tmp_path, **method):
    from cmgen.train import Trainer

    return Trainer(lcd_recipe(cache, teacher, **method), tmp_path, progress=False)


def test_defaults_are_the_papers():
    from cmgen.methods.lcd import Config

    c = Config(teacher="x")
    assert (c.huber_c, c.target_decay, c.original_steps, c.w_min, c.w_max, c.loss) == (0.001, 0.95, 50, 5.0, 15.0,
                                                                                        "huber")


def test_student_starts_as_the_teacher_plus_a_fresh_w_projection(cache, teacher, tmp_path):
    tr = trainer(cache, teacher, tmp_path)
    student = tr.gen.net.backbone.unet.state_dict()
    ref = tr.method.teacher.backbone.unet.state_dict()
    fresh = [k for k in student if k not in ref]
    assert fresh == ["time_embedding.cond_proj.weight"]
    assert all(torch.equal(student[k], ref[k]) for k in ref)
    assert all(torch.equal(p, q) for p, q in zip(tr.targets["target"].module.parameters(), tr.gen.net.parameters()))


def test_loss_equals_a_hand_computation_with_diffusers_ddim(cache, teacher, tmp_path):
    """Replaying the step's keyed draws (n, eps, w): z = add_noise at t_s = 20(n+1) - 1, the teacher's guided eps
    stepped by DDIMScheduler (trailing 50-step grid), the target network at t_e = t_s - 20 with the same w, and
    mean(sqrt(d^2 + 0.001^2) - 0.001)."""
    from cmgen.rng import BatchRNG
    from cmgen.vp import VPSchedule, add_noise

    tr = trainer(cache, teacher, tmp_path)
    batch = tr._batch(0)
    got = tr.method.loss(tr.nets, batch, 0)
    rng = BatchRNG(0, 0, 8, 0, 8)
    n = rng.randint(0, 50)
    eps = rng.randn(4, 4, 4)
    w = 0.5 + 1.5 * rng.rand()
    t_s = 20 * (n + 1) - 1
    ac = VPSchedule().alphas_cumprod()
    z = add_noise(batch.x, eps, ac, t_s)
    teacher_net = tr.method.teacher
    null = torch.full_like(batch.labels, 10)
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing")
    sched.set_timesteps(50)
    with torch.no_grad():
        e_c, e_u = teacher_net(z, t_s, batch.labels), teacher_net(z, t_s, null)
        e = e_c + w.view(-1, 1, 1, 1) * (e_c - e_u)
        z_prev = torch.cat([sched.step(e[i:i + 1], int(t_s[i]), z[i:i + 1]).prev_sample for i in range(8)])
        target = tr.nets.target(z_prev, (t_s - 20).clamp(min=0), batch.labels, w)
        pred = tr.nets.model(z, t_s, batch.labels, w)
    want = (torch.sqrt((pred - target) ** 2 + 1e-6) - 1e-3).mean()
    assert got["loss"].item() == pytest.approx(want.item(), rel=1e-4)
    # the pair itself (the loss alone barely moves when both sides shift together, e.g. z noised to t_e)
    pred_got, target_got = tr.method.lcd_pair(tr.nets, tr._batch(0))
    assert torch.allclose(pred_got, pred, atol=1e-5) and torch.allclose(target_got, target, atol=1e-5)
    assert not torch.allclose(target, tr.nets.model(z_prev, (t_s - 20).clamp(min=0), batch.labels, 0.0 * w))


def test_target_network_is_an_ema_with_decay_095(cache, teacher, tmp_path):
    tr = trainer(cache, teacher, tmp_path)
    before = [p.detach().clone() for p in tr.targets["target"].module.parameters()]
    tr.train_step()
    after = list(tr.targets["target"].module.parameters())
    model = list(tr.gen.net.parameters())
    moved = 0
    for b, a, m in zip(before, after, model):
        assert torch.allclose(a, 0.95 * b + 0.05 * m.detach(), atol=1e-6)
        moved += int(not torch.equal(a, b))
    assert moved > 0


def _train_weights(cache, teacher, tmp_path, **method):
    tr = trainer(cache, teacher, tmp_path, **method)
    for _ in range(3):
        tr.train_step()
    return {k: v.clone() for k, v in tr.gen.net.state_dict().items()}


def test_beta_zero_reproduces_plain_lcd_bit_for_bit_and_beta_positive_does_not(cache, teacher, tmp_path):
    plain = _train_weights(cache, teacher, tmp_path / "a")
    zero = _train_weights(cache, teacher, tmp_path / "b", reward_mode="direct", reward="ink", reward_scale=0.0)
    lrm0 = _train_weights(cache, teacher, tmp_path / "c", reward_mode="lrm", reward="jpeg-compressibility",
                          reward_scale=0.0)
    half = _train_weights(cache, teacher, tmp_path / "d", reward_mode="direct", reward="ink", reward_scale=0.5)
    assert all(torch.equal(plain[k], zero[k]) for k in plain)
    assert all(torch.equal(plain[k], lrm0[k]) for k in plain)
    assert any(not torch.equal(plain[k], half[k]) for k in plain)


def test_reward_term_is_minus_beta_r_of_the_decoded_student_output(cache, teacher, tmp_path, monkeypatch):
    """dL/df = dL_LCD/df - beta dR(decode(f))/df: the reward's gradient reaches the student's one-step output (not
    the target), with a minus sign."""
    from cmgen.methods.lcd import pseudo_huber_elementwise
    from cmgen.rewards.differentiable import ink

    beta = 0.7
    tr = trainer(cache, teacher, tmp_path, reward_mode="direct", reward="ink", reward_scale=beta)
    m = tr.method
    batch = tr._batch(0)
    pred, target = m.lcd_pair(tr.nets, batch)
    assert pred.requires_grad and not target.requires_grad
    leaf = pred.detach().clone().requires_grad_(True)
    monkeypatch.setattr(m, "lcd_pair", lambda nets, b: (leaf, target))
    out = m.loss(tr.nets, batch, 0)
    out["loss"].backward()
    f1 = leaf.detach().clone().requires_grad_(True)
    torch.autograd.backward(pseudo_huber_elementwise(f1, target, 0.001))
    f2 = leaf.detach().clone().requires_grad_(True)
    ink(m.decode(f2)).mean().backward()
    assert torch.allclose(leaf.grad, f1.grad - beta * f2.grad, atol=1e-7)
    assert f2.grad.abs().sum() > 0
    assert out["reward"].item() == pytest.approx(ink(m.decode(pred.detach())).mean().item(), rel=1e-5)
    # decode is the codec's (denormalise, then the VAE), only differentiable and unclamped
    with torch.no_grad():
        assert torch.allclose(m.decode(pred).clamp(-1, 1), tr.gen.codec.decode(pred), atol=1e-5)


def test_pairwise_kl_is_the_sum_over_pairs_of_kl_expert_to_lrm():
    """RG-LCD adds F.kl_div(log q, p, reduction="batchmean") for each of the pairs (student, target),
    (student, real), (target, real): a sum over the 3 pairs of per-sample means."""
    from cmgen.rewards.lrm import pairwise_kl

    pairs = ((0, 1), (0, 2), (1, 2))   # written out: the module's PAIRS could lose one unnoticed
    g = torch.Generator().manual_seed(0)
    expert, lrm = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g).requires_grad_(True)
    got, agree = pairwise_kl(expert, lrm)
    want = 0.0
    for a, b in pairs:
        p = torch.softmax(expert[:, [a, b]], 1)
        want = want + torch.nn.functional.kl_div(torch.log_softmax(lrm[:, [a, b]], 1), p, reduction="batchmean")
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    # KL(p || q), not KL(q || p)
    rev = sum((torch.softmax(lrm[:, [a, b]], 1) * (torch.log_softmax(lrm[:, [a, b]], 1)
              - torch.log_softmax(expert[:, [a, b]], 1))).sum(1).mean() for a, b in pairs)
    assert abs(got.item() - rev.item()) > 1e-3
    got.backward()
    assert lrm.grad.abs().sum() > 0
    same, agree_same = pairwise_kl(expert, (expert + 3.0).requires_grad_(True))   # shift-invariant per pair
    assert same.item() == pytest.approx(0.0, abs=1e-6) and agree_same.item() == 1.0
    flipped, agree_flip = pairwise_kl(expert, -expert)
    assert agree_flip.item() == 0.0 and flipped.item() > 0


def test_lrm_mode_steps_the_lrm_after_the_student_on_the_triplet(cache, teacher, tmp_path):
    tr = trainer(cache, teacher, tmp_path, reward_mode="lrm", reward="jpeg-compressibility", reward_scale=1.0)
    assert tr.method.phases(0) == ("model", "lrm")
    lrm_before = [p.detach().clone() for p in tr.parts["lrm"].module.parameters()]
    model_before = [p.detach().clone() for p in tr.gen.net.parameters()]
    terms = tr.train_step()
    assert {"lrm/loss", "lrm/agree", "reward", "lcd"} <= set(terms)
    assert any(not torch.equal(a, b) for a, b in zip(lrm_before, tr.parts["lrm"].module.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(model_before, tr.gen.net.parameters()))
    # the LRM phase leaves the student alone: its loss reaches the LRM only
    batch = tr._batch(0)
    batch.extra["triplet"] = (batch.x + 0.1, batch.x - 0.1)
    batch.phase = "lrm"
    tr.gen.net.zero_grad(set_to_none=True)
    tr.method.loss(tr.nets, batch, 1)["loss"].backward()
    assert all(p.grad is None for p in tr.gen.net.parameters())


def test_lrm_warmup_keeps_the_reward_out_of_the_student_loss(cache, teacher, tmp_path):
    tr = trainer(cache, teacher, tmp_path, reward_mode="lrm", reward="jpeg-compressibility", lrm_warmup_steps=5)
    batch = tr._batch(0)
    out = tr.method.loss(tr.nets, batch, 0)
    assert out["loss"].item() == pytest.approx(out["lcd"].item(), rel=1e-6)
    out = tr.method.loss(tr.nets, tr._batch(0), 5)
    assert out["loss"].item() != pytest.approx(out["lcd"].item(), rel=1e-6)


def test_lrm_pretraining_triplet_is_a_noised_real_a_noised_same_class_partner_and_the_real():
    from cmgen.methods.lcd import noised_partner_triplet
    from cmgen.rng import BatchRNG

    real = torch.randn(12, 4, 2, 2)
    labels = torch.tensor([0, 1, 2, 0, 1, 0, 3, 1, 0, 2, 4, 0])
    partners = {i: set() for i in range(12)}
    for step in range(60):
        a, b, r = noised_partner_triplet(real, labels, BatchRNG(0, step, 12, 0, 12), 0.3)
        rng = BatchRNG(0, step, 12, 0, 12)   # the same draws, in the documented order
        rng.rand()   # the partner draw
        sa, sb = rng.rand(), rng.rand()
        ea, eb = rng.randn(4, 2, 2), rng.randn(4, 2, 2)
        assert torch.equal(r, real)
        assert torch.allclose(a, real + 0.3 * sa.view(-1, 1, 1, 1) * ea, atol=1e-6)
        clean = b - 0.3 * sb.view(-1, 1, 1, 1) * eb
        for i in range(12):
            j = int((clean[i] - real).flatten(1).abs().amax(1).argmin())
            assert torch.allclose(clean[i], real[j], atol=1e-5)
            partners[i].add(j)
    for i in range(12):   # every row of its class, itself included, and no other
        assert partners[i] == {j for j in range(12) if labels[j] == labels[i]}, i


def test_lrm_pretraining_steps_train_the_lrm_alone_before_the_student(cache, teacher, tmp_path, monkeypatch):
    tr = trainer(cache, teacher, tmp_path, reward_mode="lrm", reward="jpeg-compressibility", lrm_pretrain_steps=2,
                 lrm_pretrain_noise=0.2)
    m = tr.method
    assert m.phases(0) == m.phases(1) == ("lrm",) and m.phases(2) == ("model", "lrm")
    seen = []
    expert = m.expert
    monkeypatch.setattr(m, "expert", lambda images, cond: seen.append(images) or expert(images, cond))
    lrm_before = [p.detach().clone() for p in tr.parts["lrm"].module.parameters()]
    model_before = {k: v.clone() for k, v in tr.gen.net.state_dict().items()}
    real = m.decode(tr._batch(0).x.float())   # step 0's batch
    terms = tr.train_step()
    assert {"lrm/loss", "lrm/agree"} <= set(terms) and "lcd" not in terms
    assert any(not torch.equal(a, b) for a, b in zip(lrm_before, tr.parts["lrm"].module.parameters()))
    assert all(torch.equal(v, tr.gen.net.state_dict()[k]) for k, v in model_before.items())
    # the expert scored the noised copies and the real latents of the batch
    assert len(seen) == 3 and torch.allclose(seen[2], real, atol=1e-6)
    assert not torch.allclose(seen[0], real, atol=1e-3)


@pytest.mark.parametrize("method,needle", [
    ({"teacher": ""}, "method.teacher"),
    ({"reward_mode": "guided"}, "method.reward_mode"),
    ({"reward_mode": "direct"}, "method.reward"),
    ({"w_min": 3.0, "w_max": 1.0}, "method.w_min"),
    ({"loss": "cauchy"}, "method.loss"),
    ({"lrm_pretrain_steps": 10}, "method.lrm_pretrain_steps"),
])
def test_bad_lcd_recipes_are_one_sentence(cache, teacher, method, needle):
    method = dict(method)
    with pytest.raises(UserError) as err:
        lcd_recipe(cache, method.pop("teacher", teacher), **method)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_non_differentiable_direct_reward_is_refused(cache, teacher, tmp_path):
    with pytest.raises(UserError, match="jpeg-surrogate"):
        trainer(cache, teacher, tmp_path, reward_mode="direct", reward="jpeg-compressibility")


def test_teacher_must_be_an_ldm_run(cache, tmp_path):
    with pytest.raises(UserError, match="method.teacher"):
        trainer(cache, tmp_path / "nowhere", tmp_path / "out")


@pytest.fixture(scope="module")
def lcd_run(cache, teacher, tmp_path_factory):
    from cmgen.train import train

    return train(lcd_recipe(cache, teacher), tmp_path_factory.mktemp("lcd") / "run", progress=False)


@pytest.mark.parametrize("steps", [2, 4])
def test_exported_class_conditional_pipeline_equals_cmgen_sample(lcd_run, tmp_path, steps):
    """CMGenLCMPipeline runs diffusers' LCMScheduler (its timesteps, scalings and noise) and the LCM pipeline's
    w-embedding; its images equal `cmgen sample`'s for the same per-image seeds and labels."""
    from cmgen.pipelines import CMGenLCMPipeline   # the import `cmgen export` prints
    from cmgen.runs import load_model
    from cmgen.sampling import generate

    out = tmp_path / "pipe"
    assert cli(["export", str(lcd_run), "--to", str(out)]) == 0
    assert not list(out.rglob("*.bin")) and (out / "latent_stats" / "diffusion_pytorch_model.safetensors").is_file()
    pipe = CMGenLCMPipeline.from_pretrained(out)
    gens = [torch.Generator().manual_seed(s) for s in range(5)]
    got = pipe(batch_size=5, num_inference_steps=steps, generator=gens, output_type="pt").images
    gen = load_model(lcd_run)
    want = next(generate(gen, 5, gen.times(steps), seed=0, progress=False))[0]
    assert torch.allclose(got, (want / 2 + 0.5).clamp(0, 1), atol=1e-5)
    other = pipe(batch_size=5, num_inference_steps=steps, guidance_scale=1.0,
                 generator=[torch.Generator().manual_seed(s) for s in range(5)], output_type="pt").images
    assert not torch.allclose(other, got, atol=1e-3)   # guidance enters through the w-embedding


def test_every_net_and_tensor_of_a_latent_rglcd_run_lives_on_the_training_device(cache, teacher, tmp_path, monkeypatch):
    """A GPU run decodes latents, scores them and averages weights on the GPU: after the Trainer is built, the
    codec (VAE and statistics), the parts (the LRM), their EMAs, the target and the frozen teacher are all on the
    accelerator's device. meta stands in for the GPU."""
    import accelerate

    from cmgen.train import Trainer

    monkeypatch.setattr(accelerate.Accelerator, "device", property(lambda self: torch.device("meta")))
    tr = Trainer(lcd_recipe(cache, teacher, reward_mode="lrm", reward="jpeg-compressibility"), tmp_path, progress=False)
    codec = tr.gen.codec
    where = {"codec": {p.device.type for p in codec.vae.parameters()} | {codec.mean.device.type, codec.std.device.type}}
    for name, part in tr.parts.items():
        shadows = part.ema.shadow if part.ema is not None else []
        where[name] = {p.device.type for p in part.module.parameters()} | {s.device.type for s in shadows}
    for name, net in tr.nets.items():
        where[f"net {name}"] = {p.device.type for p in net.parameters()}
    assert {"model", "lrm", "net target", "net teacher"} <= set(where) and all(v == {"meta"} for v in where.values()), where


def test_reward_against_a_latent_base_is_judged_on_decoded_images(lcd_run, teacher, tmp_path):
    """`cmgen eval reward STUDENT --base TEACHER` of latent runs: both make 1x8x8 digits through the VAE, so
    the shapes agree and the shift's FD is FD-digits on the decoded images (not the 4x4 latents)."""
    import json

    out = tmp_path / "r"
    assert cli(["eval", "reward", str(lcd_run), "--reward", "brightness", "--n", "16", "--steps", "2",
                "--base", str(teacher), "--out", str(out)] + FAST) == 0
    tuned, base = json.loads((out / "reward-brightness.json").read_text())["rows"]
    assert tuned["fd_metric"] == "FD-digits" and tuned["fd_to_base"] > 0 and base["n"] == tuned["n"] == 16


def test_an_exported_latent_pipeline_loads_its_codec_onto_the_sampling_device(lcd_run, tmp_path):
    """`cmgen sample --device cuda PIPELINE` decodes on the GPU: the folder's VAE and latent statistics go where the
    network goes (meta stands in for the GPU)."""
    from cmgen.runs import load_model

    assert cli(["export", str(lcd_run), "--to", str(tmp_path / "pipe")]) == 0
    gen = load_model(tmp_path / "pipe", device="meta")
    codec = gen.codec
    assert {p.device.type for p in gen.net.parameters()} == {p.device.type for p in codec.vae.parameters()} == \
        {codec.mean.device.type, codec.std.device.type} == {"meta"}


def test_an_exported_lcm_pipeline_samples_and_evaluates_like_its_run(lcd_run, tmp_path):
    """`cmgen sample` / `cmgen eval` take the exported folder: same network, scheduler rule and codec as the run."""
    from cmgen.runs import load_model
    from cmgen.sampling import generate

    out = tmp_path / "pipe"
    assert cli(["export", str(lcd_run), "--to", str(out)]) == 0
    run, pipe = load_model(lcd_run), load_model(out)
    assert type(pipe.net).__name__ == "LatentConsistency" and pipe.codec is not None
    for steps in (2, 4):
        want = next(generate(run, 4, run.times(steps), seed=3, progress=False))[0]
        got = next(generate(pipe, 4, pipe.times(steps), seed=3, progress=False))[0]
        assert torch.allclose(got, want, atol=1e-5)
    assert cli(["sample", str(out), "--steps", "2", "--n", "4", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 0


def test_lrm_is_trained_on_the_student_target_real_triplet_scored_by_the_expert(cache, teacher, tmp_path, monkeypatch):
    tr = trainer(cache, teacher, tmp_path, reward_mode="lrm", reward="jpeg-compressibility", expert_scale=3.0)
    m = tr.method
    batch = tr._batch(0)
    m.loss(tr.nets, batch, 0)
    student, target = batch.extra["triplet"]
    seen = []
    monkeypatch.setattr(m, "expert", lambda images, cond: seen.append(images) or images.flatten(1).mean(1))
    batch.phase = "lrm"
    out = m.lrm_loss(tr.nets, batch)
    for z, images in zip((student, target, batch.x), seen):
        assert torch.allclose(images, m.decode(z), atol=1e-6)
    from cmgen.rewards.lrm import pairwise_kl

    expert = torch.stack([m.decode(z).flatten(1).mean(1) for z in (student, target, batch.x)], 1) * 3.0
    lrm = torch.stack([tr.nets.lrm(z, batch.labels) for z in (student, target, batch.x)], 1)
    assert out["loss"].item() == pytest.approx(pairwise_kl(expert, lrm)[0].item(), rel=1e-5)


def test_the_l2_loss_option_is_the_mean_squared_error_and_huber_is_not(cache, teacher, tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(8, 4, 4, 4, generator=g), torch.randn(8, 4, 4, 4, generator=g)
    huber = (((pred - target).pow(2) + 0.001**2).sqrt() - 0.001).mean()     # RG-LCD's c = 0.001, element-wise
    for loss, want in [("l2", (pred - target).pow(2).mean()), ("huber", huber)]:
        tr = trainer(cache, teacher, tmp_path / loss, loss=loss)
        monkeypatch.setattr(tr.method, "lcd_pair", lambda nets, batch: (pred, target))
        out = tr.method.loss(tr.nets, tr._batch(0), 0)
        assert torch.allclose(out["loss"], want, rtol=1e-6) and torch.allclose(out["lcd"], want, rtol=1e-6)


def test_the_lrm_ce_option_makes_the_real_latent_win_both_its_pairs(cache, teacher, tmp_path):
    from cmgen.rewards.lrm import pairwise_real_ce

    tr = trainer(cache, teacher, tmp_path, reward_mode="lrm", reward="jpeg-compressibility", lrm_loss="ce")
    m, batch = tr.method, tr._batch(0)
    m.loss(tr.nets, batch, 0)
    student, target = batch.extra["triplet"]
    batch.phase = "lrm"
    out = m.lrm_loss(tr.nets, batch)
    lrm = torch.stack([tr.nets.lrm(z, batch.labels) for z in (student, target, batch.x)], 1)
    assert out["loss"].item() == pytest.approx(pairwise_real_ce(lrm).item(), rel=1e-5)
    assert torch.isnan(out["agree"])


def test_the_students_lrm_reward_is_the_bare_cosine_not_the_preference_logit(cache, teacher, tmp_path):
    """L = L_LCD - beta mean cos(img(f), txt(c)): the LRM's logit scale sharpens its preferences only, so a
    large scale leaves the student's reward (and its gradient) in [-1, 1]."""
    import math

    tr = trainer(cache, teacher, tmp_path, reward_mode="lrm", reward="jpeg-compressibility", reward_scale=0.7,
                 lrm_warmup_steps=0)
    with torch.no_grad():
        tr.nets.lrm.log_scale.fill_(math.log(50.0))
    batch = tr._batch(0)
    out = tr.method.loss(tr.nets, batch, 0)
    pred, _ = batch.extra["triplet"]
    lrm = tr.nets.lrm
    img = torch.nn.functional.normalize(lrm.image(pred), dim=-1)
    txt = torch.nn.functional.normalize(lrm.condition(batch.labels, len(pred), pred.device), dim=-1)
    cos = (img * txt).sum(-1).mean()
    assert out["reward"].item() == pytest.approx(cos.item(), abs=1e-6)
    assert out["loss"].item() == pytest.approx(out["lcd"].item() - 0.7 * cos.item(), abs=1e-6)
    assert lrm(pred, batch.labels).mean().item() == pytest.approx(50 * cos.item(), rel=1e-4)


def test_sample_guidance_is_the_w_embedding_of_cfg_minus_one(lcd_run):
    from cmgen.runs import load_model
    from cmgen.sampling import per_image_noise
    from cmgen.sampling.lcm import lcm_multistep
    from cmgen.vp import lcm_timesteps

    gen = load_model(lcd_run)
    labels = torch.tensor([0, 5])
    for cfg, w in ((3.0, 2.0), (1.0, gen.recipe.method.guidance - 1)):   # --cfg 1 (the default): method.guidance
        noise = per_image_noise([7, 8], gen.shape)
        want = gen.codec.decode(lcm_multistep(gen.net, per_image_noise([7, 8], gen.shape), lcm_timesteps(2),
                                              gen.net.alphas_cumprod, w=w, class_labels=labels))
        assert torch.allclose(gen.sample(noise, gen.times(2), labels=labels, guidance=cfg), want, atol=1e-6)
    assert gen.nfe(gen.times(2), guidance=3.0) == 2  # one evaluation a step: guidance is a network input


def test_a_student_layout_other_than_the_teachers_is_one_sentence(cache, teacher, tmp_path):
    from cmgen.train import Trainer

    r = lcd_recipe(cache, teacher)
    import dataclasses

    r = dataclasses.replace(r, model=dataclasses.replace(r.model, block_out_channels=(16, 48)))
    with pytest.raises(UserError, match="recipe section 'model'"):
        Trainer(r, tmp_path, progress=False)


def test_a_latent_diffusion_teacher_is_not_exported_but_says_how_to_sample_it(teacher, tmp_path, capsys):
    out = tmp_path / "x"
    assert cli(["export", str(teacher), "--to", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a ldm model" in err[0] and "cmgen sample" in err[0]
    assert not out.exists()


def test_the_students_lrm_reward_gradient_is_minus_beta_dcos_dpred(cache, teacher, tmp_path, monkeypatch):
    """lrm mode: dL/df = dL_LCD/df - beta d cos(img(f), txt(c)) / df, through the frozen LRM into f."""
    from cmgen.methods.lcd import pseudo_huber_elementwise

    beta = 0.7
    tr = trainer(cache, teacher, tmp_path, reward_mode="lrm", reward="jpeg-compressibility", reward_scale=beta)
    m, lrm = tr.method, tr.nets.lrm
    batch = tr._batch(0)
    pred, target = m.lcd_pair(tr.nets, batch)
    leaf = pred.detach().clone().requires_grad_(True)
    monkeypatch.setattr(m, "lcd_pair", lambda nets, b: (leaf, target))
    m.loss(tr.nets, batch, 0)["loss"].backward()
    f1 = leaf.detach().clone().requires_grad_(True)
    pseudo_huber_elementwise(f1, target, 0.001).backward()
    f2 = leaf.detach().clone().requires_grad_(True)
    img = torch.nn.functional.normalize(lrm.image(f2), dim=-1)
    txt = torch.nn.functional.normalize(lrm.condition(batch.labels, len(f2), f2.device), dim=-1)
    (img * txt).sum(-1).mean().backward()
    assert f2.grad.abs().sum() > 0
    assert torch.allclose(leaf.grad, f1.grad - beta * f2.grad, atol=1e-7)


def test_target_ema_moves_after_the_model_phase_only_in_lrm_mode(cache, teacher, tmp_path):
    """Phases (model, lrm): the target takes one 0.95 EMA step per optimizer step, after the student's phase,
    never after the LRM's (an LRM-only pretraining step leaves it as it was)."""
    tr = trainer(cache, teacher, tmp_path, reward_mode="lrm", reward="jpeg-compressibility", lrm_pretrain_steps=1)
    target = tr.targets["target"].module
    before = [p.detach().clone() for p in target.parameters()]
    assert tr.method.phases(0) == ("lrm",)
    tr.train_step()
    assert all(torch.equal(a, b) for a, b in zip(before, target.parameters()))
    assert tr.method.phases(1) == ("model", "lrm")
    tr.train_step()
    moved = 0
    for b, a, m in zip(before, target.parameters(), tr.gen.net.parameters()):
        assert torch.allclose(a, 0.95 * b + 0.05 * m.detach(), atol=1e-6)
        moved += int(not torch.equal(a, b))
    assert moved > 0


def test_expert_pair_logits_default_to_the_experts_own_logit_scale(cache, teacher, tmp_path, monkeypatch):
    """RG-LCD's expert logits are logit_scale x cos for CLIP-style experts (HPSv2.1: ~100 x cos): with
    method.expert_scale unset the expert's Reward.logit_scale multiplies its rewards; an expert without one
    (JPEG size) keeps its rewards as logits; a recipe's expert_scale overrides both."""
    import cmgen.rewards.differentiable as rd
    from cmgen.rewards import Reward
    from cmgen.rewards.lrm import pairwise_kl

    for scale, logit_scale, want_scale in ((None, 100.0, 100.0), (None, None, 1.0), (3.0, 100.0, 3.0)):
        expert = Reward("stand-in", lambda x, c=None: x.flatten(1).mean(1), "mean pixel", logit_scale=logit_scale)
        monkeypatch.setattr(rd, "build_reward", lambda name, expert=expert, **options: expert)
        extra = {} if scale is None else {"expert_scale": scale}
        tr = trainer(cache, teacher, tmp_path / str(want_scale), reward_mode="lrm", reward="jpeg-compressibility",
                     **extra)
        m, batch = tr.method, tr._batch(0)
        m.loss(tr.nets, batch, 0)
        batch.phase = "lrm"
        out = m.lrm_loss(tr.nets, batch)
        latents = (*batch.extra["triplet"], batch.x)
        expert = torch.stack([m.decode(z).flatten(1).mean(1) for z in latents], 1)
        lrm = torch.stack([tr.nets.lrm(z, batch.labels) for z in latents], 1)
        assert out["loss"].item() == pytest.approx(pairwise_kl(want_scale * expert, lrm)[0].item(), rel=1e-5)
        assert out["expert"].item() == pytest.approx(expert[:, 0].mean().item(), rel=1e-5)


@pytest.mark.parametrize("mode, name", [("direct", "reward"), ("lrm", "expert")])
def test_reward_networks_are_frozen_nets_that_the_loop_places_on_its_device(cache, teacher, tmp_path, mode, name):
    """The direct reward's and the LRM expert's networks are Method.frozen() entries, which the Trainer moves
    to its device with the teacher; the reward then scores where its network is (meta stands in for a GPU)."""
    tr = trainer(cache, teacher, tmp_path, reward_mode=mode, reward="digit-class")
    m = tr.method
    reward = m.reward_fn if mode == "direct" else m.expert
    assert m.frozen()[name] is reward.module and tr.nets[name] is reward.module
    assert not any(p.requires_grad for p in reward.module.parameters())
    x, labels = m.decode(tr._batch(0).x.float()).detach(), tr._batch(0).labels
    here = reward(x, labels)
    reward.module.to("meta")
    assert reward(x, labels).device.type == "meta" and here.device == x.device
