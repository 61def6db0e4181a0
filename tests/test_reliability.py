"""Runs that survive: kill -9 and resume, atomic checkpoints, safe loading, non-finite losses,
a fuzzed recipe loader and 2-process training through accelerate's own launcher."""
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from cmgen.errors import UserError
from cmgen.recipe import from_tree, load_recipe, read_yaml, resolve_recipe_path
from cmgen.train import Trainer, train
from conftest import PickleExploit, launch_two_processes, subprocess_env

BIN = Path(sys.executable).parent
TINY = ["model.block_out_channels=[16,32]", "model.norm_num_groups=8", "model.attention_head_dim=8",
        "train.batch_size=8", "train.sample_n=4", "train.log_every=1", "train.threads=1", "model.dropout=0.1"]


def _cmgen(*args, check=True, **kw):
    proc = subprocess.run([str(BIN / "cmgen"), *map(str, args)], env=subprocess_env(), capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr[-3000:])
    return proc


def _final(run, step):
    d = Path(run) / "checkpoints" / f"step-{step:08d}"
    return {n: load_file(str(d / f"{n}.safetensors")) for n in ("model", "ema", "optimizer")}


def _same(a, b, atol=0.0):
    for part in a:
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            if atol == 0.0:
                assert torch.equal(a[part][k], b[part][k]), f"{part}:{k}"
            else:
                assert torch.allclose(a[part][k], b[part][k], atol=atol, rtol=0), \
                    f"{part}:{k} max diff {(a[part][k] - b[part][k]).abs().max()}"


# ------------------------------------------------------------------------------ 1. exact resume after kill -9

