"""`cmgen eval fid | sweep | ref-stats | reward` end to end on tiny runs (digits and 2-D points)."""
import json

import numpy as np
import pytest

from cmgen.cli import main as cli

FAST = ["--threads", "1", "--no-progress", "--device", "cpu", "--batch-size", "32"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    from cmgen.recipe import load_recipe
    from cmgen.train import train

    recipe = load_recipe("ict_digits", ["train.steps=4", "train.batch_size=8", "model.block_out_channels=[16,32]",
                                        "model.norm_num_groups=8", "model.attention_head_dim=8", "train.sample_n=4",
                                        "train.checkpoint_every=4"])
    return train(recipe, out_dir=tmp_path_factory.mktemp("eval-cli") / "digits", progress=False)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    from cmgen.recipe import load_recipe
    from cmgen.train import train

    recipe = load_recipe("ict_toy2d", ["train.steps=4", "train.batch_size=16", "model.hidden=16", "model.depth=1",
                                       "train.sample_n=16", "train.checkpoint_every=4"])
    return train(recipe, out_dir=tmp_path_factory.mktemp("eval-cli") / "toy", progress=False)


def _json(out_dir, prefix):
    files = sorted(out_dir.glob(f"{prefix}*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def test_fid_of_a_run_writes_table_json_and_markdown(digits_run, tmp_path, capsys):
    out = tmp_path / "o"
    assert cli(["eval", "fid", str(digits_run), "--n", "64", "--steps", "1,2", "--out", str(out)] + FAST) == 0
    printed = capsys.readouterr().out
    table = _json(out, "fid_")
    assert table["metric"] == "FD-digits" and "FID" not in printed.split("\n")[0]
    assert [r["steps"] for r in table["rows"]] == [1, 2] and [r["nfe"] for r in table["rows"]] == [1, 2]
    for r in table["rows"]:
        assert r["fd"] > 0 and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 and r["kid"] is not None
    p = table["protocol"]
    assert p["n"] == 64 and p["reference"]["name"] == "digits" and p["features"].startswith("digits-cnn")
    md = next(out.glob("fid_*.md")).read_text()
    assert "| steps | NFE | FD-digits | precision | recall |" in md and "reference: digits" in md


def test_holdout_reference_adds_the_real_data_floor(digits_run, tmp_path, capsys):
    out = tmp_path / "o"
    assert cli(["eval", "fid", str(digits_run), "--n", "200", "--steps", "1", "--ref", "holdout",
                "--out", str(out)] + FAST) == 0
    table = _json(out, "fid_")
    model_row, real_row = table["rows"]
    assert real_row["steps"] == "real" and real_row["nfe"] == 0
    assert table["protocol"]["reference"]["n"] == 297  # ict_digits keeps 297 digits out of training
    assert real_row["fd"] < 0.2 * model_row["fd"]  # real train vs held-out real is far closer than a 4-step model
    assert "real" in capsys.readouterr().out
    # the floor is the run's training split (n of it, drawn as --n draws) scored against the held-out split, not
    # held-out vs itself
    from cmgen.eval.cli import run_splits
    from cmgen.eval.features import build_feature_net
    from cmgen.eval.frechet import fd_between
    from cmgen.eval.refstats import accumulate
    from cmgen.eval.sources import dataset_source, subset
    from cmgen.runs import load_model

    splits = run_splits(load_model(digits_run).recipe)
    net = build_feature_net("digits", (1, 8, 8))
    train, held = (accumulate(dataset_source(x, name, "image", 64), net) for x, name in
                   ((subset(splits["train"].x, 200), "train"), (splits["holdout"].x, "holdout")))
    assert real_row["fd"] == pytest.approx(fd_between(train, held), rel=1e-6)


def test_train_reference_of_a_run_without_a_holdout(tmp_path, capsys):
    """--ref train needs no held-out split (only --ref holdout does, and says so in one line)."""
    from cmgen.recipe import load_recipe
    from cmgen.train import train

    run = train(load_recipe("ict_digits", ["train.steps=2", "train.batch_size=8", "model.block_out_channels=[16,32]",
                                           "model.norm_num_groups=8", "model.attention_head_dim=8", "data.holdout=0",
                                           "train.sample_n=4", "train.checkpoint_every=2"]),
                out_dir=tmp_path / "run", progress=False)
    out = tmp_path / "o"
    assert cli(["eval", "fid", str(run), "--n", "32", "--steps", "1", "--ref", "train", "--out", str(out)] + FAST) == 0
    table = _json(out, "fid_")
    assert table["protocol"]["reference"]["n"] == 1797 and [r["steps"] for r in table["rows"]] == [1]
    capsys.readouterr()
    assert cli(["eval", "fid", str(run), "--n", "32", "--steps", "1", "--ref", "holdout"] + FAST) == 2
    assert "data.holdout > 0" in capsys.readouterr().err


def test_npz_from_cmgen_sample_gives_the_runs_number(digits_run, tmp_path):
    """The same seeds through `cmgen sample` then eval of the .npz equal eval of the run: one pipeline."""
    npz = tmp_path / "s.npz"
    assert cli(["sample", str(digits_run), "--steps", "1", "--n", "48", "--out", str(npz), "--no-progress",
                "--threads", "1", "--device", "cpu"]) == 0
    assert cli(["eval", "fid", str(npz), "--ref", "digits", "--out", str(tmp_path / "a")] + FAST) == 0
    assert cli(["eval", "fid", str(digits_run), "--steps", "1", "--n", "48", "--out", str(tmp_path / "b")] + FAST) == 0
    a, b = _json(tmp_path / "a", "fid_")["rows"][0], _json(tmp_path / "b", "fid_")["rows"][0]
    assert a["steps"] is None and a["n"] == 48
    assert a["fd"] == pytest.approx(b["fd"], rel=1e-9)
    assert (a["precision"], a["recall"]) == (b["precision"], b["recall"])


def test_ref_stats_file_gives_the_same_fd_as_the_named_reference(digits_run, tmp_path, capsys):
    stats = tmp_path / "digits.npz"
    assert cli(["eval", "ref-stats", "digits", "--out", str(stats)] + FAST) == 0
    assert "n=1797" in capsys.readouterr().out
    with np.load(stats, allow_pickle=False) as z:
        assert z["mu"].shape == (64,) and int(z["n"]) == 1797
    for name, ref in (("named", "digits"), ("file", str(stats))):
        assert cli(["eval", "fid", str(digits_run), "--steps", "1", "--n", "32", "--ref", ref,
                    "--out", str(tmp_path / name)] + FAST) == 0
    named, from_file = _json(tmp_path / "named", "fid_"), _json(tmp_path / "file", "fid_")
    assert named["rows"][0]["fd"] == pytest.approx(from_file["rows"][0]["fd"], rel=1e-9)


def test_folder_of_images_can_be_evaluated(digits_run, tmp_path):
    from PIL import Image

    from cmgen.data import load_digits
    from cmgen.plots import to_uint8

    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, im in enumerate(to_uint8(load_digits().x[:40])):
        Image.fromarray(im[..., 0]).save(folder / f"{i:03d}.png")
    assert cli(["eval", "fid", str(folder), "--ref", "digits", "--out", str(tmp_path / "o")] + FAST) == 0
    row = _json(tmp_path / "o", "fid_")["rows"][0]
    assert row["n"] == 40 and row["precision"] > 0.8  # real digits lie on the real manifold


def test_sweep_writes_a_plot(digits_run, tmp_path):
    out = tmp_path / "sweep"
    assert cli(["eval", "sweep", str(digits_run), "--n", "32", "--steps", "1,2,4", "--out", str(out)] + FAST) == 0
    table = _json(out, "sweep_")
    assert [r["nfe"] for r in table["rows"]] == [1, 2, 4]
    png = next(out.glob("sweep_*.png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweeps_with_other_samplers_or_guidance_get_their_own_files(tmp_path, capsys):
    from cmgen.recipe import load_recipe
    from cmgen.train import train

    run = train(load_recipe("fm_digits", ["train.steps=2", "train.batch_size=8", "model.block_out_channels=[16,32]",
                                          "model.norm_num_groups=8", "model.attention_head_dim=8",
                                          "train.sample_n=4", "train.checkpoint_every=2"]),
                out_dir=tmp_path / "fm", progress=False)
    out = tmp_path / "sweeps"
    for extra in ([], ["--sampler", "sde"], ["--cfg", "2"]):
        assert cli(["eval", "sweep", str(run), "--n", "32", "--steps", "1,2", "--ref", "holdout", "--out", str(out)]
                   + extra + FAST) == 0
    names = sorted(p.name for p in out.glob("sweep_*.json"))
    assert names == ["sweep_FD-digits_cfg2_step2.json", "sweep_FD-digits_sde_step2.json", "sweep_FD-digits_step2.json"]
    sde = json.loads((out / "sweep_FD-digits_sde_step2.json").read_text())
    assert sde["protocol"]["sampler"] == "sde" and [r["nfe"] for r in sde["rows"]] == [1, 2, 0]  # + the real row
    # guidance reaches the sampler: two network evaluations a step, and other samples than without it
    plain, cfg = (json.loads((out / f"sweep_FD-digits{tag}_step2.json").read_text())["rows"] for tag in ("", "_cfg2"))
    assert [r["nfe"] for r in cfg] == [2, 4, 0]
    assert all(abs(a["fd"] - b["fd"]) > 1e-6 for a, b in zip(plain[:2], cfg[:2]))
    assert plain[2]["fd"] == pytest.approx(cfg[2]["fd"])  # the real row does not sample
    assert "sampler sde" in capsys.readouterr().out


def test_points_run_reports_swd_and_mmd_against_fresh_true_samples(toy_run, tmp_path, capsys):
    out = tmp_path / "o"
    assert cli(["eval", "fid", str(toy_run), "--n", "300", "--steps", "1", "--out", str(out)] + FAST) == 0
    table = _json(out, "fid_")
    assert table["metric"] == "FD-points"
    row = table["rows"][0]
    assert row["swd"] > 0 and row["mmd2"] is not None and row["fd"] > 0
    assert "fresh samples" in table["protocol"]["reference"]["source"]
    assert "SWD" in capsys.readouterr().out


def test_reward_with_a_base_reports_interval_and_shift(digits_run, tmp_path):
    out = tmp_path / "r"
    assert cli(["eval", "reward", str(digits_run), "--reward", "jpeg-compressibility", "--n", "40", "--steps", "2",
                "--base", str(digits_run), "--no-ema", "--out", str(out)] + FAST) == 0
    report = json.loads((out / "reward-jpeg-compressibility.json").read_text())
    tuned, base = report["rows"]
    assert tuned["steps"] == base["steps"] == 2 and tuned["nfe"] == base["nfe"] == 2  # the base at the same steps
    assert tuned["ci95_low"] < tuned["mean"] < tuned["ci95_high"] and tuned["mean"] < 0  # -kB
    assert tuned["delta_vs_base"] == pytest.approx(0.0, abs=1e-12)  # the same model twice
    assert tuned["fd_to_base"] == pytest.approx(0.0, abs=1e-6) and tuned["fd_metric"] == "FD-digits"


@pytest.mark.parametrize("argv, needle", [
    (["eval", "reward", "RUN", "--reward", "prettiness"], "valid rewards"),
    (["eval", "fid", "RUN", "--features", "inception", "--n", "4"], "CMGEN_INCEPTION"),
    (["eval", "fid", "RUN", "--steps", "0"], "--steps"),
    (["eval", "fid", "RUN", "--ref", "imagenet"], "--ref"),
    (["eval", "fid", "NPZ"], "--ref is required"),
    (["eval", "fid", "RUN", "--n", "1"], "--n"),
    (["eval", "sweep", "NPZ"], "cmgen eval fid"),
    (["eval", "ref-stats", "NPZ", "--out", "x.txt"], "--out"),
])
def test_user_errors_exit_2_with_one_line(argv, needle, digits_run, tmp_path, capsys, monkeypatch):
    from cmgen.eval import features

    monkeypatch.delenv("CMGEN_INCEPTION", raising=False)
    monkeypatch.setattr(features, "cache_dir", lambda: tmp_path / "cache")  # no Inception file anywhere
    monkeypatch.setattr(features, "CLEANFID_DIR", tmp_path / "none")
    npz = tmp_path / "x.npz"
    np.savez(npz, images=np.zeros((2, 8, 8, 1), np.uint8))
    argv = [str(digits_run) if a == "RUN" else str(npz) if a == "NPZ" else a for a in argv]
    assert cli(argv + FAST) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_model_samples_stream_in_seeded_batches_with_a_progress_bar(digits_run, capsys):
    """Features are taken batch by batch (no batch larger than --batch-size), the same seeds give the same
    numbers whatever the batch size, and the bar is shown."""
    from cmgen.eval.features import build_feature_net
    from cmgen.eval.refstats import accumulate
    from cmgen.eval.sources import model_source
    from cmgen.runs import load_model

    lm = load_model(digits_run)
    net = build_feature_net("digits", lm.shape)
    seen = []
    embed = net.embed
    net.embed = lambda batch: seen.append(len(batch)) or embed(batch)

    def stats(batch_size, progress=False):
        src = model_source(lm, lm.times(2), 40, seed=5, batch_size=batch_size, progress=progress)
        return accumulate(src, net, keep=8)

    a = stats(16, progress=True)
    assert seen == [16, 16, 8] and a.n == 40 and len(a.kept) == 8
    assert "2-point multistep" in capsys.readouterr().err
    b = stats(40)
    np.testing.assert_allclose(a.mean, b.mean, rtol=1e-6)
    np.testing.assert_allclose(a.cov, b.cov, rtol=1e-5, atol=1e-8)
