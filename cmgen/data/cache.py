"""A uint8 cache of a decoded image set: one memory-mapped .npy, built once, shared by a run's processes.

`<root>/<key>/` holds images.npy (uint8 NCHW), labels.npy and meta.json with a fingerprint of the
source (every file's path, size and mtime). The folder is written under a temporary name and renamed
into place, so a crash never leaves a half-written cache; when several processes start together the
main process of each machine builds it while the others wait at a barrier, then all map the same
file read-only (the page cache holds one copy per machine). A source that changed after the cache
was built is refused in one sentence rather than silently trained on stale images.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from cmgen.errors import UserError

VERSION = 1


def cache_root(setting: str) -> Path:
    """data.cache: 'auto' (under $CMGEN_CACHE or ~/.cache/cmgen) or a folder."""
    if setting != "auto":
        return Path(setting)
    base = os.environ.get("CMGEN_CACHE") or str(Path.home() / ".cache" / "cmgen")
    return Path(base) / "images"


def fingerprint(files: Sequence[Path], root: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


@contextlib.contextmanager
def main_process_first() -> Iterator[bool]:
    """Yields True on the process that builds (local rank 0); the others wait until it is done."""
    import torch.distributed as td

    multi = td.is_available() and td.is_initialized() and td.get_world_size() > 1
    builder = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if multi and not builder:
        td.barrier()
    try:
        yield builder
    finally:
        if multi and builder:
            td.barrier()


def cached_images(source: Path, files: Sequence[Path], spec: dict, shape: tuple[int, int, int],
                  fill: Callable[[np.ndarray, int], Optional[np.ndarray]], setting: str = "auto", workers: int = 0,
                  count: Optional[Callable[[], int]] = None):
    """(images uint8 memmap [N, C, H, W], labels int64 array or None, cache folder).

    `spec` names what is cached (source kind, resolution); `fill(out, workers)` writes every image into
    `out` and returns the labels (or None). N is one image per file, or `count()` when files hold several
    (CIFAR-10's batches); it is asked only when the cache is built."""
    source = Path(source).resolve()
    key = hashlib.blake2b(json.dumps([VERSION, str(source), spec], sort_keys=True).encode(),
                          digest_size=8).hexdigest()
    folder = cache_root(setting) / f"{source.name}-{key}"
    fp = fingerprint(files, source)
    with main_process_first() as builder:
        if builder and not (folder / "meta.json").is_file():
            rows = count() if count is not None else len(files)
            _build(folder, source, files, spec, (rows, *shape), fp, lambda out: fill(out, workers))
    if not (folder / "meta.json").is_file():
        raise UserError(f"the image cache '{folder}' was not built (the main process failed: see its error); "
                        "fix that error and start the run again")
    meta = json.loads((folder / "meta.json").read_text())
    if meta["fingerprint"] != fp:
        raise UserError(f"the images under '{source}' changed since their cache '{folder}' was built "
                        f"({len(files)} files now, {meta.get('files', meta['n'])} then, or files modified); "
                        f"delete '{folder}' to rebuild it")
    images = np.load(folder / "images.npy", mmap_mode="r")
    labels = np.load(folder / "labels.npy") if (folder / "labels.npy").is_file() else None
    return images, labels, folder


def _build(folder: Path, source: Path, files, spec, shape, fp, fill) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        out = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=shape)
        labels = fill(out)
        out.flush()
        del out
        if labels is not None:
            np.save(tmp / "labels.npy", np.asarray(labels, dtype=np.int64))
        meta = {"version": VERSION, "source": str(source), "n": shape[0], "files": len(files),
                "shape": list(shape[1:]), "fingerprint": fp} | spec
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, folder)  # atomic: the cache appears whole or not at all
        except OSError:
            if not (folder / "meta.json").is_file():  # not another machine's identical build
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
