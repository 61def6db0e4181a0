"""Sanity ordering of FD-digits on the digits set: held-out real is close, more noise or blur is farther,
pure noise is far; precision drops as images degrade."""

import pytest
import torch

from cmgen.eval.features import build_feature_net
from cmgen.eval.frechet import fd_between
from cmgen.eval.metrics import precision_recall
from cmgen.eval.refstats import accumulate
from cmgen.eval.sources import dataset_source


@pytest.fixture(scope="module")
def setup():
    from cmgen.data import load_digits
    from cmgen.data import _split

    train, held = _split(load_digits(), 400, seed=0)
    net = build_feature_net("digits", (1, 8, 8))
    ref = accumulate(dataset_source(train.x, "train", "image"), net)
    return net, ref, held.x


def _fd(net, ref, x):
    stats = accumulate(dataset_source(x.clamp(-1, 1), "x", "image"), net)
    return fd_between(stats, ref), stats


def _blur(x, passes):
    kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]).div(16).view(1, 1, 3, 3)
    for _ in range(passes):
        x = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), kernel)
    return x


def test_held_out_real_is_close_and_pure_noise_is_far(setup):
    net, ref, held = setup
    real, _ = _fd(net, ref, held)
    g = torch.Generator().manual_seed(0)
    noise, _ = _fd(net, ref, torch.rand(held.shape, generator=g) * 2 - 1)
    assert noise > 20 * real


def test_more_gaussian_noise_raises_fd_monotonically(setup):
    net, ref, held = setup
    g = torch.Generator().manual_seed(1)
    z = torch.randn(held.shape, generator=g)
    values = [_fd(net, ref, held + s * z)[0] for s in (0.0, 0.1, 0.2, 0.4, 0.8)]
    assert all(a < b for a, b in zip(values, values[1:])), values


def test_more_blur_raises_fd_monotonically(setup):
    net, ref, held = setup
    values = [_fd(net, ref, _blur(held, p))[0] for p in (0, 1, 2, 4)]
    assert all(a < b for a, b in zip(values, values[1:])), values


def test_precision_drops_with_noise(setup):
    net, ref, held = setup
    g = torch.Generator().manual_seed(2)
    clean = _fd(net, ref, held)[1]
    noisy = _fd(net, ref, held + 0.6 * torch.randn(held.shape, generator=g))[1]
    real = ref.kept[:400]
    p_clean, _ = precision_recall(real, clean.kept)
    p_noisy, _ = precision_recall(real, noisy.kept)
    assert p_clean > 0.5 and p_noisy < p_clean - 0.2
