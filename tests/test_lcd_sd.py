"""LCD from a Stable Diffusion teacher on a tiny pipeline built from configs (offline): the teacher's UNet and
schedule, the empty prompt as the null condition, prompts through the text encoder, and the text student's
export as diffusers' stock LatentConsistencyModelPipeline, whose latents equal cmgen's LCM sampler."""
import pytest
import torch

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from cmgen.sd import tiny_sd_pipeline

    return tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "tiny_sd")


def _trainer(tiny_sd, tmp_path, **method):
    from cmgen.recipe import load_recipe
    from cmgen.train import Trainer

    over = [f"method.teacher={tiny_sd}", "data.resolution=64", "train.batch_size=2", "train.mixed_precision=no",
            "train.threads=1"] + [f"method.{k}={v}" for k, v in method.items()]
    return Trainer(load_recipe("rglcd_sd15_hps", over), tmp_path, smoke=True, progress=False)


def test_sd_teacher_prompts_and_null_condition(tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    from cmgen.sd import encode_prompts

    tr = _trainer(tiny_sd, tmp_path, reward="ink")
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd), safety_checker=None, local_files_only=True)
    emb, neg = pipe.encode_prompt(["a", "b"], "cpu", 1, True, negative_prompt=None)
    assert torch.allclose(encode_prompts(tiny_sd, ["a", "b"]), emb, atol=1e-6)
    assert torch.allclose(tr.method.null_cond, neg[:1], atol=1e-6)     # the unconditional prompt is ""
    assert torch.equal(tr.method.teacher.alphas_cumprod, pipe.scheduler.alphas_cumprod)
    batches = tr.method.collect([tr._batch(0)], tr.nets, 0, tr.dist)
    b = batches[0]
    assert b.labels.is_floating_point() and b.extra["prompts"][0] in tr.recipe.method.prompts
    assert torch.allclose(b.labels, encode_prompts(tiny_sd, b.extra["prompts"]))
    out = tr.method.loss(tr.nets, b, 0)
    assert torch.isfinite(out["loss"])


def test_the_sd_teachers_null_condition_is_the_empty_prompts_embeddings_for_every_row(tiny_sd, tmp_path):
    from cmgen.sd import encode_prompts

    tr = _trainer(tiny_sd, tmp_path, reward="ink")
    cond = encode_prompts(tiny_sd, ["a red cube", "two cats", "a lighthouse"])
    null = tr.method.null(cond)
    assert null.shape == cond.shape
    assert torch.allclose(null, encode_prompts(tiny_sd, ["", "", ""]), atol=1e-6)
    assert not torch.allclose(null, cond, atol=1e-3)


def test_the_sd15_recipe_names_its_deviations_from_the_papers_sd21_run():
    """RG-LCD's run distils SD 2.1 (v-prediction, 768 px) with 8-bit Adam; a recipe that differs says so."""
    from cmgen.recipe import load_recipe

    r = load_recipe("rglcd_sd15_hps")
    text = " ".join(r.description.split())
    assert "paper's settings" not in text
    assert "stable-diffusion-v1-5" in r.method.teacher and r.optim.name == "adamw"   # what it deviates with
    assert "not SD 2.1 (v-prediction, 768 px)" in text and "method.prediction_type=v_prediction" in text
    assert "not the 8-bit Adam" in text


def test_a_v_prediction_teacher_is_read_as_v_prediction(tiny_sd, tmp_path):
    """The same UNet weights saved with prediction_type v_prediction: the teacher's x_0 is a z - s v, not the
    eps-prediction (z - s eps) / a of the stock pipeline."""
    from cmgen.sd import load_sd_teacher, tiny_sd_pipeline

    eps_teacher, _ = load_sd_teacher(tiny_sd)
    v_teacher, _ = load_sd_teacher(tiny_sd_pipeline(tmp_path / "v_sd", prediction_type="v_prediction"))
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999, 400])
    cond = torch.randn(2, 77, 32, generator=g)
    raw = eps_teacher(z, t, cond)
    assert torch.equal(v_teacher(z, t, cond), raw)  # the same network
    ab = eps_teacher.alphas_cumprod[t].view(-1, 1, 1, 1)
    x0_v, eps_v = v_teacher.x0_eps(z, t, cond)
    assert torch.allclose(x0_v, ab.sqrt() * z - (1 - ab).sqrt() * raw, atol=1e-5)
    assert torch.allclose(eps_v, ab.sqrt() * raw + (1 - ab).sqrt() * z, atol=1e-5)
    x0_e, _ = eps_teacher.x0_eps(z, t, cond)
    assert torch.allclose(x0_e, (z - (1 - ab).sqrt() * raw) / ab.sqrt(), atol=1e-4)


