"""The CLI: every bad input is one line on stderr and exit code 2; the happy paths write files."""
import shutil

import numpy as np
import pytest
import torch
import yaml

from cmgen.cli import main


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _bad_yaml(tmp):
    p = tmp / "bad.yaml"
    p.write_text("name: x\nmethod: {name: ict\ntrain:\n  steps: 3\n")
    return p


def _truncated_ckpt(tmp, run):
    dst = tmp / "trunc"
    shutil.copytree(run, dst)
    ckpt = sorted((dst / "checkpoints").iterdir())[-1]
    data = (ckpt / "ema.safetensors").read_bytes()
    (ckpt / "ema.safetensors").write_bytes(data[: len(data) // 2])
    return dst


def _a_file(tmp):
    (tmp / "a_file").write_text("not a folder")
    return tmp / "a_file"


def _bad_image_folder(tmp):
    (tmp / "imgs").mkdir()
    (tmp / "imgs" / "zz.png").write_text("not an image")
    return tmp / "imgs"


def _blank_state(tmp, run):
    dst = tmp / "blank"
    shutil.copytree(run, dst)
    (sorted((dst / "checkpoints").iterdir())[-1] / "state.json").write_text("{}")
    return dst


def _truncated_stats(tmp):
    import numpy as np

    np.savez(tmp / "st.npz", mu=np.zeros(64), sigma=np.eye(64))
    data = (tmp / "st.npz").read_bytes()
    (tmp / "st.npz").write_bytes(data[:300])
    return tmp / "st.npz"


def _foreign_ckpt(tmp, run):
    dst = tmp / "foreign"
    shutil.copytree(run, dst)
    ckpt = sorted((dst / "checkpoints").iterdir())[-1]
    (ckpt / "ema.safetensors").write_bytes(b"PK\x03\x04 this is a zip file, not safetensors" * 10)
    return dst


def _reshaped_ckpt(tmp, run):
    dst = tmp / "reshaped"
    shutil.copytree(run, dst)
    ckpt = sorted((dst / "checkpoints").iterdir())[-1]
    tree = yaml.safe_load((ckpt / "recipe.yaml").read_text())
    tree["model"]["block_out_channels"] = [24, 48]
    (ckpt / "recipe.yaml").write_text(yaml.safe_dump(tree))
    return dst


# (case id, argv builder(tmp, run) -> argv, words the one-line message must contain)
BAD_INPUTS = [
    ("unknown recipe key", lambda t, r: ["train", "ict_digits", "train.stpes=3", "--out", t / "o"],
     ["train.stpes", "did you mean 'train.steps'"]),
    ("mistyped recipe value", lambda t, r: ["train", "ict_digits", "train.steps=many", "--out", t / "o"],
     ["train.steps", "integer"]),
    ("malformed yaml", lambda t, r: ["train", _bad_yaml(t), "--out", t / "o"], ["not valid YAML", "line"]),
    ("missing recipe file", lambda t, r: ["train", t / "nope.yaml"], ["does not exist", "cmgen recipes"]),
    ("missing data folder", lambda t, r: ["train", "ict_digits", "data.name=folder", f"data.path={t / 'no_images'}",
                                          "--out", t / "o"], ["data.path", "does not exist"]),
    ("unknown method", lambda t, r: ["train", "ict_digits", "method.name=ictt", "--out", t / "o"],
     ["method.name", "did you mean 'ict'"]),
    ("batch not divisible by the accumulation", lambda t, r: ["train", "ict_digits", "train.batch_size=9",
                                                               "train.grad_accum=2", "--out", t / "o"],
     ["train.batch_size", "(9)", "divisible", "1 x 2"]),
    ("unknown checkpoint", lambda t, r: ["sample", t / "no_run", "--out", t / "s.png"], ["does not exist"]),
    ("folder without checkpoints", lambda t, r: ["sample", t, "--out", t / "s.png"], ["no complete cmgen checkpoint"]),
    ("truncated checkpoint", lambda t, r: ["sample", _truncated_ckpt(t, r), "--out", t / "s.png"],
     ["not a valid safetensors file", "truncated"]),
    ("foreign checkpoint", lambda t, r: ["sample", _foreign_ckpt(t, r), "--out", t / "s.png"],
     ["not a valid safetensors file"]),
    ("checkpoint shapes do not fit the recipe", lambda t, r: ["sample", _reshaped_ckpt(t, r), "--out", t / "s.png"],
     ["do not fit the recipe", "shape"]),
    ("resume with a different model", lambda t, r: ["train", "ict_digits", "model.block_out_channels=[24,48]",
                                                    "--resume", r, "--out", t / "o"],
     ["model.block_out_channels", "checkpoint"]),
    ("steps zero", lambda t, r: ["sample", r, "--steps", "0", "--out", t / "s.png"], ["--steps"]),
    ("bad sigmas", lambda t, r: ["sample", r, "--sigmas", "0.5,80", "--out", t / "s.png"], ["--sigmas", "decreasing"]),
    ("guidance without a null label", lambda t, r: ["sample", r, "--cfg", "2", "--out", t / "s.png"],
     ["--cfg 2 needs a class-conditional model trained with method.label_dropout > 0"]),
    ("steps and sigmas disagree", lambda t, r: ["sample", r, "--sigmas", "80,2,0.5", "--steps", "2", "--out",
                                                t / "s.png"], ["--steps 2 disagrees with --sigmas (3 values)"]),
    ("unwritable sample output", lambda t, r: ["sample", r, "--out", "/proc/cmgen/s.png"], ["cannot be written"]),
    ("unwritable run folder", lambda t, r: ["train", "ict_digits", "train.steps=1", "--out", "/proc/cmgen-run"],
     ["cannot be written", "--out"]),
    ("unknown reward", lambda t, r: ["eval", "reward", r, "--reward", "shiny", "--n", "2"],
     ["--reward 'shiny' is unknown", "jpeg-compressibility"]),
    ("unknown feature net", lambda t, r: ["eval", "fid", r, "--features", "vgg", "--n", "2"], ["--features", "vgg"]),
    ("missing inception weights", lambda t, r: ["eval", "fid", r, "--features", "inception", "--n", "2", "--ref",
                                                "digits", "--inception", t / "none.pt"],
     ["inception-2015-12-05.pt", "--inception"]),
    ("bad eval.features in a recipe", lambda t, r: ["train", "ict_digits", "eval.every=5", "eval.features=fid",
                                                    "--out", t / "o"], ["eval.features"]),
    ("existing run without --resume", lambda t, r: ["train", "ict_digits", "--out", r], ["--resume auto"]),
    ("not a device", lambda t, r: ["sample", r, "--device", "gpu0", "--out", t / "s.png"],
     ["--device 'gpu0' is not a device; use cpu, cuda or cuda:N"]),
    ("sample output suffix", lambda t, r: ["sample", r, "--out", t / "s.jpg"], ["--out must end in .png or .npz"]),
    ("gamma on a consistency model", lambda t, r: ["sample", r, "--gamma", "0.5", "--out", t / "s.png"],
     ["--gamma applies to CTM's gamma sampler; this is a cm model"]),
    ("class label on an unconditional model", lambda t, r: ["sample", r, "--class-label", "3", "--out", t / "s.png"],
     ["--class-label was given but the model is not class-conditional"]),
    ("eval steps not numbers", lambda t, r: ["eval", "sweep", r, "--steps", "1,x", "--n", "2"],
     ["--steps must be comma-separated step counts like 1,2, got '1,x'"]),
    ("eval batch size zero", lambda t, r: ["eval", "fid", r, "--batch-size", "0", "--n", "2"],
     ["--batch-size must be at least 1"]),
    ("eval negative keep", lambda t, r: ["eval", "fid", r, "--keep", "-1", "--n", "2"], ["--keep must be >= 0"]),
    ("eval source missing", lambda t, r: ["eval", "fid", t / "nothing", "--n", "2"],
     ["does not exist; pass a run, checkpoint or pipeline folder"]),
    ("sample count zero", lambda t, r: ["sample", r, "--n", "0", "--out", t / "s.png"],
     ["argument --n: must be at least 1, got 0", "cmgen sample --help"]),
    ("sample batch size zero", lambda t, r: ["sample", r, "--batch-size", "0", "--out", t / "s.png"],
     ["argument --batch-size: must be at least 1, got 0"]),
    ("threads negative", lambda t, r: ["eval", "fid", r, "--threads", "-1"], ["argument --threads: must be at least 0"]),
    ("vae latent channels zero", lambda t, r: ["latents", "train-vae", "digits", "--out", t / "v", "--latent-channels",
                                               "0"], ["argument --latent-channels: must be at least 1, got 0"]),
    ("an unknown choice", lambda t, r: ["eval", "fid", r, "--mode", "foo"], ["argument --mode: invalid choice: 'foo'"]),
    ("sample output onto an unwritable path", lambda t, r: ["sample", r, "--out", "/proc/cmgen-s.png", "--n", "2"],
     ["cannot read or write '/proc/cmgen-s.png'"]),
    ("eval output onto a file", lambda t, r: ["eval", "fid", r, "--n", "8", "--steps", "1", "--out", _a_file(t)],
     ["cannot read or write", "a_file", "File exists"]),
    ("an unreadable image in a folder", lambda t, r: ["eval", "fid", _bad_image_folder(t), "--ref", "digits"],
     ["image file", "zz.png", "cannot be read", "remove or replace it"]),
    ("a state.json of the wrong shape", lambda t, r: ["sample", _blank_state(t, r), "--out", t / "s.png"],
     ["corrupt state.json", "older checkpoint"]),
    ("a truncated statistics file", lambda t, r: ["eval", "fid", r, "--n", "8", "--steps", "1", "--ref",
                                                  _truncated_stats(t)], ["st.npz' is not a readable .npz", "ref-stats"]),
    ("sigmas not numbers", lambda t, r: ["sample", r, "--sigmas", "80,x", "--out", t / "s.png"],
     ["--sigmas must be comma-separated numbers like 80,0.821, got '80,x'"]),
    ("vae channels not numbers", lambda t, r: ["latents", "train-vae", "digits", "--out", t / "v", "--channels", "32,x"],
     ["--channels must be comma-separated integers like 32,64, got '32,x'"]),
    ("vae steps zero", lambda t, r: ["latents", "train-vae", "digits", "--out", t / "v", "--steps", "0"],
     ["--steps and --batch-size must be at least 1"]),
    ("latents of a missing folder", lambda t, r: ["latents", "encode", t / "nowhere", "--vae", t / "vae", "--out",
                                                  t / "c"],
     ["is not digits, cifar10 or an existing folder of images; fix the path"]),
]


@pytest.mark.parametrize("case,argv,words", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, tiny_run, capsys, case, argv, words):
    code, out, err = run_cli(capsys, *argv(tmp_path, tiny_run))
    assert code == 2, (case, out, err)
    lines = [l for l in err.splitlines() if l.strip() and not l.lstrip().startswith(("warnings.warn", "UserWarning"))]
    msg = [l for l in lines if l.startswith("cmgen: error:")]
    assert len(msg) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in msg[0], (w, msg[0])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_device_cuda_without_a_cuda_device_is_one_sentence(tmp_path, tiny_run, capsys):
    code, _, err = run_cli(capsys, "sample", tiny_run, "--device", "cuda", "--out", tmp_path / "s.png")
    assert code == 2 and "--device cuda was asked for but no CUDA device is available; use --device cpu" in err
    assert not (tmp_path / "s.png").exists()


def test_debug_flag_shows_the_traceback(tmp_path, capsys):
    from cmgen.errors import UserError

    with pytest.raises(UserError):
        main(["--debug", "train", "ict_digits", "train.stpes=3", "--out", str(tmp_path / "o")])


def test_sample_writes_png_and_npz(tmp_path, tiny_run, capsys):
    code, out, _ = run_cli(capsys, "sample", tiny_run, "--steps", "2", "--n", "5", "--seed", "3",
                           "--out", tmp_path / "s", "--no-progress")
    assert code == 0
    data = np.load(tmp_path / "s.npz", allow_pickle=False)
    assert data["images"].shape == (5, 8, 8, 1) and data["images"].dtype == np.uint8
    assert data["samples"].shape == (5, 1, 8, 8) and data["samples"].dtype == np.float32
    assert np.allclose(data["sigmas"], [80.0, 0.821])
    assert (tmp_path / "s.png").stat().st_size > 0
    # EMA by default; --no-ema gives the raw weights (different after training)
    run_cli(capsys, "sample", tiny_run, "--steps", "1", "--n", "3", "--out", tmp_path / "ema.npz", "--no-progress")
    run_cli(capsys, "sample", tiny_run, "--steps", "1", "--n", "3", "--out", tmp_path / "raw.npz", "--no-ema",
            "--no-progress")
    assert not np.allclose(np.load(tmp_path / "ema.npz")["samples"], np.load(tmp_path / "raw.npz")["samples"])


def test_sample_with_explicit_sigmas(tmp_path, tiny_run, capsys):
    code, out, _ = run_cli(capsys, "sample", tiny_run, "--sigmas", "80,2.0,0.5", "--n", "2",
                           "--out", tmp_path / "s.npz", "--no-progress")
    assert code == 0 and "3 step(s)" in out
    assert np.allclose(np.load(tmp_path / "s.npz")["sigmas"], [80, 2.0, 0.5])


def test_recipes_lists_every_shipped_recipe(capsys):
    code, out, _ = run_cli(capsys, "recipes")
    assert code == 0
    names = [l.split()[0] for l in out.splitlines()]
    for r in ("ict_digits", "ict_toy2d", "ict_cifar10", "ict_imagenet64"):
        assert r in names
    assert all(len(l.split()) > 3 for l in out.splitlines())  # each has a description


def test_dry_run_prints_the_resolved_recipe_with_overrides(capsys):
    code, out, _ = run_cli(capsys, "train", "ict_digits", "train.steps=2000", "optim.lr=2e-4", "--dry-run")
    assert code == 0
    tree = yaml.safe_load(out)
    assert tree["train"]["steps"] == 2000 and tree["optim"]["lr"] == 2e-4 and tree["method"]["name"] == "ict"


def test_sampler_help_lists_every_sampler_with_its_default_first():
    from cmgen.cli import SAMPLER_HELP
    from cmgen.sampling import DEFAULT_SAMPLER, SAMPLERS

    listed = dict(part.split(": ") for part in SAMPLER_HELP.split(" (")[0].split("; "))
    assert set(listed) == set(SAMPLERS)
    for kind, names in listed.items():
        names = names.split(", ")
        assert sorted(names) == sorted(SAMPLERS[kind]) and names[0] == DEFAULT_SAMPLER[kind], kind
