"""cmgen <-> diffusers: export a run as a pipeline folder, load pipelines and UNets back.

Export picks the stock path when diffusers can express the model (a plain `UNet2DModel`:
`ConsistencyModelPipeline` + `CMStochasticIterativeScheduler`, loadable with diffusers alone)
and cmgen's pipeline classes otherwise (e.g. NsLN UNets; see cmgen.pipelines).

Two-step sampling on the stock scheduler. `CMStochasticIterativeScheduler` only evaluates at
points of its Karras grid sigma_i = (max^(1/rho) + i/(N-1) (min^(1/rho) - max^(1/rho)))^rho
(i counted from sigma_max), selected by `timesteps=[i, 0]`. A recipe's sigma_mid (0.821) lies
on no grid exactly, so export keeps sigma_min, sigma_max and rho and searches the smallest N
with an index i whose grid point equals sigma_mid in float32 *and* whose timestep
250 ln(sigma_i), computed by the scheduler in float64 and rounded to float32 by the UNet, equals
the c_noise cmgen computes for sigma_mid. The UNet then sees bit-identical inputs in both
samplers (e.g. 0.821 -> N = 34198, i = 21052), which is what makes the images agree to 1e-5.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from cmgen.errors import UserError
from cmgen.precond import ConsistencyDenoiser, PrecondConfig, c_noise

RECIPE_FILE = "cmgen_recipe.yaml"     # the run's resolved recipe, stored beside the pipeline
EXPORT_FILE = "cmgen_export.json"     # step, data shape, classes and the 2-step grid index
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SCHEDULERS = ("CMStochasticIterativeScheduler", "CMGenScheduler")
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


# ----------------------------------------------------------------------------- the 2-step grid

@dataclass(frozen=True)
class KarrasGrid:
    num_train_timesteps: int
    mid_index: Optional[int]      # grid index (counted from sigma_max) of the 2-step sigma; None for 1 step
    exact: bool                   # that grid point is the 2-step sigma bit-exactly (sigma and timestep)

    @property
    def two_step_timesteps(self) -> list[int]:
        return [self.mid_index, 0]


def _cmgen_timestep(sigma: float) -> np.float32:
    return np.float32(c_noise(torch.tensor([sigma], dtype=torch.float32)).item())


def karras_grid_for(sigmas, p: PrecondConfig, max_points: int = 400_000) -> KarrasGrid:
    """The smallest CMStochasticIterativeScheduler grid holding the 2-step sigma `sigmas[1]` exactly.

    Exact = same float32 sigma (what step() uses) and same float32 timestep (what the UNet sees).
    Failing that, the smallest grid with the same float32 sigma (timestep within an ulp or two).
    """
    from diffusers import CMStochasticIterativeScheduler

    if len(sigmas) < 2:
        return KarrasGrid(40, None, True)  # one step needs no grid point: keep diffusers' default size
    mid = float(sigmas[1])
    sched = CMStochasticIterativeScheduler(num_train_timesteps=2, sigma_min=p.sigma_min, sigma_max=p.sigma_max,
                                           rho=p.rho)
    n = np.arange(3, max_points + 1, dtype=np.int64)
    lo, hi = p.sigma_min ** (1 / p.rho), p.sigma_max ** (1 / p.rho)
    u = (hi - mid ** (1 / p.rho)) / (hi - lo)  # position of mid between sigma_max (0) and sigma_min (1)
    exact, close = [], []
    for offset in (0, 1):  # the grid points just above and just below mid, for every size n
        i = np.floor(u * (n - 1)).astype(np.int64) + offset
        sigma = sched._convert_to_karras(i / (n - 1))  # the scheduler's own arithmetic, as in set_timesteps
        same_sigma = (sigma.astype(np.float32) == np.float32(mid)) & (i > 0) & (i < n - 1)
        same_t = sched.sigma_to_t(sigma).astype(np.float32) == _cmgen_timestep(mid)
        exact += _smallest(n, i, same_sigma & same_t)
        close += _smallest(n, i, same_sigma)
    if exact or close:
        size, index = min(exact or close)
        return KarrasGrid(size, index, bool(exact))
    return KarrasGrid(max_points, int(round(u * (max_points - 1))), False)  # nearest point of a fine grid


def _smallest(n: np.ndarray, i: np.ndarray, ok: np.ndarray) -> list[tuple[int, int]]:
    k = int(np.argmax(ok))
    return [(int(n[k]), int(i[k]))] if ok[k] else []


# ----------------------------------------------------------------------------- export

@dataclass
class ExportResult:
    folder: Path
    pipeline_class: str
    stock: bool
    grid: Optional[KarrasGrid]


def export_model(source, out_dir, ema: bool = True) -> ExportResult:
    """Write a run or checkpoint as a diffusers pipeline folder (safetensors only) with a model card."""
    from cmgen.runs import is_pipeline_dir, load_model

    if is_pipeline_dir(source):
        raise UserError(f"'{source}' is already a diffusers pipeline folder; pass a cmgen run or checkpoint folder")
    out = Path(out_dir)
    _check_target(out)
    lm = load_model(source, ema=ema)
    unet = _exportable_network(lm)
    pipe, grid = _build_pipeline(unet, lm.recipe)
    _make_parent(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        _write_sidecar_files(tmp, lm, pipe, grid, ema)
        _assert_no_pickles(tmp)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)  # the folder appears complete or not at all
    except OSError as exc:
        raise UserError(f"--to '{out}' cannot be written ({exc.strerror or exc}); choose another folder") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(out, type(pipe).__name__, grid is not None, grid)


def _check_target(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--to '{out}' exists and is not an empty folder; pass a new or empty folder")


def _make_parent(out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--to '{out}' cannot be created ({exc.strerror}); choose another folder") from None


def _exportable_network(lm):
    unet = getattr(lm.model.backbone, "unet", None)
    if lm.kind != "image" or unet is None or not hasattr(unet, "save_pretrained"):
        raise UserError(f"'{lm.source}' holds a model.arch={lm.recipe.model.arch} model on {lm.kind} data, which "
                        "diffusers cannot load; only image models with model.arch=unet can be exported")
    return unet


def _build_pipeline(unet, recipe):
    """(pipeline, grid): stock classes for a plain UNet2DModel, cmgen's registered pipeline otherwise."""
    from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline, UNet2DModel

    from cmgen.pipelines import CMGenScheduler, pipeline_class_for

    p, s = recipe.precond, recipe.sample
    if type(unet) is UNet2DModel:
        grid = karras_grid_for(s.sigmas, p)
        sched = CMStochasticIterativeScheduler(num_train_timesteps=grid.num_train_timesteps, sigma_min=p.sigma_min,
                                               sigma_max=p.sigma_max, sigma_data=p.sigma_data, rho=p.rho,
                                               clip_denoised=s.clip_denoised)
        return ConsistencyModelPipeline(unet=unet, scheduler=sched), grid
    pipeline_class = pipeline_class_for(unet)
    if pipeline_class is None:
        raise UserError(f"no cmgen pipeline class is registered for the network {type(unet).__name__}; "
                        "add it to cmgen.pipelines.PIPELINES")
    sched = CMGenScheduler(sigma_min=p.sigma_min, sigma_max=p.sigma_max, sigma_data=p.sigma_data, rho=p.rho,
                           sample_sigmas=list(s.sigmas), clip_denoised=s.clip_denoised)
    return pipeline_class(unet=unet, scheduler=sched), None


