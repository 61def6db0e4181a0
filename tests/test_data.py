"""Datasets: digits, 2-D toys, image folders, CIFAR-10's missing-files message, flips."""
import numpy as np
import pytest
import torch
from PIL import Image

from cmgen.data import cifar10, image_folder, load_dataset, load_digits, toy2d
from cmgen.errors import UserError
from cmgen.recipe import load_recipe
from conftest import fake_cifar10


def test_digits_are_scaled_to_minus_one_one_with_labels():
    d = load_digits()
    assert d.x.shape == (1797, 1, 8, 8) and d.x.min() == -1 and d.x.max() == 1
    assert d.labels.unique().tolist() == list(range(10)) and d.num_classes == 10


def test_holdout_is_disjoint_and_fixed():
    r = load_recipe("ict_digits")
    train, held = load_dataset(r.data, seed=0)
    train2, held2 = load_dataset(r.data, seed=0)
    assert len(train) + len(held) == 1797 and len(held) == r.data.holdout
    assert torch.equal(held.x, held2.x)
    flat = lambda t: {tuple(v.flatten().tolist()) for v in t}
    assert len(flat(held.x) & flat(train.x)) < 10  # digits has a few exact duplicates, nothing more


@pytest.mark.parametrize("kind,modes", [("ring", 8), ("moons", 2)])
def test_toy2d(kind, modes):
    d = toy2d(kind, 4000, seed=1)
    assert d.x.shape == (4000, 2) and d.num_classes == modes and d.kind == "points"
    assert 0.2 < d.x.std().item() < 0.8  # about sigma_data = 0.5
    if kind == "ring":
        r = d.x.norm(dim=1)
        assert (r - 0.7).abs().mean() < 0.05


def test_image_folder_with_class_subfolders(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    d = image_folder(str(tmp_path), resolution=16)
    assert d.x.shape == (6, 3, 16, 16) and d.num_classes == 2 and d.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert -1 <= d.x.min() and d.x.max() <= 1


def test_image_folder_errors(tmp_path):
    with pytest.raises(UserError, match="data.path.*does not exist"):
        image_folder(str(tmp_path / "nope"), 8)
    with pytest.raises(UserError, match="holds no images"):
        image_folder(str(tmp_path), 8)


def test_cifar10_missing_files_is_one_sentence_with_where_to_put_them(tmp_path):
    with pytest.raises(UserError) as e:
        cifar10(str(tmp_path))
    msg = str(e.value)
    assert "cifar-10-batches-py" in msg and str(tmp_path) in msg and "\n" not in msg


def test_hflip_flips_about_half_the_batch(tmp_path):
    from cmgen.train import Trainer

    recipe = load_recipe("ict_digits", ["model.block_out_channels=[16,32]", "model.norm_num_groups=8",
                                        "model.attention_head_dim=8", "train.batch_size=256", "data.hflip=true"])
    tr = Trainer(recipe, tmp_path / "run", progress=False)
    x = tr._batch(0).x
    idx = tr.sampler.indices(0, 256, 0, 256)
    orig = tr.data.x[idx]
    flipped = (x == orig.flip(3)).flatten(1).all(1) & ~(x == orig).flatten(1).all(1)
    same = (x == orig).flatten(1).all(1)
    assert (flipped | same).all()
    assert 0.3 < flipped.float().mean().item() < 0.7


def _solid_images(folder, colours):
    folder.mkdir()
    for i, c in enumerate(colours):
        Image.fromarray(np.full((6, 6, 3), c, np.uint8)).save(folder / f"{i}.png")


def test_image_rows_read_any_index_order_from_ram_and_from_a_memory_map(tmp_path):
    colours = [(10 * i, 200 - 10 * i, 7 * i) for i in range(6)]
    _solid_images(tmp_path / "imgs", colours)
    want = torch.tensor(colours, dtype=torch.uint8)[:, :, None, None].expand(-1, -1, 6, 6)
    ram = image_folder(str(tmp_path / "imgs"), None)
    mapped = image_folder(str(tmp_path / "imgs"), None, cache=str(tmp_path / "cache"))
    idx = torch.tensor([4, 0, 5, 0, 2])                   # unsorted, with a repeat: a training draw
    for d in (ram, mapped):
        assert torch.equal(d.uint8(idx), want[idx])
        assert torch.equal(d.batch(idx), want[idx].float() / 127.5 - 1)
        assert torch.equal(d.uint8(torch.tensor([1, 3])), want[[1, 3]])   # sorted: one read
        part = d.take(torch.tensor([5, 1, 3]))                            # a split keeps its own row order
        assert torch.equal(part.uint8(torch.tensor([2, 0])), want[[3, 5]])


def test_image_folder_crops_the_centre_before_resizing(tmp_path):
    (tmp_path / "imgs").mkdir()
    a = np.zeros((20, 30, 3), np.uint8)
    a[:, :5], a[:, 5:25], a[:, 25:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)   # red | green | blue strips
    Image.fromarray(a).save(tmp_path / "imgs" / "wide.png")
    d = image_folder(str(tmp_path / "imgs"), 10)
    assert d.shape == (3, 10, 10)
    assert torch.equal(d.uint8(torch.tensor([0]))[0], torch.tensor([0, 255, 0], dtype=torch.uint8)[:, None, None]
                       .expand(3, 10, 10))


def test_cifar10_reads_the_training_batches_in_ram_and_memory_mapped(tmp_path, lift_cifar_md5):
    images, labels = fake_cifar10(tmp_path / "c10")
    for cache in (None, str(tmp_path / "cache")):
        d = cifar10(str(tmp_path / "c10"), cache=cache)
        assert d.shape == (3, 32, 32) and len(d) == 20 and d.num_classes == 10
        assert np.array_equal(d.uint8(torch.arange(20)).numpy(), images) and d.labels.tolist() == labels
    r = load_recipe("ict_cifar10", [f"data.path={tmp_path / 'c10'}", "data.holdout=0"])
    assert len(load_dataset(r.data)[0]) == 20
