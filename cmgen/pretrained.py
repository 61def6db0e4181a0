"""Reading pretrained weights: diffusers pipeline and UNet folders, cached hub ids and name-matched
partial loads (a student initialised from its teacher, the rest fresh). Never downloads, never unpickles.

Nothing here imports the loop, the run loader or the exporter.
"""
from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from cmgen.errors import UserError
from cmgen.precond import ConsistencyDenoiser, PrecondConfig

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
SCHEDULERS = ("CMStochasticIterativeScheduler", "CMGenScheduler", "EDMEulerScheduler", "FlowMatchEulerDiscreteScheduler",
              "LCMScheduler")
# UNet config keys that may differ between the source and the recipe's model
_FREE_CONFIG_KEYS = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "dropout"}


def load_weights(model: torch.nn.Module, weights: dict, where: str) -> None:
    """Strict load with a one-line error when names or shapes do not fit the recipe's model.

    Frozen parameters (requires_grad False, e.g. a LoRA base loaded from model.init_from) may be absent:
    checkpoints store trainable parameters only."""
    own = model.state_dict()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    missing = [k for k in own if k not in weights and k not in frozen]
    unexpected = [k for k in weights if k not in own]
    if missing and not unexpected:
        from cmgen.models.two_time import is_s_branch

        if all(is_s_branch(k) for k in missing):
            raise UserError(f"weights in '{where}' have no s branch (time_embedding_s, time_emb_proj.s): they are a "
                            "one-time EDM network, not a CTM; use them as method.teacher of a ctm recipe")
    if missing or unexpected:
        name = (missing or unexpected)[0]
        raise UserError(f"weights in '{where}' do not fit the recipe's model ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected, e.g. '{name}'); check model.* in the recipe")
    for k, v in weights.items():
        if own[k].shape != v.shape:
            raise UserError(f"weights in '{where}' do not fit the recipe's model: '{k}' has shape "
                            f"{tuple(v.shape)}, the recipe builds {tuple(own[k].shape)}; check model.* in the recipe")
    model.load_state_dict(weights, strict=not frozen)


def load_matching(model: torch.nn.Module, weights: dict) -> tuple[list[str], list[str]]:
    """Copy every tensor whose name and shape match; returns (names left as initialised, names not used).

    The partial, name-matched load of CTM and LCD students from their teachers."""
    own = model.state_dict()
    take = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(take, strict=False)
    return sorted(k for k in own if k not in take), sorted(k for k in weights if k not in take)


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"'{path.parent}' has no {path.name}; it is not a complete {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"'{path}' is not valid JSON; the {what} is corrupt, export or download it again") from None
    if not isinstance(data, dict):
        raise UserError(f"'{path}' does not hold a JSON object; the {what} is corrupt, export or download it again")
    return data


def _network_class(library: str, name: str, where: str):
    """The class of a saved network; only diffusers' and cmgen's own modules are imported."""
    if not (library == "diffusers" or library == "cmgen" or library.startswith("cmgen.")):
        raise UserError(f"'{where}' uses the network class {library}.{name}, which cmgen cannot load; "
                        "pass a ConsistencyModelPipeline or a cmgen export")
    try:
        cls = getattr(importlib.import_module(library), name)
    except (ImportError, AttributeError):
        raise UserError(f"'{where}' needs the class {library}.{name}, which this cmgen/diffusers install does not "
                        "have; upgrade cmgen or re-export the model") from None
    return cls


