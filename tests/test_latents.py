"""Latent caches: posterior samples of a VAE, per-element statistics to std 0.5, the codec, resume
after an interruption, and refusal of a cache made with another VAE, seed or dataset."""
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_vae

from cmgen.cli import main as cli
from cmgen.errors import UserError

FAST = ["--threads", "1", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae") / "vae"
    tiny_vae().save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def cache(vae_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "digits"
    assert cli(["latents", "encode", "digits", "--vae", str(vae_dir), "--out", str(out)] + FAST) == 0
    return out


def test_cache_holds_posterior_samples_and_per_element_stats(cache, vae_dir):
    from cmgen.data import load_digits
    from cmgen.latents import LatentCodec, read_cache
    from cmgen.pretrained import load_vae

    c = read_cache(cache)
    ds = load_digits()
    assert c.latents.shape == (1797, 4, 4, 4) and torch.equal(c.labels, ds.labels) and c.num_classes == 10
    assert c.image_shape == (1, 8, 8)
    assert torch.allclose(c.mean, c.latents.mean(0)) and torch.allclose(c.std, c.latents.std(0))
    vae = load_vae(str(vae_dir))
    with torch.no_grad():
        post = vae.encode(ds.x).latent_dist
    resid = (c.latents - post.mean) / post.std          # samples, not means: standard normal residuals
    assert 0.95 < resid.std().item() < 1.05 and abs(resid.mean().item()) < 0.02
    codec = LatentCodec(vae, c.mean, c.std)
    assert codec.image_shape == (1, 8, 8)          # without a stored shape: latent side x 2^(levels - 1)
    x = codec.normalise(c.latents)
    assert torch.allclose(x.std(0), torch.full_like(c.std, 0.5), atol=1e-4)
    assert torch.allclose(x.mean(0), torch.zeros_like(c.mean), atol=1e-5)
    assert torch.allclose(c.model_latents(), x, atol=1e-6)   # what the loop trains on: per-element std 0.5
    with torch.no_grad():
        direct = vae.decode(c.latents[:5]).sample.clamp(-1, 1)
    assert torch.allclose(codec.decode(x[:5]), direct, atol=1e-5)


def test_an_interrupted_encode_resumes_to_the_same_cache(cache, vae_dir, tmp_path):
    from cmgen.data import load_digits
    from cmgen.latents import CHUNK, CacheSpec, encode_dataset, read_cache, tensor_fingerprint, vae_fingerprint
    from cmgen.pretrained import load_vae

    ds, vae = load_digits(), load_vae(str(vae_dir))
    spec = CacheSpec(str(vae_dir), vae_fingerprint(vae), "digits", tensor_fingerprint(ds.x), 8, False, 0)
    calls = {"n": 0}
    encode = vae.encode

    def dies_in_the_second_chunk(x):
        calls["n"] += 1
        if calls["n"] * 64 > CHUNK + 64:
            raise KeyboardInterrupt
        return encode(x)

    vae.encode = dies_in_the_second_chunk
    out = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):
        encode_dataset(ds.x, ds.labels, vae, out, spec=spec, progress=False)
    assert (out / "part-00000.safetensors").is_file() and not (out / "latents.safetensors").exists()
    vae.encode = encode
    encode_dataset(ds.x, ds.labels, vae, out, spec=spec, progress=False, num_classes=10)
    straight = encode_dataset(ds.x, ds.labels, vae, tmp_path / "straight", spec=spec, progress=False, num_classes=10)
    assert torch.equal(read_cache(out).latents, read_cache(straight).latents)  # same threads: bit for bit
    assert torch.allclose(read_cache(out).latents, read_cache(cache).latents, atol=1e-5)  # the CLI's cache
    assert not list(out.glob("part-*"))


def test_a_cache_made_otherwise_is_refused_in_one_sentence(cache, vae_dir, tmp_path, capsys):
    before = (cache / "latents.safetensors").read_bytes()
    other = tmp_path / "other_vae"
    tiny_vae(seed=1).save_pretrained(other, safe_serialization=True)
    for extra, needle in ((["--vae", str(other)], "another VAE"), (["--vae", str(vae_dir), "--seed", "3"],
                                                                    "another seed"),
                          (["--vae", str(vae_dir), "--hflip"], "another data.hflip"),
                          (["--vae", str(vae_dir), "--scaling", "sd"], "another --scaling")):
        assert cli(["latents", "encode", "digits", "--out", str(cache)] + extra + FAST) == 2
        err = capsys.readouterr().err
        assert needle in err and "pass a new --out" in err and err.count("\n") == 1
    assert (cache / "latents.safetensors").read_bytes() == before


def test_hflip_stores_the_flipped_images_latents_too(vae_dir, tmp_path):
    from cmgen.data import load_digits
    from cmgen.latents import CacheSpec, encode_dataset, posterior_sample, read_cache
    from cmgen.pretrained import load_vae

    ds, vae = load_digits(), load_vae(str(vae_dir))
    x = ds.x[:40]
    spec = CacheSpec("v", "h", "d", "dh", 8, True, 5)
    c = read_cache(encode_dataset(x, ds.labels[:40], vae, tmp_path / "f", spec=spec, progress=False))
    assert c.latents.shape[0] == 80 and torch.equal(c.labels[40:], ds.labels[:40])
    g = torch.Generator().manual_seed(5 * 1_000_003 + 1)  # chunk 0, flipped
    with torch.no_grad():
        assert torch.allclose(c.latents[40:], posterior_sample(vae, x.flip(3), g), atol=1e-6)


def test_a_folder_that_is_not_yet_or_no_longer_a_latent_cache_is_one_sentence(cache, vae_dir, tmp_path, capsys):
    from cmgen.data import latent_dataset
    from cmgen.errors import UserError

    with pytest.raises(UserError, match=r"is not a latent cache \(no cache.json\); make one with `cmgen latents encode`"):
        latent_dataset(str(tmp_path))
    (tmp_path / "cache.json").write_text((cache / "cache.json").read_text())   # an encode stopped before the end
    with pytest.raises(UserError, match="is incomplete; run the same `cmgen latents encode` again to finish it"):
        latent_dataset(str(tmp_path))
    (tmp_path / "cache.json").write_text("{half")
    assert cli(["latents", "encode", "digits", "--vae", str(vae_dir), "--out", str(tmp_path)] + FAST) == 2
    err = capsys.readouterr().err
    assert "has an unreadable cache.json; delete the folder or pass a new --out" in err and err.count("\n") == 1


def test_missing_or_wrong_vae_is_one_sentence(tmp_path, capsys, cache):
    assert cli(["latents", "encode", "digits", "--vae", "stabilityai/sd-vae-ft-ema", "--out", str(tmp_path / "a")]
               + FAST) == 2
    err = capsys.readouterr().err
    assert "not in the local Hugging Face cache" in err and "hf download stabilityai/sd-vae-ft-ema" in err
    assert cli(["latents", "encode", "digits", "--vae", str(cache), "--out", str(tmp_path / "b")] + FAST) == 2
    assert "is not a diffusers AutoencoderKL folder" in capsys.readouterr().err


@pytest.fixture(scope="module")
def latent_run(cache, tmp_path_factory):
    from cmgen.recipe import from_tree
    from cmgen.train import train

    tree = {"name": "lct_tiny", "method": {"name": "lct"},
            "data": {"name": "latents", "path": str(cache), "holdout": 297},
            "model": {"arch": "unet", "block_out_channels": [16, 32], "norm_num_groups": 8, "attention_head_dim": 8,
                      "norm": "nsln"},
            "train": {"steps": 3, "batch_size": 8, "sample_n": 4, "checkpoint_every": 3, "sample_every": 3},
            "sample": {"sigmas": [80.0, 0.529]}, "eval": {"steps": [1, 2], "every": 3, "n": 32}}
    return train(from_tree(tree), tmp_path_factory.mktemp("lct") / "run", progress=False)


def test_latent_ct_trains_on_a_cache_and_is_judged_on_decoded_images(latent_run, tmp_path, capsys):
    """lct on digits latents: the loop sees 4x4x4 latents; sample and eval see decoded 8x8 images, and
    `--ref holdout` adds the real-data and VAE-reconstruction floors."""
    import numpy as np

    from cmgen.runs import load_model

    run = latent_run
    gen = load_model(run)
    assert gen.shape == (4, 4, 4) and gen.image_shape == (1, 8, 8) and gen.kind == "latent" and not gen.clip
    assert (run / "samples_2step.png").is_file()
    inloop = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert inloop[-1]["step"] == 3 and inloop[-1]["metric"] == "FD-digits" and inloop[-1]["fd_2step"] > 0
    out = tmp_path / "s.npz"
    assert cli(["sample", str(run), "--steps", "2", "--n", "6", "--out", str(out)] + FAST) == 0
    samples = np.load(out)["samples"]
    assert samples.shape == (6, 1, 8, 8) and samples.min() >= -1 and samples.max() <= 1
    ev = tmp_path / "eval"
    assert cli(["eval", "fid", str(run), "--steps", "1", "--n", "64", "--ref", "holdout", "--out", str(ev),
                "--batch-size", "64"] + FAST) == 0
    table = json.loads(next(ev.glob("fid_*.json")).read_text())
    rows = {str(r["steps"]): r for r in table["rows"]}
    assert set(rows) == {"1", "real", "vae"}
    assert rows["real"]["fd"] < rows["1"]["fd"]   # an untrained latent model is far from the real digits


def test_a_latent_runs_splits_pair_each_training_image_with_its_own_latent(latent_run):
    """--ref holdout of a latent run: the images and the latents are split by the run's seed alike, so the
    VAE-reconstruction floor decodes the latents of exactly the training images, in their order."""
    from cmgen.eval.cli import latent_run_splits
    from cmgen.runs import load_model

    recipe = load_model(latent_run).recipe
    splits = latent_run_splits(recipe)
    train, held, vae = splits["train"], splits["holdout"], splits["vae"]
    assert len(held) == 297 and len(train) == len(vae) == 1797 - 297
    assert torch.equal(train.labels, vae.labels)  # a permutation of other images would mix the classes
    assert not torch.equal(train.labels, torch.sort(train.labels).values)  # the split shuffles


def test_vae_loss_is_mse_plus_weighted_closed_form_kl_per_pixel():
    from torch.distributions import Normal, kl_divergence

    from cmgen.vae_train import vae_loss

    vae = tiny_vae()
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    loss, terms = vae_loss(vae, x, torch.Generator().manual_seed(0), kl_weight=0.5)
    post = vae.encode(x).latent_dist
    kl = kl_divergence(Normal(post.mean, post.std), Normal(0.0, 1.0)).flatten(1).sum(1).mean() / 64
    assert terms["kl"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert loss.item() == pytest.approx(terms["mse"].item() + 0.5 * kl.item(), rel=1e-5)


def test_train_vae_cli_writes_a_loadable_diffusers_vae_that_learned(tmp_path, capsys):
    from cmgen.pretrained import load_vae

    out = tmp_path / "vae"
    assert cli(["latents", "train-vae", "digits", "--out", str(out), "--steps", "60", "--batch-size", "32",
                "--channels", "8,16", "--threads", "1", "--no-progress"]) == 0
    assert "VAE trained on digits" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["mse"] < 0.7 * rows[0]["mse"]
    assert (out / "recon.png").is_file() and (out / "loss.png").is_file()
    assert load_vae(str(out)).config.block_out_channels == [8, 16] or \
        tuple(load_vae(str(out)).config.block_out_channels) == (8, 16)
    assert cli(["latents", "train-vae", "digits", "--out", str(out), "--steps", "1"]) == 2  # not empty


def _sample_npz(target, steps, n, tmp_path):
    import numpy as np

    out = tmp_path / f"{Path(target).name}-{steps}.npz"
    assert cli(["sample", str(target), "--steps", str(steps), "--n", str(n), "--out", str(out)] + FAST) == 0
    return torch.from_numpy(np.load(out)["samples"])


@pytest.mark.parametrize("steps", [1, 2])
def test_latent_export_holds_vae_unet_scheduler_and_statistics_and_equals_cmgen_sample(latent_run, cache, steps,
                                                                                         tmp_path):
    """The exported pipeline decodes through its own VAE copy and the cache's mean/std maps: its images
    equal `cmgen sample` on the run, and the folder loads back as a generator that samples the same."""
    from cmgen.latents import read_cache
    from cmgen.pipelines import CMGenLatentPipeline

    folder = tmp_path / "pipe"
    assert cli(["export", str(latent_run), "--to", str(folder)]) == 0
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "CMGenLatentPipeline" and {"unet", "vae", "scheduler", "latent_stats"} <= set(index)
    pipe = CMGenLatentPipeline.from_pretrained(folder)
    stats = read_cache(cache)
    assert torch.equal(pipe.latent_stats.mean, stats.mean) and torch.equal(pipe.latent_stats.std, stats.std)
    assert not pipe.scheduler.config.clip_denoised          # latents are not clamped to [-1, 1]
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(j) for j in range(5)]
    theirs = pipe(batch_size=5, num_inference_steps=steps, generator=gens, output_type="pt").images
    ours = _sample_npz(latent_run, steps, 5, tmp_path) / 2 + 0.5
    assert theirs.shape == (5, 1, 8, 8) and ours.std() > 0.01
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert torch.allclose(_sample_npz(folder, steps, 5, tmp_path), ours * 2 - 1, atol=1e-6, rtol=0)


def _images(folder, names):
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 40, np.uint8)).save(folder / name)


