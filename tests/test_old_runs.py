"""A run folder written before the method protocol (tests/data/pre_protocol_run, made at commit
dc2b850) still samples, evaluates, exports and resumes."""
import shutil
from pathlib import Path

import numpy as np
import pytest

from cmgen.cli import main

OLD = Path(__file__).parent / "data" / "pre_protocol_run"


@pytest.fixture
def old_run(tmp_path):
    run = tmp_path / "old"
    shutil.copytree(OLD, run)
    return run


def test_old_run_samples_evaluates_and_exports(old_run, tmp_path):
    out = tmp_path / "s.npz"
    assert main(["sample", str(old_run), "--steps", "2", "--n", "6", "--out", str(out), "--no-progress"]) == 0
    images = np.load(out)["images"]
    assert images.shape == (6, 8, 8, 1) and images.std() > 0
    assert main(["eval", "fid", str(old_run), "--n", "40", "--steps", "1", "--features", "digits", "--ref",
                 "holdout", "--keep", "20", "--kid-subsets", "2", "--kid-subset-size", "10", "--out",
                 str(tmp_path / "ev"), "--no-progress"]) == 0
    assert main(["export", str(old_run), "--to", str(tmp_path / "pipe")]) == 0
    assert (tmp_path / "pipe" / "model_index.json").is_file()


def test_old_run_resumes(old_run):
    assert main(["train", str(old_run / "recipe.yaml"), "train.steps=6", "--out", str(old_run), "--resume", "auto",
                 "--no-progress"]) == 0
    assert (old_run / "checkpoints" / "step-00000006" / "state.json").is_file()
