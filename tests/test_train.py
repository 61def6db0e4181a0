"""Short training runs per recipe, exact resume, previews and run records."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from cmgen.plots import read_metrics
from cmgen.recipe import load_recipe
from cmgen.train import train

TINY = ["model.block_out_channels=[16,32]", "model.norm_num_groups=8", "model.attention_head_dim=8"]


def _falls(rows, key="loss", k=10):
    v = [r[key] for r in rows]
    assert all(map(lambda t: t == t and abs(t) != float("inf"), v)), "loss is not finite"
    first, last = sum(v[:k]) / k, sum(v[-k:]) / k
    return first, last


@pytest.mark.parametrize("name,extra,steps", [
    # one curriculum stage (s1 = s0) so the loss scale stays fixed and a fall is meaningful
    ("ict_digits", TINY + ["train.batch_size=32", "optim.lr=2e-3"], 80),
    ("ict_toy2d", ["train.batch_size=128", "model.hidden=64"], 150),
])
def test_short_run_loss_is_finite_and_falls(tmp_path, name, extra, steps):
    recipe = load_recipe(name, extra + [f"train.steps={steps}", "method.s1=10", "train.log_every=1",
                                        f"train.checkpoint_every={steps}", "train.sample_n=16"])
    run = train(recipe, tmp_path / "run", progress=False)
    rows = read_metrics(run / "metrics.jsonl")
    assert len(rows) == steps
    first, last = _falls(rows)
    assert last < 0.9 * first, (first, last)
    for f in ("samples_1step.png", "samples_2step.png", "loss.png", "recipe.yaml", "environment.json"):
        assert (run / f).stat().st_size > 0


def _ckpt_tensors(run, step):
    d = run / "checkpoints" / f"step-{step:08d}"
    return {name: load_file(str(d / f"{name}.safetensors")) for name in ("model", "ema", "optimizer")}


def _assert_same_tensors(a, b):
    for part in a:
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}:{k} differs"


def test_resume_matches_a_straight_run_bit_for_bit(tmp_path, tiny_digits_overrides):
    over = tiny_digits_overrides + ["train.steps=8", "method.s1=20", "model.dropout=0.1", "train.grad_accum=2"]
    recipe = load_recipe("ict_digits", over)
    straight = train(recipe, tmp_path / "straight", progress=False)
    split = train(recipe, tmp_path / "split", progress=False, stop_after=4)
    assert (split / "checkpoints" / "step-00000004").is_dir()
    train(recipe, split, resume="auto", progress=False)
    _assert_same_tensors(_ckpt_tensors(straight, 8), _ckpt_tensors(split, 8))
    assert read_metrics(straight / "metrics.jsonl") == read_metrics(split / "metrics.jsonl")


def test_run_folder_is_self_describing(tmp_path, tiny_digits_overrides):
    recipe = load_recipe("ict_digits", tiny_digits_overrides + ["train.steps=4"])
    run = train(recipe, tmp_path / "run", progress=False)
    ckpt = run / "checkpoints" / "step-00000004"
    env = json.loads((ckpt / "environment.json").read_text())
    assert "torch" in env["versions"] and "git_revision" in env
    from cmgen.methods import resolve_recipe

    stored = load_recipe(ckpt / "recipe.yaml")
    assert stored == resolve_recipe(recipe) and stored.method.total_steps == 4  # K written out at the start
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 4 and state["data_shape"] == [1, 8, 8]


def test_keep_last_prunes_old_checkpoints(tmp_path, tiny_digits_overrides):
    recipe = load_recipe("ict_digits", tiny_digits_overrides + ["train.steps=6", "train.checkpoint_every=1",
                                                               "train.keep_last=2"])
    run = train(recipe, tmp_path / "run", progress=False)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step-00000005", "step-00000006"]


def test_bf16_autocast_runs_on_the_cpu(tmp_path, tiny_digits_overrides):
    recipe = load_recipe("ict_digits", tiny_digits_overrides + ["train.steps=3", "train.mixed_precision=bf16"])
    run = train(recipe, tmp_path / "run", progress=False)
    rows = read_metrics(run / "metrics.jsonl")
    assert len(rows) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    # weights stay float32 under autocast
    w = load_file(str(run / "checkpoints" / "step-00000003" / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in w.values())


def test_resume_with_a_new_train_steps_keeps_the_curriculum_length(tmp_path, tiny_digits_overrides):
    from cmgen.errors import UserError
    from cmgen.recipe import from_tree, read_yaml
    from cmgen.schedules import ict_curriculum
    from cmgen.train import Trainer

    tiny = tiny_digits_overrides + ["train.checkpoint_every=20", "method.s1=160"]
    run = train(load_recipe("ict_digits", tiny + ["train.steps=20"]), tmp_path / "run", progress=False)
    saved = from_tree(read_yaml(run / "checkpoints" / "step-00000020" / "recipe.yaml"))
    assert saved.method.total_steps == 20 and "total_steps: 20" in (run / "recipe.yaml").read_text()
    longer = Trainer(load_recipe("ict_digits", tiny + ["train.steps=40"]), run, resume="auto", progress=False)
    assert longer.step == 20 and longer.recipe.method.total_steps == 20
    # K = 20: stage length 4, so step 20 is past the cap; K = 40 would put it back at N = 41
    assert longer.method.discretisation(20) == ict_curriculum(20, 20, 10, 160) == 161 != ict_curriculum(20, 40, 10, 160)
    with pytest.raises(UserError, match="method.total_steps"):
        Trainer(load_recipe("ict_digits", tiny + ["train.steps=40", "method.total_steps=40"]), run, resume="auto",
                progress=False)


def test_learning_rate_schedule_warms_up_then_decays_to_zero_at_the_last_step():
    from cmgen.recipe import OptimConfig
    from cmgen.train import lr_at

    const = OptimConfig(lr=1.0, warmup_steps=4)
    assert [lr_at(s, const, 20) for s in (0, 1, 3, 19)] == [0.25, 0.5, 1.0, 1.0]
    cos = OptimConfig(lr=2.0, warmup_steps=0, decay="cosine")
    # 2 * (1 + cos(pi * s / 10)) / 2 over 10 steps
    assert lr_at(0, cos, 10) == pytest.approx(2.0)
    assert lr_at(5, cos, 10) == pytest.approx(1.0)
    assert lr_at(2, cos, 10) == pytest.approx(1.0 + math.cos(math.pi * 0.2))
    lin = OptimConfig(lr=1.0, warmup_steps=2, decay="linear")
    # peak after the warmup, then (1 - (s - 2) / 8) over the remaining 8 steps
    assert [lr_at(s, lin, 10) for s in (0, 1, 2, 6, 9)] == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.125])


def test_a_decaying_run_trains_its_last_step_at_a_small_learning_rate(tmp_path, tiny_digits_overrides):
    recipe = load_recipe("ict_digits", tiny_digits_overrides + ["train.steps=4", "train.log_every=1",
                                                                "optim.decay=linear"])
    train(recipe, tmp_path / "run", progress=False)
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    base = recipe.optim.lr
    assert lrs == pytest.approx([base, 0.75 * base, 0.5 * base, 0.25 * base])
