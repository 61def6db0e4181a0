"""iCT is pinned bit for bit: these checksums were taken from short runs made before the
method protocol existed (commit dc2b850); the same recipe and seed must give the same weights.

Bit identity holds for one choice of CPU kernels and thread count: a CPU with AVX-512 runs other
convolution and matmul kernels, which round differently. So each run is made in a child process that
caps torch's kernels (ATen's and oneDNN's) and MKL's at AVX2 and uses two threads, as the pinned runs did."""
import hashlib
import platform
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from conftest import subprocess_env

TINY = ["model.block_out_channels=[16,32]", "model.norm_num_groups=8", "model.attention_head_dim=8"]

PINNED = {
    # dropout (shared teacher/student masks), gradient accumulation, flips and a curriculum stage change
    "digits": ("ict_digits", TINY + ["train.steps=6", "train.batch_size=8", "train.grad_accum=2", "model.dropout=0.1",
                                     "data.hflip=true", "method.s1=20", "train.ema_decay=0.9",
                                     "train.checkpoint_every=6", "train.sample_n=4", "train.sample_every=0"],
               "27cd0dec71a55a684d31863f05b4a31bf6d94fa452057011c9d0aa742745ac18"),
    "toy2d": ("ict_toy2d", ["train.steps=5", "train.batch_size=32", "model.hidden=32", "train.checkpoint_every=5",
                            "train.sample_n=8"], "c583d2533a3c44862160f121d81c62da8eaab6a21b24a5ebff83f677fd18624c"),
}


def checksum(ckpt) -> str:
    """sha256 over every tensor (name, dtype, shape, bytes) of model, EMA and optimizer, in name order."""
    h = hashlib.sha256()
    for part in ("model", "ema", "optimizer"):
        tensors = load_file(str(ckpt / f"{part}.safetensors"))
        for k in sorted(tensors):
            t = tensors[k].contiguous()
            h.update(f"{part}/{k}/{t.dtype}/{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("case", sorted(PINNED))
def test_ict_weights_are_bit_identical_to_the_pinned_run(tmp_path, case):
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the pinned checksums are those of x86-64 AVX2 kernels")
    name, over, expected = PINNED[case]
    env = dict(subprocess_env(), ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2", MKL_ENABLE_INSTRUCTIONS="AVX2")
    run = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "cmgen.cli", "train", name, *over, "train.threads=2", "--out", str(run),
                    "--no-progress"], env=env, check=True, capture_output=True, timeout=300)
    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    assert checksum(ckpt) == expected
