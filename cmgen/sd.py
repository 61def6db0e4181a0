"""Stable Diffusion teachers for LCD / RG-LCD: reading a `StableDiffusionPipeline` folder (UNet, scheduler
constants, text encoder and tokenizer; never downloading), prompt embeddings, and a tiny pipeline built from
configs for offline smoke runs (`python -m cmgen.sd tiny OUT`).
"""
from __future__ import annotations

import json
import sys
from functools import lru_cache
from pathlib import Path

import torch

from cmgen.errors import UserError


def _transformers():
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserError("a Stable Diffusion teacher needs the transformers package: pip install 'cmgen[sd]'") from None


def read_scheduler(folder: Path) -> dict:
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise UserError(f"recipe key 'method.teacher': '{folder}' has no scheduler/scheduler_config.json; pass a "
                        "complete Stable Diffusion pipeline folder")
    return json.loads(path.read_text())


def teacher_schedule(sched: dict):
    from cmgen.vp import VPSchedule

    if sched.get("beta_schedule", "scaled_linear") != "scaled_linear":
        raise UserError(f"the teacher's scheduler uses beta_schedule={sched.get('beta_schedule')}; LCD here follows "
                        "Stable Diffusion's scaled_linear schedule")
    return VPSchedule(float(sched.get("beta_start", 0.00085)), float(sched.get("beta_end", 0.012)),
                      int(sched.get("num_train_timesteps", 1000))), sched.get("prediction_type", "epsilon")


@lru_cache(maxsize=2)
def text_models(folder: str):
    _transformers()
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(Path(folder) / "tokenizer"), local_files_only=True)
    enc = CLIPTextModel.from_pretrained(str(Path(folder) / "text_encoder"), local_files_only=True)
    return tok, enc.eval().requires_grad_(False)


@torch.no_grad()
def encode_prompts(folder, prompts) -> torch.Tensor:
    """Last hidden states of the pipeline's CLIP text encoder for `prompts` (padded to the tokenizer's max)."""
    tok, enc = text_models(str(folder))
    ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    return enc(ids)[0].float()


def load_sd_teacher(folder: Path):
    """(NoisePredictor over the pipeline's UNet, the empty prompt's embeddings [1, L, D])."""
    from diffusers import UNet2DConditionModel

    from cmgen.models.ldm_unet import CondUNetBackbone, NoisePredictor

    _transformers()
    schedule, prediction_type = teacher_schedule(read_scheduler(folder))
    unet = UNet2DConditionModel.from_pretrained(str(Path(folder) / "unet"), local_files_only=True)
    net = NoisePredictor(CondUNetBackbone(unet), schedule, prediction_type).eval().requires_grad_(False)
    return net, encode_prompts(folder, [""])


# ----------------------------------------------------------------------------- a tiny pipeline from configs

def byte_characters() -> list[str]:
    """GPT-2 / CLIP's reversible byte -> printable character map (256 characters)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tiny_tokenizer_files(folder: Path) -> None:
    """A byte-level CLIP BPE vocabulary without merges (every character is a token): vocab.json, merges.txt."""
    chars = byte_characters()
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")


def tiny_text_config(tok) -> dict:
    """The text tower of the tiny CLIP models built here (the SD pipeline's encoder, the tests' CLIP rewards):
    two layers of width 32 over the byte-level tokenizer `tok` of tiny_tokenizer_files()."""
    return dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)


def tiny_sd_pipeline(out, seed: int = 0, prediction_type: str = "epsilon"):
    """A Stable Diffusion pipeline with SD's layout and schedule but tiny random networks, saved to `out`."""
    _transformers()
    import tempfile

    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from cmgen.latents import tiny_vae

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=16)
    with tempfile.TemporaryDirectory() as tmp:
        tiny_tokenizer_files(Path(tmp))
        tok = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77)
    enc = CLIPTextModel(CLIPTextConfig(**tiny_text_config(tok)))
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=tiny_vae(3, 4), text_encoder=enc, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(out), safe_serialization=True)
    return Path(out)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "tiny":
        print("usage: python -m cmgen.sd tiny OUT_FOLDER   (a tiny Stable Diffusion pipeline for smoke runs)")
        return 2
    print(f"cmgen: tiny Stable Diffusion pipeline written to {tiny_sd_pipeline(argv[1])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
