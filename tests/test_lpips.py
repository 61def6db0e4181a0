"""CTM's LPIPS distance (cmgen.perceptual) against the lpips package, on VGG16 weights made here.

The lpips package is the oracle: the same VGG16 and linear weights loaded into it give the same distance
for pooling=max; with its max-pools swapped for 2x2 average pools (piq's replace_pooling=True, what the
CM / CTM reference code calls) the same for pooling=avg.
"""
import pickle

import pytest
import torch

from cmgen.errors import UserError
from cmgen.perceptual import BACKBONE_FILE, CHANNELS, load_lpips
from conftest import PickleExploit

lpips = pytest.importorskip("lpips")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A folder as a user would fill it: torchvision's VGG16 file (features only, random) and lpips' vgg.pth."""
    import torchvision

    folder = tmp_path_factory.mktemp("lpips")
    torch.manual_seed(0)
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])  # vgg16().features
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, folder / BACKBONE_FILE)
    g = torch.Generator().manual_seed(1)
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for i, c in enumerate(CHANNELS)}
    torch.save(lin, folder / "vgg.pth")
    return folder


ORACLES = {}


def oracle(folder, pooling):
    if (folder, pooling) not in ORACLES:
        ORACLES[folder, pooling] = _oracle(folder, pooling)
    return ORACLES[folder, pooling]


def _oracle(folder, pooling):
    net = lpips.LPIPS(net="vgg", pnet_rand=True, model_path=str(folder / "vgg.pth"), verbose=False).eval()
    vgg = {k.removeprefix("features."): v for k, v in torch.load(folder / BACKBONE_FILE, weights_only=True).items()}
    for s, (lo, hi) in enumerate([(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)], 1):
        part = getattr(net.net, f"slice{s}")
        for i in range(lo, hi):
            if pooling == "avg" and isinstance(part._modules[str(i)], torch.nn.MaxPool2d):
                part._modules[str(i)] = torch.nn.AvgPool2d(2, 2)
            for p in ("weight", "bias"):
                if f"{i}.{p}" in vgg:
                    getattr(part._modules[str(i)], p).data.copy_(vgg[f"{i}.{p}"])
    return net


def pairs(n=2, side=64, channels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, channels, side, side, generator=g) * 2 - 1
    return a, (a + 0.3 * torch.randn(a.shape, generator=g)).clamp(-1, 1)


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_lpips_equals_the_lpips_package_with_the_same_weights(weights, pooling):
    a, b = pairs()
    ours = load_lpips(str(weights), pooling)(a, b)
    theirs = oracle(weights, pooling)(a, b, normalize=False).flatten()
    assert ours.shape == (2,) and (ours > 0).all()
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-7), (ours, theirs)
    other = "avg" if pooling == "max" else "max"
    assert not torch.allclose(ours, oracle(weights, other)(a, b, normalize=False).flatten(), rtol=1e-2)


def test_the_ctm_distance_is_lpips_on_images_resized_to_224_and_carries_the_gradient(weights):
    from tests.test_ctm import make_method

    m = make_method("method.distance=lpips", f"method.lpips_weights={weights}")
    a, b = pairs(side=8, channels=1)
    a.requires_grad_(True)
    d = m.distance(a, b)
    up = lambda v: torch.nn.functional.interpolate(v.detach().expand(-1, 3, -1, -1), size=224, mode="bilinear")  # noqa: E731
    assert torch.allclose(d.detach(), oracle(weights, "avg")(up(a), up(b), normalize=False).flatten(), rtol=1e-4)
    d.sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    assert torch.allclose(m.distance(b, b), torch.zeros(2), atol=1e-6)


def test_piqs_weight_file_is_read_too(weights, tmp_path):
    import shutil

    shutil.copy(weights / BACKBONE_FILE, tmp_path / BACKBONE_FILE)
    lin = torch.load(weights / "vgg.pth", weights_only=True)
    torch.save([lin[f"lin{i}.model.1.weight"] for i in range(5)], tmp_path / "lpips_weights.pt")
    a, b = pairs()
    assert torch.allclose(load_lpips(str(tmp_path))(a, b), load_lpips(str(weights))(a, b), rtol=1e-6)


def test_missing_or_bad_weight_files_are_one_sentence_and_never_unpickled(weights, tmp_path):
    import shutil

    with pytest.raises(UserError, match="set method.lpips_weights"):
        load_lpips(None)
    with pytest.raises(UserError, match=f"holds no VGG16 backbone: put torchvision's {BACKBONE_FILE}"):
        load_lpips(str(tmp_path))
    state = torch.load(weights / BACKBONE_FILE, weights_only=True)
    torch.save({k: v for k, v in state.items() if not k.startswith("features.28.")}, tmp_path / BACKBONE_FILE)
    with pytest.raises(UserError, match=r"is not torchvision's VGG16 \(it lacks \['28.bias'"):
        load_lpips(str(tmp_path))
    torch.save({"conv1.weight": torch.ones(2), "fc.bias": torch.ones(2)}, tmp_path / BACKBONE_FILE)   # a ResNet's
    with pytest.raises(UserError, match="is not torchvision's VGG16"):
        load_lpips(str(tmp_path))
    torch.save([torch.ones(2)], tmp_path / BACKBONE_FILE)
    with pytest.raises(UserError, match="is not torchvision's VGG16"):
        load_lpips(str(tmp_path))
    torch.save({k: v[:1] for k, v in state.items()}, tmp_path / BACKBONE_FILE)            # names right, shapes wrong
    with pytest.raises(UserError, match="do not fit VGG16"):
        load_lpips(str(tmp_path))
    marker = tmp_path / "pwned"
    (tmp_path / BACKBONE_FILE).write_bytes(pickle.dumps({"x": PickleExploit(marker)}))
    with pytest.raises(UserError, match="is not a readable VGG16 state dict"):
        load_lpips(str(tmp_path))
    assert not marker.exists()
    shutil.copy(weights / BACKBONE_FILE, tmp_path / BACKBONE_FILE)
    torch.save({"lin0.model.1.weight": torch.ones(1, 64, 1, 1)}, tmp_path / "vgg.pth")
    with pytest.raises(UserError, match="does not hold the five LPIPS-VGG linear layers"):
        load_lpips(str(tmp_path))


def test_lpips_on_points_or_four_channel_latents_is_refused():
    from cmgen.methods.ctm import Config, distance_fn

    for shape in [(2,), (4, 8, 8)]:
        with pytest.raises(UserError, match="method.distance=lpips compares images"):
            distance_fn(Config(distance="lpips"), shape, "cpu")
    with pytest.raises(UserError, match="method.lpips_pooling"):
        from tests.test_ctm import tiny_recipe

        tiny_recipe("method.lpips_pooling=min")
