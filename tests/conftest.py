"""Test settings: offline, deterministic thread count, small shared fixtures."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("CMGEN_CACHE", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "cmgen"))

import pytest  # noqa: E402
import torch  # noqa: E402

# Two cores: one intra-op thread per core, so tests never oversubscribe.
THREADS = int(os.environ.get("CMGEN_TEST_THREADS", "2"))
torch.set_num_threads(THREADS)


def subprocess_env() -> dict:
    """The environment of a `cmgen` child process in a test: offline, one thread, unbuffered, no inherited
    WORLD_SIZE (a launcher's variables would make the child wait for peers)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


def benchmark_module(name: str):
    """The script benchmarks/<name>.py as a module (benchmarks/ is not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def launch_two_processes(cmgen_args, env=None):
    """`cmgen *cmgen_args` under accelerate's launcher in two CPU processes (gloo); asserts it exits 0. The
    launcher runs as a module: a venv that gets accelerate through a .pth has no `accelerate` script."""
    import subprocess
    import sys
    from pathlib import Path

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(Path(sys.executable).parent / "cmgen"), *map(str, cmgen_args)]
    proc = subprocess.run(cmd, env=subprocess_env() if env is None else env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def random_image_folder(root, n=12, size=(12, 10)):
    """`n` random RGB PNGs of `size` (H, W) in two class subfolders of `root`, b/ and a/ alternating; returns root."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(d / f"{i:03d}.png")
    return root


@pytest.fixture(autouse=True)
def _fixed_threads_and_seeds():
    """Every test starts from the same global RNG state, whatever ran before it (tests that draw with
    torch.randn and no generator would otherwise depend on the order they run in). In-process CLI calls
    set torch's thread count; put it back after every test."""
    import random

    import numpy as np

    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    yield
    if torch.get_num_threads() != THREADS:
        torch.set_num_threads(THREADS)

TINY_UNET = ["model.block_out_channels=[16,32]", "model.norm_num_groups=8", "model.attention_head_dim=8"]


def tiny_vae(seed=0, **config):
    """A seeded 1-channel AutoencoderKL (8x8 images to 4x2x2 latents); `config` overrides, e.g. scaling_factor."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**{"in_channels": 1, "out_channels": 1, "down_block_types": ("DownEncoderBlock2D",) * 2,
                            "up_block_types": ("UpDecoderBlock2D",) * 2, "block_out_channels": (8, 16),
                            "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 8, "sample_size": 8,
                            **config}).eval()


@pytest.fixture
def tiny_digits_overrides():
    """ict_digits shrunk to seconds: a 16/32-channel UNet, small batches, frequent checkpoints."""
    return TINY_UNET + ["train.batch_size=8", "train.sample_n=4", "train.log_every=1", "train.checkpoint_every=4",
                        "train.sample_every=0"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A 4-step ict_digits run with a tiny UNet, shared by tests that only read it."""
    from cmgen.recipe import load_recipe
    from cmgen.train import train

    out = tmp_path_factory.mktemp("tiny_run") / "run"
    recipe = load_recipe("ict_digits", TINY_UNET + ["train.steps=4", "train.batch_size=8", "train.sample_n=4",
                                                    "train.checkpoint_every=4"])
    return train(recipe, out, progress=False)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A 2-step class-conditional flow digits model with a null label, like fm_digits but tiny (the base of the
    AWM and Flow-GRPO tests)."""
    from cmgen.recipe import load_recipe
    from cmgen.train import train

    out = tmp_path_factory.mktemp("fm_base") / "run"
    r = load_recipe("fm_digits", TINY_UNET + ["train.steps=2", "train.batch_size=8", "train.sample_n=4",
                                              "train.checkpoint_every=2", "train.sample_every=0", "eval.steps=[2]"])
    return train(r, out, progress=False)


class PickleExploit:
    """Pickled, it runs `touch marker` when unpickled: planted in weight files, it must never run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def fake_cifar10(root, per_batch=4, seed=0):
    """CIFAR-10's python layout (cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta) with random
    images; torchvision's md5 check is lifted by the `lift_cifar_md5` fixture. Returns (images NCHW uint8,
    labels) of the training batches."""
    import pickle

    import numpy as np

    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    images, labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8)
        y = rng.integers(0, 10, per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": y}, f)
        if name != "test_batch":
            images.append(data.reshape(-1, 3, 32, 32))
            labels += y
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return np.concatenate(images), labels


@pytest.fixture
def lift_cifar_md5(monkeypatch):
    """torchvision's md5 checks of CIFAR-10's files pass (for `fake_cifar10`'s random images)."""
    import torchvision

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
