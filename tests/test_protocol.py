"""The method protocol: a toy method (tests/plugins/toy_method.py, under 40 lines) with an extra
trainable part, two phases, a target network, a frozen net and a step gate runs through the
unchanged loop, checkpoints only trainable state and resumes exactly after kill -9."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cmgen.plots import read_metrics
from cmgen.recipe import from_tree
from cmgen.train import Trainer, train

PLUGINS = Path(__file__).parent / "plugins"
sys.path.insert(0, str(PLUGINS))

TREE = {"name": "toy", "method": {"name": "toy_method"}, "data": {"name": "toy2d", "n_points": 256},
        "model": {"arch": "mlp", "hidden": 16, "depth": 1},
        "train": {"steps": 8, "batch_size": 8, "checkpoint_every": 4, "log_every": 1, "sample_n": 4,
                  "ema_decay": 0.9, "grad_accum": 2},
        "sample": {"clip_denoised": False}, "eval": {"steps": [1]}}


def recipe(**method):
    tree = dict(TREE) | {"method": {"name": "toy_method", **method}}
    return from_tree(tree)


def test_the_loop_names_no_method():
    from cmgen.methods import _MODULES

    text = (Path(__file__).parent.parent / "cmgen" / "train.py").read_text().lower()
    for name in list(_MODULES) + ["ctm", "awm", "lcd", "lct", "rg-lcd", "discriminator", "teacher"]:
        assert not re.search(rf"\b{re.escape(name)}\b", text), name


def _params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(a, b):
    return any(not torch.equal(a[k], b[k]) for k in a)


def test_phases_update_only_their_part_and_the_target_follows_model_steps(tmp_path):
    tr = Trainer(recipe(), tmp_path / "run", progress=False)
    model, critic, slow = tr.accelerator.unwrap_model(tr.model), tr.parts["critic"].module, tr.targets["slow"].module
    m0, c0, s0 = _params(model), _params(critic), _params(slow)
    assert not _changed(m0, s0)  # the target starts as a copy of the model
    tr.train_step()  # step 0: model phase
    m1, c1, s1 = _params(model), _params(critic), _params(slow)
    assert _changed(m0, m1) and not _changed(c0, c1)
    for k in s1:  # target <- 0.5 target + 0.5 model after the model step
        assert torch.allclose(s1[k], 0.5 * s0[k] + 0.5 * m1[k], atol=1e-6), k
    ema_c = [t.clone() for t in tr.parts["critic"].ema.shadow]
    tr.train_step()  # step 1: critic phase
    m2, c2, s2 = _params(model), _params(critic), _params(slow)
    assert not _changed(m1, m2) and _changed(c1, c2) and not _changed(s1, s2)
    for (name, p), old in zip(critic.named_parameters(), ema_c):  # the part's own EMA moved toward it
        new = tr.parts["critic"].ema.shadow[tr.parts["critic"].ema.names.index(name)]
        assert torch.allclose(new, 0.5 * old + 0.5 * p.detach(), atol=1e-6)


def test_checkpoint_holds_parts_and_targets_never_frozen_nets_and_the_gate_switches_on(tmp_path):
    run = train(recipe(freeze_input=True), tmp_path / "run", progress=False)
    ckpt = run / "checkpoints" / "step-00000008"
    names = {p.name for p in ckpt.iterdir()}
    assert {"model.safetensors", "ema.safetensors", "optimizer.safetensors", "critic.safetensors",
            "critic-ema.safetensors", "critic-optimizer.safetensors", "critic-optimizer.json",
            "target-slow.safetensors"} <= names
    for f in ckpt.glob("*.safetensors"):
        keys = load_file(str(f)).keys()
        assert not any("teacher" in k for k in keys)
        if f.name in ("model.safetensors", "ema.safetensors", "target-slow.safetensors"):
            assert "backbone.inp.weight" not in keys and "backbone.out.weight" in keys  # frozen: never written
    opt = load_file(str(ckpt / "optimizer.safetensors"))
    n_trainable = sum(1 for k in load_file(str(ckpt / "model.safetensors")) if "weight" in k or "bias" in k)
    assert len({k.split(".")[0] for k in opt}) == n_trainable  # Adam state for trainable parameters only
    rows = {r["step"]: r for r in read_metrics(run / "metrics.jsonl")}
    assert rows[1]["late"] == 0 and rows[3]["late"] == 0 and rows[5]["late"] > 0  # gate_at = 3
    assert "critic/loss" in rows[2] and "loss" not in rows[2]


def _all_tensors(run, step):
    d = run / "checkpoints" / f"step-{step:08d}"
    return {f.name: load_file(str(f)) for f in sorted(d.glob("*.safetensors"))}


@pytest.mark.slow
def test_kill_9_and_resume_matches_a_straight_run(tmp_path):
    path = tmp_path / "toy.yaml"
    import yaml
    path.write_text(yaml.safe_dump(TREE))
    env = dict(os.environ, PYTHONPATH=f"{PLUGINS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               CMGEN_TEST_THREADS="1")
    cmd = [sys.executable, "-m", "cmgen.cli", "train", str(path), "train.threads=1", "--no-progress"]
    straight = tmp_path / "straight"
    subprocess.run(cmd + ["--out", str(straight)], env=env, check=True, capture_output=True)
    killed = tmp_path / "killed"
    r = subprocess.run(cmd + ["--out", str(killed)], env=env | {"TOY_KILL_AT": "6"}, capture_output=True)
    assert r.returncode == -9 and (killed / "checkpoints" / "step-00000004").is_dir()
    assert not (killed / "checkpoints" / "step-00000008").exists()
    subprocess.run(cmd + ["--out", str(killed), "--resume", "auto"], env=env, check=True, capture_output=True)
    a, b = _all_tensors(straight, 8), _all_tensors(killed, 8)
    assert a.keys() == b.keys() and len(a) == 7  # model, ema, optimizer, critic (+ema, +optimizer), target
    for f in a:
        for k in a[f]:
            assert torch.equal(a[f][k], b[f][k]), f"{f}:{k}"
    assert read_metrics(straight / "metrics.jsonl") == read_metrics(killed / "metrics.jsonl")


def test_export_refuses_a_flow_model_on_points_in_one_sentence(tmp_path):
    from cmgen.cli import main

    r = from_tree({"name": "f", "method": {"name": "flow"}, "data": {"name": "toy2d", "n_points": 64},
                   "model": {"arch": "mlp", "hidden": 8, "depth": 1},
                   "train": {"steps": 1, "batch_size": 4, "sample_n": 2}, "eval": {"steps": [2]}})
    run = train(r, tmp_path / "run", progress=False)
    assert main(["export", str(run), "--to", str(tmp_path / "pipe")]) == 2
    assert not (tmp_path / "pipe").exists()