def _load_network(cls, folder: Path, where: str):
    has = [p.name for p in folder.glob("diffusion_pytorch_model*")] if folder.is_dir() else []
    if not any(".safetensors" in n for n in has):
        found = f" (it has {', '.join(sorted(has))})" if has else ""
        raise UserError(f"'{folder}' has no safetensors weights{found}; cmgen never unpickles, so convert "
                        f"'{where}' with diffusers' save_pretrained(safe_serialization=True)")
    try:
        return cls.from_pretrained(folder, use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as exc:  # corrupt or mismatched files
        raise UserError(f"diffusers could not load '{folder}' ({str(exc).splitlines()[0][:100]}); export or "
                        "download it again") from None


def read_pipeline_parts(path) -> tuple[dict, object, dict]:
    """(model_index, network, scheduler config) of a consistency pipeline folder or a cmgen EDM/flow export."""
    folder = Path(path)
    index = _read_json(folder / "model_index.json", "diffusers pipeline folder")
    entry = index.get("unet")
    if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(v, str) for v in entry)):
        raise UserError(f"'{folder}' is a {index.get('_class_name', 'diffusers')} pipeline without a 'unet'; "
                        "cmgen loads consistency-model pipelines (ConsistencyModelPipeline or a cmgen export)")
    sched = _read_json(folder / "scheduler" / "scheduler_config.json", "diffusers pipeline folder")
    if sched.get("_class_name") not in SCHEDULERS:
        raise UserError(f"'{folder}' uses the scheduler {sched.get('_class_name')}, not a consistency-model "
                        f"scheduler ({', '.join(SCHEDULERS)}); cmgen cannot sample it")
    network = _load_network(_network_class(*entry, str(folder)), folder / "unet", str(folder))
    return index, network, sched


def load_init_weights(model: ConsistencyDenoiser, init_from: str) -> None:
    """Load `model.init_from` (pipeline folder, UNet folder or cached hub id) into `model`'s UNet."""
    if getattr(model.backbone, "loads_itself", False):  # an SD3 backbone read init_from when it was built
        return
    unet = getattr(model.backbone, "unet", None)
    if unet is None:
        raise UserError("recipe key 'model.init_from' needs model.arch=unet; remove it for other architectures")
    folder = resolve_init_source(init_from)
    net_dir, sched = _network_folder(folder, init_from)
    where = f"model.init_from '{init_from}'"
    _check_same_network(_read_json(net_dir / "config.json", "diffusers UNet folder"), unet, where)
    if sched is not None:
        _check_same_precond(sched, model.cfg, where)
    weights = _read_safetensors(net_dir, where)
    load_weights(model, {f"backbone.unet.{k}": v for k, v in weights.items()}, where)


def resolve_init_source(init_from: str) -> Path:
    """A local folder, or the cached snapshot of a hub id; never downloads."""
    path = Path(init_from).expanduser()
    if path.exists():
        return path
    if not HUB_ID.match(init_from):
        raise UserError(f"recipe key 'model.init_from' ('{init_from}') is neither an existing folder nor a hub id "
                        "like openai/diffusers-ct_imagenet64; fix the path")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(init_from, local_files_only=True))
    except Exception:  # any miss (not cached, bad cache) is the same fix for the user
        raise UserError(f"recipe key 'model.init_from' names the hub id '{init_from}', which is not in the local "
                        f"Hugging Face cache and cmgen never downloads; run `hf download {init_from}` once while "
                        "online, or pass a local folder") from None


def _network_folder(folder: Path, init_from: str) -> tuple[Path, Optional[dict]]:
    """(folder holding config.json + weights, scheduler config or None) of a pipeline or UNet folder."""
    if (folder / "model_index.json").is_file():
        if "unet" not in _read_json(folder / "model_index.json", "diffusers pipeline folder"):
            raise UserError(f"recipe key 'model.init_from' ('{init_from}') is a pipeline without a 'unet' "
                            "component; pass a consistency-model pipeline or a UNet folder")
        sched_file = folder / "scheduler" / "scheduler_config.json"
        return folder / "unet", (_read_json(sched_file, "diffusers pipeline") if sched_file.is_file() else None)
    if (folder / "config.json").is_file():
        return folder, None
    raise UserError(f"recipe key 'model.init_from' ('{init_from}') is not a diffusers pipeline folder "
                    "(model_index.json) or UNet folder (config.json); point it at one of those")


def _plain(value):
    return json.loads(json.dumps(value))  # tuples -> lists, as in a saved config


