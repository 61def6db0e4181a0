"""Training state on disk: which checkpoint to resume, whether its recipe allows it, and every
trainable part, optimizer, EMA and target network as safetensors (frozen networks are never written).

Layout of `checkpoints/step-N/` (the model's files keep the names they had before parts existed):
  model.safetensors, ema.safetensors, optimizer.safetensors + optimizer.json    the model
  <part>.safetensors, <part>-ema.safetensors, <part>-optimizer.safetensors/.json  each extra part
  target-<name>.safetensors                                                       each target network
  state.json (step, counters, data shape, parts, targets), recipe.yaml, environment.json
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import torch

from cmgen import checkpoint as ckpt_io
from cmgen.errors import UserError

log = logging.getLogger("cmgen")

# keys that may differ between a run and its resumption; anything else must match
RESUMABLE = ("train.steps", "train.checkpoint_every", "train.keep_last", "train.log_every",
             "train.sample_every", "train.sample_n", "train.max_nonfinite", "train.threads", "train.log_with",
             "data.num_workers", "data.cache", "eval.")


def find_resume(out_dir: Path, resume: Optional[str]) -> Optional[Path]:
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


def _flat(d, prefix=""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _flat(v, key + ".")
        else:
            yield key, v


def check_resume_recipe(recipe, ckpt: Path):
    """The recipe, if only RESUMABLE keys differ from the checkpoint's; else a one-line error.

    Method defaults fixed at the run's start (Method.resolve, e.g. iCT's K) come from the checkpoint:
    a method key left unset (None) takes the stored value, computed from the stored recipe."""
    from cmgen.methods import resolve_recipe
    from cmgen.recipe import from_tree, read_yaml, recipe_to_dict

    saved = resolve_recipe(from_tree(read_yaml(ckpt / "recipe.yaml")))
    fo, fn = dict(_flat(recipe_to_dict(saved))), dict(_flat(recipe_to_dict(recipe)))
    fixed = {k: fo[k] for k, v in fn.items() if k.startswith("method.") and v is None and fo.get(k) is not None}
    if fixed:
        from dataclasses import replace

        recipe = replace(recipe, method=replace(recipe.method, **{k.split(".", 1)[1]: v for k, v in fixed.items()}))
        fn.update(fixed)
    for key, value in fn.items():
        if key in ("name", "description"):
            continue
        if fo.get(key) != value and not any(key == k or (k.endswith(".") and key.startswith(k))
                                                   for k in RESUMABLE):
            raise UserError(f"recipe key '{key}' is {value!r} but the checkpoint '{ckpt}' was trained with "
                            f"{fo.get(key)!r}; resume with the same recipe or start a new --out")
    return recipe


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines a crashed run wrote after its last checkpoint."""
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


def trainable_state(module: torch.nn.Module, like: Optional[torch.nn.Module] = None) -> dict[str, torch.Tensor]:
    """state_dict without frozen parameters (e.g. a LoRA base): what a checkpoint stores. `like` names the
    network whose frozen parameters count (a target network is a frozen copy of the model)."""
    frozen = {n for n, p in (like or module).named_parameters() if not p.requires_grad}
    return {k: v for k, v in module.state_dict().items() if k not in frozen}


def _file_prefix(name: str) -> str:
    return "" if name == "model" else f"{name}-"


def _optimizer_state(opt):
    inner = getattr(opt, "optimizer", opt)
    return inner.state_dict()


