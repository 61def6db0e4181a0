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


@pytest.mark.parametrize("steps", [2, 4])
def test_text_student_exports_as_the_stock_lcm_pipeline_with_equal_latents(tiny_sd, tmp_path, steps):
    from diffusers import LatentConsistencyModelPipeline

    from cmgen.export_lcm import build_lcm_pipeline
    from cmgen.sampling.lcm import lcm_multistep
    from cmgen.sd import encode_prompts
    from cmgen.vp import lcm_timesteps

    tr = _trainer(tiny_sd, tmp_path, reward="ink")
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


def test_lrm_mode_runs_on_text_latents(tiny_sd, tmp_path):
    tr = _trainer(tiny_sd, tmp_path, reward_mode="lrm", reward="jpeg-compressibility")
    terms = tr.train_step()
    assert "lrm/loss" in terms and torch.isfinite(torch.tensor(terms["lrm/loss"]))


def test_weight_backed_reward_without_weights_is_one_sentence(tiny_sd, tmp_path, monkeypatch):
    from cmgen.errors import UserError

    monkeypatch.delenv("CMGEN_HPSV21", raising=False)
    with pytest.raises(UserError) as err:
        _trainer(tiny_sd, tmp_path)   # the recipe's reward: hpsv2.1
    assert "CMGEN_HPSV21" in str(err.value) and "\n" not in str(err.value)