def _effective_config(cfg: dict) -> dict:
    """Resolve the one default UNet2DModel decides itself, so equal networks compare equal."""
    if cfg.get("attn_norm_num_groups") is None and "norm_num_groups" in cfg:
        # None = the mid-block attention normalises with norm_num_groups, but only for "default" time shift
        scale_shift = cfg.get("resnet_time_scale_shift", "default") != "default"
        cfg = {**cfg, "attn_norm_num_groups": None if scale_shift else cfg["norm_num_groups"]}
    return cfg


def _check_same_network(theirs: dict, unet, where: str) -> None:
    ours_class = type(unet).__name__
    their_class = theirs.get("_class_name", ours_class)
    if their_class != ours_class:
        hint = "set model.norm=nsln" if their_class == "NsLNUNet2DModel" else "set model.norm=group"
        raise UserError(f"{where} holds a {their_class} but the recipe builds a {ours_class}; {hint}")
    ours, theirs = _effective_config(dict(unet.config)), _effective_config(theirs)
    for key, value in theirs.items():
        if key in _FREE_CONFIG_KEYS or key not in ours:
            continue
        if _plain(value) != _plain(ours[key]):
            raise UserError(f"{where} holds a UNet with {key}={_plain(value)!r} but the recipe builds "
                            f"{key}={_plain(ours[key])!r}; set the matching model.* keys (e.g. model.preset)")


def _check_same_precond(sched: dict, p: PrecondConfig, where: str) -> None:
    for key in ("sigma_min", "sigma_max", "sigma_data"):
        if key in sched and not np.isclose(float(sched[key]), getattr(p, key), rtol=1e-6, atol=0):
            raise UserError(f"{where} was trained with {key}={sched[key]} but the recipe has "
                            f"precond.{key}={getattr(p, key)}; set precond.{key}={sched[key]}")


def _read_safetensors(folder: Path, where: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    files = ([folder / f for f in sorted(set(_read_json(index, "sharded checkpoint")["weight_map"].values()))]
             if index.is_file() else [folder / "diffusion_pytorch_model.safetensors"])
    if not all(f.is_file() for f in files):
        raise UserError(f"{where} has no diffusion_pytorch_model.safetensors in '{folder}'; cmgen never unpickles "
                        ".bin weights, so re-save them with diffusers' save_pretrained(safe_serialization=True)")
    weights = {}
    for f in files:
        try:
            weights.update(load_file(str(f)))
        except Exception as exc:  # safetensors raises several types for a damaged file
            raise UserError(f"{where}: '{f}' is not a valid safetensors file ({str(exc).splitlines()[0][:80]}); "
                            "download or export it again") from None
    return weights


def load_vae(source: str, what: str = "--vae"):
    """A diffusers AutoencoderKL from a VAE folder, a pipeline folder with a vae/ component, or a cached
    hub id (e.g. stabilityai/sd-vae-ft-ema); safetensors only, never downloads."""
    from diffusers import AutoencoderKL

    path = Path(source).expanduser()
    if not path.exists():
        if not HUB_ID.match(source):
            raise UserError(f"{what} '{source}' is neither an existing folder nor a hub id like "
                            "stabilityai/sd-vae-ft-ema; fix the path")
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(source, local_files_only=True))
        except Exception:  # not cached, or a broken cache: the same fix
            raise UserError(f"{what} names the hub id '{source}', which is not in the local Hugging Face cache and "
                            f"cmgen never downloads; run `hf download {source}` once while online, or pass a "
                            "local folder") from None
    if (path / "model_index.json").is_file():
        path = path / "vae"
    if not (path / "config.json").is_file():
        raise UserError(f"{what} '{source}' is not a diffusers AutoencoderKL folder (config.json) or a pipeline "
                        "folder with a vae/ component; point it at one of those")
    cls = _read_json(path / "config.json", "diffusers VAE folder").get("_class_name")
    if cls != "AutoencoderKL":
        raise UserError(f"{what} '{source}' holds a {cls}, not an AutoencoderKL; pass a KL VAE such as "
                        "stabilityai/sd-vae-ft-ema")
    return _load_network(AutoencoderKL, path, source).eval().requires_grad_(False)
