"""DataLoader workers that read the rows the keyed sampler names, in the loop's order.

The loop's `IndexSampler` still decides every batch from (seed, step, offset); the workers only
read and convert those rows ahead of time (a memory-mapped cache, cmgen.data.cache), so a run with
`data.num_workers > 0` trains on exactly the batches a run without workers trains on, resumed or not.
"""
from __future__ import annotations

from typing import Iterator

import torch


class _Rows(torch.utils.data.Dataset):
    """`rows[(step, micro, indices)]` -> (step, micro, rows, labels): one whole micro-batch per item; image
    rows stay uint8 (a quarter of the bytes to pass between processes and to the device)."""

    def __init__(self, data):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key):
        step, micro, idx = key
        y = None if self.data.labels is None else self.data.labels[idx]
        rows = self.data.uint8(idx) if hasattr(self.data, "uint8") else self.data.batch(idx)
        return step, micro, rows, y


class _KeyedOrder(torch.utils.data.Sampler):
    """(step, micro-step, indices) of this process, from `start` on, as the loop would draw them."""

    def __init__(self, sampler, start: int, global_batch: int, offsets: list[int], count: int):
        self.sampler, self.start, self.global_batch, self.offsets, self.count = sampler, start, global_batch, offsets, count

    def __iter__(self):
        step = self.start
        while True:
            for m, offset in enumerate(self.offsets):
                yield step, m, self.sampler.indices(step, self.global_batch, offset, self.count)
            step += 1


def keyed_batches(data, sampler, start: int, global_batch: int, offsets: list[int], count: int, workers: int,
                  pin_memory: bool = False) -> Iterator:
    """Yields (step, micro, rows (uint8 images or float), labels) for step = start, start + 1, ... with `workers` processes."""
    loader = torch.utils.data.DataLoader(_Rows(data), sampler=_KeyedOrder(sampler, start, global_batch, offsets, count),
                                         batch_size=None, num_workers=workers, pin_memory=pin_memory,
                                         persistent_workers=False, prefetch_factor=4 if workers else None)
    return iter(loader)
