"""Real scale: trackers, the uint8 image cache and DataLoader workers, device-keyed draws, distributed evaluation."""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cmgen.errors import UserError
from cmgen.recipe import load_recipe
from cmgen.train import train
from conftest import launch_two_processes, random_image_folder, subprocess_env

BIN = Path(sys.executable).parent
TINY = ["model.block_out_channels=[16,32]", "model.norm_num_groups=8", "model.attention_head_dim=8",
        "train.batch_size=8", "train.sample_n=4", "train.log_every=1", "train.sample_every=0", "train.threads=1"]


def _tensors(run, step, names=("model", "ema", "optimizer")):
    d = Path(run) / "checkpoints" / f"step-{step:08d}"
    return {n: load_file(str(d / f"{n}.safetensors")) for n in names}


def _assert_equal(a, b):
    for part in a:
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}:{k} differs"


# ------------------------------------------------------------------------------ trackers

def _tensorboard_rows(logdir: Path) -> dict:
    """{step: {tag: value}} as TensorBoard shows it: a SessionLog START at step s (SummaryWriter's
    purge_step) drops every earlier event at step >= s; a step/tag seen twice is an error."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.compat.proto.event_pb2 import SessionLog

    files = sorted(logdir.glob("events.out.tfevents.*"), key=lambda p: (float(p.name.split(".")[3]), p.name))
    assert files, f"no event files in {logdir}"
    seen: dict = {}
    for f in files:
        for ev in EventFileLoader(str(f)).Load():
            if ev.HasField("session_log") and ev.session_log.status == SessionLog.START:
                seen = {k: v for k, v in seen.items() if k[0] < ev.step}
            for v in ev.summary.value:
                key = (ev.step, v.tag)
                assert key not in seen, f"step {ev.step} tag {v.tag} logged twice"
                seen[key] = v.simple_value if v.HasField("simple_value") else float(v.tensor.float_val[0])
    rows: dict = {}
    for (step, tag), value in seen.items():
        rows.setdefault(step, {})[tag] = value
    return rows


def test_tensorboard_gets_the_metrics_rows_once_each_across_a_crash_and_a_resume(tmp_path):
    over = TINY + ["train.steps=8", "train.checkpoint_every=4", "method.s1=20"]
    run = tmp_path / "run"
    # the first attempt logs steps 5, 6 after its last checkpoint (4), as a crashed run would
    train(load_recipe("ict_digits", over + ["train.log_with=tensorboard"]), run, progress=False, stop_after=6)
    # resumed without a tracker, then with one again: log_with may change on resume
    train(load_recipe("ict_digits", over), run, resume="auto", progress=False, stop_after=1)
    train(load_recipe("ict_digits", over + ["train.log_with=tensorboard"]), run, resume="auto", progress=False)
    metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics] == list(range(1, 9))
    tb = _tensorboard_rows(run / "tensorboard")
    # each step once: the first attempt's 5 and 6 (after its last checkpoint) are purged by the last
    # resume, which starts again at the checkpoint of step 4
    assert sorted(tb) == list(range(1, 9))
    for row in metrics:
        expect = {k: v for k, v in row.items() if k != "step"}
        assert tb[row["step"]] == pytest.approx(expect, rel=1e-6), row["step"]
    hparams = max((run / "tensorboard").glob("*/hparams.yml"), key=lambda p: float(p.parent.name)).read_text()
    assert "train.log_with: tensorboard" in hparams and "method.s1: 20" in hparams


def test_eval_rows_reach_the_tracker(tmp_path):
    over = TINY + ["train.steps=2", "train.checkpoint_every=2", "eval.every=2", "eval.n=16", "eval.steps=[1]",
                   "train.log_with=tensorboard"]
    run = train(load_recipe("ict_digits", over), tmp_path / "run", progress=False)
    row = json.loads((run / "eval.jsonl").read_text().splitlines()[-1])
    tb = _tensorboard_rows(run / "tensorboard")[2]
    numbers = {k: v for k, v in row.items() if k.endswith("step") and k != "step"}
    assert numbers and {f"eval/{k}": v for k, v in numbers.items()} == pytest.approx(
        {k: v for k, v in tb.items() if k.startswith("eval/")}, rel=1e-6)


def test_log_with_errors_are_one_line_and_name_the_fix(tmp_path, monkeypatch):
    import importlib.util

    from cmgen import trackers

    with pytest.raises(UserError, match="train.log_with.*none, tensorboard, wandb"):
        train(load_recipe("ict_digits", TINY + ["train.log_with=mlflow"]), tmp_path / "a", progress=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError) as e:
        trackers.tracker_name("wandb")
    assert "pip install 'cmgen[wandb]'" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "a" / "metrics.jsonl").exists()


def test_wandb_runs_offline_without_credentials_and_keeps_its_run_id(tmp_path):
    from cmgen.trackers import wandb_settings

    netrc = tmp_path / "netrc"
    first = wandb_settings(tmp_path, "x", env={"NETRC": str(netrc)})
    assert first["mode"] == "offline" and first["resume"] == "allow"
    assert wandb_settings(tmp_path, "x", env={"NETRC": str(netrc)})["id"] == first["id"]  # a resume continues it
    assert wandb_settings(tmp_path, "x", env={"NETRC": str(netrc), "WANDB_API_KEY": "k"})["mode"] == "online"
    assert wandb_settings(tmp_path, "x", env={"WANDB_MODE": "disabled", "WANDB_API_KEY": "k"})["mode"] == "disabled"


# ------------------------------------------------------------------------------ image cache

def test_cache_is_built_once_mapped_and_equal_to_decoding(tmp_path, monkeypatch):
    import cmgen.data as data

    src = random_image_folder(tmp_path / "imgs")
    plain = data.image_folder(str(src), 8)
    calls = []
    real = data._decode
    monkeypatch.setattr(data, "_decode", lambda p, r: calls.append(p) or real(p, r))
    first = data.image_folder(str(src), 8, cache=str(tmp_path / "cache"), workers=2)
    assert len(calls) == 12 + 1  # every file once, plus the size probe
    again = data.image_folder(str(src), 8, cache=str(tmp_path / "cache"))
    assert len(calls) == 12 + 2  # the probe only: read from the cache
    assert isinstance(again.images, np.memmap)
    assert torch.equal(first.x, plain.x) and torch.equal(again.x, plain.x)
    assert torch.equal(again.labels, plain.labels)
    assert len(pickle.dumps(again)) < 2000  # DataLoader workers reopen the map, never copy it


def test_a_changed_source_is_refused_in_one_sentence(tmp_path):
    from cmgen.data import image_folder

    src = random_image_folder(tmp_path / "imgs")
    image_folder(str(src), 8, cache=str(tmp_path / "cache"))
    victim = src / "a" / "001.png"
    Image.fromarray(np.zeros((12, 10, 3), np.uint8)).save(victim)
    os.utime(victim, ns=(1, 1))
    with pytest.raises(UserError) as e:
        image_folder(str(src), 8, cache=str(tmp_path / "cache"))
    msg = str(e.value)
    assert "changed" in msg and str(tmp_path / "cache") in msg and "delete" in msg and "\n" not in msg
    (src / "b" / "new.png").write_bytes(victim.read_bytes())  # an added file too
    with pytest.raises(UserError, match="changed"):
        image_folder(str(src), 8, cache=str(tmp_path / "cache"))


def test_a_crash_while_building_leaves_no_cache_behind(tmp_path, monkeypatch):
    import cmgen.data as data

    src = random_image_folder(tmp_path / "imgs")
    real = data._decode

    def dies(p, r):
        if p.name == "007.png":
            raise KeyboardInterrupt
        return real(p, r)

    monkeypatch.setattr(data, "_decode", dies)
    with pytest.raises(KeyboardInterrupt):
        data.image_folder(str(src), 8, cache=str(tmp_path / "cache"))
    assert list((tmp_path / "cache").iterdir()) == []  # no half-written cache, no temporary folder
    monkeypatch.setattr(data, "_decode", real)
    assert torch.equal(data.image_folder(str(src), 8, cache=str(tmp_path / "cache")).x,
                       data.image_folder(str(src), 8).x)


def test_workers_and_resume_train_on_exactly_the_batches_of_a_straight_run(tmp_path):
    src = random_image_folder(tmp_path / "imgs", n=20)
    over = TINY + [f"data.path={src}", "data.name=folder", "data.resolution=8", "data.holdout=4", "train.steps=6",
                   "train.checkpoint_every=3", "method.s1=20", "train.grad_accum=2", "data.hflip=true",
                   f"data.cache={tmp_path / 'cache'}", "model.class_conditional=true"]
    plain = train(load_recipe("ict_digits", over), tmp_path / "plain", progress=False)
    workers = load_recipe("ict_digits", over + ["data.num_workers=2"])
    split = train(workers, tmp_path / "workers", progress=False, stop_after=3)
    train(workers, split, resume="auto", progress=False)
    _assert_equal(_tensors(plain, 6), _tensors(split, 6))


# ------------------------------------------------------------------------------ keyed draws

def _devices():
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    return out


@pytest.mark.parametrize("device", _devices())
def test_keyed_draws_are_the_same_for_any_process_count_and_on_resume(device):
    from cmgen.rng import BatchRNG

    probs = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)

    def draws(step, world, accum=2, batch=16):
        micro = batch // (world * accum)
        parts = []
        for m in range(accum):
            for rank in range(world):
                r = BatchRNG(7, step, batch, (m * world + rank) * micro, micro, device)
                parts.append([r.randn(3), r.rand(), r.randint(0, 100), r.multinomial(probs)])
        return [torch.cat([p[i] for p in parts]).cpu() for i in range(4)]

    one = draws(5, 1)
    for world in (2, 4):
        for a, b in zip(one, draws(5, world)):
            assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(one, draws(5, 1)))  # a resumed step redraws the same
    assert not torch.equal(one[0], draws(6, 1)[0])                   # the next step does not
    if device != "cpu":
        assert draws(5, 1)[0].device.type == "cpu"


def test_cpu_draws_are_those_of_a_cpu_generator_keyed_by_seed_step_and_draw():
    """On the CPU the device generator is torch's CPU generator: earlier runs' draws are unchanged."""
    from cmgen.rng import BatchRNG, key_seed

    r = BatchRNG(3, 9, 8, 2, 4, "cpu")
    a, b = r.randn(2), r.rand()
    want_a = torch.randn(8, 2, generator=torch.Generator().manual_seed(key_seed(3, 9, "draw", 1)))[2:6]
    want_b = torch.rand(8, generator=torch.Generator().manual_seed(key_seed(3, 9, "draw", 2)))[2:6]
    assert torch.equal(a, want_a) and torch.equal(b, want_b)


# ------------------------------------------------------------------------------ distributed evaluation

def _launch(*args):
    return launch_two_processes(args)


@pytest.mark.slow
def test_two_process_eval_and_in_loop_eval_equal_one_process(tmp_path):
    over = TINY + ["train.steps=2", "train.checkpoint_every=2", "eval.every=2", "eval.n=40", "eval.steps=[1,2]"]
    _launch("train", "ict_digits", *over, "--out", tmp_path / "run", "--no-progress")
    run = tmp_path / "run"
    # in-loop: the row the two processes wrote equals one process evaluating the same EMA weights
    from cmgen.eval.inloop import evaluate_during_training
    from cmgen.recipe import from_tree, read_yaml
    from cmgen.runs import load_model
    from cmgen.data import training_data

    recipe = from_tree(read_yaml(run / "recipe.yaml"))
    data, holdout = training_data(recipe)
    gen = load_model(run, ema=True)
    (tmp_path / "single").mkdir()
    numbers = evaluate_during_training(gen, recipe, data, holdout, 2, tmp_path / "single")
    row = json.loads((run / "eval.jsonl").read_text().splitlines()[-1])
    assert numbers and {k: row[k] for k in numbers} == numbers
    # cmgen eval fid: 40 samples in batches of 16 (3 batches over 2 processes), exactly one process's table
    fast = ["--n", "40", "--steps", "1,2", "--batch-size", "16", "--threads", "1", "--no-progress"]
    _launch("eval", "fid", run, *fast, "--out", tmp_path / "two")
    subprocess.run([str(BIN / "cmgen"), "eval", "fid", str(run), *fast, "--out", str(tmp_path / "one")],
                   env=subprocess_env(), check=True, capture_output=True)
    one, two = (json.loads(next((tmp_path / d).glob("fid_*.json")).read_text()) for d in ("one", "two"))
    assert one["rows"] == two["rows"]