def test_captioned_folder_reads_metadata_jsonl_then_txt_and_refuses_gaps_in_one_sentence(tmp_path, capsys):
    from cmgen.data import captioned_folder, is_captioned

    root = tmp_path / "cap"
    _images(root, ["a.png", "sub/b.png", "c.jpg"])
    (root / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "an apple"}\n\n'
                                         '{"file_name": "sub/b.png", "text": "a bee", "extra": 1}\n')
    assert is_captioned(root) and not is_captioned(tmp_path / "nothing")
    with pytest.raises(UserError, match="image 'c.jpg' .* has no caption; add the line") as err:
        captioned_folder(str(root), None)
    assert "\n" not in str(err.value) and "c.txt" in str(err.value)
    (root / "c.txt").write_text("a cat\n")
    ds = captioned_folder(str(root), None)
    assert ds.captions == ["an apple", "a cat", "a bee"] and torch.equal(ds.labels, torch.arange(3))
    assert ds.x.shape == (3, 3, 8, 8) and ds.num_classes == 3
    with (root / "metadata.jsonl").open("a") as f:
        f.write('{"file_name": "gone.png", "text": "lost"}\n')
    with pytest.raises(UserError, match="line 4 names 'gone.png', which is not a file"):
        captioned_folder(str(root), None)
    (root / "metadata.jsonl").write_text('{"file_name": "a.png"}\n')
    with pytest.raises(UserError, match="line 1 is not a JSON object with 'file_name' and 'text'"):
        captioned_folder(str(root), None)
    (tmp_path / "empty").mkdir()
    assert cli(["latents", "encode", str(tmp_path / "empty"), "--vae", "x", "--out", str(tmp_path / "o")] + FAST) == 2
    assert "holds no images" in capsys.readouterr().err


