"""Sample grids: every image lands in its row-major tile, with white padding between tiles."""
import numpy as np

from cmgen.plots import image_grid


def test_image_grid_places_tiles_row_major_with_white_padding():
    n, h, w = 5, 3, 2
    images = np.stack([np.full((h, w, 1), 10 * (k + 1), np.uint8) for k in range(n)])
    grid = image_grid(images, nrow=3, pad=1)
    assert grid.shape == (2 * (h + 1) + 1, 3 * (w + 1) + 1, 1)
    for k in range(n):
        r, q = divmod(k, 3)
        top, left = 1 + r * (h + 1), 1 + q * (w + 1)
        assert (grid[top:top + h, left:left + w] == 10 * (k + 1)).all(), k
    assert (grid[0] == 255).all() and (grid[:, 0] == 255).all() and (grid[h + 1] == 255).all()
    assert (grid[1 + h + 1:, 1 + 2 * (w + 1):] == 255).all()  # the empty sixth tile stays white
    assert image_grid(images, nrow=3, pad=1, upscale=2).shape == (2 * grid.shape[0], 2 * grid.shape[1], 1)
