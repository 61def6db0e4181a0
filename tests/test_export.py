"""cmgen export / import with diffusers: stock pipeline round trip, pipeline folders as models,
model.init_from, and the errors users meet. Everything offline (HF_HUB_OFFLINE=1)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
torch.set_num_threads(1)

from cmgen.cli import main as cli  # noqa: E402
from cmgen.errors import UserError  # noqa: E402

TINY = ["train.steps=4", "train.batch_size=8", "model.block_out_channels=[16,32]", "model.norm_num_groups=8",
        "model.attention_head_dim=8", "train.sample_n=4", "train.checkpoint_every=4"]
TOL = 1e-5


def train_tiny(out: Path, *overrides: str) -> Path:
    from cmgen.recipe import load_recipe
    from cmgen.train import train

    return train(load_recipe("ict_digits", TINY + list(overrides)), out_dir=out, progress=False)


def cmgen_samples(target, steps: int, n: int, seed: int, tmp: Path, *extra: str) -> np.ndarray:
    """`cmgen sample` output (float samples in [-1, 1]); `extra` are more flags (e.g. --class-label 3)."""
    out = tmp / f"cmgen-{Path(target).name}-{steps}-{seed}.npz"
    assert cli(["sample", str(target), "--steps", str(steps), "--n", str(n), "--seed", str(seed),
                "--out", str(out), "--threads", "1", "--no-progress", "--device", "cpu", *extra]) == 0
    return np.load(out)["samples"]


# the consumer side: a fresh interpreter in which cmgen cannot even be imported
DIFFUSERS_ONLY = textwrap.dedent("""
    import sys
    sys.modules["cmgen"] = None  # prove the folder needs nothing but diffusers
    import torch
    torch.set_num_threads(1)
    from diffusers import DiffusionPipeline
    from safetensors.torch import save_file
    folder, out, n, seed, mid_index, classes = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    labels = (torch.arange(n) % classes) if classes else None
    result = {"pipeline": torch.tensor([float(type(pipe).__name__ == "ConsistencyModelPipeline")])}
    for steps, kw in ((1, dict(num_inference_steps=1)), (2, dict(num_inference_steps=None, timesteps=[mid_index, 0]))):
        gens = [torch.Generator().manual_seed(seed + j) for j in range(n)]
        result[f"{steps}"] = pipe(batch_size=n, class_labels=labels, generator=gens, output_type="pt", **kw).images
    save_file(result, out)
""")


def diffusers_only_images(folder: Path, n: int, seed: int, mid_index: int, classes: int, tmp: Path) -> dict:
    from safetensors.torch import load_file

    out = tmp / "diffusers.safetensors"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", DIFFUSERS_ONLY, str(folder), str(out), str(n), str(seed),
                           str(mid_index), str(classes)], capture_output=True, text=True, env=env, cwd=tmp, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(str(out))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A class-conditional tiny iCT run on digits (labels exercise the class-embedding path)."""
    return train_tiny(tmp_path_factory.mktemp("run") / "run", "model.class_conditional=true")


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export") / "pipe"
    assert cli(["export", str(run), "--to", str(folder)]) == 0
    return folder


# ----------------------------------------------------------------------------- the 2-step grid

@pytest.mark.parametrize("sigma_mid", [0.821, 1.526, 0.529])
def test_karras_grid_holds_sigma_mid_exactly(sigma_mid):
    from diffusers import CMStochasticIterativeScheduler

    from cmgen.export import karras_grid_for
    from cmgen.precond import PrecondConfig, c_noise

    grid = karras_grid_for([80.0, sigma_mid], PrecondConfig())
    assert grid.exact
    sched = CMStochasticIterativeScheduler(num_train_timesteps=grid.num_train_timesteps)
    sched.set_timesteps(timesteps=grid.two_step_timesteps)
    want_t = c_noise(torch.tensor([sigma_mid], dtype=torch.float32))
    assert sched.sigmas[1].item() == np.float32(sigma_mid)  # what the scheduler's step() uses
    assert torch.tensor(sched.timesteps[1].item()).float() == want_t  # what the UNet's embedding sees
    assert sched.sigmas[0].item() == 80.0