def test_sd_scaling_subtracts_the_shift_factor_and_the_codec_inverts_it(tmp_path):
    from cmgen.latents import CacheSpec, LatentCodec, encode_dataset, posterior_sample, read_cache
    from cmgen.pipelines import LatentStatistics

    vae = tiny_vae(scaling_factor=0.5, shift_factor=0.25)
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    spec = CacheSpec("v", "h", "d", "dh", 8, False, 2, scaling="sd")
    c = read_cache(encode_dataset(x, None, vae, tmp_path / "sd", spec=spec, progress=False))
    with torch.no_grad():
        z = posterior_sample(vae, x, torch.Generator().manual_seed(2 * 1_000_003))
    assert c.scaling == "sd" and torch.allclose(c.latents, (z - 0.25) * 0.5, atol=1e-6)
    assert torch.equal(c.model_latents(), c.latents)
    codec = LatentCodec.sd(vae, c.latents.shape[1:])
    with torch.no_grad():
        direct = vae.decode(z).sample.clamp(-1, 1)
    assert torch.allclose(codec.decode(c.latents), direct, atol=1e-5)
    exported = LatentStatistics.from_codec(codec).codec(vae)      # what an exported pipeline decodes with
    assert exported.scaling == "sd" and torch.allclose(exported.decode(c.latents), direct, atol=1e-5)
