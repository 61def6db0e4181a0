"""Export of LCD / RG-LCD students: a text student (Stable Diffusion teacher) as diffusers' stock
`LatentConsistencyModelPipeline` (the teacher's VAE, text encoder and tokenizer, the student UNet and an
`LCMScheduler` with the teacher's constants); a class-conditional student as cmgen's `CMGenLCMPipeline`
(cmgen.pipelines_lcm). Both write safetensors only, with the run's recipe beside them."""
from __future__ import annotations

import json
from pathlib import Path

from cmgen.errors import UserError


def lcm_scheduler(recipe):
    from diffusers import LCMScheduler

    m = recipe.method
    return LCMScheduler(num_train_timesteps=m.num_train_timesteps, beta_start=m.beta_start, beta_end=m.beta_end,
                        beta_schedule="scaled_linear", prediction_type=m.prediction_type,
                        original_inference_steps=m.original_steps, clip_sample=False, set_alpha_to_one=True,
                        timestep_spacing="leading")


def build_lcm_pipeline(lm):
    """The pipeline object of a loaded LCD run (a Generator with parameterisation lcm)."""
    from cmgen.methods.lcd import is_pipeline, pipeline_folder

    unet = lm.net.backbone.unet
    m = lm.recipe.method
    if is_pipeline(m.teacher):
        try:
            from diffusers import LatentConsistencyModelPipeline, StableDiffusionPipeline
        except ImportError:
            raise UserError("exporting a text LCM needs transformers: pip install 'cmgen[sd]'") from None
        teacher = StableDiffusionPipeline.from_pretrained(str(pipeline_folder(m.teacher)), safety_checker=None,
                                                          requires_safety_checker=False, local_files_only=True)
        return LatentConsistencyModelPipeline(vae=teacher.vae, text_encoder=teacher.text_encoder,
                                              tokenizer=teacher.tokenizer, unet=unet, scheduler=lcm_scheduler(lm.recipe),
                                              safety_checker=None, feature_extractor=None,
                                              requires_safety_checker=False)
    from cmgen.pipelines import LatentStatistics
    from cmgen.pipelines_lcm import CMGenLCMPipeline

    codec = lm.codec
    if not hasattr(codec, "vae"):
        raise UserError(f"'{lm.source}' is not a latent model; LCD students are trained on a latent cache")
    return CMGenLCMPipeline(unet=unet, scheduler=lcm_scheduler(lm.recipe), vae=codec.vae,
                            latent_stats=LatentStatistics.from_codec(codec),
                            default_guidance=m.guidance, num_classes=lm.num_classes)


def export_lcm(lm, out: Path, ema: bool = True):
    """Write the pipeline of `lm` into the new folder `out`; returns the pipeline class name."""
    from cmgen.export import publish_folder
    from cmgen.recipe import dump_recipe
    from cmgen.runs import EXPORT_FILE, RECIPE_FILE

    pipe = build_lcm_pipeline(lm)

    def write(tmp: Path) -> None:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / RECIPE_FILE).write_text(dump_recipe(lm.recipe))
        info = {"step": lm.step, "weights": "ema" if ema else "raw", "source": str(lm.source),
                "data_shape": list(lm.shape), "num_classes": lm.num_classes, "data_kind": lm.kind,
                "pipeline_class": type(pipe).__name__}
        (tmp / EXPORT_FILE).write_text(json.dumps(info, indent=2) + "\n")
        if type(pipe).__module__.startswith("cmgen"):
            (tmp / "pipeline.py").write_text(f'"""Loads cmgen\'s pipeline class (pip install cmgen)."""\n'
                                             f"from {type(pipe).__module__} import {type(pipe).__name__}  # noqa: F401\n")

    publish_folder(out, write)
    return type(pipe).__name__