def _write_sidecar_files(folder: Path, lm, pipe, grid: Optional[KarrasGrid], ema: bool) -> None:
    from cmgen.recipe import dump_recipe

    info = {"step": lm.step, "weights": "ema" if ema else "raw", "source": str(lm.source),
            "data_shape": list(lm.shape), "num_classes": lm.num_classes, "data_kind": lm.kind,
            "pipeline_class": type(pipe).__name__}
    if grid is not None and grid.mid_index is not None:
        info["scheduler_grid"] = {"num_train_timesteps": grid.num_train_timesteps,
                                  "two_step_timesteps": grid.two_step_timesteps, "exact": grid.exact}
    (folder / RECIPE_FILE).write_text(dump_recipe(lm.recipe))
    (folder / EXPORT_FILE).write_text(json.dumps(info, indent=2) + "\n")
    if grid is None:  # lets DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder) find the class
        (folder / "pipeline.py").write_text(
            f'"""Loads cmgen\'s pipeline class (pip install cmgen)."""\n'
            f"from {type(pipe).__module__} import {type(pipe).__name__}  # noqa: F401\n")
    (folder / "README.md").write_text(model_card(lm, info, grid))


def _assert_no_pickles(folder: Path) -> None:
    bad = [p for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    if bad:  # diffusers wrote a pickle: a bug or an unsupported component, never ship it
        raise RuntimeError(f"export wrote pickled weights {bad[0]}; refusing to publish them")


# ----------------------------------------------------------------------------- loading pipelines

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
    """(model_index, network, scheduler config) of a consistency pipeline folder."""
    folder = Path(path)
    index = _read_json(folder / "model_index.json", "diffusers pipeline folder")
    entry = index.get("unet")
    if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(v, str) for v in entry)):
        raise UserError(f"'{folder}' is a {index.get('_class_name', 'diffusers')} pipeline without a 'unet'; "
                        "cmgen loads consistency-model pipelines (ConsistencyModelPipeline or a cmgen export)")
    sched = _read_json(folder / "scheduler" / "scheduler_config.json", "diffusers pipeline folder")
    if sched.get("_class_name") not in SCHEDULERS:
        raise UserError(f"'{folder}' uses the scheduler {sched.get('_class_name')}, not a consistency-model "
                        f"scheduler ({' or '.join(SCHEDULERS)}); cmgen cannot sample it")
    network = _load_network(_network_class(*entry, str(folder)), folder / "unet", str(folder))
    return index, network, sched


