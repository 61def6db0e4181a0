"""The cmgen-class export path, exercised by a model diffusers cannot express: a UNet with NsLN."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
torch.set_num_threads(1)

from test_export import TINY, TOL, cli, cmgen_samples, train_tiny  # noqa: E402

# a fresh interpreter: cmgen's class by name, and diffusers' loader through the folder's pipeline.py
CUSTOM_LOADERS = textwrap.dedent("""
    import sys
    import torch
    torch.set_num_threads(1)
    from diffusers import DiffusionPipeline
    from safetensors.torch import save_file
    folder, out, n, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    from cmgen.pipelines import CMGenPipeline
    pipes = {"cmgen": CMGenPipeline.from_pretrained(folder),
             "diffusers": DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)}
    result = {}
    for name, pipe in pipes.items():
        pipe.set_progress_bar_config(disable=True)
        for steps in (1, 2):
            gens = [torch.Generator().manual_seed(seed + j) for j in range(n)]
            result[f"{name}-{steps}"] = pipe(batch_size=n, num_inference_steps=steps, generator=gens,
                                             output_type="pt").images
    save_file(result, out)
""")


@pytest.fixture(scope="module")
def nsln_run(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("nsln") / "run", "model.norm=nsln")


@pytest.fixture(scope="module")
def nsln_exported(nsln_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("nsln_export") / "pipe"
    assert cli(["export", str(nsln_run), "--to", str(folder)]) == 0
    return folder


def test_export_picks_cmgen_classes_for_nsln(nsln_exported):
    index = json.loads((nsln_exported / "model_index.json").read_text())
    assert index["_class_name"] == "CMGenPipeline"
    assert index["unet"] == ["cmgen.models.nsln", "NsLNUNet2DModel"]
    assert index["scheduler"] == ["cmgen.pipelines", "CMGenScheduler"]
    assert "from cmgen.pipelines import CMGenPipeline" in (nsln_exported / "pipeline.py").read_text()
    assert not [p for p in nsln_exported.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    card = (nsln_exported / "README.md").read_text()
    assert "CMGenPipeline.from_pretrained" in card and "custom_pipeline" in card and "trust_remote_code=True" in card


def test_nsln_pipeline_loads_both_ways_and_matches_cmgen_sample(nsln_run, nsln_exported, tmp_path):
    from safetensors.torch import load_file

    n, seed = 5, 11
    out = tmp_path / "custom.safetensors"
    proc = subprocess.run([sys.executable, "-c", CUSTOM_LOADERS, str(nsln_exported), str(out), str(n), str(seed)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    images = load_file(str(out))
    for steps in (1, 2):
        ours = torch.from_numpy(cmgen_samples(nsln_run, steps, n, seed, tmp_path) / 2 + 0.5).clamp(0, 1)
        assert ours.std() > 0.02
        for loader in ("cmgen", "diffusers"):
            diff = (ours - images[f"{loader}-{steps}"]).abs().max().item()
            assert diff <= TOL, f"{loader} loader, {steps}-step: differs from cmgen sample by {diff}"


def test_nsln_pipeline_folder_works_in_cmgen_sample(nsln_run, nsln_exported, tmp_path):
    from cmgen.models.nsln import NsLNUNet2DModel
    from cmgen.runs import load_model

    lm = load_model(nsln_exported)
    assert isinstance(lm.net.backbone.unet, NsLNUNet2DModel) and lm.recipe.model.norm == "nsln"
    for steps in (1, 2):
        a = cmgen_samples(nsln_run, steps, 3, 0, tmp_path)
        b = cmgen_samples(nsln_exported, steps, 3, 0, tmp_path)
        assert abs(a - b).max() <= TOL


def test_nsln_pipeline_initialises_an_nsln_recipe(nsln_exported):
    from cmgen.pretrained import load_init_weights
    from cmgen.generator import build_network
    from cmgen.recipe import load_recipe
    from cmgen.runs import load_model

    model = build_network(load_recipe("ict_digits", TINY + ["model.norm=nsln"]), (1, 8, 8), 10)
    load_init_weights(model, str(nsln_exported))
    exported = load_model(nsln_exported).net.state_dict()
    assert model.state_dict().keys() == exported.keys()
    assert all(torch.equal(v, exported[k]) for k, v in model.state_dict().items())
