"""Where evaluated samples come from, one batch at a time (never all images in memory).

A source yields uint8 NHWC image batches or float [B, D] point batches: from a model
(seeded per image through cmgen.sampling.generate), a folder of images, an `.npz` of
samples (read in chunks straight from the archive), or an in-memory cmgen Dataset.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from cmgen.errors import UserError
from cmgen.plots import LUMA_601

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".pgm", ".ppm"}


@dataclass
class Source:
    name: str                                    # shown in the protocol
    shape: tuple[int, ...]                       # one sample: (C, H, W) or (D,)
    kind: str                                    # image | points
    n: int
    batches: Callable[[int], Iterator[np.ndarray]]  # channels wanted (1 or 3; ignored for points) -> batches


def to_uint8_nhwc(x: torch.Tensor) -> np.ndarray:
    from cmgen.plots import to_uint8

    return to_uint8(x)


def _as_channels(batch: np.ndarray, channels: int) -> np.ndarray:
    """uint8 NHWC -> the channel count a feature net wants (luma for grey, replication for RGB)."""
    c = batch.shape[-1]
    if channels in (0, c):
        return batch
    if channels == 3 and c == 1:
        return np.repeat(batch, 3, axis=-1)
    if channels == 1 and c == 3:
        luma = batch.astype(np.float32) @ np.array(LUMA_601, np.float32)
        return np.clip(np.round(luma), 0, 255).astype(np.uint8)[..., None]
    raise UserError(f"images have {c} channels; only 1 (grey) or 3 (RGB) can be evaluated")


# ----------------------------------------------------------------------------- models

def model_source(gen, times: Sequence[float], n: int, *, sampler: Optional[str] = None, guidance: float = 1.0,
                 seed: int = 0, batch_size: int = 256, device="cpu", progress: bool = True,
                 name: str = "model") -> Source:
    """Samples of a Generator over `times` with `sampler`; image j uses seed + j (cmgen.sampling.generate).

    Under several processes (torch.distributed initialised, e.g. `accelerate launch`) each process
    samples every world-th batch and all of them receive every batch in order: the same arrays, so the
    same metrics, as one process, in a fraction of the sampling time."""
    from cmgen.sampling import generate

    spec = gen.sampler(sampler)
    rank, world = process_shard()

    def convert(x: torch.Tensor, channels: int) -> np.ndarray:
        return x.numpy().astype(np.float64) if gen.output_kind == "points" else _as_channels(to_uint8_nhwc(x), channels)

    def batches(channels: int) -> Iterator[np.ndarray]:
        made = generate(gen, n, times, sampler=spec.name, seed=seed, batch_size=batch_size, guidance=guidance,
                        device=device, progress=progress, desc=f"{name}: {len(times)}-point {spec.name}",
                        shard=(rank, world))
        if world == 1:
            for x, _ in made:
                yield convert(x, channels)
            return
        for _ in range(0, -(-n // batch_size), world):  # rounds: batch round * world + r comes from process r
            mine = next(made, None)
            for b in gather_objects(None if mine is None else convert(mine[0], channels)):
                if b is not None:
                    yield b

    cfg = f", cfg {guidance:g}" if guidance != 1.0 else ""
    shown = ", ".join(f"{s:.4g}" for s in times)
    return Source(f"{name} ({spec.name}, NFE {gen.nfe(times, spec.name, guidance)}, times {shown}{cfg}, "
                  f"seeds {seed}..)", gen.image_shape, gen.output_kind, n, batches)


def process_shard() -> tuple[int, int]:
    """(rank, processes) of the running torch.distributed group, (0, 1) without one."""
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        return td.get_rank(), td.get_world_size()
    return 0, 1


def gather_objects(obj) -> list:
    """`obj` of every process, in rank order."""
    import torch.distributed as td

    out = [None] * td.get_world_size()
    td.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------- datasets

def subset(rows, n: Optional[int]):
    """`n` of `rows` (a tensor, array or list) as a seeded uniform draw in their order, or all of them: a folder
    or split sorted by class is scored evenly, not cut at its first classes."""
    from cmgen.eval.frechet import SUBSAMPLE_SEED
    from cmgen.eval.metrics import uniform_rows

    if n is None or n >= len(rows):
        return rows
    picked = uniform_rows(np.arange(len(rows)), n, np.random.default_rng(SUBSAMPLE_SEED))
    return [rows[i] for i in picked] if isinstance(rows, list) else rows[picked]


def dataset_source(x: torch.Tensor, name: str, kind: str, batch_size: int = 256, n: Optional[int] = None,
                   progress: bool = False) -> Source:
    """An in-memory cmgen Dataset's tensor (images in [-1, 1], quantised to uint8 like samples are); `n` rows
    are a seeded uniform draw (`subset`)."""
    x = subset(x, n)

    def batches(channels: int) -> Iterator[np.ndarray]:
        for start in tqdm(range(0, len(x), batch_size), desc=f"features of {name}", unit="batch",
                          disable=not progress, leave=False):
            b = x[start:start + batch_size]
            yield b.numpy().astype(np.float64) if kind == "points" else _as_channels(to_uint8_nhwc(b), channels)

    return Source(name, tuple(x.shape[1:]), kind, len(x), batches)


# ----------------------------------------------------------------------------- folders

def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())


def folder_source(folder, batch_size: int = 256, progress: bool = True, n: Optional[int] = None) -> Source:
    from cmgen.data import open_image

    files = subset(image_files(folder), n)
    if not files:
        raise UserError(f"folder '{folder}' holds no images ({', '.join(sorted(IMAGE_EXTS))}); "
                        "pass a folder of samples, an .npz or a run")
    with open_image(files[0]) as im:
        first_mode, size = im.mode, im.size
    channels_found = 1 if first_mode in ("L", "1", "I;16", "I", "F") else 3

    def batches(channels: int) -> Iterator[np.ndarray]:
        want = channels or channels_found
        pil_mode = "L" if want == 1 else "RGB"
        bar = tqdm(total=len(files), desc=f"reading {Path(folder).name}", unit="img", disable=not progress, leave=False)
        for start in range(0, len(files), batch_size):
            arrays = []
            for p in files[start:start + batch_size]:
                with open_image(p) as im:
                    a = np.asarray(im.convert(pil_mode))
                arrays.append(a[..., None] if a.ndim == 2 else a)
            if len({a.shape for a in arrays}) > 1:
                raise UserError(f"images in '{folder}' differ in size; resize them to one size first")
            bar.update(len(arrays))
            yield np.stack(arrays)
        bar.close()

    return Source(f"folder {folder}", (channels_found, size[1], size[0]), "image", len(files), batches)


# ----------------------------------------------------------------------------- npz

def _npz_member(zf: zipfile.ZipFile, key: str) -> Optional[str]:
    return f"{key}.npy" if f"{key}.npy" in zf.namelist() else None


def _npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def read_npz_array_header(path, key: str) -> tuple[tuple[int, ...], np.dtype]:
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        shape, fortran, dtype = _npy_header(f)
    return shape, dtype


def iter_npz_array(path, key: str, batch_size: int) -> Iterator[np.ndarray]:
    """Rows of array `key` of an .npz, `batch_size` at a time, without loading the whole array (no pickle)."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        shape, fortran, dtype = _npy_header(f)
        if dtype.hasobject:
            raise UserError(f"array '{key}' in '{path}' holds Python objects; cmgen never unpickles, save plain arrays")
        if fortran and len(shape) > 1:
            raise UserError(f"array '{key}' in '{path}' is Fortran-ordered; save it with np.ascontiguousarray")
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        for start in range(0, shape[0], batch_size):
            count = min(batch_size, shape[0] - start)
            buf = f.read(row * count)
            yield np.frombuffer(bytearray(buf), dtype=dtype).reshape((count, *shape[1:]))  # writable for torch