def test_kill_dash_9_then_resume_auto_equals_a_straight_run(tmp_path):
    steps = 30
    over = TINY + [f"train.steps={steps}", "train.checkpoint_every=5", "train.sample_every=1", "train.keep_last=2"]
    _cmgen("train", "ict_digits", *over, "--out", tmp_path / "straight", "--no-progress")

    killed = tmp_path / "killed"
    proc = subprocess.Popen([str(BIN / "cmgen"), "train", "ict_digits", *over, "--out", str(killed), "--no-progress"],
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step-00000005" / "state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    done = sorted(p.name for p in (killed / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert done and done[-1] != f"step-{steps:08d}", "killed too late to test a resume"

    _cmgen("train", "ict_digits", *over, "--out", killed, "--resume", "auto", "--no-progress")
    _same(_final(tmp_path / "straight", steps), _final(killed, steps))
    rows = lambda run: (Path(run) / "metrics.jsonl").read_text().splitlines()
    assert rows(tmp_path / "straight") == rows(killed)


@pytest.mark.parametrize("name, over", [
    ("edm_toy2d", ["model.hidden=16", "model.depth=1", "data.n_points=200"]),
    ("fm_toy2d", ["model.hidden=16", "model.depth=1", "data.n_points=200"]),
])
def test_dropout_of_every_method_is_keyed_so_a_resumed_run_equals_a_straight_one(tmp_path, name, over):
    """Every method's loss runs with the global RNG keyed by (seed, step, rank, micro-step), not only iCT's: with
    dropout on, a run stopped at step 2 and resumed ends bit-identical to a straight run, and the masks matter."""
    over = over + ["train.steps=4", "train.batch_size=32", "train.checkpoint_every=2", "train.keep_last=5",
                   "train.sample_every=0", "train.sample_n=8", "data.holdout=0", "train.threads=1"]
    final = {}
    for drop in (0.3, 0.0):
        r = load_recipe(name, over + [f"model.dropout={drop}"])
        final[drop] = _final(train(r, tmp_path / f"straight{drop}", progress=False), 4)
    train(r := load_recipe(name, over + ["model.dropout=0.3"]), tmp_path / "resumed", progress=False, stop_after=2)
    _same(final[0.3], _final(train(r, tmp_path / "resumed", resume="auto", progress=False), 4))
    assert any(not torch.equal(final[0.3]["model"][k], final[0.0]["model"][k]) for k in final[0.3]["model"])


def test_the_ema_follows_its_network_to_the_training_device(tmp_path, monkeypatch):
    """accelerate's prepare moves each part to the training device (a GPU); its EMA, built and resumed beside
    the weights on the CPU, must follow, or the first update mixes devices. `meta` stands in for the GPU."""
    import accelerate

    monkeypatch.setattr(accelerate.Accelerator, "device", property(lambda self: torch.device("meta")))
    trainer = Trainer(load_recipe("ict_toy2d", ["model.hidden=16", "model.depth=1", "train.threads=1"]), tmp_path,
                      progress=False)
    part = trainer.parts["model"]
    assert part.ema.shadow and all(s.device.type == "meta" for s in part.ema.shadow)
    part.ema.update(part.module)   # raises "tensors on different devices" when the EMA stayed behind


def test_logged_terms_made_on_the_cpu_join_the_loss_on_the_training_device():
    """iCT's N or CTM's k come as CPU tensors beside a GPU loss: the step's sums live on the training device, so
    stacking them works (meta stands in for the GPU)."""
    from cmgen.train import add_terms

    sums = {}
    for _ in range(2):
        add_terms(sums, {"loss": torch.ones((), device="meta"), "N": torch.tensor(11)}, torch.device("meta"), 2)
    assert {v.device.type for v in sums.values()} == {"meta"} and torch.stack(list(sums.values())).shape == (2,)


# ------------------------------------------------------------------------------ 2. atomic checkpoints

def test_a_crash_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    recipe = load_recipe("ict_digits", TINY + ["train.steps=4", "train.checkpoint_every=2"])
    run = tmp_path / "run"
    train(recipe, run, progress=False, stop_after=2)
    import cmgen.checkpoint as ck

    real = ck.save_file
    calls = {"n": 0}

    def dying_save(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second file of the step-4 checkpoint
            Path(path).write_bytes(b"\x00" * 10)
            raise KeyboardInterrupt("simulated kill during a save")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ck, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, run, resume="auto", progress=False)
    monkeypatch.setattr(ck, "save_file", real)
    assert [p.name for p in ck.list_checkpoints(run)] == ["step-00000002"]
    assert any(p.name.startswith(".tmp-step-00000004") for p in (run / "checkpoints").iterdir())
    from cmgen.runs import load_model

    assert load_model(run).step == 2
    train(recipe, run, resume="auto", progress=False)
    assert [p.name for p in ck.list_checkpoints(run)][-1] == "step-00000004"
    straight = train(recipe, tmp_path / "straight", progress=False)
    _same(_final(straight, 4), _final(run, 4))


def test_incomplete_checkpoint_folders_are_ignored(tmp_path):
    recipe = load_recipe("ict_digits", TINY + ["train.steps=2", "train.checkpoint_every=2"])
    run = train(recipe, tmp_path / "run", progress=False)
    fake = run / "checkpoints" / "step-00000099"
    fake.mkdir()
    (fake / "model.safetensors").write_bytes(b"partial")
    from cmgen.checkpoint import list_checkpoints
    from cmgen.runs import resolve_checkpoint

    assert list_checkpoints(run)[-1].name == "step-00000002"
    assert resolve_checkpoint(run).name == "step-00000002"


def test_resaving_a_step_replaces_it_whole_and_other_processes_leftovers_are_pruned(tmp_path):
    from cmgen import checkpoint as ck

    run = tmp_path / "run"
    ck.save_checkpoint(run, 2, {"model": {"w": torch.zeros(2)}}, {"step": 2}, "name: a\n", {"old.txt": "x"})
    stale = run / "checkpoints" / ".tmp-step-00000003-999999999"   # a dead process's half-written save
    own = run / "checkpoints" / f".tmp-step-00000005-{os.getpid()}"  # this process's save in progress
    stale.mkdir()
    own.mkdir()
    path = ck.save_checkpoint(run, 2, {"model": {"w": torch.ones(2)}}, {"step": 2, "v": 2}, "name: a\n")
    assert torch.equal(ck.load_tensors(path / "model.safetensors")["w"], torch.ones(2))
    assert ck.read_state(path)["v"] == 2 and not (path / "old.txt").exists()   # replaced, not merged
    assert [p.name for p in ck.list_checkpoints(run)] == ["step-00000002"]
    assert not any(p.name.startswith(".old-step") for p in (run / "checkpoints").iterdir())
    ck.prune_checkpoints(run, keep_last=3)
    assert not stale.exists() and own.exists()


def test_a_checkpoint_without_or_with_a_corrupt_state_is_one_sentence(tmp_path):
    from cmgen import checkpoint as ck

    with pytest.raises(UserError, match="is not a cmgen checkpoint \\(no state.json\\)"):
        ck.read_state(tmp_path)
    (tmp_path / "state.json").write_text('{"step": 2')
    with pytest.raises(UserError, match="has a corrupt state.json; resume from an older checkpoint"):
        ck.read_state(tmp_path)
    with pytest.raises(UserError, match="model.safetensors' is missing; the checkpoint is incomplete"):
        ck.load_tensors(tmp_path / "model.safetensors")


def test_resuming_on_images_of_another_size_is_one_sentence(tmp_path):
    import numpy as np
    from PIL import Image

    from cmgen import checkpoint as ck

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)

    def fill(side):
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"{i}.png")

    fill(8)
    recipe = load_recipe("ict_digits", TINY + ["data.name=folder", f"data.path={folder}", "data.holdout=0",
                                               "data.cache=off", "train.steps=2", "train.checkpoint_every=1",
                                               "train.sample_every=0"])
    run = tmp_path / "run"
    train(recipe, run, progress=False, stop_after=1)
    fill(16)
    with pytest.raises(UserError, match=r"was trained on data of shape \[3, 8, 8\], the recipe's data have \[3, 16, 16\]"):
        train(recipe, run, resume="auto", progress=False)
    assert [p.name for p in ck.list_checkpoints(run)] == ["step-00000001"]


# ------------------------------------------------------------------------------ 3. safe loading

@pytest.mark.parametrize("victim", ["model.safetensors", "ema.safetensors", "optimizer.safetensors"])
def test_a_planted_pickle_is_refused_not_executed(tmp_path, tiny_run, victim, capsys):
    from cmgen.cli import main

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"weights": PickleExploit(marker)})
    (ckpt / victim).write_bytes(payload)
    torch.save({"x": PickleExploit(marker)}, ckpt / "extra.pt")  # a stray torch pickle beside it
    code_sample = main(["sample", str(run), "--n", "1", "--out", str(tmp_path / "s.png"), "--no-progress"]
                       + (["--no-ema"] if victim == "model.safetensors" else []))
    same_recipe = TINY[:5] + ["train.checkpoint_every=4", "train.steps=8"]  # as the tiny_run fixture
    code_resume = main(["train", "ict_digits", *same_recipe, "--resume", "auto", "--out", str(run), "--no-progress"])
    err = capsys.readouterr().err
    assert not marker.exists(), "the pickle was executed"
    if victim != "optimizer.safetensors":
        assert code_sample == 2
    assert code_resume == 2
    assert "not a valid safetensors file" in err


