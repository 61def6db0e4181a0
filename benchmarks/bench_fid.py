"""cmgen's feature extraction + Frechet distance against clean-fid's `compute_fid`, side by side in one run.

Both read the same two folders of PNGs with the same Inception file through clean-fid's
InceptionV3W and the same resize mode; the script prints both FDs, their relative
difference, both wall times and the ratio. With $CMGEN_INCEPTION set it uses the real
Inception; otherwise a TorchScript stand-in of the same interface (numbers then only
compare the two pipelines, not with papers).

    python benchmarks/bench_fid.py --n 2100 --mode clean

Use n > 2048: with fewer images the 2048-d covariances are singular and clean-fid's
scipy `sqrtm` falls back to adding 1e-6 to the diagonals, so the two FDs differ by design.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch


def smooth_images(n: int, res: int, seed: int, contrast: float) -> np.ndarray:
    """Random smooth colour fields (upsampled 4x4 noise plus grain): cheap stand-ins for natural images."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=(res, res), mode="bicubic", align_corners=False)
    x = 0.5 + contrast * (x - 0.5) + 0.05 * torch.randn(n, 3, res, res, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def write_folder(images: np.ndarray, folder: Path) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:05d}.png")
    return folder


def inception_file(tmp: Path) -> tuple[Path, bool]:
    given = os.environ.get("CMGEN_INCEPTION")
    if given:
        return Path(given), True
    from cmgen.eval.standin import save_standin_inception

    return save_standin_inception(tmp / "standin"), False


def time_cmgen(dirs, path: Path, mode: str, batch_size: int):
    from cmgen.eval.features import build_feature_net
    from cmgen.eval.frechet import fd_between
    from cmgen.eval.refstats import accumulate
    from cmgen.eval.sources import folder_source

    start = time.perf_counter()
    net = build_feature_net("inception", (3, 32, 32), mode=mode, inception=str(path))
    stats = [accumulate(folder_source(d, batch_size, progress=False), net) for d in dirs]
    mid = time.perf_counter()
    fd = fd_between(*stats)
    end = time.perf_counter()
    return fd, end - start, end - mid, stats


def time_cleanfid(dirs, path: Path, mode: str, batch_size: int) -> tuple[float, float]:
    from cleanfid import fid as cfid
    from cleanfid.inception_torchscript import InceptionV3W

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load and scipy sqrtm(disp=) deprecations
        model = InceptionV3W(str(path.parent), download=False, resize_inside=mode == "legacy_tensorflow").eval()
        fd = cfid.compute_fid(str(dirs[0]), str(dirs[1]), mode=mode, num_workers=0, batch_size=batch_size,
                              device=torch.device("cpu"), custom_feat_extractor=model, verbose=False)
    return float(fd), time.perf_counter() - start


def compare_kid(dirs, path: Path, mode: str, batch_size: int, stats) -> None:
    """KID: clean-fid's kernel_distance (numpy seeded, as it draws subsets from the global RNG) next to cmgen's;
    with one subset of all samples both are deterministic and must agree exactly."""
    from cleanfid import fid as cfid
    from cleanfid.inception_torchscript import InceptionV3W

    from cmgen.eval.metrics import kernel_inception_distance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = InceptionV3W(str(path.parent), download=False, resize_inside=mode == "legacy_tensorflow").eval()
        feats = [cfid.get_folder_features(str(d), model, num_workers=0, batch_size=batch_size,
                                          device=torch.device("cpu"), mode=mode, verbose=False) for d in dirs]
    feats = [f.astype(np.float64) for f in feats]  # clean-fid computes in its input's dtype; float32 loses ~1e-4
    m = min(len(f) for f in feats)
    np.random.seed(0)
    theirs = cfid.kernel_distance(feats[0], feats[1])
    ours, ours_std = kernel_inception_distance(stats[1].kept, stats[0].kept)
    np.random.seed(0)
    theirs_all = cfid.kernel_distance(feats[0][:m], feats[1][:m], num_subsets=1, max_subset_size=m)
    ours_all, _ = kernel_inception_distance(feats[1][:m], feats[0][:m], num_subsets=1, subset_size=m)
    sub = min(m, 1000)
    print(f"KID, 100 subsets of {sub}: clean-fid {theirs:.6g}   cmgen {ours:.6g} ± {ours_std:.2g} (different subsets)")
    print(f"KID, one subset of all {m} (deterministic): clean-fid {theirs_all:.10g}   cmgen {ours_all:.10g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2100, help="images per folder (default 2100, above the 2048 dims)")
    ap.add_argument("--res", type=int, default=32, help="image side (default 32, CIFAR-sized)")
    ap.add_argument("--mode", default="clean", choices=["clean", "legacy_tensorflow"])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-kid", action="store_true", help="skip the KID comparison (it extracts clean-fid's "
                    "features once more)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    singular = args.n <= 2048
    if singular:
        print(f"note: n={args.n} <= 2048: singular covariances, clean-fid adds 1e-6 to the diagonals (the FDs may differ slightly)")

    with tempfile.TemporaryDirectory(prefix="cmgen-bench-fid-") as tmp:
        tmp = Path(tmp)
        path, real = inception_file(tmp)
        dirs = [write_folder(smooth_images(args.n, args.res, 0, 1.0), tmp / "a"),
                write_folder(smooth_images(args.n, args.res, 1, 0.8), tmp / "b")]
        # clean-fid first, then cmgen, so any file-cache warm-up favours cmgen's competitor, not cmgen
        fd_theirs, t_theirs = time_cleanfid(dirs, path, args.mode, args.batch_size)
        fd_ours, t_ours, t_fd, stats = time_cmgen(dirs, path, args.mode, args.batch_size)
        if not args.no_kid:
            compare_kid(dirs, path, args.mode, args.batch_size, stats)

    rel = abs(fd_ours - fd_theirs) / max(abs(fd_theirs), 1e-12)
    print(f"extractor: {'Inception ' + str(path) if real else 'TorchScript stand-in (set CMGEN_INCEPTION for the real one)'}"
          f", mode {args.mode}, {args.n} + {args.n} images at {args.res}px, {args.threads} thread(s)")
    print(f"clean-fid compute_fid : FD {fd_theirs:.6f}  in {t_theirs:7.2f} s")
    print(f"cmgen eval            : FD {fd_ours:.6f}  in {t_ours:7.2f} s  (of which FD math {t_fd:.2f} s)")
    print(f"relative FD difference: {rel:.2e}" + ("  (singular covariances: clean-fid regularised them)" if singular else ""))
    print(f"time ratio clean-fid / cmgen: {t_theirs / t_ours:.2f}x")


if __name__ == "__main__":
    main()
