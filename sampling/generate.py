"""Batched, seeded generation: the engine behind `cmgen sample`, loop previews and evaluation."""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch
from tqdm.auto import tqdm

from cmgen.errors import UserError
from cmgen.precond import sampling_sigmas_ok
from cmgen.sampling.multistep import per_image_noise


def default_sigmas(recipe, steps: int) -> list[float]:
    """The run's schedule for 1 or 2 steps (sigma_max, then the recipe's sigma_mid); more steps
    take a Karras grid between sigma_max and the smallest recipe sigma."""
    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    p = recipe.precond
    sig = list(recipe.sample.sigmas)
    if steps <= len(sig):
        return [p.sigma_max] + sig[1:steps]
    from cmgen.schedules import karras_sigmas

    lo = sig[-1] if len(sig) > 1 else 0.5
    grid = karras_sigmas(steps, lo, p.sigma_max, p.rho).flip(0)
    return [float(v) for v in grid]


def parse_sigmas(text: str, sigma_min: float, sigma_max: float) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--sigmas must be comma-separated numbers like 80,0.821, got '{text}'") from None
    if not sampling_sigmas_ok(values, sigma_min, sigma_max):
        raise UserError(f"--sigmas must be decreasing values in ({sigma_min}, {sigma_max}], got '{text}'")
    return values


def generate(gen, n: int, times: Sequence[float], *, sampler: Optional[str] = None, seed: int = 0,
             batch_size: int = 256, labels: Optional[torch.Tensor] = None, guidance: float = 1.0, device="cpu",
             autocast_dtype=None, progress: bool = True, desc: str = "sampling", shard: tuple[int, int] = (0, 1),
             **options) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """Yields (samples float on CPU, labels) batches from a Generator; image j uses seed + j and,
    for a class-conditional model, label j % classes unless `labels` are given. With `shard`
    (rank, processes) only the batches numbered rank, rank + processes, ... are made: each is
    exactly the batch one process would make (same images, same batch composition)."""
    if n < 1:
        raise UserError(f"--n must be at least 1, got {n}")
    gen.check_guidance(guidance)
    rank, world = shard
    starts = list(range(0, n, batch_size))[rank::world]
    bar = tqdm(total=sum(min(batch_size, n - s) for s in starts), desc=desc, unit="img", disable=not progress,
               leave=False)
    for start in starts:
        idx = torch.arange(start, min(n, start + batch_size))
        y = None
        if gen.conditional:
            y = (labels[idx] if labels is not None else idx % gen.num_classes).to(device)
        noise = per_image_noise((seed + idx).tolist(), gen.shape, device)
        with torch.autocast(torch.device(device).type, dtype=autocast_dtype or torch.bfloat16,
                            enabled=autocast_dtype is not None):
            x = gen.sample(noise, times, sampler=sampler, labels=y, guidance=guidance, **options)
        bar.update(len(idx))
        yield x.float().cpu(), (None if y is None else y.cpu())
    bar.close()