@pytest.mark.parametrize("steps, prediction", [(2, "epsilon"), (4, "epsilon"), (2, "v_prediction")])
def test_text_student_exports_as_the_stock_lcm_pipeline_with_equal_latents(tiny_sd, tmp_path, steps, prediction):
    from diffusers import LatentConsistencyModelPipeline

    from cmgen.export_lcm import build_lcm_pipeline
    from cmgen.sampling.lcm import lcm_multistep
    from cmgen.sd import encode_prompts, tiny_sd_pipeline
    from cmgen.vp import lcm_timesteps

    if prediction != "epsilon":   # the scheduler's x_0 must follow the teacher's parameterisation
        tiny_sd = tiny_sd_pipeline(tmp_path / "v_sd", prediction_type=prediction)
    tr = _trainer(tiny_sd, tmp_path / "run", reward="ink", prediction_type=prediction)
    tr.train_step()
    gen = tr.eval_generator()
    pipe = build_lcm_pipeline(gen)
    assert isinstance(pipe, LatentConsistencyModelPipeline)
    pipe.save_pretrained(tmp_path / "pipe", safe_serialization=True)
    pipe = LatentConsistencyModelPipeline.from_pretrained(tmp_path / "pipe", safety_checker=None)
    prompts = ["a red cube", "two cats"]
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    got = pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=8.0, generator=gens, output_type="latent",
               height=64, width=64).images
    draws = {}
    g2 = [torch.Generator().manual_seed(s) for s in (3, 4)]

    def noise(k):
        if k not in draws:
            draws[k] = torch.cat([torch.randn((1, 4, 8, 8), generator=g) for g in g2])
        return draws[k]

    with torch.no_grad():
        ours = lcm_multistep(gen.net, noise, lcm_timesteps(steps), gen.net.alphas_cumprod, w=7.0,
                             class_labels=encode_prompts(tiny_sd, prompts))
    assert torch.allclose(got, ours, atol=1e-5)



def test_an_exported_text_student_is_sampled_with_diffusers_not_cmgen(tiny_sd, tmp_path, capsys):
    """cmgen samples class-conditional LCM exports; a text student's stock pipeline is one sentence naming
    diffusers' class, not a key error."""
    from cmgen.cli import main as cli
    from cmgen.export_lcm import export_lcm

    out = tmp_path / "exported"
    assert export_lcm(_trainer(tiny_sd, tmp_path / "run", reward="ink").eval_generator(), out) == \
        "LatentConsistencyModelPipeline"
    capsys.readouterr()
    assert cli(["sample", str(out), "--n", "2", "--out", str(tmp_path / "s.png")] + FAST) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "text-to-image LCM pipeline" in err[0] and "LatentConsistencyModelPipeline" in err[0]
    assert not (tmp_path / "s.png").exists()

def test_lrm_mode_pretrains_and_runs_on_text_latents(tiny_sd, tmp_path):
    tr = _trainer(tiny_sd, tmp_path, reward_mode="lrm", reward="jpeg-compressibility", lrm_pretrain_steps=1)
    student = {k: v.clone() for k, v in tr.gen.net.state_dict().items()}
    terms = tr.train_step()   # pretraining: the LRM alone, on noised copies of the text-conditioned latents
    assert "lrm/loss" in terms and "lcd" not in terms and torch.isfinite(torch.tensor(terms["lrm/loss"]))
    assert all(torch.equal(v, tr.gen.net.state_dict()[k]) for k, v in student.items())
    terms = tr.train_step()
    assert "lrm/loss" in terms and "lcd" in terms and torch.isfinite(torch.tensor(terms["lrm/loss"]))


def test_weight_backed_reward_without_weights_is_one_sentence(tiny_sd, tmp_path, monkeypatch):
    from cmgen.errors import UserError

    monkeypatch.delenv("CMGEN_HPSV21", raising=False)
    with pytest.raises(UserError) as err:
        _trainer(tiny_sd, tmp_path)   # the recipe's reward: hpsv2.1
    assert "CMGEN_HPSV21" in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------- captioned caches in SD's scaling

FAST = ["--threads", "1", "--no-progress", "--device", "cpu"]


def captioned_folder(root, n=6, size=64):
    """`n` random RGB images with captions: metadata.jsonl for all but the last, whose caption is NAME.txt."""
    import json

    import numpy as np
    from PIL import Image

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    captions = [f"caption number {i}" for i in range(n - 1)] + ["a caption from a text file"]
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"img{i}.png", "text": captions[i]}) + "\n"
                                                 for i in range(n - 1)))
    (root / f"img{n - 1}.txt").write_text(captions[-1] + "\n")
    return root, captions


@pytest.fixture(scope="module")
def sd_cache(tiny_sd, tmp_path_factory):
    from cmgen.cli import main as cli

    tmp = tmp_path_factory.mktemp("captioned")
    folder, captions = captioned_folder(tmp / "images")
    out = tmp / "cache"
    assert cli(["latents", "encode", str(folder), "--vae", str(tiny_sd), "--out", str(out), "--scaling", "sd",
                "--batch-size", "4"] + FAST) == 0
    return folder, captions, out


