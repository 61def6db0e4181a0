"""Finding and loading trained models: a run folder, a checkpoint folder or a diffusers pipeline."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from cmgen.checkpoint import list_checkpoints, load_tensors, read_state
from cmgen.errors import UserError


@dataclass
class LoadedModel:
    model: torch.nn.Module           # the consistency function f(x, sigma, labels), eval mode
    recipe: object                   # the recipe it was trained with
    shape: tuple[int, ...]
    num_classes: int
    kind: str                        # image | points
    step: Optional[int]
    source: Path


def resolve_checkpoint(path) -> Path:
    """A checkpoint folder, or the newest complete checkpoint of a run folder."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"'{path}' does not exist; pass a run folder, a checkpoints/step-N folder or a pipeline folder")
    if (p / "state.json").is_file():
        return p
    ckpts = list_checkpoints(p)
    if ckpts:
        return ckpts[-1]
    raise UserError(f"'{path}' holds no complete cmgen checkpoint (checkpoints/step-N/state.json)")


def is_pipeline_dir(path) -> bool:
    return (Path(path) / "model_index.json").is_file()


def load_model(path, ema: bool = True, device="cpu") -> LoadedModel:
    """Load a run, checkpoint or diffusers pipeline folder as a consistency function."""
    if is_pipeline_dir(path):
        from cmgen.export import load_pipeline_model

        return load_pipeline_model(path, device=device)
    from cmgen.models import build_denoiser
    from cmgen.recipe import from_tree, read_yaml

    ckpt = resolve_checkpoint(path)
    state = read_state(ckpt)
    recipe = from_tree(read_yaml(ckpt / "recipe.yaml"))
    shape, num_classes = tuple(state["data_shape"]), int(state["num_classes"])
    model = build_denoiser(recipe, shape, num_classes)
    weights = load_tensors(ckpt / ("ema.safetensors" if ema else "model.safetensors"))
    load_weights(model, weights, str(ckpt))
    model.to(device).eval()
    return LoadedModel(model, recipe, shape, num_classes, state.get("data_kind", "image"), state["step"], ckpt)


def load_weights(model: torch.nn.Module, weights: dict, where: str) -> None:
    """Strict load with a one-line error when names or shapes do not fit the recipe's model."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    if missing or unexpected:
        name = (missing or unexpected)[0]
        raise UserError(f"weights in '{where}' do not fit the recipe's model ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected, e.g. '{name}'); check model.* in the recipe")
    for k, v in weights.items():
        if own[k].shape != v.shape:
            raise UserError(f"weights in '{where}' do not fit the recipe's model: '{k}' has shape "
                            f"{tuple(v.shape)}, the recipe builds {tuple(own[k].shape)}; check model.* in the recipe")
    model.load_state_dict(weights)
