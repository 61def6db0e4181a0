"""EDM and flow models through diffusers: export with the stock EDMEulerScheduler /
FlowMatchEulerDiscreteScheduler, and every sampler of the exported pipeline equals `cmgen sample`
on the run (Euler through the stock scheduler's arithmetic, Heun and the SDE through cmgen's)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cmgen.cli import main as cli

TINY = ["train.steps=4", "train.batch_size=8", "model.block_out_channels=[16,32]", "model.norm_num_groups=8",
        "model.attention_head_dim=8", "train.sample_n=4", "train.checkpoint_every=4", "train.sample_every=0"]
TOL = 1e-4


def _train(recipe: str, out: Path, *overrides: str) -> Path:
    from cmgen.recipe import load_recipe
    from cmgen.train import train

    return train(load_recipe(recipe, TINY + list(overrides)), out_dir=out, progress=False)


def _cmgen(target, sampler: str, steps: int, n: int, seed: int, tmp: Path, cfg: float = 1.0) -> torch.Tensor:
    out = tmp / f"s-{Path(target).name}-{sampler}-{steps}-{cfg}.npz"
    assert cli(["sample", str(target), "--sampler", sampler, "--steps", str(steps), "--n", str(n), "--seed",
                str(seed), "--cfg", str(cfg), "--out", str(out), "--threads", "1", "--no-progress"]) == 0
    return torch.from_numpy(np.load(out)["samples"] / 2 + 0.5).clamp(0, 1)  # the pipeline's convention


def _pipe(folder: Path, sampler: str, steps: int, n: int, seed: int, cfg: float = 1.0, **options) -> torch.Tensor:
    from cmgen.pipelines import CMGenEDMPipeline, CMGenFlowPipeline

    cls = {"CMGenEDMPipeline": CMGenEDMPipeline, "CMGenFlowPipeline": CMGenFlowPipeline}[
        json.loads((folder / "model_index.json").read_text())["_class_name"]]
    pipe = cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(seed + j) for j in range(n)]
    return pipe(batch_size=n, num_inference_steps=steps, sampler=sampler, guidance_scale=cfg, generator=gens,
                output_type="pt", **options).images


@pytest.fixture(scope="module")
def edm(tmp_path_factory):
    root = tmp_path_factory.mktemp("edm")
    run = _train("edm_digits", root / "run", "model.class_conditional=true", "method.label_dropout=0.2")
    assert cli(["export", str(run), "--to", str(root / "pipe")]) == 0
    return run, root / "pipe"


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    run = _train("fm_digits", root / "run", "sample.shift=3.0")
    assert cli(["export", str(run), "--to", str(root / "pipe")]) == 0
    return run, root / "pipe"


def test_edm_exports_with_the_stock_edm_euler_scheduler(edm):
    _, folder = edm
    index = json.loads((folder / "model_index.json").read_text())
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert index["_class_name"] == "CMGenEDMPipeline" and index["scheduler"][1] == "EDMEulerScheduler"
    assert index["null_label"] == 10 and index["num_classes"] == 10 and index["default_sampler"] == "heun"
    assert (sched["sigma_min"], sched["sigma_max"], sched["sigma_data"], sched["rho"]) == (0.002, 80.0, 0.5, 7.0)
    assert not [p for p in folder.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]


def test_flow_exports_with_the_stock_flow_match_scheduler(flow):
    _, folder = flow
    index = json.loads((folder / "model_index.json").read_text())
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert index["_class_name"] == "CMGenFlowPipeline" and index["scheduler"][1] == "FlowMatchEulerDiscreteScheduler"
    assert sched["shift"] == 3.0 and index["default_sampler"] == "euler" and index["null_label"] == 10


@pytest.mark.parametrize("which,sampler,steps,cfg,seed", [
    ("edm", "euler", 6, 1.0, 7), ("edm", "heun", 5, 1.0, 7), ("edm", "euler", 4, 2.5, 7), ("edm", "heun", 3, 2.5, 7),
    ("flow", "euler", 6, 1.0, 11), ("flow", "sde", 5, 1.0, 11), ("flow", "euler", 4, 3.0, 11)])
def test_pipeline_equals_cmgen_sample(which, sampler, steps, cfg, seed, request, tmp_path):
    run, folder = request.getfixturevalue(which)
    ours = _cmgen(run, sampler, steps, 5, seed, tmp_path, cfg)
    theirs = _pipe(folder, sampler, steps, 5, seed, cfg)
    assert ours.std() > 0.05
    assert (ours - theirs).abs().max().item() <= TOL



@pytest.mark.parametrize("recipe,sampler,key,value,default", [("edm_digits", "heun", "churn", 5.0, 0.0),
                                                              ("fm_digits", "sde", "sde_a", 0.3, 0.7)])
def test_pipeline_samples_with_the_runs_churn_and_sde_a(recipe, sampler, key, value, default, tmp_path):
    """A recipe's sample.churn / sample.sde_a are the exported pipeline's defaults, as they are `cmgen sample`'s."""
    run = _train(recipe, tmp_path / "run", f"sample.{key}={value}")
    folder = tmp_path / "pipe"
    assert cli(["export", str(run), "--to", str(folder)]) == 0
    assert json.loads((folder / "model_index.json").read_text())["default_options"] == {key: value}
    ours, theirs = _cmgen(run, sampler, 3, 4, 3, tmp_path), _pipe(folder, sampler, 3, 4, 3)
    assert (ours - theirs).abs().max().item() <= TOL
    assert (_pipe(folder, sampler, 3, 4, 3, **{key: value}) - theirs).abs().max().item() == 0
    assert (_pipe(folder, sampler, 3, 4, 3, **{key: default}) - theirs).abs().max().item() > 1e-3

