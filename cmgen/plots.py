"""PNG outputs: sample grids, 2-D scatter plots and metric curves."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

# ITU-R 601 luma weights of R, G, B: PIL's 'L' conversion, how every RGB image is reduced to grey here
LUMA_601 = (0.299, 0.587, 0.114)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """NCHW float in [-1, 1] -> NHWC uint8, clamped, then rounded to nearest (ties to even, as numpy's round
    in diffusers' numpy_to_pil after /2+0.5)."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: np.ndarray, nrow: int | None = None, pad: int = 1, upscale: int = 1) -> np.ndarray:
    """NHWC uint8 -> one HWC uint8 grid image."""
    from einops import rearrange

    n = images.shape[0]
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    ncol = math.ceil(n / nrow)
    # white padding right of and below every tile (and blank tiles to fill the last row), then tiles
    # row-major into one image, then the top and left border
    tiles = np.pad(images, ((0, nrow * ncol - n), (0, pad), (0, pad), (0, 0)), constant_values=255)
    grid = rearrange(tiles, "(r q) h w c -> (r h) (q w) c", q=nrow)
    grid = np.pad(grid, ((pad, 0), (pad, 0), (0, 0)), constant_values=255)
    if upscale > 1:
        grid = grid.repeat(upscale, 0).repeat(upscale, 1)
    return grid


def save_grid(x: torch.Tensor, path, nrow: int | None = None) -> Path:
    from PIL import Image

    images = to_uint8(x)
    h = images.shape[1]
    grid = image_grid(images, nrow, upscale=max(1, 64 // h) if h < 64 else 1)
    if grid.shape[2] == 1:
        grid = grid[..., 0]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_scatter(points: torch.Tensor, path, reference: torch.Tensor | None = None, title: str = "") -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    if reference is not None:
        r = reference[:2000].cpu().numpy()
        ax.scatter(r[:, 0], r[:, 1], s=2, c="0.75", label="data")
    p = points.cpu().numpy()
    ax.scatter(p[:, 0], p[:, 1], s=2, c="tab:blue", label="samples")
    ax.set_xlim(-1.5, 1.5)
    ax.set_ylim(-1.5, 1.5)
    ax.set_aspect("equal")
    ax.legend(loc="upper right", fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def save_samples(x: torch.Tensor, path, reference=None, title: str = "") -> Path:
    """A grid for images, a scatter plot for points."""
    if x.ndim == 2:
        return save_scatter(x, path, reference, title)
    return save_grid(x, path)


def read_metrics(path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if isinstance(row, dict):
            rows.append(row)
    return rows


def save_curve(rows: list[dict], key: str, path, logy: bool = True, title: str = "") -> Path | None:
    pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None and math.isfinite(r[key])]
    if not pts:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    s, v = zip(*pts)
    ax.plot(s, v, lw=1)
    if logy and min(v) > 0:
        ax.set_yscale("log")
    stages = [(r["step"], r["N"]) for r in rows if "N" in r]
    for (_, n0), (step, n1) in zip(stages, stages[1:]):  # curriculum stage boundaries: the loss jumps there
        if n1 != n0:
            ax.axvline(step, color="0.6", ls=":", lw=0.8)
            ax.text(step, 1.0, f" N={int(n1)}", transform=ax.get_xaxis_transform(), va="top", fontsize=7, color="0.4")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(title or key, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
