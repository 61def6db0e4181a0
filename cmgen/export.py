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

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from cmgen.errors import UserError
from cmgen.precond import PrecondConfig, c_noise

C_NOISE_TEXT = {"cm": "250 ln(sigma)", "edm": "0.25 ln(sigma)"}   # precond.c_noise, as the model card states it
from cmgen.runs import EXPORT_FILE, RECIPE_FILE

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


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
    if lm.recipe.model.arch == "sd3":  # a LoRA-tuned diffusers transformer: base pipeline + adapter
        from cmgen.lora import export_lora
        return export_lora(lm, out, ema)
    if lm.parameterisation == "lcm":  # LCD students: stock LatentConsistencyModelPipeline or CMGenLCMPipeline
        from cmgen.export_lcm import export_lcm

        return ExportResult(out, export_lcm(lm, out, ema), False, None)
    unet = _exportable_network(lm)
    pipe, grid = _build_pipeline(unet, lm)

    def write(tmp: Path) -> None:
        pipe.save_pretrained(tmp, safe_serialization=True)
        _write_sidecar_files(tmp, lm, pipe, grid, ema)

    publish_folder(out, write)
    return ExportResult(out, type(pipe).__name__, grid is not None, grid)


def publish_folder(out: Path, write) -> None:
    """`write(tmp)` fills a temporary sibling folder, which then replaces the empty `out`: the folder appears
    complete or not at all, never with pickled weights."""
    _make_parent(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        _assert_no_pickles(tmp)
        if out.exists():
            out.rmdir()  # empty, checked before
        os.replace(tmp, out)
    except OSError as exc:
        raise UserError(f"--to '{out}' cannot be written ({exc.strerror or exc}); choose another folder") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_target(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--to '{out}' exists and is not an empty folder; pass a new or empty folder")


def _make_parent(out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--to '{out}' cannot be created ({exc.strerror}); choose another folder") from None


def _exportable_network(lm):
    if lm.parameterisation == "edm" and lm.recipe.precond.c_noise != "edm":
        raise UserError(f"'{lm.source}' is an EDM model trained with precond.c_noise={lm.recipe.precond.c_noise}; "
                        "diffusers' EDMEulerScheduler feeds the UNet 0.25 ln(sigma), so only precond.c_noise: edm "
                        "models export; sample this one with `cmgen sample`")
    if lm.parameterisation not in ("cm", "edm", "flow", "ctm"):
        raise UserError(f"'{lm.source}' holds a {lm.parameterisation} model, which cmgen export does not write yet; "
                        "sample it with `cmgen sample`")
    if lm.kind == "latent" and lm.parameterisation != "cm":
        raise UserError(f"'{lm.source}' is a latent {lm.parameterisation} model; cmgen export writes latent "
                        "consistency models only so far; sample this one with `cmgen sample`")
    unet = getattr(lm.net.backbone, "unet", None)
    if lm.kind not in ("image", "latent") or unet is None or not hasattr(unet, "save_pretrained"):
        raise UserError(f"'{lm.source}' holds a model.arch={lm.recipe.model.arch} model on {lm.kind} data, which "
                        "diffusers cannot load; only image models with model.arch=unet can be exported")
    return unet


def _build_pipeline(unet, lm):
    """(pipeline, grid): stock classes for a plain UNet2DModel consistency model, cmgen's registered
    pipeline otherwise (EDM and flow models with diffusers' EDMEulerScheduler / FlowMatchEulerDiscreteScheduler)."""
    from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline, UNet2DModel

    from cmgen.pipelines import CMGenScheduler, pipeline_class_for

    recipe = lm.recipe
    p, s = recipe.precond, recipe.sample
    if lm.parameterisation in ("edm", "flow"):
        return _diffusion_pipeline(unet, lm), None
    if lm.parameterisation == "ctm":
        return _ctm_pipeline(unet, lm), None
    if lm.kind == "latent":  # the VAE and the latent statistics travel with the UNet
        from cmgen.pipelines import CMGenLatentPipeline, LatentStatistics

        sched = CMGenScheduler(sigma_min=p.sigma_min, sigma_max=p.sigma_max, sigma_data=p.sigma_data, rho=p.rho,
                               sample_sigmas=list(s.sigmas), clip_denoised=lm.clip, c_noise=p.c_noise)
        return CMGenLatentPipeline(unet=unet, scheduler=sched, vae=lm.codec.vae,
                                   latent_stats=LatentStatistics.from_codec(lm.codec)), None
    if type(unet) is UNet2DModel and p.c_noise == "cm":   # the stock scheduler feeds the UNet 250 ln(sigma)
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
                           sample_sigmas=list(s.sigmas), clip_denoised=s.clip_denoised, c_noise=p.c_noise)
    return pipeline_class(unet=unet, scheduler=sched), None


def _ctm_pipeline(unet, lm):
    from cmgen.pipelines import CMGenScheduler, pipeline_class_for

    p, s = lm.recipe.precond, lm.recipe.sample
    sched = CMGenScheduler(sigma_min=p.sigma_min, sigma_max=p.sigma_max, sigma_data=p.sigma_data, rho=p.rho,
                           sample_sigmas=list(lm.times(s.steps)), clip_denoised=lm.clip, c_noise=p.c_noise)
    if s.sampler == "heun":
        raise UserError(f"'{lm.source}' samples with sample.sampler=heun, which CMGenCTMPipeline (gamma-sampling) "
                        f"does not run; set sample.sampler: gamma (or multistep) in {Path(lm.source) / 'recipe.yaml'} "
                        "to export it, or sample it with `cmgen sample --sampler heun`")
    gamma = 1.0 if s.sampler == "multistep" else s.gamma   # multistep is gamma-sampling's gamma = 1 (tested)
    return pipeline_class_for(unet, "ctm")(unet=unet, scheduler=sched, c_noise=p.c_noise, default_gamma=gamma,
                                           default_steps=s.steps)


def _diffusion_pipeline(unet, lm):
    from diffusers import EDMEulerScheduler, FlowMatchEulerDiscreteScheduler

    from cmgen.pipelines import pipeline_class_for

    p, s = lm.recipe.precond, lm.recipe.sample
    if lm.parameterisation == "edm":
        sched = EDMEulerScheduler(sigma_min=p.sigma_min, sigma_max=p.sigma_max, sigma_data=p.sigma_data, rho=p.rho,
                                  sigma_schedule="karras", prediction_type="epsilon", final_sigmas_type="zero")
    else:
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=s.shift)
    pipeline_class = pipeline_class_for(unet, lm.parameterisation)
    if pipeline_class is None:
        raise UserError(f"no cmgen pipeline class is registered for a {lm.parameterisation} "
                        f"{type(unet).__name__}; add it to cmgen.pipelines.PIPELINES")
    return pipeline_class(unet=unet, scheduler=sched, null_label=lm.null_label,
                          num_classes=lm.num_classes or None, default_sampler=lm.sampler().name,
                          default_steps=s.steps,
                          default_options={k: getattr(s, k) for k in pipeline_class.option_names})


def _write_sidecar_files(folder: Path, lm, pipe, grid: Optional[KarrasGrid], ema: bool) -> None:
    from cmgen.recipe import dump_recipe

    info = {"step": lm.step, "weights": "ema" if ema else "raw", "source": str(lm.source),
            "data_shape": list(lm.shape), "image_shape": list(lm.image_shape), "num_classes": lm.num_classes,
            "data_kind": lm.kind,
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
        _sigma_section(p, sigmas, grid, r.sample.clip_denoised) if lm.parameterisation == "cm" else "",
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
    if name == "CMGenCTMPipeline":
        return (head + f"from cmgen.pipelines import {name}\n\n"
                f'pipe = {name}.from_pretrained("PATH")\n'
                f"images = pipe({args}, num_inference_steps=1).images  # 1 jump sigma_max -> sigma_min\n"
                f"images = pipe({args}, num_inference_steps=4, gamma=0.0).images  # gamma-sampling, NFE 4\n")
    if name in ("CMGenEDMPipeline", "CMGenFlowPipeline"):
        samplers = "heun (default), euler" if name == "CMGenEDMPipeline" else "euler (default), sde"
        return (head + f"from cmgen.pipelines import {name}\n\n"
                f'pipe = {name}.from_pretrained("PATH")\n'
                f"images = pipe({args}, num_inference_steps=18, sampler=...).images  # samplers: {samplers}\n")
    return (head + f"from cmgen.pipelines import {name}\n\n"
            f'pipe = {name}.from_pretrained("PATH")\n'
            '# or with diffusers (cmgen installed): DiffusionPipeline.from_pretrained("PATH", '
            'custom_pipeline="PATH", trust_remote_code=True)\n'
            f"images = pipe({args}, num_inference_steps=1).images  # 1 step\n"
            f"images = pipe({args}, num_inference_steps=2).images  # sigmas {shown}\n")


def _sigma_section(p: PrecondConfig, sigmas: list, grid: Optional[KarrasGrid], clip: bool) -> str:
    text = (f"## Noise levels\n\nsigma_min {p.sigma_min:g}, sigma_max {p.sigma_max:g}, sigma_data "
            f"{p.sigma_data:g}, rho {p.rho:g}; c_noise = {C_NOISE_TEXT[p.c_noise]}; estimates clipped to [-1, 1]: "
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
