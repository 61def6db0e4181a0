"""The training loop's evaluation: eval.jsonl rows, eval.png, returned numbers, resumed-run rows."""
import json

import pytest
import torch

from cmgen.errors import UserError
from cmgen.eval.inloop import evaluate_during_training


def _rows(run):
    return [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]


def test_training_with_eval_every_records_fd_digits(tmp_path):
    from cmgen.recipe import load_recipe
    from cmgen.train import train

    recipe = load_recipe("ict_digits", ["train.steps=4", "train.batch_size=8", "model.block_out_channels=[16,32]",
                                        "model.norm_num_groups=8", "model.attention_head_dim=8", "train.sample_n=4",
                                        "train.checkpoint_every=4", "eval.every=2", "eval.n=32", "eval.steps=[1,2]"])
    run = train(recipe, out_dir=tmp_path / "run", progress=False)
    rows = _rows(run)
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        assert r["metric"] == "FD-digits" and r["n"] == 32 and "held-out" in r["reference"]
        assert r["fd_1step"] > 0 and r["fd_2step"] > 0 and 0 <= r["precision_1step"] <= 1
    assert (run / "eval.png").read_bytes()[:4] == b"\x89PNG"
    state = json.loads(next((run / "checkpoints").glob("step-*/state.json")).read_text())
    assert state["last_eval"]["fd_1step"] == pytest.approx(rows[-1]["fd_1step"])


def _toy(tmp_path, extra=()):
    from cmgen.data import load_dataset
    from cmgen.generator import Generator
    from cmgen.recipe import load_recipe

    recipe = load_recipe("ict_toy2d", ["model.hidden=16", "model.depth=1", "eval.n=200", "eval.steps=[1]", *extra])
    data, holdout = load_dataset(recipe.data, 0)
    torch.manual_seed(0)
    model = Generator.build(recipe, data.shape, data.num_classes, data.kind).eval()
    return model, recipe, data, holdout


def test_points_use_swd_and_rows_after_a_resume_point_are_replaced(tmp_path):
    model, recipe, data, holdout = _toy(tmp_path)
    first = evaluate_during_training(model, recipe, data, holdout, 10, tmp_path)
    assert set(first) >= {"swd_1step", "mmd2_1step", "fd_1step"} and first["swd_1step"] > 0
    evaluate_during_training(model, recipe, data, holdout, 20, tmp_path)
    evaluate_during_training(model, recipe, data, holdout, 30, tmp_path)
    # a run that crashed after step 30 and resumed from its step-20 checkpoint evaluates step 30 again
    again = evaluate_during_training(model, recipe, data, holdout, 20, tmp_path)
    assert [r["step"] for r in _rows(tmp_path)] == [10, 20]
    assert again == first  # same model, same seeds, same fresh reference: the same numbers
    assert _rows(tmp_path)[0]["reference"] == "ring"  # the named true distribution, drawn fresh
    assert (tmp_path / "eval.png").is_file()


def test_bad_eval_features_is_a_user_error_before_training(tmp_path):
    from cmgen.recipe import load_recipe

    with pytest.raises(UserError, match="eval.features"):  # at load time, not after eval.every steps
        load_recipe("ict_toy2d", ["eval.every=10", "eval.features=fid"])
