"""The one training loop (accelerate): every method runs through it unchanged.

Per optimizer step: for each micro-batch, the method's loss on this process's slice of the
global batch; a non-finite check across processes; backward with accumulation; clip; step;
EMA. All randomness is keyed by (seed, step) (cmgen.rng), so a resumed or multi-process
run draws what a straight single-process run draws.
"""
from __future__ import annotations

import contextlib
import copy
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
from cmgen.ema import EMA
from cmgen.errors import UserError
from cmgen.recipe import Recipe, dump_recipe, from_tree, read_yaml

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


def lr_at(step: int, cfg) -> float:
    if cfg.warmup_steps > 0:
        return cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps)
    return cfg.lr


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


class Trainer:
    """Owns the state of one run; `run()` trains to recipe.train.steps (or `stop_after` steps)."""

    def __init__(self, recipe: Recipe, out_dir: Path, resume: Optional[str] = None, smoke: bool = False,
                 progress: bool = True):
        from accelerate import Accelerator

        self.smoke = smoke
        self.progress = progress
        out_dir = Path(out_dir)
        resume_ckpt = self._find_resume(out_dir, resume)
        if resume_ckpt is not None:
            recipe = self._resume_recipe(recipe, resume_ckpt)
        self.recipe = r = recipe
        t = r.train

        _reset_accelerator_state(t.mixed_precision)
        self.accelerator = acc = Accelerator(mixed_precision=t.mixed_precision, cpu=not torch.cuda.is_available(),
                                             step_scheduler_with_optimizer=False)
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
        self.out = out_dir
        if self.is_main:
            _check_writable(out_dir)
        acc.wait_for_everyone()

        from cmgen.data import Dataset, load_dataset, random_images, shape_of

        if smoke:
            shape, ncls, kind = shape_of(r.data)
            if kind == "points":
                from cmgen.data import toy2d
                self.data = toy2d(r.data.toy, 256, t.seed)
            else:
                self.data = random_images(shape[0], shape[1], ncls, n=max(8, t.batch_size), seed=t.seed)
            self.holdout: Optional[Dataset] = None
        else:
            self.data, self.holdout = load_dataset(r.data, t.seed)
        if r.model.class_conditional and not self.data.num_classes:
            raise UserError("recipe key 'model.class_conditional' is true but the data have no labels")

        from cmgen.methods import build_method
        from cmgen.models import build_denoiser
        from cmgen.rng import IndexSampler

        torch.manual_seed(t.seed)  # initial weights: the only use of the global RNG
        model = build_denoiser(r, self.data.shape, self.data.num_classes)
        if r.model.init_from and resume_ckpt is None:
            from cmgen.export import load_init_weights
            load_init_weights(model, r.model.init_from)
        self.method = build_method(r, self.data.shape)
        self.sampler = IndexSampler(len(self.data), t.seed)
        optimizer = make_optimizer(model.parameters(), r.optim)
        self.ema = EMA(model, t.ema_decay)
        self.step = 0
        self.nonfinite = 0
        self.pending: dict[str, float] = {}
        self.pending_n = 0
        self.last_eval: dict = {}
        if resume_ckpt is not None:
            self._load(resume_ckpt, model, optimizer)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        scaler_state = getattr(self, "_scaler_state", None)
        if scaler_state and getattr(acc, "scaler", None) is not None:
            acc.scaler.load_state_dict(scaler_state)
        self._eval_model = None
        self._data_on_device = self.data.x.to(self.device) if self.data.x.numel() * 4 < 2**30 else None

    # ------------------------------------------------------------------ resume
    @staticmethod
    def _find_resume(out_dir: Path, resume: Optional[str]) -> Optional[Path]:
        if resume is None:
            if ckpt_io.list_checkpoints(out_dir):
                raise UserError(f"run folder '{out_dir}' already holds checkpoints; pass --resume auto to continue "
                                "it or --out a new folder")
            return None
        if resume == "auto":
            found = ckpt_io.list_checkpoints(out_dir)
            return found[-1] if found else None
        from cmgen.runs import resolve_checkpoint
        return resolve_checkpoint(resume)

    # keys that may differ between a run and its resumption; anything else must match
    RESUMABLE = ("train.steps", "train.checkpoint_every", "train.keep_last", "train.log_every",
                 "train.sample_every", "train.sample_n", "train.max_nonfinite", "train.threads", "eval.")

    def _resume_recipe(self, recipe: Recipe, ckpt: Path) -> Recipe:
        from cmgen.recipe import recipe_to_dict

        saved = from_tree(read_yaml(ckpt / "recipe.yaml"))
        new, old = recipe_to_dict(recipe), recipe_to_dict(saved)

        def flat(d, prefix=""):
            for k, v in d.items():
                key = f"{prefix}{k}"
                if isinstance(v, dict):
                    yield from flat(v, key + ".")
                else:
                    yield key, v

        fo, fn = dict(flat(old)), dict(flat(new))
        for key, value in fn.items():
            if key in ("name", "description"):
                continue
            if fo.get(key) != value and not any(key == k or (k.endswith(".") and key.startswith(k))
                                                 for k in self.RESUMABLE):
                raise UserError(f"recipe key '{key}' is {value!r} but the checkpoint '{ckpt}' was trained with "
                                f"{fo.get(key)!r}; resume with the same recipe or start a new --out")
        return recipe

    def _load(self, ckpt: Path, model, optimizer) -> None:
        from cmgen.runs import load_weights

        state = ckpt_io.read_state(ckpt)
        if tuple(state["data_shape"]) != tuple(self.data.shape):
            raise UserError(f"checkpoint '{ckpt}' was trained on data of shape {state['data_shape']}, "
                            f"the recipe's data have {list(self.data.shape)}")
        load_weights(model, ckpt_io.load_tensors(ckpt / "model.safetensors"), str(ckpt))
        self.ema.load_state_dict(ckpt_io.load_tensors(ckpt / "ema.safetensors"))
        opt_meta = json.loads((ckpt / "optimizer.json").read_text())
        optimizer.load_state_dict(ckpt_io.optimizer_from_flat(ckpt_io.load_tensors(ckpt / "optimizer.safetensors"),
                                                              opt_meta))
        self.step = int(state["step"])
        self.nonfinite = int(state.get("nonfinite", 0))
        self.pending = dict(state.get("pending", {}))
        self.pending_n = int(state.get("pending_n", 0))
        self.last_eval = dict(state.get("last_eval", {}))
        self._scaler_state = state.get("scaler")
        if self.is_main:
            self._truncate_metrics(self.step)
            log.info("resumed from %s at step %d", ckpt, self.step)

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines a crashed run wrote after its last checkpoint."""
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(l + "\n" for l in keep))
        os.replace(tmp, path)

    # ------------------------------------------------------------------ saving
    def save(self) -> Path:
        acc = self.accelerator
        acc.wait_for_everyone()
        path = None
        if self.is_main:
            model = acc.unwrap_model(self.model)
            weights = model.state_dict()
            ema = dict(weights) | self.ema.state_dict()
            opt_tensors, opt_meta = ckpt_io.optimizer_to_flat(self.optimizer.optimizer.state_dict()
                                                              if hasattr(self.optimizer, "optimizer")
                                                              else self.optimizer.state_dict())
            scaler = getattr(acc, "scaler", None)
            state = {"step": self.step, "nonfinite": self.nonfinite, "pending": self.pending,
                     "pending_n": self.pending_n, "last_eval": self.last_eval,
                     "data_shape": list(self.data.shape), "num_classes": self.data.num_classes,
                     "data_kind": self.data.kind,
                     "scaler": None if scaler is None else {k: (v.item() if torch.is_tensor(v) else v)
                                                             for k, v in scaler.state_dict().items()}}
            path = ckpt_io.save_checkpoint(
                self.out, self.step, {"model": weights, "ema": ema, "optimizer": opt_tensors}, state,
                dump_recipe(self.recipe), extra_files={"optimizer.json": json.dumps(opt_meta)})
            ckpt_io.prune_checkpoints(self.out, self.recipe.train.keep_last)
        acc.wait_for_everyone()
        return path

    # ------------------------------------------------------------------ one step
    def _batch(self, micro_idx: int):
        t = self.recipe.train
        offset = (micro_idx * self.world + self.rank) * self.micro
        idx = self.sampler.indices(self.step, t.batch_size, offset, self.micro)
        src = self._data_on_device if self._data_on_device is not None else self.data.x
        x = src[idx.to(src.device)].to(self.device, non_blocking=True)
        y = None
        if self.recipe.model.class_conditional:
            y = self.data.labels[idx].to(self.device)
        from cmgen.rng import BatchRNG

        rng = BatchRNG(t.seed, self.step, t.batch_size, offset, self.micro, self.device,
                       dropout_key=(self.rank, micro_idx))
        if self.recipe.data.hflip and x.ndim == 4:
            flip = rng.rand() < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        return x, y, rng

    def train_step(self) -> Optional[dict]:
        """One optimizer step. Returns the step's (process-averaged) loss terms, or None if skipped."""
        acc, t = self.accelerator, self.recipe.train
        lr = lr_at(self.step, self.recipe.optim)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        sums: dict[str, torch.Tensor] = {}
        for m in range(t.grad_accum):
            x, y, rng = self._batch(m)
            sync = m == t.grad_accum - 1
            ctx = acc.no_sync(self.model) if not sync and self.world > 1 else contextlib.nullcontext()
            with ctx:
                terms = self.method.loss(self.model, x, y, self.step, rng)
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float() / t.grad_accum
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
        any_bad = vec[-1].item() > 0
        if any_bad:
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite += 1
            bad = [k for k, b in zip(keys, local_bad.tolist()) if b]
            # name the specific term, not just the total
            name = next((k for k in bad if k != "loss"), bad[0]) if bad else "a loss term on another process"
            warnings.warn(f"step {self.step}: loss term '{name}' is not finite; step skipped "
                          f"({self.nonfinite} in a row, the run stops at {t.max_nonfinite})", stacklevel=2)
            if self.nonfinite >= t.max_nonfinite:
                raise NonFiniteLoss(f"{self.nonfinite} non-finite losses in a row (last: term '{name}' at step {self.step}); "
                                    "lower optim.lr or use bf16 instead of fp16; the last good checkpoint is intact")
            self.step += 1
            return None
        self.nonfinite = 0
        if self.recipe.optim.grad_clip > 0:
            acc.clip_grad_norm_(self.model.parameters(), self.recipe.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not acc.optimizer_step_was_skipped:
            self.ema.update(acc.unwrap_model(self.model))
        self.step += 1
        out = {k: float(v) for k, v in zip(keys, vec[:-1].tolist())}
        out["lr"] = lr
        return out

    # ------------------------------------------------------------------ outputs
    def eval_model(self):
        """A copy of the network holding the EMA weights, in eval mode."""
        if self._eval_model is None:
            self._eval_model = copy.deepcopy(self.accelerator.unwrap_model(self.model)).eval()
        self.ema.copy_to(self._eval_model)
        return self._eval_model

    def write_previews(self) -> list[Path]:
        from cmgen.plots import read_metrics, save_curve, save_samples
        from cmgen.sampling import default_sigmas, generate

        r = self.recipe
        model = self.eval_model()
        out = []
        samples = self.out / "samples"
        samples.mkdir(exist_ok=True)
        ref = self.data.x if self.data.kind == "points" else None
        for steps in (1, 2):
            sigmas = default_sigmas(r, steps)
            x = torch.cat([b for b, _ in generate(model, r.train.sample_n, self.data.shape, sigmas, seed=0,
                                                   num_classes=self.data.num_classes if r.model.class_conditional else 0,
                                                   sigma_min=r.precond.sigma_min, device=self.device,
                                                   clip_denoised=r.sample.clip_denoised and self.data.kind == "image",
                                                   progress=False)])
            title = f"step {self.step}, {steps}-step, sigmas {','.join(f'{s:g}' for s in sigmas)}"
            path = samples / f"step-{self.step:08d}-{steps}step.png"
            save_samples(x, path, ref, title)
            latest = self.out / f"samples_{steps}step.png"
            save_samples(x, latest, ref, title)
            out += [path, latest]
        rows = read_metrics(self.out / "metrics.jsonl")
        curve = save_curve(rows, "loss", self.out / "loss.png", title=f"{r.name}: training loss")
        if curve:
            out.append(curve)
        return out

    def _log(self, row: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    # ------------------------------------------------------------------ the loop
    def run(self, stop_after: Optional[int] = None) -> Path:
        acc, r, t = self.accelerator, self.recipe, self.recipe.train
        if self.is_main:
            (self.out / "recipe.yaml").write_text(dump_recipe(r))
            (self.out / "environment.json").write_text(json.dumps(ckpt_io.environment_info(), indent=2))
        end = t.steps if stop_after is None else min(t.steps, self.step + stop_after)
        bar = tqdm(total=t.steps, initial=self.step, desc=r.name, disable=not (self.progress and self.is_main),
                   dynamic_ncols=True, smoothing=0.05)
        while self.step < end:
            terms = self.train_step()
            if terms is not None:
                for k, v in terms.items():
                    self.pending[k] = self.pending.get(k, 0.0) + v
                self.pending_n += 1
                bar.set_postfix(loss=f"{terms['loss']:.4g}", N=int(terms.get("N", 0)) or None, refresh=False)
            bar.update(1)
            step = self.step
            if step % t.log_every == 0 or step == t.steps:
                if self.is_main and self.pending_n:
                    row = {"step": step} | {k: v / self.pending_n for k, v in sorted(self.pending.items())}
                    self._log(row)
                self.pending, self.pending_n = {}, 0
            if r.eval.every and (step % r.eval.every == 0 or step == t.steps):
                self._in_loop_eval()
            # no checkpoint inside a streak of skipped steps: the last good one stays the newest
            if (step % t.checkpoint_every == 0 or step == t.steps) and self.nonfinite == 0:
                self.save()
            if self.is_main and ((t.sample_every and step % t.sample_every == 0) or step == t.steps):
                self.write_previews()
        bar.close()
        acc.wait_for_everyone()
        return self.out

    def _in_loop_eval(self) -> None:
        if not self.is_main:
            self.accelerator.wait_for_everyone()
            return
        from cmgen.eval.inloop import evaluate_during_training

        result = evaluate_during_training(self.eval_model(), self.recipe, self.data, self.holdout, self.step,
                                          self.out, device=self.device)
        self.last_eval = result
        self.accelerator.wait_for_everyone()


def _reset_accelerator_state(mixed_precision: str) -> None:
    """accelerate keeps one process-wide state; a second run in the same process (a notebook, the
    tests) with another mixed_precision must reset it. The distributed part is left alone."""
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and str(AcceleratorState().mixed_precision) != mixed_precision:
        AcceleratorState._reset_state()


def train(recipe: Recipe, out_dir=None, resume: Optional[str] = None, smoke: bool = False, progress: bool = True,
          stop_after: Optional[int] = None) -> Path:
    """Train `recipe` into `out_dir` (default runs/<name>); returns the run folder."""
    out = Path(out_dir) if out_dir else default_run_dir(recipe)
    trainer = Trainer(recipe, out, resume=resume, smoke=smoke, progress=progress)
    return trainer.run(stop_after=stop_after)
