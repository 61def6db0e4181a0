"""The one training loop (accelerate): every method runs through it unchanged.

Per optimizer step: the micro-batches of this process's slice of the global batch, the method's
`collect` once (rollouts, rewards), then for each phase the method names (cmgen.methods.base):
the loss per micro-batch with accumulation, one non-finite check across processes, clip, that
part's optimizer step, its EMA and, after a model step, the target networks. All randomness is
keyed by (seed, step, phase) (cmgen.rng), so a resumed or multi-process run draws what a straight
single-process run draws.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from cmgen import checkpoint as ckpt_io
from cmgen import state as state_io
from cmgen.ema import EMA, TargetNetwork
from cmgen.errors import UserError
from cmgen.recipe import Recipe, dump_recipe
from cmgen.rng import same_dropout

log = logging.getLogger("cmgen")


class NonFiniteLoss(UserError):
    pass


def configure_threads(requested: int = 0) -> int:
    """One intra-op thread per available core, divided among the local processes.

    Oversubscribed OpenMP threads on a small machine run many times slower, so the count is
    set deliberately rather than left to torch's default.
    """
    if requested > 0:
        n = requested
    else:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = os.cpu_count() or 1
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("ACCELERATE_NUM_PROCESSES", "1")) or 1)
        n = max(1, min(8, cores // max(1, local)))
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set once in this process
    return n


def make_optimizer(params, cfg):
    # foreach: torch picks the per-tensor loop on the CPU by default, ~10x slower for many small tensors
    kw = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, foreach=True)
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "radam": torch.optim.RAdam}[cfg.name]
    return cls(params, **kw)


def lr_at(step: int, cfg, total: int) -> float:
    """The learning rate of 0-based `step` of `total`: linear warmup over optim.warmup_steps, then constant or
    decaying (cosine or linear) from optim.lr to 0 at the last step."""
    w = cfg.warmup_steps
    if w > 0 and step < w:
        return cfg.lr * (step + 1) / w
    if cfg.decay == "constant" or total <= w:
        return cfg.lr
    frac = min(1.0, (step - w) / (total - w))
    if cfg.decay == "linear":
        return cfg.lr * (1.0 - frac)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * frac))


def default_run_dir(recipe: Recipe) -> Path:
    return Path("runs") / recipe.name


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"output folder '{out}' cannot be written ({exc.strerror}); pass a writable --out") from None


@dataclasses.dataclass
class TrainPart:
    """A trainable network with its optimizer (settings and instance) and optional evaluation EMA."""
    module: torch.nn.Module
    optim: object
    optimizer: object
    ema: Optional[EMA]


class Trainer:
    """Owns the state of one run; `run()` trains to recipe.train.steps (or `stop_after` steps)."""

    def __init__(self, recipe: Recipe, out_dir: Path, resume: Optional[str] = None, smoke: bool = False,
                 progress: bool = True):
        from accelerate import Accelerator

        from cmgen.data import training_data
        from cmgen.generator import Generator
        from cmgen.methods import Dist, Nets, build_method, resolve_recipe
        from cmgen.rng import IndexSampler

        self.smoke, self.progress, self.out = smoke, progress, Path(out_dir)
        resume_ckpt = state_io.find_resume(self.out, resume)
        if resume_ckpt is not None:
            recipe = state_io.check_resume_recipe(recipe, resume_ckpt)
        if smoke:  # a method may swap stand-ins into its recipe (a tiny pipeline for a hub model)
            from cmgen.methods import method_class
            recipe = getattr(method_class(recipe), "smoke_recipe", lambda rec: rec)(recipe)
        self.recipe = r = resolve_recipe(recipe)
        t = r.train

        _reset_accelerator_state(t.mixed_precision)
        from cmgen.trackers import tracker_name
        log_with = tracker_name(t.log_with)
        # accelerate picks CUDA, MPS, XPU...; cpu=True only where there is none, so that a multi-process
        # launch on a CPU-only machine still gets gloo (accelerate needs the flag for that)
        self.accelerator = acc = Accelerator(mixed_precision=t.mixed_precision, cpu=not accelerator_present(),
                                             step_scheduler_with_optimizer=False, log_with=log_with,
                                             project_dir=str(self.out))
        self.world, self.rank, self.device = acc.num_processes, acc.process_index, acc.device
        self.is_main = acc.is_main_process
        per_step = self.world * t.grad_accum
        if t.batch_size % per_step:
            raise UserError(f"recipe key 'train.batch_size' ({t.batch_size}) must be divisible by processes x "
                            f"train.grad_accum ({self.world} x {t.grad_accum})")
        self.micro = t.batch_size // per_step
        if t.mixed_precision == "fp16" and self.device.type == "cpu":
            warnings.warn("train.mixed_precision=fp16 has no effect on the CPU (accelerate runs fp32 there); "
                          "use bf16 to exercise autocast on the CPU", stacklevel=2)
        if self.is_main:
            _check_writable(self.out)
        acc.wait_for_everyone()

        self.data, self.holdout = training_data(r, smoke)
        torch.manual_seed(t.seed)  # initial weights: the only use of the global RNG
        codec = None
        if smoke and self.data.kind == "latent":
            from cmgen.latents import codec_for
            codec = codec_for(r, smoke=True)
        self.gen = Generator.build(r, self.data.shape, self.data.num_classes, self.data.kind, codec=codec)
        if r.model.init_from and resume_ckpt is None:
            from cmgen.pretrained import load_init_weights
            load_init_weights(self.gen.net, r.model.init_from)
        self.method = build_method(r, self.gen)
        self.sampler = IndexSampler(len(self.data), t.seed)
        self.parts = {"model": self._part(self.gen.net, r.optim, t.ema_decay)}
        for name, part in self.method.parts().items():
            self.parts[name] = self._part(part.module, part.optim, part.ema_decay)
        self.targets = {name: TargetNetwork(self.gen.net, decay) for name, decay in self.method.targets().items()}
        self.step, self.nonfinite, self.pending, self.last_eval = 0, 0, {}, {}
        self.pending_count = {}  # steps that reported each term (a phase's terms come on its steps only)
        self.scaler_state, self.trackers_on = None, False
        if resume_ckpt is not None:
            state_io.read(self, resume_ckpt)
        for part in self.parts.values():
            part.module, part.optimizer = acc.prepare(part.module, part.optimizer)
            if part.ema is not None:   # built (and resumed) beside the weights on the CPU: it follows them
                part.ema.to(next(acc.unwrap_model(part.module).parameters()).device)
        self.gen.to(self.device)   # a latent model's codec (VAE and statistics) decodes on the training device
        self.model, self.optimizer = self.parts["model"].module, self.parts["model"].optimizer
        if self.scaler_state and getattr(acc, "scaler", None) is not None:
            acc.scaler.load_state_dict(self.scaler_state)
        frozen = {name: net.to(self.device).eval().requires_grad_(False) for name, net in self.method.frozen().items()}
        for target in self.targets.values():
            target.module.to(self.device)
        self.nets = Nets({name: part.module for name, part in self.parts.items()}
                         | {name: target.module for name, target in self.targets.items()} | frozen)
        self.dist = Dist(acc)
        self._eval_gen = None
        self._stream = None  # DataLoader workers (data.num_workers > 0)
        small = len(self.data) * int(torch.tensor(self.data.shape).prod()) * 4 < 2**30
        self._data_on_device = self.data.x.to(self.device) if small and not r.data.num_workers else None

    @staticmethod
    def _part(module, optim_cfg, ema_decay) -> TrainPart:
        params = [p for p in module.parameters() if p.requires_grad]
        return TrainPart(module, optim_cfg, make_optimizer(params, optim_cfg),
                         EMA(module, ema_decay) if ema_decay is not None else None)

    def save(self) -> Path:
        self.accelerator.wait_for_everyone()
        path = state_io.write(self) if self.is_main else None
        self.accelerator.wait_for_everyone()
        return path

    # ------------------------------------------------------------------ one step
    def _rng(self, micro_idx: int, phase: str):
        from cmgen.rng import BatchRNG

        t = self.recipe.train
        offset = (micro_idx * self.world + self.rank) * self.micro
        stream = None if phase == "model" else phase
        key = (self.rank, micro_idx) if stream is None else (self.rank, micro_idx, phase)
        return BatchRNG(t.seed, self.step, t.batch_size, offset, self.micro, self.device, dropout_key=key,
                        stream=stream)

    def _rows(self, micro_idx: int):
        """(x float on the device, labels) of this process's micro-batch `micro_idx` at this step."""
        from cmgen.data import to_float

        t, workers = self.recipe.train, self.recipe.data.num_workers
        if workers > 0:
            for _ in range(2):  # a stream started at another step (a test moved self.step) restarts once
                if self._stream is None:
                    from cmgen.data.loader import keyed_batches

                    offsets = [(m * self.world + self.rank) * self.micro for m in range(t.grad_accum)]
                    self._stream = keyed_batches(self.data, self.sampler, self.step, t.batch_size, offsets,
                                                 self.micro, workers, pin_memory=self.device.type == "cuda")
                step, m, x, y = next(self._stream)
                if (step, m) == (self.step, micro_idx):
                    break
                self._stream = None
            x = x.to(self.device, non_blocking=True)
        else:
            offset = (micro_idx * self.world + self.rank) * self.micro
            idx = self.sampler.indices(self.step, t.batch_size, offset, self.micro)
            if self._data_on_device is not None:
                x = self._data_on_device[idx.to(self.device)]
            else:
                x = self.data.batch(idx).to(self.device, non_blocking=True)
            y = None if self.data.labels is None else self.data.labels[idx]
        x = to_float(x) if x.dtype == torch.uint8 else x
        return x, (y.to(self.device) if self.gen.conditional else None)

    def _batch(self, micro_idx: int):
        from cmgen.methods import Batch

        x, y = self._rows(micro_idx)
        rng = self._rng(micro_idx, "model")
        if self.recipe.data.hflip and x.ndim == 4:
            flip = rng.rand() < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        return Batch(x, y, rng)

    def train_step(self) -> Optional[dict]:
        """One optimizer step of every phase. Returns the step's (process-averaged) loss terms, or None if
        every phase was skipped as non-finite."""
        t = self.recipe.train
        batches = [self._batch(m) for m in range(t.grad_accum)]
        with torch.no_grad():
            batches = self.method.collect(batches, self.nets, self.step, self.dist)
        out, bad_terms = {}, []
        for phase in self.method.phases(self.step):
            if phase not in self.parts:
                raise UserError(f"method phase '{phase}' names no trainable part (known: {', '.join(self.parts)})")
            if phase != "model":
                batches = [dataclasses.replace(b, rng=self._rng(m, phase), phase=phase) for m, b in enumerate(batches)]
            terms, bad = self._phase_step(phase, batches)
            prefix = "" if phase == "model" else f"{phase}/"
            if bad is not None:
                bad_terms.append(prefix + bad)
            else:
                out |= {prefix + k: v for k, v in terms.items()}
        if bad_terms:
            self.nonfinite += 1
            name = bad_terms[0]
            warnings.warn(f"step {self.step}: loss term '{name}' is not finite; step skipped "
                          f"({self.nonfinite} in a row, the run stops at {t.max_nonfinite})", stacklevel=2)
            if self.nonfinite >= t.max_nonfinite:
                raise NonFiniteLoss(f"{self.nonfinite} non-finite losses in a row (last: term '{name}' at step "
                                    f"{self.step}); lower optim.lr or use bf16 instead of fp16; the last good "
                                    "checkpoint is intact")
        else:
            self.nonfinite = 0
        self.step += 1
        return out or None

    def _phase_step(self, phase: str, batches) -> tuple[dict, Optional[str]]:
        """Accumulate one part's gradients over the micro-batches and step its optimizer.
        Returns (averaged terms with 'lr', None) or ({}, name of the non-finite term)."""
        acc, t, part = self.accelerator, self.recipe.train, self.parts[phase]
        lr = lr_at(self.step, part.optim, self.recipe.train.steps)
        for g in part.optimizer.param_groups:
            g["lr"] = lr
        for other in self.parts.values():  # a phase's loss may reach other parts: only its own grads count
            other.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        for m, batch in enumerate(batches):
            sync = m == len(batches) - 1
            ctx = acc.no_sync(part.module) if not sync and self.world > 1 else contextlib.nullcontext()
            # dropout and any other draw from the global RNG inside the loss: keyed by (seed, step, rank, micro-step)
            with ctx, same_dropout(batch.rng.dropout_seed, self.device):
                terms = self.method.loss(self.nets, batch, self.step)
                add_terms(sums, terms, self.device, t.grad_accum)
                # always backward, even on a non-finite loss: every process must join DDP's gradient
                # all-reduce; the check below discards the gradients before the optimizer sees them
                acc.backward(terms["loss"] / t.grad_accum)
        keys = sorted(sums)
        raw = torch.stack([sums[k] for k in keys])
        local_bad = ~torch.isfinite(raw)  # one check for all terms and micro-steps (NaN/Inf survive the sum)
        vec = torch.cat([torch.nan_to_num(raw, nan=0.0, posinf=0.0, neginf=0.0), local_bad.any().float()[None]])
        if self.world > 1:
            vec = acc.reduce(vec, reduction="sum")
            vec[:-1] /= self.world
        if vec[-1].item() > 0:
            part.optimizer.zero_grad(set_to_none=True)
            bad = [k for k, b in zip(keys, local_bad.tolist()) if b]
            # name the specific term, not just the total
            return {}, (next((k for k in bad if k != "loss"), bad[0]) if bad else "a loss term on another process")
        if part.optim.grad_clip > 0:
            acc.clip_grad_norm_(part.module.parameters(), part.optim.grad_clip)
        part.optimizer.step()
        part.optimizer.zero_grad(set_to_none=True)
        if not part.optimizer.step_was_skipped:
            module = acc.unwrap_model(part.module)
            if part.ema is not None:
                part.ema.update(module)
            if phase == "model":
                for target in self.targets.values():
                    target.update(module, self.step)
        return {k: float(v) for k, v in zip(keys, vec[:-1].tolist())} | {"lr": lr}, None

    # ------------------------------------------------------------------ outputs
    def eval_generator(self):
        """The Generator with the evaluation EMA weights, in eval mode (a copy; training is untouched)."""
        from cmgen.generator import Generator

        if self._eval_gen is None:
            net = copy.deepcopy(self.accelerator.unwrap_model(self.model)).eval()
            self._eval_gen = Generator(net, self.recipe, self.data.shape, self.data.num_classes, self.data.kind,
                                       codec=self.gen.codec)
        self._eval_gen.step = self.step
        self.parts["model"].ema.copy_to(self._eval_gen.net)
        return self._eval_gen

    def write_previews(self) -> list[Path]:
        from cmgen.plots import read_metrics, save_curve, save_samples
        from cmgen.sampling import generate

        r = self.recipe
        gen = self.eval_generator()
        out = []
        samples = self.out / "samples"
        samples.mkdir(exist_ok=True)
        ref = self.data.x if self.data.kind == "points" else None
        for steps in r.eval.steps:
            times = gen.times(steps)
            x = torch.cat([b for b, _ in generate(gen, r.train.sample_n, times, seed=0, device=self.device,
                                                   progress=False)])
            title = (f"step {self.step}, {steps}-step {gen.sampler().name} (NFE {gen.nfe(times)}), "
                     f"times {','.join(f'{s:.3g}' for s in times[:4])}{',...' if len(times) > 4 else ''}")
            path = samples / f"step-{self.step:08d}-{steps}step.png"
            save_samples(x, path, ref, title)
            latest = self.out / f"samples_{steps}step.png"
            save_samples(x, latest, ref, title)
            out += [path, latest]
        rows = read_metrics(self.out / "metrics.jsonl")
        curve = save_curve(rows, "loss", self.out / "loss.png", title=f"{r.name}: training loss")
        if curve:
            out.append(curve)
        for key in getattr(self.method, "curves", ()):  # a method's own logged terms worth a plot (rewards)
            curve = save_curve(rows, key, self.out / f"{key}.png", logy=False, title=f"{r.name}: {key}")
            if curve:
                out.append(curve)
        return out

    def _log(self, row: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.trackers_on:
            self.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    # ------------------------------------------------------------------ the loop
    def run(self, stop_after: Optional[int] = None) -> Path:
        acc, r, t = self.accelerator, self.recipe, self.recipe.train
        if self.is_main:
            (self.out / "recipe.yaml").write_text(dump_recipe(r))
            (self.out / "environment.json").write_text(json.dumps(ckpt_io.environment_info(), indent=2))
        from cmgen.trackers import start_trackers
        self.trackers_on = start_trackers(acc, r, self.out, self.step)
        end = t.steps if stop_after is None else min(t.steps, self.step + stop_after)
        bar = tqdm(total=t.steps, initial=self.step, desc=r.name, disable=not (self.progress and self.is_main),
                   dynamic_ncols=True, smoothing=0.05)
        while self.step < end:
            terms = self.train_step()
            if terms is not None:
                for k, v in terms.items():
                    self.pending[k] = self.pending.get(k, 0.0) + v
                    self.pending_count[k] = self.pending_count.get(k, 0) + 1
                bar.set_postfix(loss=f"{terms.get('loss', float('nan')):.4g}", N=int(terms.get("N", 0)) or None,
                                refresh=False)
            bar.update(1)
            step = self.step
            if step % t.log_every == 0 or step == t.steps:
                if self.is_main and self.pending:
                    row = {"step": step} | {k: v / self.pending_count[k] for k, v in sorted(self.pending.items())}
                    self._log(row)
                self.pending, self.pending_count = {}, {}
            if r.eval.every and (step % r.eval.every == 0 or step == t.steps):
                self._in_loop_eval()
            # no checkpoint inside a streak of skipped steps: the last good one stays the newest
            if (step % t.checkpoint_every == 0 or step == t.steps) and self.nonfinite == 0:
                self.save()
            if self.is_main and ((t.sample_every and step % t.sample_every == 0) or step == t.steps):
                self.write_previews()
        bar.close()
        self._stream = None  # stops the DataLoader workers
        if self.trackers_on:
            acc.end_training()
        acc.wait_for_everyone()
        return self.out

    def _in_loop_eval(self) -> None:
        """Every process samples its share of eval.n (cmgen.eval.sources.model_source); the main one writes."""
        from cmgen.eval.inloop import evaluate_during_training

        self.last_eval = evaluate_during_training(self.eval_generator(), self.recipe, self.data, self.holdout,
                                                  self.step, self.out, device=self.device, dist=self.dist)
        if self.trackers_on and self.last_eval:
            self.accelerator.log({f"eval/{k}": v for k, v in self.last_eval.items()}, step=self.step)
        self.accelerator.wait_for_everyone()


def accelerator_present() -> bool:
    """Whether torch sees a device accelerate can train on (CUDA/ROCm, MPS, XPU, NPU, MLU)."""
    from accelerate.utils import is_mlu_available, is_mps_available, is_npu_available, is_xpu_available

    return torch.cuda.is_available() or is_mps_available() or is_xpu_available() or is_npu_available() \
        or is_mlu_available()


def _reset_accelerator_state(mixed_precision: str) -> None:
    """accelerate keeps one process-wide state; a second run in the same process (a notebook, the
    tests) with another mixed_precision must reset it. The distributed part is left alone."""
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and str(AcceleratorState().mixed_precision) != mixed_precision:
        AcceleratorState._reset_state()


def add_terms(sums: dict, terms: dict, device, grad_accum: int) -> None:
    """Fold one micro-batch's logged terms into `sums` (their mean over the step), on the training device: a
    method may return counters made on the CPU beside a loss on the GPU."""
    for k, v in terms.items():
        sums[k] = sums.get(k, 0.0) + v.detach().float().to(device) / grad_accum


def train(recipe: Recipe, out_dir=None, resume: Optional[str] = None, smoke: bool = False, progress: bool = True,
          stop_after: Optional[int] = None) -> Path:
    """Train `recipe` into `out_dir` (default runs/<name>); returns the run folder."""
    out = Path(out_dir) if out_dir else default_run_dir(recipe)
    trainer = Trainer(recipe, out, resume=resume, smoke=smoke, progress=progress)
    return trainer.run(stop_after=stop_after)
