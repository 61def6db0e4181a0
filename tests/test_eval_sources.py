"""Sample sources stream batches: .npz read in chunks (no pickle), folders, datasets, statistics files."""
import numpy as np
import pytest
import torch

from cmgen.errors import UserError
from cmgen.eval.features import FeatureNet
from cmgen.eval.frechet import FeatureStats
from cmgen.eval.refstats import accumulate, load_stats, resolve_reference, save_stats
from cmgen.eval.sources import dataset_source, folder_source, iter_npz_array, npz_source


def _mean_pixel_net():
    """A transparent feature net for plumbing tests: per-channel means and a few pixels."""
    def embed(images):
        x = np.asarray(images, np.float64)
        return np.concatenate([x.mean((1, 2)), x[:, 0, 0, :], x[:, -1, -1, :]], axis=1)

    return FeatureNet("test", "FD-test", embed, 3, {"features": "mean-pixel", "dim": 9})


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_is_streamed_in_chunks_equal_to_np_load(tmp_path, compressed):
    g = np.random.default_rng(0)
    images = g.integers(0, 256, (23, 5, 6, 3), dtype=np.uint8)
    path = tmp_path / "s.npz"
    (np.savez_compressed if compressed else np.savez)(path, images=images, samples=images.astype(np.float32))
    chunks = list(iter_npz_array(path, "images", 10))
    assert [len(c) for c in chunks] == [10, 10, 3]
    np.testing.assert_array_equal(np.concatenate(chunks), images)
    src = npz_source(path, batch_size=4, n=9)
    assert src.shape == (3, 5, 6) and src.n == 9
    batches = list(src.batches(3))
    assert all(0 < len(b) <= 4 for b in batches)
    rows = [_row_index(images, r) for r in np.concatenate(batches)]   # n of them, drawn from the whole file
    assert len(rows) == 9 and rows == sorted(set(rows)) and max(rows) >= 9
    np.testing.assert_array_equal(np.concatenate(list(src.batches(3))), np.concatenate(batches))
    grey = np.concatenate(list(src.batches(1)))
    assert grey.shape == (9, 5, 6, 1)
    np.testing.assert_array_equal(np.concatenate(list(npz_source(path, batch_size=4).batches(3))), images)


def _row_index(rows: np.ndarray, row: np.ndarray) -> int:
    """The one index of `row` among the distinct `rows`."""
    (i,), = np.nonzero((rows == row).reshape(len(rows), -1).all(1))
    return int(i)


def test_npz_with_float_samples_and_points(tmp_path):
    x = torch.linspace(-1, 1, 2 * 3 * 4 * 4).view(2, 3, 4, 4)
    np.savez(tmp_path / "f.npz", samples=x.numpy())
    src = npz_source(tmp_path / "f.npz")
    from cmgen.plots import to_uint8

    np.testing.assert_array_equal(np.concatenate(list(src.batches(3))), to_uint8(x))
    pts = np.random.default_rng(1).standard_normal((7, 2))
    np.savez(tmp_path / "p.npz", samples=pts)
    psrc = npz_source(tmp_path / "p.npz", batch_size=3)
    assert psrc.kind == "points"
    np.testing.assert_allclose(np.concatenate(list(psrc.batches(0))), pts)


