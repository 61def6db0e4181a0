"""Randomness keyed by (seed, step): resumed and multi-process runs draw what a straight run draws.

Draws are made for the *global* batch from a generator keyed by (seed, step, stream) and
sliced to this process's micro-batch, so a run on 2 processes sees the same data, sigmas
and noise as the same run on 1 process. On an accelerator (CUDA, MPS, XPU) the generator
lives on the device and the draw is made there: no per-process CPU work or host-to-device
copy per step, and the same draws for any number of processes on a given device type (CPU
and GPU generators are different algorithms, so a CPU run and a GPU run draw differently).
Dropout, which acts inside the network on the local batch, is keyed by (seed, step, rank,
micro-step) instead.
"""
from __future__ import annotations

import hashlib

import torch


def key_seed(*parts) -> int:
    """A 63-bit seed from any tuple of ints/strings (stable across runs and platforms)."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def keyed_generator(*parts, device="cpu") -> torch.Generator:
    return torch.Generator(device=torch.device(device)).manual_seed(key_seed(*parts))


class BatchRNG:
    """Draws for the global batch of one step, sliced to [offset, offset + count).

    Each call to a draw method advances a per-step stream, so the sequence of draws a
    method makes (e.g. index, then noise) is reproducible from (seed, step) alone.
    """

    def __init__(self, seed: int, step: int, global_batch: int, offset: int, count: int, device="cpu",
                 dropout_key=(), stream=None):
        self.seed, self.step = seed, step
        self.stream = () if stream is None else (stream,)  # e.g. a second phase's own draws
        self.global_batch, self.offset, self.count = global_batch, offset, count
        self.device = torch.device(device)
        self._draws = 0
        self.dropout_seed = key_seed(seed, step, "dropout", *dropout_key)

    def _gen(self) -> torch.Generator:
        self._draws += 1
        return keyed_generator(self.seed, self.step, *self.stream, "draw", self._draws, device=self.device)

    def _slice(self, t: torch.Tensor) -> torch.Tensor:
        return t[self.offset:self.offset + self.count]

    def randn(self, *shape) -> torch.Tensor:
        return self._slice(torch.randn(self.global_batch, *shape, generator=self._gen(), device=self.device))

    def rand(self, *shape) -> torch.Tensor:
        return self._slice(torch.rand(self.global_batch, *shape, generator=self._gen(), device=self.device))

    def multinomial(self, probs: torch.Tensor) -> torch.Tensor:
        """Indices drawn with replacement from `probs` (float64 or float32, any device)."""
        return self._slice(torch.multinomial(probs.to(self.device, torch.float32), self.global_batch,
                                             replacement=True, generator=self._gen()))

    def randint(self, low: int, high: int) -> torch.Tensor:
        return self._slice(torch.randint(low, high, (self.global_batch,), generator=self._gen(), device=self.device))


class same_dropout:
    """Context that runs a forward pass with the global RNG seeded to `seed` and restored after.

    Entering it twice with one seed gives two passes the same dropout masks (iCT's teacher and
    student); the global RNG stream outside is left untouched.
    """

    def __init__(self, seed: int, device):
        self.seed = seed
        self.device = torch.device(device)

    def __enter__(self):
        kind = self.device.type
        # fork_rng saves and restores the CPU generator and those of the named devices of one type
        self._fork = torch.random.fork_rng(devices=[] if kind == "cpu" else [self.device], enabled=True,
                                           device_type="cuda" if kind == "cpu" else kind)
        self._fork.__enter__()
        torch.manual_seed(self.seed)  # seeds the CPU and every accelerator's default generator
        return self

    def __exit__(self, *exc):
        return self._fork.__exit__(*exc)


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=keyed_generator(seed, "epoch", epoch))


class IndexSampler:
    """Which examples a global batch holds: epoch-wise permutations keyed by (seed, epoch)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._cache: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            if len(self._cache) > 2:
                self._cache.pop(min(self._cache))
            self._cache[epoch] = epoch_permutation(self.seed, epoch, self.n)
        return self._cache[epoch]

    def indices(self, step: int, global_batch: int, offset: int, count: int) -> torch.Tensor:
        pos = torch.arange(step * global_batch + offset, step * global_batch + offset + count)
        epochs = pos // self.n
        out = torch.empty_like(pos)
        for e in epochs.unique().tolist():
            m = epochs == e
            out[m] = self._perm(e)[pos[m] % self.n]
        return out