def test_sd_cache_stores_posterior_samples_times_the_scaling_factor_and_the_captions(tiny_sd, sd_cache):
    import numpy as np
    from diffusers import AutoencoderKL
    from PIL import Image

    from cmgen.latents import codec_for, read_cache
    from cmgen.recipe import load_recipe

    folder, captions, out = sd_cache
    c = read_cache(out)
    assert c.scaling == "sd" and c.captions == captions and torch.equal(c.labels, torch.arange(6))
    assert c.mean is None and c.std is None and c.latents.shape == (6, 4, 8, 8)
    vae = AutoencoderKL.from_pretrained(str(tiny_sd / "vae")).eval()
    x = torch.from_numpy(np.stack([np.asarray(Image.open(folder / f"img{i}.png")) for i in range(6)]))
    x = x.permute(0, 3, 1, 2).float() / 127.5 - 1
    g = torch.Generator().manual_seed(0)             # seed 0, chunk 0, not flipped; batches of 4
    with torch.no_grad():
        want = torch.cat([vae.encode(x[b:b + 4]).latent_dist.sample(generator=g) for b in (0, 4)])
    want = want * vae.config.scaling_factor
    assert vae.config.scaling_factor == 0.18215 and torch.allclose(c.latents, want, atol=1e-6)
    codec = codec_for(load_recipe("rglcd_sd15_hps", [f"data.path={out}"]))
    assert codec.scaling == "sd"
    with torch.no_grad():
        assert torch.allclose(codec.decode(c.latents[:2]), vae.decode(want[:2] / 0.18215).sample.clamp(-1, 1),
                              atol=1e-5)


def test_lcd_from_the_sd_teacher_reads_the_caches_captions(tiny_sd, sd_cache, tmp_path, monkeypatch):
    """Two LCD steps on the captioned cache: the text encoder sees each batch's captions (never method.prompts),
    and the previews condition on captions too."""
    import cmgen.sd
    from cmgen.recipe import load_recipe
    from cmgen.train import Trainer

    _, captions, cache = sd_cache
    seen = []
    encode = cmgen.sd.encode_prompts

    def recording(folder, prompts):
        seen.append(list(prompts))
        return encode(folder, prompts)

    monkeypatch.setattr(cmgen.sd, "encode_prompts", recording)
    over = [f"method.teacher={tiny_sd}", f"data.path={cache}", "method.reward=ink", "train.batch_size=2",
            "train.mixed_precision=no", "train.threads=1", "train.sample_every=0", "eval.every=0",
            "train.sample_n=2"]
    tr = Trainer(load_recipe("rglcd_sd15_hps", over), tmp_path / "run", progress=False)
    assert tr.data.num_classes == 6 and tr.method.captions == captions
    batch = tr.method.collect([tr._batch(0)], tr.nets, 0, tr.dist)[0]
    want = [captions[i] for i in tr._rows(0)[1].tolist()]
    assert batch.extra["prompts"] == want and torch.allclose(batch.labels, encode(tiny_sd, want))
    for _ in range(2):
        terms = tr.train_step()
        assert terms is not None and torch.isfinite(torch.tensor(terms["loss"]))
    assert seen[0] == [""]                                   # the teacher's null condition, at set-up
    texts = [p for call in seen[1:] for p in call]
    assert len(seen) == 4 and len(texts) == 6 and set(texts) <= set(captions)
    assert not set(texts) & set(tr.recipe.method.prompts)
    gen = tr.eval_generator()          # previews / cmgen sample: label i -> caption i's embeddings
    assert torch.allclose(gen.condition(torch.tensor([2, 5])), encode(tiny_sd, [captions[2], captions[5]]))
    assert tr.write_previews() and set(seen[-1]) <= set(captions)


def test_a_normalised_cache_for_the_sd_teacher_is_one_sentence(tiny_sd, sd_cache, tmp_path, capsys):
    from types import SimpleNamespace

    from cmgen.cli import main as cli
    from cmgen.errors import UserError
    from cmgen.methods.lcd import check_scaling

    folder, _, sd = sd_cache
    normalised = tmp_path / "normalised"
    assert cli(["latents", "encode", str(folder), "--vae", str(tiny_sd), "--out", str(normalised)] + FAST) == 0
    assert cli(["latents", "encode", str(folder), "--vae", str(tiny_sd), "--out", str(normalised), "--scaling", "sd"]
               + FAST) == 2
    assert "another --scaling" in capsys.readouterr().err
    from cmgen.recipe import load_recipe
    from cmgen.train import Trainer

    with pytest.raises(UserError) as err:
        Trainer(load_recipe("rglcd_sd15_hps", [f"method.teacher={tiny_sd}", f"data.path={normalised}",
                                               "method.reward=ink", "train.batch_size=2", "train.threads=1"]),
                tmp_path / "run", progress=False)
    msg = str(err.value)
    assert "normalised to std 0.5" in msg and "--scaling sd" in msg and "\n" not in msg
    recipe = SimpleNamespace(data=SimpleNamespace(name="latents", path=str(sd)))   # the reverse: an ldm teacher
    with pytest.raises(UserError) as err:                                          # trained on normalised latents
        check_scaling(recipe, "normalised", "the teacher 'runs/ldm'", "runs/vae")
    assert "Stable Diffusion's scaling" in str(err.value) and "--scaling normalised" in str(err.value)