def load_pipeline_model(path, device="cpu"):
    """A diffusers consistency pipeline folder as a cmgen LoadedModel (for `cmgen sample` / `cmgen eval`)."""
    from cmgen.models.unet import UNetBackbone
    from cmgen.recipe import from_tree, read_yaml
    from cmgen.runs import LoadedModel

    folder = Path(path)
    _, unet, sched = read_pipeline_parts(folder)
    defaults = PrecondConfig()
    precond = PrecondConfig(**{k: float(sched.get(k, getattr(defaults, k)))
                               for k in ("sigma_min", "sigma_max", "sigma_data", "rho")})
    model = ConsistencyDenoiser(UNetBackbone(unet), precond).to(device).eval()
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, (list, tuple)) else (cfg.sample_size,) * 2
    info = _read_json(folder / EXPORT_FILE, "cmgen export") if (folder / EXPORT_FILE).is_file() else {}
    shape = tuple(info.get("data_shape") or (cfg.in_channels, *size))
    num_classes = int(info.get("num_classes", cfg.num_class_embeds or 0))
    if (folder / RECIPE_FILE).is_file():
        recipe = from_tree(read_yaml(folder / RECIPE_FILE))
    else:
        recipe = foreign_recipe(folder, unet, sched, precond, shape, num_classes)
    return LoadedModel(model, recipe, shape, num_classes, info.get("data_kind", "image"), info.get("step"), folder)


def foreign_sample_sigmas(sched: dict, p: PrecondConfig) -> list[float]:
    """sigma_max, then the second sigma of the pipeline's own `num_inference_steps=2` call."""
    from diffusers import CMStochasticIterativeScheduler

    if sched.get("_class_name") == "CMGenScheduler":
        return [float(s) for s in sched.get("sample_sigmas") or [p.sigma_max]]
    if sched.get("num_train_timesteps", 40) < 3:
        return [p.sigma_max]
    scheduler = CMStochasticIterativeScheduler.from_config(sched)
    scheduler.set_timesteps(2)
    mid = float(scheduler.sigmas[1])
    return [p.sigma_max, mid] if p.sigma_min < mid < p.sigma_max else [p.sigma_max]


def foreign_recipe(folder: Path, unet, sched: dict, precond: PrecondConfig, shape, num_classes: int):
    """A recipe describing a pipeline cmgen did not export: its noise levels and 1/2-step schedule;
    the model section is descriptive, the UNet config stays authoritative."""
    from cmgen.models.nsln import NsLNUNet2DModel
    from cmgen.recipe import from_tree

    cfg = unet.config
    attn = [i for i, t in enumerate(cfg.down_block_types) if "Attn" in t]
    tree = {
        "name": folder.resolve().name, "method": {"name": "ict"},
        "description": f"synthesised by cmgen from the diffusers pipeline {folder} (its UNet config is authoritative)",
        "data": {"name": "random", "channels": shape[0], "resolution": shape[1], "num_classes": num_classes},
        "model": {"arch": "unet", "block_out_channels": list(cfg.block_out_channels),
                  "layers_per_block": cfg.layers_per_block, "attention_levels": attn,
                  "attention_head_dim": cfg.attention_head_dim, "norm_num_groups": cfg.norm_num_groups,
                  "norm": "nsln" if isinstance(unet, NsLNUNet2DModel) else "group",
                  "class_conditional": bool(cfg.num_class_embeds)},
        "precond": {"sigma_min": precond.sigma_min, "sigma_max": precond.sigma_max,
                    "sigma_data": precond.sigma_data, "rho": precond.rho},
        "sample": {"sigmas": foreign_sample_sigmas(sched, precond),
                   "clip_denoised": bool(sched.get("clip_denoised", True))},
    }
    return from_tree(tree)


# ----------------------------------------------------------------------------- import for fine-tuning

# UNet config keys that may differ between the source and the recipe's model
_FREE_CONFIG_KEYS = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "dropout"}


def load_init_weights(model: ConsistencyDenoiser, init_from: str) -> None:
    """Load `model.init_from` (pipeline folder, UNet folder or cached hub id) into `model`'s UNet."""
    from cmgen.runs import load_weights

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


# ----------------------------------------------------------------------------- model card