def _rows(path, key: str, batch_size: int, rows: int, n: Optional[int]) -> Iterator[np.ndarray]:
    """`n` of the `rows` rows of an npz array (`subset`'s draw; all of them for None), in batches of
    `batch_size`, reading the file only up to the last row drawn."""
    picked = subset(np.arange(rows), n)
    seen, pending = 0, []
    for b in iter_npz_array(path, key, batch_size):
        lo, hi = np.searchsorted(picked, [seen, seen + len(b)])
        pending.append(b[picked[lo:hi] - seen])
        seen += len(b)
        last = hi == len(picked)
        if last or sum(map(len, pending)) >= batch_size:
            ready = np.concatenate(pending)
            cut = len(ready) if last else len(ready) - len(ready) % batch_size
            yield from (ready[i:i + batch_size] for i in range(0, cut, batch_size))
            pending = [ready[cut:]]
        if last:  # stop before reading the next batch from the file
            return


def npz_source(path, batch_size: int = 256, n: Optional[int] = None) -> Source:
    """`cmgen sample` output: 'images' (uint8 NHWC) preferred, else 'samples' (float NCHW in [-1, 1] or [N, D] points)."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            images, samples = _npz_member(zf, "images"), _npz_member(zf, "samples")
    except (zipfile.BadZipFile, OSError) as exc:
        raise UserError(f"'{path}' is not a readable .npz ({exc}); pass the output of `cmgen sample --out X.npz`") from None
    if images:
        shape, dtype = read_npz_array_header(path, "images")
        if dtype != np.uint8 or len(shape) != 4:
            raise UserError(f"'images' in '{path}' must be uint8 NHWC, got {dtype} {shape}")
        total = shape[0] if n is None else min(n, shape[0])

        def batches(channels: int) -> Iterator[np.ndarray]:
            for b in _rows(path, "images", batch_size, shape[0], n):
                yield _as_channels(b, channels)

        return Source(f"npz {path}", (shape[3], shape[1], shape[2]), "image", total, batches)
    if samples:
        shape, dtype = read_npz_array_header(path, "samples")
        kind = "points" if len(shape) == 2 else "image"
        if kind == "image" and len(shape) != 4:
            raise UserError(f"'samples' in '{path}' must be NCHW images or [N, D] points, got shape {shape}")
        total = shape[0] if n is None else min(n, shape[0])

        def batches(channels: int) -> Iterator[np.ndarray]:
            for b in _rows(path, "samples", batch_size, shape[0], n):
                if kind == "points":
                    yield b.astype(np.float64)
                else:
                    yield _as_channels(to_uint8_nhwc(torch.from_numpy(np.array(b))), channels)

        return Source(f"npz {path}", tuple(shape[1:]), kind, total, batches)
    raise UserError(f"'{path}' has neither 'images' nor 'samples'; pass the output of `cmgen sample --out X.npz`")