def test_npz_without_samples_or_with_objects_is_refused(tmp_path):
    np.savez(tmp_path / "x.npz", other=np.zeros(3))
    with pytest.raises(UserError, match="cmgen sample"):
        npz_source(tmp_path / "x.npz")
    np.savez(tmp_path / "o.npz", images=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(UserError):
        list(npz_source(tmp_path / "o.npz").batches(3))


def test_folder_and_dataset_sources_agree(tmp_path):
    from PIL import Image

    x = torch.rand(5, 3, 6, 6) * 2 - 1
    from cmgen.plots import to_uint8

    u8 = to_uint8(x)
    for i, im in enumerate(u8):
        Image.fromarray(im).save(tmp_path / f"{i}.png")
    a = np.concatenate(list(folder_source(tmp_path, batch_size=2, progress=False).batches(3)))
    b = np.concatenate(list(dataset_source(x, "x", "image", batch_size=3).batches(3)))
    np.testing.assert_array_equal(a, b)
    with pytest.raises(UserError, match="no images"):
        folder_source(tmp_path / "empty-does-not-exist")


def test_grey_samples_meet_a_colour_feature_net(tmp_path):
    from PIL import Image

    grey = np.random.default_rng(2).integers(0, 256, (5, 4, 4), dtype=np.uint8)
    for i, im in enumerate(grey):
        Image.fromarray(im, mode="L").save(tmp_path / f"{i}.png")
    src = folder_source(tmp_path, batch_size=2, progress=False, n=3)
    assert src.n == 3 and src.shape == (1, 4, 4)
    rgb = np.concatenate(list(src.batches(3)))
    rows = [_row_index(grey, r) for r in rgb[..., 0]]
    assert rgb.shape == (3, 4, 4, 3) and all(np.array_equal(rgb[..., c], grey[rows]) for c in range(3))
    np.savez(tmp_path / "g.npz", images=grey[..., None])
    np.testing.assert_array_equal(np.concatenate(list(npz_source(tmp_path / "g.npz", batch_size=2).batches(3))),
                                  np.repeat(grey[..., None], 3, axis=-1))


def test_n_of_a_class_sorted_set_is_a_seeded_draw_over_all_of_it_the_same_from_every_source(tmp_path):
    """`--n` of a folder, an .npz or a run's split sorted by class (class sub-folders, a split in index order)
    scores every class, not the first ones; each source draws the same rows, call after call."""
    from PIL import Image

    classes = np.repeat(np.arange(10), 20)                       # 200 images, class-sorted
    images = np.zeros((200, 4, 4), np.uint8)
    images[:, 0, 0], images[:, 0, 1] = classes * 20, np.arange(200) % 20   # class and index within the class
    for i, im in enumerate(images):
        (tmp_path / f"class{i // 20}").mkdir(exist_ok=True)
        Image.fromarray(im, mode="L").save(tmp_path / f"class{i // 20}" / f"{i % 20:02d}.png")
    np.savez(tmp_path / "s.npz", images=images[..., None])
    x = torch.from_numpy(images[:, None].astype(np.float32) / 127.5 - 1)
    sources = [folder_source(tmp_path, batch_size=16, progress=False, n=50),
               npz_source(tmp_path / "s.npz", batch_size=16, n=50),
               dataset_source(x, "split", "image", batch_size=16, n=50)]
    drawn = [np.concatenate(list(src.batches(1)))[..., 0] for src in sources]
    for d in drawn:
        np.testing.assert_array_equal(d, drawn[0])
    np.testing.assert_array_equal(np.concatenate(list(sources[0].batches(1)))[..., 0], drawn[0])
    got = drawn[0][:, 0, 0] // 20
    assert len(got) == 50 and len(np.unique(drawn[0].reshape(50, -1), axis=0)) == 50
    assert len(set(got.tolist())) >= 8 and 3.5 < got.mean() < 5.5, got   # the first 50 would be classes 0-2


def test_a_fortran_ordered_npz_is_refused_not_read_transposed(tmp_path):
    images = np.asfortranarray(np.random.default_rng(3).integers(0, 256, (4, 5, 6, 3), dtype=np.uint8))
    np.savez(tmp_path / "f.npz", images=images)
    with pytest.raises(UserError, match="is Fortran-ordered; save it with np.ascontiguousarray"):
        list(npz_source(tmp_path / "f.npz").batches(3))


def test_statistics_file_round_trip_and_feature_space_check(tmp_path):
    net = _mean_pixel_net()
    x = torch.rand(40, 3, 4, 4) * 2 - 1
    stats = accumulate(dataset_source(x, "x", "image", batch_size=16), net, keep=30)
    path = save_stats(tmp_path / "ref.npz", stats, net, "x")
    ref = load_stats(path, net)
    np.testing.assert_array_equal(ref.stats.mean, stats.mean)
    np.testing.assert_allclose(ref.stats.cov, stats.cov, rtol=1e-12)
    assert ref.stats.n == 40 and len(ref.stats.kept) == 30
    assert resolve_reference(str(path), net).stats.n == 40
    other = FeatureNet("test", "FD-test", net.embed, 3, {"features": "something-else", "dim": 9})
    with pytest.raises(UserError, match="ref-stats"):
        load_stats(path, other)
    # the same network in clean-fid's other resizing mode is another feature space
    legacy = FeatureNet("test", "FD-test", net.embed, 3, {**net.protocol, "mode": "legacy_tensorflow"})
    save_stats(tmp_path / "clean.npz", stats, FeatureNet("test", "FD-test", net.embed, 3, {**net.protocol, "mode": "clean"}),
               "x")
    with pytest.raises(UserError, match="ref-stats"):
        load_stats(tmp_path / "clean.npz", legacy)


def test_cleanfid_style_stats_without_protocol_are_accepted(tmp_path):
    net = _mean_pixel_net()
    np.savez(tmp_path / "cf.npz", mu=np.zeros(9), sigma=np.eye(9))
    ref = load_stats(tmp_path / "cf.npz", net)
    assert ref.stats.dim == 9 and "not recorded" in ref.description["protocol"]
    np.savez(tmp_path / "bad.npz", mu=np.zeros(4), sigma=np.eye(4))
    with pytest.raises(UserError, match="dimensional"):
        load_stats(tmp_path / "bad.npz", net)


def test_unknown_reference_lists_the_options(tmp_path):
    with pytest.raises(UserError, match="cifar10-train"):
        resolve_reference(str(tmp_path / "missing"), _mean_pixel_net())


def test_points_against_images_is_a_user_error():
    from cmgen.eval.features import points_net

    src = dataset_source(torch.rand(4, 3, 4, 4), "x", "image")
    with pytest.raises(UserError, match="--features"):
        accumulate(src, points_net((2,)))


def test_kept_features_are_bounded_while_moments_use_everything():
    net = _mean_pixel_net()
    x = torch.rand(50, 3, 4, 4) * 2 - 1
    stats = accumulate(dataset_source(x, "x", "image", batch_size=8), net, keep=12)
    assert stats.n == 50 and len(stats.kept) == 12
    full = FeatureStats()
    full.update(np.concatenate([net.embed(b) for b in dataset_source(x, "x", "image").batches(3)]))
    np.testing.assert_allclose(stats.cov, full.cov, rtol=1e-10)
