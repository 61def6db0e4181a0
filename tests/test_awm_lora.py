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
    # shift 3, beta 1e-4, ghuber, T = 6 from index 0, EMA 0.99
    c = m.method
    assert (c.lora_rank, c.lora_alpha, c.group_size, c.rollout_steps, c.rollout_shift, c.beta) == (32, 64, 24, 14, 3.0, 1e-4)
    assert (c.weighting, c.timesteps, c.t_first, c.t_last, m.optim.lr, m.train.ema_decay) == ("ghuber", 6, 0, 12, 3e-4, 0.99)


def test_smoke_of_the_sd35_recipe_runs_from_the_cli(capsys):
    from cmgen.cli import main

    assert main(["train", "awm_sd35_pickscore", "--smoke"]) == 0
    assert "-> ok" in capsys.readouterr().out