def model_card(lm, info: dict, grid: Optional[KarrasGrid]) -> str:
    """README.md: what the model is, how to load it, its noise levels, metrics and recipe."""
    from cmgen.recipe import dump_recipe

    r, p = lm.recipe, lm.recipe.precond
    sigmas = list(r.sample.sigmas)
    parts = [
        "---\nlibrary_name: diffusers\npipeline_tag: unconditional-image-generation\n"
        "tags:\n- consistency-models\n- cmgen\n---\n",
        f"# {r.name}\n\n{' '.join(r.description.split())}\n",
        f"Exported by cmgen from `{info['source']}` at training step {info['step']} ({info['weights']} weights). "
        f"Method `{type(r.method).__module__.rsplit('.', 1)[-1]}`, data `{r.data.name}` of shape "
        f"{info['data_shape']}, {info['num_classes']} classes"
        f"{' (class-conditional)' if r.model.class_conditional else ''}, images in [-1, 1].\n",
        "## Use\n\nPATH is this folder (or the hub id it was uploaded to).\n\n```python\n"
        + _usage(info, grid, sigmas, r.model.class_conditional) + "```\n",
        _sigma_section(p, sigmas, grid, r.sample.clip_denoised),
        _metrics_section(lm.source, info["step"]),
        "## Recipe\n\n```yaml\n" + dump_recipe(r) + "```\n",
    ]
    return "\n".join(x for x in parts if x)


def _usage(info: dict, grid: Optional[KarrasGrid], sigmas: list, class_conditional: bool) -> str:
    args = "batch_size=16, generator=gens"
    if class_conditional:
        args += f", class_labels=torch.arange(16) % {info['num_classes']}"
    head = ("import torch\n"
            "gens = [torch.Generator().manual_seed(j) for j in range(16)]  # = `cmgen sample --seed 0`\n")
    if grid is not None:
        two = (f"images = pipe({args}, num_inference_steps=None, timesteps={grid.two_step_timesteps}).images  "
               f"# 2 steps: sigma {sigmas[0]:g} -> {sigmas[1]:g}\n" if grid.mid_index is not None else "")
        return (head + "from diffusers import DiffusionPipeline\n\n"
                'pipe = DiffusionPipeline.from_pretrained("PATH")  # diffusers alone, works offline\n'
                f"images = pipe({args}, num_inference_steps=1).images  # 1 step\n" + two)
    name, shown = info["pipeline_class"], ", ".join(f"{s:g}" for s in sigmas[:2])
    return (head + f"from cmgen.pipelines import {name}\n\n"
            f'pipe = {name}.from_pretrained("PATH")\n'
            '# or with diffusers (cmgen installed): DiffusionPipeline.from_pretrained("PATH", '
            'custom_pipeline="PATH", trust_remote_code=True)\n'
            f"images = pipe({args}, num_inference_steps=1).images  # 1 step\n"
            f"images = pipe({args}, num_inference_steps=2).images  # sigmas {shown}\n")


def _sigma_section(p: PrecondConfig, sigmas: list, grid: Optional[KarrasGrid], clip: bool) -> str:
    text = (f"## Noise levels\n\nsigma_min {p.sigma_min:g}, sigma_max {p.sigma_max:g}, sigma_data "
            f"{p.sigma_data:g}, rho {p.rho:g}; c_noise = 250 ln(sigma); estimates clipped to [-1, 1]: "
            f"{'yes' if clip else 'no'}. Sampling sigmas: {', '.join(f'{s:g}' for s in sigmas)} "
            f"(`cmgen sample PATH --steps N` uses the first N).\n")
    if grid is None or grid.mid_index is None:
        return text
    exact = ("exactly (float32 sigma and timestep)" if grid.exact else
             "as nearly as a grid of up to 400k points allows")
    return text + (f"\nThe scheduler's Karras grid has num_train_timesteps={grid.num_train_timesteps}: the smallest "
                   f"grid on which index {grid.mid_index} (counted from sigma_max) is sigma {sigmas[1]:g} "
                   f"{exact}, so `timesteps={grid.two_step_timesteps}` reproduces cmgen's 2-step sampling.\n")


def _metrics_section(source: Path, step) -> str:
    from cmgen.plots import read_metrics

    run = source.parent.parent if source.parent.name == "checkpoints" else source
    lines = []
    train = [row for row in read_metrics(run / "metrics.jsonl") if step is None or row.get("step", 0) <= step]
    if train:
        lines.append("Training (last logged row): " + _fmt_row(train[-1]))
    for row in read_metrics(run / "eval.jsonl")[-10:]:
        lines.append("Evaluation: " + _fmt_row(row))
    return "## Metrics\n\n" + "\n".join(f"- {line}" for line in lines) + "\n" if lines else ""


def _fmt_row(row: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                     if not isinstance(v, (dict, list)))
