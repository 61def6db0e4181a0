"""Feature nets: Inception through clean-fid from a local file (tested with a TorchScript stand-in),
the cached digits network, CLIP's loading path, and --features auto."""
import sys
import types
import warnings

import numpy as np
import pytest
import torch

from cmgen.errors import UserError
from cmgen.eval import features as F
from cmgen.eval.standin import save_standin_inception


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    return save_standin_inception(tmp_path_factory.mktemp("inception"))


@pytest.fixture(scope="module")
def two_folders(tmp_path_factory):
    """Two folders of 12 RGB 24x24 PNGs with different content."""
    from PIL import Image

    g = np.random.default_rng(0)
    dirs = []
    for k in range(2):
        d = tmp_path_factory.mktemp(f"imgs{k}")
        base = np.linspace(0, 255, 24)[None, :, None] * (1 if k == 0 else 0.5)
        for i in range(12):
            im = np.clip(base + g.normal(0, 20 + 30 * k, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(im).save(d / f"{i:03d}.png")
        dirs.append(d)
    return dirs


def test_missing_inception_names_file_url_and_both_ways_to_point_at_it(monkeypatch, tmp_path):
    monkeypatch.delenv("CMGEN_INCEPTION", raising=False)
    monkeypatch.setenv("CMGEN_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(F, "CLEANFID_DIR", tmp_path / "no-cleanfid")
    with pytest.raises(UserError) as err:
        F.build_feature_net("inception", (3, 32, 32))
    msg = str(err.value)
    for needed in ("inception-2015-12-05.pt", F.INCEPTION_URL, "--inception", "CMGEN_INCEPTION",
                   str(tmp_path / "empty-cache")):
        assert needed in msg
    assert "\n" not in msg


def test_missing_file_given_explicitly_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="--inception"):
        F.build_feature_net("inception", (3, 32, 32), inception=str(tmp_path / "nope.pt"))


def test_inception_found_through_the_environment_and_flagged_as_unpublished(monkeypatch, standin):
    monkeypatch.setenv("CMGEN_INCEPTION", str(standin))
    net = F.build_feature_net("auto", (3, 16, 16))
    assert net.kind == "inception" and net.metric == "FID"
    assert "not the published one" in net.protocol["warning"]
    feats = net.embed(np.zeros((2, 16, 16, 3), np.uint8))
    assert feats.shape == (2, 2048) and feats.dtype == np.float64


def test_inception_file_under_another_name_is_linked(tmp_path, standin):
    other = tmp_path / "my-inception.pt"
    other.write_bytes(standin.read_bytes())
    net = F.build_feature_net("inception", (3, 16, 16), inception=str(other))
    ref = F.build_feature_net("inception", (3, 16, 16), inception=str(standin))
    x = np.random.default_rng(1).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(net.embed(x), ref.embed(x))


@pytest.mark.parametrize("mode", ["clean", "legacy_tensorflow"])
def test_features_equal_cleanfid_folder_features(mode, standin, two_folders):
    """Same images, same network: cmgen's streamed features and moments equal clean-fid's folder pipeline
    (its resize, its quantisation). The FD formula itself is checked against clean-fid in test_eval_frechet
    (a 2048-d FD costs seconds, so it is not repeated here)."""
    from cleanfid import fid as cfid
    from cleanfid.inception_torchscript import InceptionV3W

    from cmgen.eval.refstats import accumulate
    from cmgen.eval.sources import folder_source

    net = F.build_feature_net("inception", (3, 24, 24), mode=mode, inception=str(standin))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = InceptionV3W(str(standin.parent), download=False, resize_inside=mode == "legacy_tensorflow").eval()
        theirs = [cfid.get_folder_features(str(d), model, num_workers=0, batch_size=5, device=torch.device("cpu"),
                                           mode=mode, verbose=False) for d in two_folders]
    stats = [accumulate(folder_source(d, batch_size=7, progress=False), net) for d in two_folders]
    for ours, their in zip(stats, theirs):
        np.testing.assert_allclose(ours.kept, their, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ours.mean, their.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ours.cov, np.cov(their, rowvar=False), rtol=1e-4, atol=1e-7)
    assert not np.allclose(theirs[0].mean(0), theirs[1].mean(0), atol=1e-3)  # the folders do differ


def test_auto_detection():
    assert F.detect_features((1, 8, 8)) == "digits"
    assert F.detect_features((2,)) == "points"
    assert F.detect_features((3, 32, 32)) == "inception"
    assert F.detect_features((1, 28, 28)) == "inception"
    with pytest.raises(UserError, match="--features"):
        F.detect_features((5,))
    with pytest.raises(UserError, match="--features"):
        F.build_feature_net("vgg", (3, 32, 32))
    with pytest.raises(UserError, match="--mode"):
        F.build_feature_net("digits", (1, 8, 8), mode="legacy_tensorflow")


def test_digits_training_is_deterministic():
    from cmgen.eval.digits_net import train_digits_net, weights_digest

    assert weights_digest(train_digits_net(epochs=1)) == weights_digest(train_digits_net(epochs=1))
    assert weights_digest(train_digits_net(epochs=1)) != weights_digest(train_digits_net(epochs=1, seed=1))


def test_digits_training_works_when_first_called_under_no_grad():
    """A reward's first use can come from inside a no_grad rollout; training must still learn."""
    from cmgen.eval.digits_net import train_digits_net, weights_digest

    with torch.no_grad():
        inside = train_digits_net(epochs=1)
    assert weights_digest(inside) == weights_digest(train_digits_net(epochs=1))


def test_digits_net_is_cached_and_accurate(monkeypatch):
    from cmgen.data import load_digits
    from cmgen.eval import digits_net as dn

    net = F.build_feature_net("digits", (1, 8, 8))
    assert dn.weights_path().is_file()
    assert net.metric == "FD-digits" and "FID" not in net.metric
    # a fresh process must load the cached file, not retrain
    dn._load_or_train.cache_clear()
    monkeypatch.setattr(dn, "train_digits_net", lambda *a, **k: pytest.fail("retrained despite the cache"))
    again = F.build_feature_net("digits", (1, 8, 8))
    assert again.protocol["weights_sha256"] == net.protocol["weights_sha256"]
    d = load_digits()
    with torch.no_grad():
        acc = (dn.digits_net()(d.x).argmax(1) == d.labels).float().mean().item()
    assert acc > 0.95


def test_clip_needs_a_local_file_and_the_package(monkeypatch, tmp_path):
    monkeypatch.delenv("CMGEN_CLIP", raising=False)
    with pytest.raises(UserError, match="--clip"):
        F.build_feature_net("clip", (3, 32, 32))
    weights = tmp_path / "ViT-B-32.pt"
    weights.write_bytes(b"stand-in")
    monkeypatch.setitem(sys.modules, "clip", None)  # not installed
    with pytest.raises(UserError, match="clip-anytorch"):
        F.build_feature_net("clip", (3, 32, 32), clip=str(weights))


def test_clip_features_through_the_clip_package_interface(monkeypatch, tmp_path):
    weights = tmp_path / "ViT-B-32.pt"
    weights.write_bytes(b"stand-in")
    loaded = {}

    class TinyClip(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(3, 6)

        def encode_image(self, x):
            assert x.shape[1:] == (3, 224, 224)
            return self.proj(x.mean((2, 3)))

    def load(name, device="cpu", jit=True):
        loaded.update(name=name, jit=jit)
        return TinyClip(), None

    monkeypatch.setitem(sys.modules, "clip", types.SimpleNamespace(load=load))
    net = F.build_feature_net("clip", (3, 32, 32), clip=str(weights))
    feats = net.embed(np.full((2, 32, 32, 3), 128, np.uint8))
    assert loaded == {"name": str(weights), "jit": False}  # the local file, never a model name to download
    assert feats.shape == (2, 6) and net.metric == "FD-CLIP"


def test_the_cifar10_train_reference_is_computed_once_then_cached_or_read_from_cleanfid(tmp_path, monkeypatch, standin,
                                                                                      lift_cifar_md5):
    import cleanfid

    from cmgen.data import cifar10
    from cmgen.eval.refstats import accumulate, resolve_reference
    from cmgen.eval.sources import dataset_source
    from conftest import fake_cifar10

    monkeypatch.setenv("HOME", str(tmp_path / "home"))          # cifar10-train reads ~/.cache/cmgen/cifar10
    monkeypatch.setenv("CMGEN_CACHE", str(tmp_path / "cache"))
    fake_cifar10(tmp_path / "home" / ".cache" / "cmgen" / "cifar10")
    net = F.build_feature_net("inception", (3, 32, 32), inception=str(standin))
    first = resolve_reference("cifar10-train", net, keep=100, progress=False)
    direct = accumulate(dataset_source(cifar10(None).x, "cifar10", "image"), net, keep=100)
    assert first.stats.n == 20
    assert np.allclose(first.stats.mean, direct.mean) and np.allclose(first.stats.cov, direct.cov)
    again = resolve_reference("cifar10-train", net, keep=100, progress=False)
    assert "(cached " in again.description["name"] and np.allclose(again.stats.cov, first.stats.cov)
    # clean-fid's published statistics, placed in its stats folder, are used for the published Inception only
    stats = tmp_path / "cleanfid" / "stats"
    stats.mkdir(parents=True)
    np.savez(stats / "cifar10_clean_train_32.npz", mu=np.full(2048, 0.25), sigma=np.eye(2048))
    monkeypatch.setattr(cleanfid, "__file__", str(tmp_path / "cleanfid" / "__init__.py"))
    assert "(cached " in resolve_reference("cifar10-train", net, keep=100, progress=False).description["name"]
    monkeypatch.delitem(net.protocol, "warning")   # as if the stand-in were the published file
    published = resolve_reference("cifar10-train", net, keep=100, progress=False)
    assert "clean-fid's published statistics" in published.description["name"]
    assert np.allclose(published.stats.mean, 0.25)
    # a legacy_tensorflow evaluation reads the statistics of its own mode, never the clean ones
    np.savez(stats / "cifar10_legacy_tensorflow_train_32.npz", mu=np.full(2048, 0.5), sigma=np.eye(2048))
    legacy = F.build_feature_net("inception", (3, 32, 32), inception=str(standin), mode="legacy_tensorflow")
    legacy.protocol.pop("warning", None)
    assert np.allclose(resolve_reference("cifar10-train", legacy, keep=100, progress=False).stats.mean, 0.5)


def test_clip_input_resizes_the_short_side_then_crops_the_centre():
    """A 32 x 64 horizontal ramp: the 224 x 224 crop holds the middle half of its columns, not all of them squashed."""
    ramp = np.repeat(np.repeat((np.arange(64) * 4).astype(np.uint8)[None, :], 32, 0)[None, :, :, None], 3, 3)
    x = F.clip_preprocess(ramp)
    assert tuple(x.shape) == (1, 3, 224, 224)
    grey = (x[0, 0] * 0.26862954 + 0.48145466) * 255                     # undo CLIP's normalisation
    assert abs(grey[:, 0].mean().item() - 64) < 6 and abs(grey[:, -1].mean().item() - 188) < 6   # columns 16, 47


def test_in_loop_evaluation_uses_the_recipes_inception_mode(standin, monkeypatch):
    from cmgen.eval.inloop import _feature_net
    from cmgen.recipe import load_recipe

    from cmgen.eval import inloop

    monkeypatch.setenv("CMGEN_INCEPTION", str(standin))
    monkeypatch.setattr(inloop, "_NETS", {})   # no stand-in net left in the module's cache for later tests
    c10 = load_recipe("ict_cifar10")
    assert c10.eval.mode == "legacy_tensorflow"   # the papers' CIFAR-10 protocol
    assert _feature_net(c10, (3, 32, 32), "cpu").protocol["mode"] == "legacy_tensorflow"
    clean = load_recipe("ict_cifar10", ["eval.mode=clean"])
    assert _feature_net(clean, (3, 32, 32), "cpu").protocol["mode"] == "clean"
    with pytest.raises(UserError, match="'eval.mode'"):
        load_recipe("ict_cifar10", ["eval.mode=legacy_pytorch"])


def test_clip_input_is_clean_fids_bit_for_bit(monkeypatch):
    if "clip" not in sys.modules:   # clean-fid's module imports openai's clip package at import time only
        monkeypatch.setitem(sys.modules, "clip", types.ModuleType("clip"))
        monkeypatch.delitem(sys.modules, "cleanfid.clip_features", raising=False)   # undone after the test
    from cleanfid.clip_features import img_preprocess_clip

    rng = np.random.default_rng(0)
    mean, std = np.array((0.48145466, 0.4578275, 0.40821073)), np.array((0.26862954, 0.26130258, 0.27577711))
    for shape in ((8, 8, 3), (32, 64, 3), (300, 200, 3), (24, 24, 1)):
        images = rng.integers(0, 256, size=(3, *shape), dtype=np.uint8)
        want = np.stack([img_preprocess_clip(img if shape[2] == 3 else img[..., 0]) for img in images])
        got = (F.clip_preprocess(images).numpy().transpose(0, 2, 3, 1) * std + mean) * 255
        assert np.abs(got - want).max() < 1e-3, shape