# ------------------------------------------------------------------------------ 4. non-finite losses

def _nan_at(monkeypatch, bad_steps, term="loss"):
    from cmgen.methods import ict

    real = ict.Method.loss

    def loss(self, nets, batch, step):
        out = real(self, nets, batch, step)
        if step in bad_steps:
            out[term] = out[term] * float("nan")
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(ict.Method, "loss", loss)


def test_a_nan_step_is_skipped_with_a_warning_naming_the_term(tmp_path, monkeypatch):
    _nan_at(monkeypatch, {2}, term="pseudo_huber")
    recipe = load_recipe("ict_digits", TINY + ["train.steps=4", "train.checkpoint_every=2"])
    trainer = Trainer(recipe, tmp_path / "run", progress=False)
    trainer.train_step()
    trainer.train_step()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    ema_before = [s.clone() for s in trainer.parts["model"].ema.shadow]
    with pytest.warns(UserWarning, match="loss term 'pseudo_huber' is not finite; step skipped"):
        assert trainer.train_step() is None
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "weights changed on a skipped step"
    assert all(torch.equal(a, b) for a, b in zip(ema_before, trainer.parts["model"].ema.shadow))
    assert trainer.step == 3 and trainer.nonfinite == 1
    assert trainer.train_step() is not None and trainer.nonfinite == 0