@pytest.mark.parametrize("which", ["edm", "flow"])
def test_exported_folder_loads_as_the_same_generator(which, edm, flow, tmp_path):
    from cmgen.runs import load_model

    run, folder = {"edm": edm, "flow": flow}[which]
    a, b = load_model(run), load_model(folder)
    assert type(a.net) is type(b.net) and a.recipe == b.recipe and a.null_label == b.null_label == 10
    sampler = "heun" if which == "edm" else "sde"
    assert torch.equal(_cmgen(run, sampler, 3, 4, 0, tmp_path), _cmgen(folder, sampler, 3, 4, 0, tmp_path))


def test_edm_with_the_cm_noise_label_is_refused_in_one_sentence(tmp_path, capsys):
    run = _train("edm_digits", tmp_path / "run", "precond.c_noise=cm")
    assert cli(["export", str(run), "--to", str(tmp_path / "pipe")]) == 2
    err = capsys.readouterr().err
    assert "precond.c_noise: edm" in err and err.count("\n") == 1
    assert not (tmp_path / "pipe").exists()


@pytest.mark.parametrize("which", ["edm", "flow"])
def test_a_stock_scheduler_pipeline_without_cmgens_recipe_is_one_sentence(which, edm, flow, tmp_path, capsys):
    import shutil

    from cmgen.runs import RECIPE_FILE

    folder = shutil.copytree({"edm": edm, "flow": flow}[which][1], tmp_path / "pipe")
    (folder / RECIPE_FILE).unlink()              # as a pipeline of these schedulers made elsewhere would be
    out = tmp_path / "s.png"
    assert cli(["sample", str(folder), "--n", "2", "--out", str(out), "--threads", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert RECIPE_FILE in err and "exported itself" in err and err.count("\n") == 1 and not out.exists()


def test_default_labels_are_j_mod_the_classes_not_the_embeddings_with_the_null_label():
    """A CFG model has classes + 1 embeddings (the last is the null label); image j still gets label j % classes."""
    from types import SimpleNamespace

    from cmgen.pipelines import _class_labels

    unet = SimpleNamespace(config=SimpleNamespace(num_class_embeds=11))
    assert torch.equal(_class_labels(unet, None, 12, "cpu", 10), torch.arange(12) % 10)
    assert torch.equal(_class_labels(unet, None, 12, "cpu"), torch.arange(12) % 11)   # no null label: all embeds
    assert torch.equal(_class_labels(unet, 3, 4, "cpu", 10), torch.full((4,), 3))
    assert _class_labels(SimpleNamespace(config=SimpleNamespace(num_class_embeds=None)), None, 4, "cpu") is None
