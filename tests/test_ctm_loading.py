"""CTM from real files: the EDM teacher read from a run, the discriminator's frozen feature networks (cmgen's
digits classifier, a timm backbone from a weights file made here), and the run's other samplers (multistep,
EDM Heun on the denoiser) through `cmgen sample`."""
import numpy as np
import pytest
import torch

from cmgen.errors import UserError
from tests.test_ctm import TINY, seeded, tiny_recipe


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-step EDM teacher run, a 2-step CTM run distilled from it, and runs of the wrong kinds."""
    from cmgen.recipe import load_recipe
    from cmgen.train import train

    root = tmp_path_factory.mktemp("ctm_runs")
    short = ["train.steps=2", "train.checkpoint_every=2", "train.sample_every=0", "train.sample_n=4",
             "train.batch_size=8", "train.ema_decay=0.5"]
    edm = train(load_recipe("edm_digits", TINY + short), root / "edm", progress=False)
    ctm = train(tiny_recipe(*short, f"method.teacher={edm}", "method.max_k=2"), root / "ctm", progress=False)
    ict = train(load_recipe("ict_digits", TINY + short), root / "ict", progress=False)
    ring = train(load_recipe("edm_toy2d", ["model.hidden=16", "model.depth=1", *short]), root / "ring", progress=False)
    return {"edm": edm, "ctm": ctm, "ict": ict, "ring": ring}


# ----------------------------------------------------------------------------- the teacher

def test_the_teacher_is_the_runs_ema_network_and_the_student_starts_as_its_euler_step(runs):
    from cmgen.runs import load_model
    from tests.test_ctm import make_method

    m = make_method(f"method.teacher={runs['edm']}", "method.max_k=2")
    ema, raw = load_model(runs["edm"], ema=True).net, load_model(runs["edm"], ema=False).net
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([80.0, 3.0, 0.3])
    with torch.no_grad():
        assert torch.allclose(m.teacher(x, t), ema(x, t), atol=1e-6)
        assert not torch.allclose(m.teacher(x, t), raw(x, t), atol=1e-4)   # the EMA, not the raw weights
        s = torch.tensor([40.0, 1.0, 0.1])
        euler = x + (s - t).view(-1, 1, 1, 1) * (x - ema(x, t)) / t.view(-1, 1, 1, 1)
        assert torch.allclose(m.gen.net(x, t, s), euler, atol=1e-5)
    assert not any(p.requires_grad for p in m.teacher.parameters())


@pytest.mark.parametrize("kind,extra,message", [
    ("ict", [], "is a cm model; CTM distils an EDM denoiser"),
    ("edm", ["precond.sigma_data=0.4"], r"precond.sigma_data=0.5, c_noise=edm; set the same in this recipe"),
    ("ring", [], r"models data of shape \[2\], this recipe's data have \[1, 8, 8\]")])
def test_a_teacher_of_the_wrong_kind_is_one_sentence(runs, kind, extra, message):
    from tests.test_ctm import make_method

    with pytest.raises(UserError, match=message):
        make_method(f"method.teacher={runs[kind]}", *extra)


# ----------------------------------------------------------------------------- samplers of a CTM run

def _sample(run, tmp_path, *flags):
    from cmgen.cli import main

    out = tmp_path / f"s{len(list(tmp_path.iterdir()))}.npz"
    assert main(["sample", str(run), "--n", "4", "--out", str(out), "--no-progress", *flags]) == 0
    return torch.from_numpy(np.load(out)["samples"])


def test_multistep_and_heun_samplers_of_a_ctm_run(runs, tmp_path):
    from cmgen.runs import load_model
    from cmgen.sampling.ctm import ctm_gamma, ctm_times
    from cmgen.sampling.edm import edm_heun, edm_sigmas
    from cmgen.sampling.multistep import consistency_multistep

    gen = load_model(runs["ctm"])
    p = gen.recipe.precond
    times = ctm_times(3, p.sigma_min, p.sigma_max, p.rho)
    with torch.no_grad():
        f = lambda x, t, y=None: gen.net(x, t, torch.full_like(t, p.sigma_min))  # noqa: E731
        multistep = consistency_multistep(f, seeded(), times, sigma_min=p.sigma_min)
        heun = edm_heun(gen.net.denoise, seeded(), edm_sigmas(3, p.sigma_min, p.sigma_max, p.rho))
        assert torch.allclose(multistep, ctm_gamma(gen.net, seeded(), times, gamma=1.0), atol=1e-5)
    assert torch.allclose(_sample(runs["ctm"], tmp_path, "--steps", "3", "--sampler", "multistep"), multistep, atol=1e-5)
    assert torch.allclose(_sample(runs["ctm"], tmp_path, "--steps", "3", "--sampler", "heun"), heun, atol=1e-5)
    assert not torch.allclose(multistep, heun, atol=1e-2)
    sigmas = edm_sigmas(3, p.sigma_min, p.sigma_max, p.rho)
    with torch.no_grad():   # sample.churn reaches CTM's Heun as it reaches EDM's (Algorithm 2)
        churned = gen.sample(seeded(), sigmas, sampler="heun", churn=30.0)
        assert torch.allclose(churned, edm_heun(gen.net.denoise, seeded(), sigmas, churn=30.0), atol=1e-5)
        assert not torch.allclose(churned, heun, atol=1e-3)
    assert gen.nfe(edm_sigmas(3, p.sigma_min, p.sigma_max, p.rho), "heun") == 5
    with pytest.raises(UserError, match="--sampler 'ddim' does not apply to a ctm model; use one of gamma, multistep, heun"):
        gen.sampler("ddim")


# ----------------------------------------------------------------------------- discriminator features

def _gan_cfg(features, weights=None):
    from cmgen.methods.ctm import Config

    return Config(gan_start=0, disc_features=features, disc_weights=None if weights is None else str(weights),
                  disc_channels=8)


def test_digits_features_are_the_digits_classifiers_conv_activations_on_a_copy(tmp_path):
    from safetensors.torch import save_file

    from cmgen.eval.digits_net import DigitsNet, digits_net
    from cmgen.methods.ctm_gan import build_discriminator

    x = torch.rand(3, 1, 8, 8) * 2 - 1
    cached = digits_net()
    before = {k: v.clone() for k, v in cached.state_dict().items()}
    disc = build_discriminator(_gan_cfg("digits"), (1, 8, 8))
    a, b = disc.features(x)
    assert torch.allclose(a, cached.trunk[1](cached.trunk[0](x)))
    assert torch.allclose(b, cached.trunk[3](cached.trunk[2](a)))
    assert not any(p.requires_grad for p in disc.features.parameters())
    with torch.no_grad():
        for p in disc.features.parameters():
            p.add_(1.0)
    assert all(torch.equal(v, cached.state_dict()[k]) for k, v in before.items())   # FD-digits' net untouched
    torch.manual_seed(3)
    own = DigitsNet()
    save_file(own.state_dict(), str(tmp_path / "d.safetensors"))
    a, _ = build_discriminator(_gan_cfg("digits", tmp_path / "d.safetensors"), (1, 8, 8)).features(x)
    assert torch.allclose(a, own.trunk[1](own.trunk[0](x)))
    save_file({"w": torch.ones(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(UserError, match="is not a cmgen digits classifier"):
        build_discriminator(_gan_cfg("digits", tmp_path / "bad.safetensors"), (1, 8, 8))
    with pytest.raises(UserError, match="needs 1x8x8 digits"):
        build_discriminator(_gan_cfg("digits"), (3, 32, 32))


def test_a_timm_backbone_is_read_from_its_weights_file_frozen_and_fed_standardised_224_inputs(tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    from cmgen.methods.ctm_gan import build_discriminator

    name = "efficientnet_lite0"   # the paper's EfficientNet-lite0 (timm's port with ImageNet's mean and std)
    torch.manual_seed(0)
    full = timm.create_model(name, pretrained=False)
    weights = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(weights))
    disc = build_discriminator(_gan_cfg(f"timm:{name}", weights), (1, 8, 8))
    feats = disc.features
    assert torch.equal(feats.net.conv_stem.weight, full.conv_stem.weight)       # the file's weights, not a new draw
    assert len(disc.heads) == 5 and [h[0].in_channels for h in disc.heads] == [16, 24, 40, 112, 320]
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    ref = timm.create_model(name, pretrained=False, features_only=True)
    ref.load_state_dict(feats.net.state_dict())
    ref.eval()
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    want = ref(torch.nn.functional.interpolate(((x.expand(-1, 3, -1, -1) + 1) / 2 - mean) / std, size=224,
                                               mode="bilinear"))
    disc.train()
    got = feats(x)
    assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got, want))
    sum(head.sum() for head in disc(x)).backward()
    assert all(p.grad is None for p in feats.parameters())
    assert all(p.grad is not None for p in disc.heads.parameters())
    save_file({"w": torch.ones(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError, match=f"timm:{name} could not be built from method.disc_weights"):
        build_discriminator(_gan_cfg(f"timm:{name}", tmp_path / "other.safetensors"), (1, 8, 8))
    with pytest.raises(UserError, match="method.disc_weights"):
        build_discriminator(_gan_cfg(f"timm:{name}", tmp_path / "absent.safetensors"), (1, 8, 8))


# ----------------------------------------------------------------------------- the two-time UNet's forward

@pytest.mark.parametrize("blocks,extra", [
    ((("SkipDownBlock2D", "AttnSkipDownBlock2D"), ("AttnSkipUpBlock2D", "SkipUpBlock2D")), {}),   # NCSN++'s skips
    ((("DownBlock2D", "AttnDownBlock2D"), ("AttnUpBlock2D", "UpBlock2D")), {"center_input_sample": True}),
    ((("DownBlock2D", "DownBlock2D"), ("UpBlock2D", "UpBlock2D")), {"class_embed_type": "timestep"}),
    ((("DownBlock2D", "DownBlock2D"), ("UpBlock2D", "UpBlock2D")), {"num_class_embeds": 5})])
def test_the_two_time_unet_with_a_zero_s_branch_is_diffusers_unet2dmodel(blocks, extra):
    """Any UNet2DModel configuration a teacher may have: with its weights and the s branch at zero, the
    two-time network's forward is diffusers' own."""
    from diffusers import UNet2DModel

    from cmgen.models.two_time import TwoTimeUNet2DModel

    cfg = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
               down_block_types=blocks[0], up_block_types=blocks[1], attention_head_dim=8, norm_num_groups=8, **extra)
    torch.manual_seed(0)
    ref = UNet2DModel(**cfg)
    two = TwoTimeUNet2DModel(**cfg)
    assert not two.load_state_dict(ref.state_dict(), strict=False).unexpected_keys
    with torch.no_grad():
        for name, p in two.named_parameters():
            if "time_emb_proj.s" in name:
                p.zero_()
        x, t = torch.randn(2, 3, 8, 8), torch.tensor([10.0, 500.0])
        labels = None if "num_class_embeds" not in extra and "class_embed_type" not in extra else torch.tensor([1, 3])
        want = ref(x, t, class_labels=labels).sample
        assert torch.allclose(two(x, t, torch.tensor([3.0, 7.0]), class_labels=labels)["sample"], want, atol=1e-5)


# ----------------------------------------------------------------------------- the exported pipeline's outputs

def test_the_exported_pipelines_default_pil_and_numpy_outputs_are_its_tensor_output(runs, tmp_path):
    """diffusers' conventions: output_type pil (the default) and np are the pt images in [0, 1], as HWC
    arrays and 8-bit PIL images; one generator per image or one for the batch."""
    from cmgen.cli import main
    from cmgen.pipelines import CMGenCTMPipeline

    assert main(["export", str(runs["ctm"]), "--to", str(tmp_path / "pipe")]) == 0
    pipe = CMGenCTMPipeline.from_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)

    def call(output_type=None, gens=3):
        kw = {} if output_type is None else {"output_type": output_type}
        generator = [torch.Generator().manual_seed(j) for j in range(gens)]
        return pipe(batch_size=3, num_inference_steps=2, generator=generator, **kw).images

    pt = call("pt")
    arrays = call("np")
    assert isinstance(arrays, np.ndarray) and arrays.shape == (3, 8, 8, 1)
    assert np.allclose(arrays, pt.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    pils = call()
    assert len(pils) == 3 and pils[0].size == (8, 8) and pils[0].mode == "L"
    assert all(np.array_equal(np.asarray(im), (a[..., 0] * 255).round().astype(np.uint8)) for im, a in zip(pils, arrays))
    with pytest.raises(ValueError, match="output_type must be pt, np or pil"):
        call("latent")
    with pytest.raises(ValueError, match="got 2 generators for batch_size 3"):
        call("pt", gens=2)
    one = pipe(batch_size=3, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert one.shape == pt.shape and not torch.allclose(one, pt)   # one batch draw, not one draw per image