def test_karras_grid_falls_back_to_same_float32_sigma():
    from cmgen.export import karras_grid_for
    from cmgen.precond import PrecondConfig

    # index 6 of the 11-point grid: cmgen's float32 c_noise is an ulp off diffusers' on every grid
    grid = karras_grid_for([80.0, 0.9654169263318939], PrecondConfig())
    assert not grid.exact and (grid.num_train_timesteps, grid.mid_index) == (6, 3)
    assert karras_grid_for([80.0], PrecondConfig()).mid_index is None


def test_config_check_resolves_attention_norm_groups_like_unet2dmodel():
    from diffusers import UNet2DModel

    from cmgen.pretrained import _check_same_network

    base = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), norm_num_groups=8,
                down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=8, layers_per_block=1)
    with torch.device("meta"):
        default = UNet2DModel(**base)
        shifted = UNet2DModel(**base, resnet_time_scale_shift="scale_shift")
    _check_same_network({**base, "attn_norm_num_groups": 8}, default, "x")  # None = norm_num_groups here
    with pytest.raises(UserError, match="attn_norm_num_groups=8 but the recipe builds attn_norm_num_groups=None"):
        _check_same_network({**base, "resnet_time_scale_shift": "scale_shift", "attn_norm_num_groups": 8},
                            shifted, "x")  # ... but no mid-block attention norm with scale_shift


# ----------------------------------------------------------------------------- stock round trip

def test_export_writes_stock_pipeline_with_safetensors_only(exported):
    index = json.loads((exported / "model_index.json").read_text())
    assert index["_class_name"] == "ConsistencyModelPipeline"
    assert index["unet"] == ["diffusers", "UNet2DModel"]
    assert index["scheduler"] == ["diffusers", "CMStochasticIterativeScheduler"]
    files = [p.name for p in exported.rglob("*") if p.is_file()]
    assert "diffusion_pytorch_model.safetensors" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]
    assert not (exported / "pipeline.py").exists()


@pytest.mark.parametrize("damage,words", [
    (lambda p: (p / "model_index.json").write_text("{half"), "is not valid JSON; the diffusers pipeline folder is corrupt"),
    (lambda p: (p / "model_index.json").write_text("[1, 2]"), "does not hold a JSON object; the diffusers pipeline"),
    (lambda p: (p / "scheduler" / "scheduler_config.json").unlink(),
     "has no scheduler_config.json; it is not a complete diffusers pipeline folder")])