def write(trainer) -> Path:
    """Write every part, optimizer, EMA and target of `trainer` as one atomic checkpoint."""
    from cmgen.recipe import dump_recipe

    acc = trainer.accelerator
    tensors, files = {}, {}
    for name, part in trainer.parts.items():
        weights = trainable_state(acc.unwrap_model(part.module))
        tensors["model" if name == "model" else name] = weights
        if part.ema is not None:
            tensors["ema" if name == "model" else f"{name}-ema"] = dict(weights) | part.ema.state_dict()
        opt_tensors, opt_meta = ckpt_io.optimizer_to_flat(_optimizer_state(part.optimizer))
        tensors[f"{_file_prefix(name)}optimizer"] = opt_tensors
        files[f"{_file_prefix(name)}optimizer.json"] = json.dumps(opt_meta)
    model = acc.unwrap_model(trainer.parts["model"].module)
    for name, target in trainer.targets.items():
        tensors[f"target-{name}"] = trainable_state(target.module, like=model)
    scaler = getattr(acc, "scaler", None)
    state = {"step": trainer.step, "nonfinite": trainer.nonfinite, "pending": trainer.pending,
             "pending_count": trainer.pending_count, "last_eval": trainer.last_eval,
             "data_shape": list(trainer.data.shape), "num_classes": trainer.data.num_classes,
             "data_kind": trainer.data.kind,
             "scaler": None if scaler is None else {k: (v.item() if torch.is_tensor(v) else v)
                                                     for k, v in scaler.state_dict().items()}}
    extra_parts = [n for n in trainer.parts if n != "model"]
    if extra_parts or trainer.targets:
        state |= {"parts": extra_parts, "targets": sorted(trainer.targets)}
    path = ckpt_io.save_checkpoint(trainer.out, trainer.step, tensors, state, dump_recipe(trainer.recipe),
                                   extra_files=files)
    ckpt_io.prune_checkpoints(trainer.out, trainer.recipe.train.keep_last)
    return path


def read(trainer, ckpt: Path) -> None:
    """Load every part (before accelerate wraps them), optimizer, EMA, target and counter from `ckpt`."""
    from cmgen.runs import load_weights

    state = ckpt_io.read_state(ckpt)
    if tuple(state["data_shape"]) != tuple(trainer.data.shape):
        raise UserError(f"checkpoint '{ckpt}' was trained on data of shape {state['data_shape']}, "
                        f"the recipe's data have {list(trainer.data.shape)}")
    for name, part in trainer.parts.items():
        base = "model" if name == "model" else name
        load_weights(part.module, ckpt_io.load_tensors(ckpt / f"{base}.safetensors"), str(ckpt))
        if part.ema is not None:
            ema_file = "ema.safetensors" if name == "model" else f"{name}-ema.safetensors"
            part.ema.load_state_dict(ckpt_io.load_tensors(ckpt / ema_file))
        prefix = _file_prefix(name)
        meta_file = ckpt / f"{prefix}optimizer.json"
        if not meta_file.is_file():
            raise UserError(f"checkpoint '{ckpt}' has no {meta_file.name}; it was written by a run without the "
                            f"part '{name}', start a new --out")
        try:
            opt_meta = json.loads(meta_file.read_text())
        except (ValueError, UnicodeDecodeError):
            raise UserError(f"checkpoint '{ckpt}' has a corrupt {meta_file.name}; resume from an older checkpoint "
                            "(--resume checkpoints/step-N)") from None
        part.optimizer.load_state_dict(ckpt_io.optimizer_from_flat(
            ckpt_io.load_tensors(ckpt / f"{prefix}optimizer.safetensors"), opt_meta))
    for name, target in trainer.targets.items():
        load_weights(target.module, ckpt_io.load_tensors(ckpt / f"target-{name}.safetensors"), str(ckpt))
    trainer.step = int(state["step"])
    trainer.nonfinite = int(state.get("nonfinite", 0))
    trainer.pending = dict(state.get("pending", {}))
    # older states count the steps once (pending_n) for every term
    counts = state.get("pending_count", {k: state.get("pending_n", 0) for k in trainer.pending})
    trainer.pending_count = {k: int(v) for k, v in counts.items()}
    trainer.last_eval = dict(state.get("last_eval", {}))
    trainer.scaler_state = state.get("scaler")
    if trainer.is_main:
        truncate_metrics(trainer.out / "metrics.jsonl", trainer.step)
        log.info("resumed from %s at step %d", ckpt, trainer.step)
