"""Export of a LoRA-tuned diffusers model: the base pipeline beside its adapter.

`folder/` is the base pipeline (model.init_from, saved with safetensors) and `folder/lora/` holds
`pytorch_lora_weights.safetensors` in diffusers' format, so stock diffusers loads the tuned model:

    pipe = StableDiffusion3Pipeline.from_pretrained(folder); pipe.load_lora_weights(folder / "lora")
"""
from __future__ import annotations

from pathlib import Path

from cmgen.errors import UserError

LORA_DIR = "lora"


def adapter_state(transformer) -> dict:
    """The adapter's tensors as peft names them, which SD3's save_lora_weights / load_lora_weights expect
    (diffusers' own SD3 LoRA training script saves them this way)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(transformer)


def export_lora(lm, out: Path, ema: bool = True):
    """Write the base pipeline and the run's adapter (`lm`: a loaded cmgen Generator of a model.arch sd3 run)."""
    from cmgen.export import ExportResult, publish_folder
    from cmgen.models.sd3 import load_pipeline, pipeline_folder
    from cmgen.recipe import dump_recipe
    from cmgen.runs import RECIPE_FILE

    backbone = lm.net.backbone
    if not backbone.has_lora:
        raise UserError(f"'{lm.source}' was trained without LoRA (method.lora_rank 0); it has no adapter to export")
    pipe = load_pipeline(pipeline_folder(lm.recipe))

    def write(tmp: Path) -> None:
        pipe.save_pretrained(tmp, safe_serialization=True)
        config = backbone.transformer.peft_config["default"]   # rank and alpha: the adapter's scale alpha / r
        type(pipe).save_lora_weights(tmp / LORA_DIR, transformer_lora_layers=adapter_state(backbone.transformer),
                                     safe_serialization=True, transformer_lora_adapter_metadata=config.to_dict())
        (tmp / RECIPE_FILE).write_text(dump_recipe(lm.recipe))
        (tmp / "README.md").write_text(
            f"# {lm.recipe.name} (step {lm.step}, {'EMA' if ema else 'raw'} adapter)\n\n"
            f"Base pipeline: `{lm.recipe.model.init_from}`; LoRA rank {lm.recipe.method.lora_rank}, trained by cmgen "
            f"({lm.recipe.method.__class__.__module__.rsplit('.', 1)[-1]}, reward {lm.recipe.method.reward}).\n\n"
            "```python\nfrom diffusers import StableDiffusion3Pipeline\n"
            f"pipe = StableDiffusion3Pipeline.from_pretrained('{out}')\npipe.load_lora_weights('{out / LORA_DIR}')\n```\n")

    publish_folder(out, write)
    return ExportResult(out, type(pipe).__name__, True, None)