def test_repeated_nan_stops_the_run_with_the_last_good_checkpoint_intact(tmp_path, monkeypatch, capsys):
    from cmgen.cli import main

    _nan_at(monkeypatch, set(range(3, 100)))
    run = tmp_path / "run"
    code = main(["train", "ict_digits", *TINY, "train.steps=20", "train.checkpoint_every=2", "train.max_nonfinite=3",
                 "--out", str(run), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "3 non-finite losses in a row" in err and "last good checkpoint is intact" in err
    from cmgen.runs import load_model

    lm = load_model(run)
    assert lm.step == 2
    assert all(torch.isfinite(p).all() for p in lm.net.parameters())


# ------------------------------------------------------------------------------ 5. fuzzing the recipe loader

_keys = st.sampled_from(["name", "method", "data", "model", "train", "optim", "sample", "eval", "precond",
                         "steps", "lr", "trian", "batch_size", "s1", "sigmas", "dropout", "toy", "x"])
_leaf = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True),
                  st.text(max_size=8), st.lists(st.integers(-3, 300), max_size=4))
_tree = st.recursive(_leaf, lambda children: st.dictionaries(_keys, children, max_size=5), max_leaves=20)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base=st.sampled_from(["ict_digits", "ict_toy2d"]), patch=st.dictionaries(_keys, _tree, max_size=4))
def test_fuzzed_recipes_load_or_fail_with_a_user_error(base, patch):
    tree = read_yaml(resolve_recipe_path(base))
    for k, v in patch.items():
        tree[k] = v
    try:
        from_tree(tree)
    except UserError as exc:
        msg = str(exc)
        assert "\n" not in msg and len(msg) < 400


# ------------------------------------------------------------------------------ 6. two processes

def _launch(args, out, extra=()):
    env = subprocess_env()
    env.pop("OMP_NUM_THREADS")
    return launch_two_processes(["train", "ict_digits", *args, "--out", out, "--no-progress", *extra], env)


def test_two_processes_match_one_process_and_resume(tmp_path):
    over = [o for o in TINY if not o.startswith(("train.threads", "model.dropout"))] + [
        "train.steps=6", "train.checkpoint_every=3", "train.batch_size=8", "train.threads=1",
        "train.grad_accum=2"]  # accumulation exercises DDP's no_sync micro-steps
    _cmgen("train", "ict_digits", *over, "--out", tmp_path / "one", "--no-progress")
    proc = _launch(over, tmp_path / "two")
    assert "2 process(es)" in proc.stdout
    # tolerance: the same global batch and draws; only the gradient all-reduce order differs
    _same(_final(tmp_path / "one", 6), _final(tmp_path / "two", 6), atol=1e-5)
    rows_two = [json.loads(l) for l in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    rows_one = [json.loads(l) for l in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_two] == list(range(1, 7))  # written once, by the main process
    for a, b in zip(rows_one, rows_two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]
    # resume under two processes: stop after 3 steps, continue, same as the straight 2-process run
    _launch(over, tmp_path / "two_resumed", extra=["--stop-after", "3"])
    _launch(over, tmp_path / "two_resumed", extra=["--resume", "auto"])
    _same(_final(tmp_path / "two", 6), _final(tmp_path / "two_resumed", 6), atol=1e-6)
