"""LoRA on a diffusers SD3 transformer: adapter-only training state, the reference as the adapter switched
off, export as base pipeline + adapter that stock diffusers loads, --smoke of the SD3.5 recipe."""
import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from cmgen.methods.rollout import RewardMethod  # noqa: E402


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    from cmgen.recipe import load_recipe
    from cmgen.train import Trainer

    out = tmp_path_factory.mktemp("sd3_lora")
    r = load_recipe("awm_sd35_pickscore", ["train.steps=2", "train.checkpoint_every=2", "train.sample_every=0",
                                           "train.mixed_precision=no", "optim.lr=1e-2"])
    tr = Trainer(RewardMethod.smoke_recipe(r), out / "run", progress=False)
    tr.run()
    return tr, out


def probe(gen_shape, n=2):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, *gen_shape, generator=g), torch.tensor([0.7, 0.3]), torch.tensor([0, 1])


def test_only_the_adapter_is_trained_stored_and_averaged(lora_run):
    from cmgen.checkpoint import list_checkpoints, load_tensors

    tr, out = lora_run
    trainable = {n for n, p in tr.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    frozen = sum(p.numel() for p in tr.model.parameters() if not p.requires_grad)
    opt_params = sum(p.numel() for g in tr.optimizer.param_groups for p in g["params"])
    assert opt_params == sum(p.numel() for p in tr.model.parameters() if p.requires_grad) < frozen
    assert set(tr.parts["model"].ema.names) == trainable
    ckpt = list_checkpoints(out / "run")[-1]
    for name in ("model", "ema", "target-previous"):
        keys = set(load_tensors(ckpt / f"{name}.safetensors"))
        assert keys and all("lora_" in k for k in keys), name


def test_reference_is_the_base_transformer_with_the_adapter_off(lora_run):
    from cmgen.models.sd3 import load_pipeline, pipeline_folder

    tr, _ = lora_run
    x, t, y = probe(tr.gen.shape)
    bb = tr.method.backbone
    base = load_pipeline(pipeline_folder(tr.recipe)).transformer
    with torch.no_grad():
        tuned = tr.nets.model(x, t, y)
        ref = tr.method.reference_velocity(tr.nets, x, t, y)
        expect = base(hidden_states=x, timestep=1000 * t, encoder_hidden_states=bb.prompt_embeds[y],
                      pooled_projections=bb.pooled[y], return_dict=False)[0]
    assert torch.allclose(ref, expect, atol=1e-5)
    assert not torch.allclose(tuned, ref, atol=1e-4)      # the adapter learned something (lr 1e-2)
    assert bb.transformer.active_adapters()                # and is switched back on


def test_export_is_base_plus_adapter_that_diffusers_loads(lora_run, capsys):
    from diffusers import StableDiffusion3Pipeline

    from cmgen.cli import main as cli
    from cmgen.runs import load_model

    tr, out = lora_run
    folder = out / "export"
    assert cli(["export", str(out / "run"), "--to", str(folder)]) == 0
    assert (folder / "lora" / "pytorch_lora_weights.safetensors").is_file()
    printed = capsys.readouterr().out                      # the CLI says how to load both parts
    assert f"DiffusionPipeline.from_pretrained('{folder}')" in printed
    assert f"pipe.load_lora_weights('{folder / 'lora'}')" in printed
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    pipe.load_lora_weights(folder / "lora")
    ours = load_model(out / "run", ema=True)
    x, t, y = probe(ours.shape)
    bb = ours.net.backbone
    with torch.no_grad():
        want = ours.net(x, t, y)
        got = pipe.transformer(hidden_states=x, timestep=1000 * t, encoder_hidden_states=bb.prompt_embeds[y],
                               pooled_projections=bb.pooled[y], return_dict=False)[0]
        pipe.transformer.disable_lora()
        plain = pipe.transformer(hidden_states=x, timestep=1000 * t, encoder_hidden_states=bb.prompt_embeds[y],
                                 pooled_projections=bb.pooled[y], return_dict=False)[0]
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(plain, want, atol=1e-4)


def test_rewards_see_prompts_and_the_recipe_keeps_the_papers_settings(lora_run):
    from cmgen.recipe import load_recipe

    tr, _ = lora_run
    assert tr.method.condition(torch.tensor([1, 0])) == [tr.method.backbone.prompts[1], tr.method.backbone.prompts[0]]
    m = load_recipe("awm_sd35_pickscore")
    # AWM reference config (config/dgx_awm.py, PickScore): LoRA r 32 / alpha 64, lr 3e-4, k = 24, 14 steps,
    # shift 3, beta 1e-4, ghuber, T = 6 from index 0 to 11 (strata {0, 1}, ..., {10, 11}), EMA 0.99
    c = m.method
    assert (c.lora_rank, c.lora_alpha, c.group_size, c.rollout_steps, c.rollout_shift, c.beta) == (32, 64, 24, 14, 3.0, 1e-4)
    assert (c.weighting, c.timesteps, c.t_first, c.t_last, m.optim.lr, m.train.ema_decay) == ("ghuber", 6, 0, 11, 3e-4, 0.99)


def scheduler_sigmas(steps: int) -> list[float]:
    """SD3.5's scheduler (shift 3), built from its config here: StableDiffusion3Pipeline's grid for `steps`."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    s.set_timesteps(steps)
    return s.sigmas.tolist()


def test_sd3_rollout_loss_and_sampling_times_are_the_schedulers_sigmas(lora_run):
    from cmgen.errors import UserError
    from cmgen.sampling.flow import flow_times

    tr, _ = lora_run
    want = scheduler_sigmas(14)
    assert want[-2] == pytest.approx(0.00893, abs=1e-5) and flow_times(14, 3.0)[-2] == pytest.approx(0.1875)
    assert tr.gen.times(14) == pytest.approx(want, abs=1e-7)                       # cmgen sample, previews, eval
    assert tr.method.times.tolist() == pytest.approx(scheduler_sigmas(4), abs=1e-7)   # the smoke run's rollouts
    from cmgen.sampling.registry import flow_grid

    assert flow_grid(tr.recipe, 14, 3.0, "method.rollout_shift") == pytest.approx(want, abs=1e-7)
    first, second = tr.method.loss_times(tr._batch(0)).tolist()                   # strata {0} and {1, 2}
    assert first == 1.0 and min(abs(second - v) for v in scheduler_sigmas(4)[1:3]) < 1e-6
    with pytest.raises(UserError, match="method.rollout_shift"):                  # a recipe shift the grid ignores
        flow_grid(tr.recipe, 14, 1.0, "method.rollout_shift")
    import dataclasses

    from cmgen.methods import build_method

    other = dataclasses.replace(tr.recipe, sample=dataclasses.replace(tr.recipe.sample, shift=1.0))
    with pytest.raises(UserError, match="'sample.shift'"):                      # refused when the run starts
        build_method(other, tr.gen)


def test_cmgen_sampling_and_the_exported_pipeline_make_the_same_latents(lora_run):
    from diffusers import StableDiffusion3Pipeline

    from cmgen.cli import main as cli
    from cmgen.runs import load_model
    from cmgen.sampling import per_image_noise

    tr, out = lora_run
    folder = out / "export-parity"
    assert cli(["export", str(out / "run"), "--to", str(folder)]) == 0
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    pipe.load_lora_weights(folder / "lora")
    ours = load_model(out / "run", ema=True)
    noise, y = per_image_noise([0, 1], ours.shape), torch.tensor([0, 1])
    bb = ours.net.backbone
    for steps in (3, 14):
        with torch.no_grad():
            z = ours.sampler("euler").run(ours.net, noise, ours.times(steps), y, ours, {})
            got = pipe(prompt_embeds=bb.prompt_embeds[y], pooled_prompt_embeds=bb.pooled[y], latents=noise(0),
                       num_inference_steps=steps, guidance_scale=1.0, height=32, width=32, output_type="latent").images
        assert torch.allclose(z, got, atol=1e-4), steps


def test_the_adapter_has_the_recipes_rank_and_alpha(lora_run):
    tr, _ = lora_run
    m, config = tr.recipe.method, tr.method.backbone.transformer.peft_config["default"]
    assert (m.lora_rank, m.lora_alpha) == (4, 8.0)                                  # the smoke recipe's
    assert (config.r, config.lora_alpha) == (4, 8.0)
    scales = {mod.scaling["default"] for mod in tr.method.backbone.transformer.modules() if hasattr(mod, "lora_A")}
    assert scales == {2.0}                                                          # alpha / r


def test_lora_adapts_every_attention_projection_of_a_joint_block():
    from diffusers import SD3Transformer2DModel

    from cmgen.models.sd3 import add_lora

    # two blocks: the first has a context output (to_add_out), the last is context_pre_only
    t = SD3Transformer2DModel(sample_size=4, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                              num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=32,
                              pooled_projection_dim=32, out_channels=4)
    add_lora(t, 4, 8.0)
    adapted = {n for n, mod in t.named_modules() if hasattr(mod, "lora_A")}
    # the reference's lora_type "attn" (train_sd3_awm.py): both streams' q, k, v and outputs
    want = {"to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"}
    assert adapted == {f"transformer_blocks.0.attn.{m}" for m in want} | {
        f"transformer_blocks.1.attn.{m}" for m in want - {"to_add_out"}}
    assert all(not p.requires_grad for n, p in t.named_parameters() if "lora_" not in n)


def test_smoke_of_the_sd35_recipe_runs_from_the_cli(capsys):
    from cmgen.cli import main

    assert main(["train", "awm_sd35_pickscore", "--smoke"]) == 0
    assert "-> ok" in capsys.readouterr().out