def test_a_pipeline_folder_with_a_damaged_json_file_is_one_sentence(exported, tmp_path, capsys, damage, words):
    from cmgen.cli import main

    bad = tmp_path / "pipe"
    shutil.copytree(exported, bad)
    damage(bad)
    assert main(["sample", str(bad), "--n", "1", "--out", str(tmp_path / "s.png"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and not (tmp_path / "s.png").exists()


def test_model_card_documents_recipe_steps_sigmas_and_metrics(exported):
    card = (exported / "README.md").read_text()
    info = json.loads((exported / "cmgen_export.json").read_text())
    grid = info["scheduler_grid"]
    assert grid["exact"] and grid["two_step_timesteps"][1] == 0
    assert f"timesteps={grid['two_step_timesteps']}" in card
    assert f"num_train_timesteps={grid['num_train_timesteps']}" in card
    assert "training step 4" in card and "80, 0.821" in card
    assert "name: ict_digits" in card and "Training (last logged row): step 4" in card
    assert "class_labels=torch.arange(16) % 10" in card


def test_round_trip_plain_diffusers_fresh_process_matches_cmgen_sample(run, exported, tmp_path):
    n, seed = 6, 3
    info = json.loads((exported / "cmgen_export.json").read_text())
    mid_index = info["scheduler_grid"]["two_step_timesteps"][0]
    theirs = diffusers_only_images(exported, n, seed, mid_index, 10, tmp_path)
    assert theirs["pipeline"].item() == 1.0
    for steps in (1, 2):
        ours = cmgen_samples(run, steps, n, seed, tmp_path)
        ours_01 = torch.from_numpy(ours / 2 + 0.5).clamp(0, 1)  # the pipeline's output convention
        diff = (ours_01 - theirs[f"{steps}"]).abs().max().item()
        assert diff <= TOL, f"{steps}-step: cmgen and diffusers differ by {diff}"
        assert ours.std() > 0.05  # real images, not a constant


def test_pipeline_folder_samples_like_the_run(run, exported, tmp_path):
    for steps in (1, 2):
        from_run = cmgen_samples(run, steps, 4, 0, tmp_path)
        from_pipe = cmgen_samples(exported, steps, 4, 0, tmp_path)
        assert np.abs(from_run - from_pipe).max() <= TOL


def test_a_model_trained_with_edm_c_noise_exports_a_pipeline_that_feeds_the_unet_the_same(tmp_path):
    """precond.c_noise: edm gives the UNet 0.25 ln(sigma); the stock scheduler would feed it 250 ln(sigma), so the
    export writes CMGenPipeline with the convention in its scheduler, and its images equal `cmgen sample`'s."""
    from cmgen.pipelines import CMGenPipeline, CMGenScheduler

    run = train_tiny(tmp_path / "run", "precond.c_noise=edm")
    folder = tmp_path / "pipe"
    assert cli(["export", str(run), "--to", str(folder)]) == 0
    assert json.loads((folder / "cmgen_export.json").read_text())["pipeline_class"] == "CMGenPipeline"
    assert "c_noise = 0.25 ln(sigma)" in (folder / "README.md").read_text()
    pipe = CMGenPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.precond().c_noise == "edm"
    for steps in (1, 2):
        ours = torch.from_numpy(cmgen_samples(run, steps, 4, 0, tmp_path) / 2 + 0.5).clamp(0, 1)
        gens = [torch.Generator().manual_seed(j) for j in range(4)]
        theirs = pipe(batch_size=4, num_inference_steps=steps, generator=gens, output_type="pt").images
        assert (ours - theirs).abs().max().item() <= TOL, steps
    pipe.scheduler = CMGenScheduler.from_config({**pipe.scheduler.config, "c_noise": "cm"})   # what a folder without it reads
    other = pipe(batch_size=4, num_inference_steps=1, output_type="pt",
                 generator=[torch.Generator().manual_seed(j) for j in range(4)]).images
    assert (other - torch.from_numpy(cmgen_samples(run, 1, 4, 0, tmp_path) / 2 + 0.5).clamp(0, 1)).abs().max() > 1e-3


def test_load_pipeline_model_rebuilds_denoiser_and_recipe(run, exported):
    from cmgen.precond import ConsistencyDenoiser
    from cmgen.runs import load_model

    lm = load_model(exported)
    ref = load_model(run)
    assert isinstance(lm.net, ConsistencyDenoiser)
    assert lm.recipe == ref.recipe and lm.shape == (1, 8, 8) and lm.num_classes == 10 and lm.step == 4
    for k, v in ref.net.state_dict().items():
        assert torch.equal(lm.net.state_dict()[k], v), k


def test_no_ema_exports_raw_weights(run, tmp_path):
    from safetensors.torch import load_file

    from cmgen.runs import resolve_checkpoint

    assert cli(["export", str(run), "--to", str(tmp_path / "raw"), "--no-ema"]) == 0
    exported = load_file(str(tmp_path / "raw" / "unet" / "diffusion_pytorch_model.safetensors"))
    raw = load_file(str(resolve_checkpoint(run) / "model.safetensors"))
    ema = load_file(str(resolve_checkpoint(run) / "ema.safetensors"))
    key = "conv_in.weight"
    assert torch.equal(exported[key], raw[f"backbone.unet.{key}"])
    assert not torch.equal(exported[key], ema[f"backbone.unet.{key}"])


def test_eval_fid_accepts_a_pipeline_folder(exported, tmp_path):
    pytest.importorskip("cmgen.eval.cli")
    out = tmp_path / "eval"
    code = cli(["eval", "fid", str(exported), "--features", "digits", "--n", "64", "--steps", "1",
                "--batch-size", "64", "--out", str(out), "--threads", "1", "--no-progress", "--device", "cpu"])
    assert code == 0
    assert any(p.suffix == ".json" for p in out.iterdir())


# ----------------------------------------------------------------------------- foreign pipelines and init_from

@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """A stock pipeline saved by diffusers itself (no cmgen files), shaped like the tiny recipe's UNet."""
    from cmgen.generator import build_network
    from cmgen.recipe import load_recipe

    torch.manual_seed(1)
    unet = build_network(load_recipe("ict_digits", TINY), (1, 8, 8), 10).backbone.unet
    return stock_pipeline(unet, tmp_path_factory.mktemp("foreign") / "ct_tiny")


def stock_pipeline(unet, folder: Path) -> Path:
    """`unet` with every weight perturbed, saved by diffusers as a ConsistencyModelPipeline (40-step grid)."""
    from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline

    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))  # not the zero-initialised output conv: images depend on weights
    ConsistencyModelPipeline(unet=unet, scheduler=CMStochasticIterativeScheduler(num_train_timesteps=40)) \
        .save_pretrained(folder)
    return folder


def test_foreign_pipeline_samples_like_its_own_two_step_call(foreign, tmp_path):
    from diffusers import ConsistencyModelPipeline

    from cmgen.runs import load_model

    lm = load_model(foreign)
    lo, hi = 0.002 ** (1 / 7), 80.0 ** (1 / 7)
    assert lm.recipe.sample.sigmas[1] == pytest.approx((hi + 20 / 39 * (lo - hi)) ** 7)  # index 20 of 40 points
    pipe = ConsistencyModelPipeline.from_pretrained(foreign)
    pipe.set_progress_bar_config(disable=True)
    for steps in (1, 2):
        ours = torch.from_numpy(cmgen_samples(foreign, steps, 3, 7, tmp_path) / 2 + 0.5).clamp(0, 1)
        gens = [torch.Generator().manual_seed(7 + j) for j in range(3)]
        theirs = pipe(batch_size=3, num_inference_steps=steps, generator=gens, output_type="pt").images
        # 40-point grid: timesteps are computed in float64 by diffusers and in float32 by cmgen (1 ulp)
        assert (ours - theirs).abs().max().item() < 1e-4


def test_a_class_conditional_foreign_pipeline_samples_like_its_own_call_per_class(foreign, tmp_path):
    from diffusers import ConsistencyModelPipeline, UNet2DModel

    from cmgen.runs import load_model

    torch.manual_seed(2)
    unet = UNet2DModel.from_config({**UNet2DModel.load_config(foreign / "unet"), "num_class_embeds": 10})
    folder = stock_pipeline(unet, tmp_path / "ct_cond")
    assert load_model(folder).num_classes == 10
    pipe = ConsistencyModelPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    for label in (3, 7):
        ours = torch.from_numpy(cmgen_samples(folder, 1, 2, 5, tmp_path, "--class-label", str(label)) / 2 + 0.5)
        ours = ours.clamp(0, 1)
        theirs = pipe(batch_size=2, class_labels=[label, label], num_inference_steps=1, output_type="pt",
                      generator=[torch.Generator().manual_seed(5 + j) for j in range(2)]).images
        assert (ours - theirs).abs().max().item() < 1e-4


def test_a_fine_tuned_run_loads_after_its_init_from_source_is_gone(foreign, tmp_path):
    """Every weight of a full fine-tune is trainable and in its checkpoints: sampling it needs no base."""
    import shutil

    from safetensors.torch import load_file

    from cmgen.recipe import load_recipe
    from cmgen.runs import load_model, resolve_checkpoint
    from cmgen.train import train

    base = tmp_path / "base"
    shutil.copytree(foreign, base)
    run = train(load_recipe("ict_digits", TINY + ["train.steps=1", f"model.init_from={base}"]), tmp_path / "ft",
                progress=False)
    shutil.rmtree(base)
    gen = load_model(run)
    ema = load_file(str(resolve_checkpoint(run) / "ema.safetensors"))
    assert all(torch.equal(v, ema[k]) for k, v in gen.net.state_dict().items())
    recipe = load_recipe("ict_digits", TINY + ["train.steps=2", f"model.init_from={base}"])
    assert load_model(train(recipe, run, resume="auto", progress=False)).step == 2  # and it resumes


def test_init_from_local_pipeline_loads_unet_into_trainer(foreign, tmp_path):
    from safetensors.torch import load_file

    from cmgen.recipe import load_recipe
    from cmgen.train import Trainer

    recipe = load_recipe("ict_digits", TINY + [f"model.init_from={foreign}"])
    trainer = Trainer(recipe, tmp_path / "ft", progress=False)
    src = load_file(str(foreign / "unet" / "diffusion_pytorch_model.safetensors"))
    own = trainer.accelerator.unwrap_model(trainer.model).backbone.unet.state_dict()
    assert src.keys() == own.keys()
    assert all(torch.equal(src[k], own[k]) for k in src)
    assert trainer.train_step() is not None  # fine-tuning runs


def test_init_from_unet_folder_and_cached_hub_id(foreign, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    from cmgen.pretrained import load_init_weights
    from cmgen.generator import build_network
    from cmgen.recipe import load_recipe

    model = build_network(load_recipe("ict_digits", TINY), (1, 8, 8), 10)
    load_init_weights(model, str(foreign / "unet"))
    conv = model.backbone.unet.conv_in.weight.detach().clone()
    # a hub id resolves from the local cache only: lay one out by hand
    snap = tmp_path / "hub" / "models--org--ct_tiny"
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text("0" * 40)
    import shutil
    shutil.copytree(foreign, snap / "snapshots" / ("0" * 40))
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    fresh = build_network(load_recipe("ict_digits", TINY), (1, 8, 8), 10)
    load_init_weights(fresh, "org/ct_tiny")
    assert torch.equal(fresh.backbone.unet.conv_in.weight, conv)
    with pytest.raises(UserError, match="not in the local Hugging Face cache and cmgen never downloads"):
        load_init_weights(fresh, "openai/diffusers-ct_imagenet64")


def test_init_from_reads_a_sharded_unet_folder(foreign, tmp_path):
    from diffusers import UNet2DModel

    from cmgen.generator import build_network
    from cmgen.pretrained import load_init_weights
    from cmgen.recipe import load_recipe

    unet = UNet2DModel.from_pretrained(foreign / "unet")
    unet.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="100KB")
    shards = sorted((tmp_path / "sharded").glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    model = build_network(load_recipe("ict_digits", TINY), (1, 8, 8), 10)
    load_init_weights(model, str(tmp_path / "sharded"))
    own = model.backbone.unet.state_dict()
    assert all(torch.equal(own[k], v) for k, v in unet.state_dict().items())


def test_a_pipeline_naming_a_network_class_outside_diffusers_and_cmgen_is_refused_unimported(foreign, tmp_path,
                                                                                             capsys, monkeypatch):
    import shutil

    marker = tmp_path / "imported"
    (tmp_path / "cmgen_probe_net.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Net: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    folder = tmp_path / "pipe"
    shutil.copytree(foreign, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["unet"] = ["cmgen_probe_net", "Net"]
    (folder / "model_index.json").write_text(json.dumps(index))
    assert cli(["sample", str(folder), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "uses the network class cmgen_probe_net.Net, which cmgen cannot load" in err
    assert not marker.exists()  # the module was never imported


def test_init_from_errors_name_the_field_and_fix(foreign, tmp_path):
    from cmgen.pretrained import load_init_weights
    from cmgen.generator import build_network
    from cmgen.recipe import load_recipe

    def model(*overrides):
        return build_network(load_recipe("ict_digits", TINY + list(overrides)), (1, 8, 8), 10)

    with pytest.raises(UserError, match=r"block_out_channels=\[16, 32\] but the recipe builds block_out_channels"):
        load_init_weights(model("model.block_out_channels=[16,16]"), str(foreign))
    with pytest.raises(UserError,
                       match="holds a UNet2DModel but the recipe builds a NsLNUNet2DModel; set model.norm=group"):
        load_init_weights(model("model.norm=nsln"), str(foreign))
    with pytest.raises(UserError, match=r"precond.sigma_data=0.25; set precond.sigma_data=0.5"):
        load_init_weights(model("precond.sigma_data=0.25"), str(foreign))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is not a diffusers pipeline folder .* or UNet folder"):
        load_init_weights(model(), str(tmp_path / "empty"))
    with pytest.raises(UserError, match="neither an existing folder nor a hub id"):
        load_init_weights(model(), str(tmp_path / "missing" / "folder"))


# ----------------------------------------------------------------------------- errors

def test_folder_that_is_not_a_consistency_pipeline_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    assert cli(["sample", str(tmp_path / "plain"), "--out", str(tmp_path / "x.png")]) == 2
    assert "holds no complete cmgen checkpoint" in capsys.readouterr().err
    dit = tmp_path / "dit"
    dit.mkdir()
    (dit / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline",
                                                      "transformer": ["diffusers", "DiTTransformer2DModel"]}))
    assert cli(["sample", str(dit), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"cmgen: error: '{dit}' is a DiTPipeline pipeline without a 'unet'; cmgen loads "
                   "consistency-model pipelines (ConsistencyModelPipeline or a cmgen export)")


def test_pickled_or_foreign_weights_are_refused(foreign, tmp_path):
    import shutil

    from cmgen.runs import load_model

    pickled = tmp_path / "pickled"
    shutil.copytree(foreign, pickled)
    st = pickled / "unet" / "diffusion_pytorch_model.safetensors"
    st.rename(st.with_suffix(".bin"))
    with pytest.raises(UserError, match="has no safetensors weights .*cmgen never unpickles"):
        load_model(pickled)
    index = json.loads((foreign / "model_index.json").read_text())
    ddpm = tmp_path / "ddpm"
    shutil.copytree(foreign, ddpm)
    (ddpm / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler"}))
    assert index["_class_name"] == "ConsistencyModelPipeline"
    with pytest.raises(UserError, match="uses the scheduler DDPMScheduler, not a consistency-model scheduler"):
        load_model(ddpm)


def test_export_refuses_non_empty_target_pipelines_and_point_models(run, exported, tmp_path, capsys):
    assert cli(["export", str(run), "--to", str(exported)]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert cli(["export", str(exported), "--to", str(tmp_path / "again")]) == 2
    assert "is already a diffusers pipeline folder" in capsys.readouterr().err
    from cmgen.recipe import load_recipe
    from cmgen.train import train

    toy = train(load_recipe("ict_toy2d", ["train.steps=2", "train.batch_size=8", "train.checkpoint_every=2",
                                          "train.sample_n=4"]), out_dir=tmp_path / "toy", progress=False)
    assert cli(["export", str(toy), "--to", str(tmp_path / "toy_pipe")]) == 2
    assert "only image models with model.arch=unet can be exported" in capsys.readouterr().err
    assert not (tmp_path / "toy_pipe").exists()


# unet/config.json of openai/diffusers-ct_imagenet64 (diffusers' convert_consistency_to_diffusers.py)
PUBLISHED_CT_IMAGENET64 = {
    "_class_name": "UNet2DModel", "sample_size": 64, "in_channels": 3, "out_channels": 3, "layers_per_block": 3,
    "num_class_embeds": 1000, "block_out_channels": [192, 384, 576, 768], "attention_head_dim": 64,
    "down_block_types": ["ResnetDownsampleBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"],
    "resnet_time_scale_shift": "scale_shift", "attn_norm_num_groups": 32, "upsample_type": "resnet",
    "downsample_type": "resnet",
}


def test_ict_imagenet64_recipe_fits_the_published_ct_imagenet64_unet():
    from diffusers import UNet2DModel

    from cmgen.pretrained import _check_same_network
    from cmgen.generator import build_network
    from cmgen.recipe import load_recipe

    with torch.device("meta"):  # the 300M-parameter ADM, built without memory
        model = build_network(load_recipe("ict_imagenet64"), (3, 64, 64), 1000)
    _check_same_network(PUBLISHED_CT_IMAGENET64, model.backbone.unet, "model.init_from")
    with torch.device("meta"):
        published = UNet2DModel(**{k: v for k, v in PUBLISHED_CT_IMAGENET64.items() if k != "_class_name"})
    ours, theirs = model.backbone.unet.state_dict(), published.state_dict()
    assert ours.keys() == theirs.keys() and all(ours[k].shape == theirs[k].shape for k in ours)
