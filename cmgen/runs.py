"""Loading trained models as Generators: a run folder, a checkpoint folder or a diffusers pipeline
folder (a cmgen export or a foreign consistency pipeline)."""
from __future__ import annotations

from pathlib import Path

from cmgen.checkpoint import list_checkpoints, load_tensors, read_state
from cmgen.errors import UserError
from cmgen.generator import Generator
from cmgen.precond import PrecondConfig
from cmgen.pretrained import load_weights, read_pipeline_parts, _read_json

RECIPE_FILE = "cmgen_recipe.yaml"     # the run's resolved recipe, stored beside an exported pipeline
EXPORT_FILE = "cmgen_export.json"     # step, data shape, classes and the 2-step grid index


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


def load_model(path, ema: bool = True, device="cpu") -> Generator:
    """Load a run, checkpoint or diffusers pipeline folder as a Generator in eval mode."""
    if is_pipeline_dir(path):
        return load_pipeline_model(path, device=device)
    from cmgen.recipe import from_tree, read_yaml

    ckpt = resolve_checkpoint(path)
    state = read_state(ckpt)
    if not isinstance(state.get("data_shape"), list):
        raise UserError(f"checkpoint '{ckpt}' has a state.json without its data shape; it was not written by cmgen "
                        "train, use another checkpoint")
    recipe = from_tree(read_yaml(ckpt / "recipe.yaml"))
    gen = Generator.build(recipe, tuple(state["data_shape"]), int(state["num_classes"]),
                          state.get("data_kind", "image"), step=state["step"], source=ckpt)
    # checkpoints hold the trainable weights only: frozen ones (a LoRA base) come from model.init_from, which a
    # fully fine-tuned run no longer needs (its source may be gone)
    if recipe.model.init_from and not all(p.requires_grad for p in gen.net.parameters()):
        from cmgen.pretrained import load_init_weights
        load_init_weights(gen.net, recipe.model.init_from)
    weights = load_tensors(ckpt / ("ema.safetensors" if ema else "model.safetensors"))
    load_weights(gen.net, weights, str(ckpt))
    return gen.to(device).eval()


def load_pipeline_model(path, device="cpu"):
    """A diffusers pipeline folder as a Generator (for `cmgen sample` / `cmgen eval`): any cmgen export,
    or a foreign consistency pipeline."""
    from cmgen.generator import parameterisation_of
    from cmgen.models.unet import UNetBackbone
    from cmgen.precond import NETWORKS
    from cmgen.recipe import from_tree, read_yaml

    folder = Path(path)
    index, unet, sched = read_pipeline_parts(folder)
    defaults = PrecondConfig()
    precond = PrecondConfig(**{k: float(sched.get(k, getattr(defaults, k)))
                               for k in ("sigma_min", "sigma_max", "sigma_data", "rho")})
    recipe = from_tree(read_yaml(folder / RECIPE_FILE)) if (folder / RECIPE_FILE).is_file() else None
    if recipe is None and sched.get("_class_name") in ("EDMEulerScheduler", "FlowMatchEulerDiscreteScheduler",
                                                       "LCMScheduler"):
        raise UserError(f"'{folder}' is a {sched['_class_name']} pipeline without {RECIPE_FILE}; cmgen samples "
                        "the EDM, flow and LCM pipelines it exported itself")
    parameterisation = parameterisation_of(recipe) if recipe is not None else "cm"
    if recipe is not None:
        precond = recipe.precond
    if parameterisation == "lcm":
        model = lcm_network(folder, index, unet, recipe)
    else:
        model = NETWORKS[parameterisation](UNetBackbone(unet), precond)
    model = model.to(device).eval()
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, (list, tuple)) else (cfg.sample_size,) * 2
    info = _read_json(folder / EXPORT_FILE, "cmgen export") if (folder / EXPORT_FILE).is_file() else {}
    shape = tuple(info.get("data_shape") or (cfg.in_channels, *size))
    num_classes = int(info.get("num_classes", cfg.num_class_embeds or 0))
    if recipe is None:
        recipe = foreign_recipe(folder, unet, sched, precond, shape, num_classes)
    codec = pipeline_codec(folder, index, info) if "latent_stats" in index else None
    return Generator(model, recipe, shape, num_classes, info.get("data_kind", "image"), codec=codec,
                     step=info.get("step"), source=folder).to(device)   # the codec decodes where the model runs


def lcm_network(folder: Path, index: dict, unet, recipe):
    """The LCD student of an exported CMGenLCMPipeline: its UNet under the run's VP schedule and prediction type."""
    from cmgen.models.ldm_unet import CondUNetBackbone, LatentConsistency

    if "latent_stats" not in index:   # diffusers' stock LatentConsistencyModelPipeline: prompts, not class labels
        raise UserError(f"'{folder}' is a text-to-image LCM pipeline; cmgen samples class-conditional LCM exports, so "
                        "load this one with diffusers' LatentConsistencyModelPipeline.from_pretrained")
    return LatentConsistency(CondUNetBackbone(unet), recipe.method.schedule, recipe.method.prediction_type)


def pipeline_codec(folder: Path, index: dict, info: dict):
    """The codec of an exported latent model: its vae/ and latent_stats/ components."""
    from cmgen.pipelines import LatentStatistics
    from cmgen.pretrained import load_vae

    if "vae" not in index:
        raise UserError(f"'{folder}' has latent statistics but no vae component; re-export the run with cmgen export")
    vae = load_vae(str(folder / "vae"), what=f"the VAE of pipeline '{folder}'")
    stats = LatentStatistics.from_pretrained(folder / "latent_stats")
    return stats.codec(vae, image_shape=info.get("image_shape"))


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
