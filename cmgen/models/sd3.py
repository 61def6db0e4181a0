"""Stable Diffusion 3-class flow transformers as cmgen flow networks, with LoRA through peft.

A prompts file is a class-conditional data set: prompt i is label i. The pipeline's frozen text
encoders embed every prompt once (no classifier-free guidance, as AWM trains), the encoders are then
dropped, and the backbone F(x, 1000 t, i) = SD3Transformer2DModel(x, 1000 t, E_i, P_i) feeds
cmgen.precond.FlowVelocity: SD3's timestep is 1000 sigma and its output is the velocity eps - x0,
exactly cmgen's flow convention. With `method.lora_rank > 0` the transformer's attention projections
get a LoRA adapter (peft) and everything else is frozen, so the optimizer, the EMA and checkpoints
hold adapter weights only; `adapters_disabled()` gives the base model (AWM's KL reference).
The codec is the pipeline's VAE: image = vae.decode(z / scaling_factor + shift_factor).
"""
from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path

import torch
from torch import nn

from cmgen.errors import UserError

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def read_prompts(path) -> list[str]:
    if not path or not Path(path).is_file():
        raise UserError(f"recipe key 'data.path' must name a prompts file (one prompt a line) for data.name "
                        f"prompts, got '{path}'")
    prompts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"recipe key 'data.path': '{path}' holds no prompts; write one prompt a line")
    return prompts


def prompts_shape(cfg) -> tuple[tuple[int, ...], int, str]:
    """Latent shape (data.channels = the transformer's latent channels, data.resolution / 8), prompt count."""
    side = (cfg.resolution or 512) // 8
    return (cfg.channels, side, side), len(read_prompts(cfg.path)), "latent"


def prompts_dataset(cfg):
    """Prompt indices as labels; x is a zero latent per prompt (AWM trains on its own rollouts)."""
    from cmgen.data import Dataset

    shape, n, kind = prompts_shape(cfg)
    return Dataset(torch.zeros(n, *shape), torch.arange(n), n, kind, "prompts")


def pipeline_folder(recipe) -> str:
    """model.init_from as a local folder (a cached hub id resolves to its snapshot; nothing is downloaded)."""
    from cmgen.pretrained import resolve_init_source

    if not recipe.model.init_from:
        raise UserError("recipe key 'model.init_from' must name an SD3 pipeline folder or cached hub id for model.arch sd3")
    return str(resolve_init_source(recipe.model.init_from))


@functools.lru_cache(maxsize=2)
def load_pipeline(folder: str):
    """The diffusers SD3 pipeline at `folder` (local only, never downloads), on the CPU in fp32."""
    try:
        from diffusers import StableDiffusion3Pipeline
    except ImportError:
        raise UserError("model.arch sd3 needs diffusers' StableDiffusion3Pipeline and transformers; "
                        "pip install 'cmgen[lora]'") from None
    if not (Path(folder) / "model_index.json").is_file():
        raise UserError(f"recipe key 'model.init_from' ('{folder}') is not a diffusers SD3 pipeline folder; "
                        "download stabilityai/stable-diffusion-3.5-medium once and pass its folder")
    return StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True)


@functools.lru_cache(maxsize=4)
def load_scheduler(folder: str):
    """The SD3 pipeline's scheduler alone (its `scheduler/` config; nothing else is read)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if not (Path(folder) / "scheduler").is_dir():
        raise UserError(f"recipe key 'model.init_from' ('{folder}') is not a diffusers SD3 pipeline folder (no "
                        "scheduler/); download stabilityai/stable-diffusion-3.5-medium once and pass its folder")
    return FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)


def scheduler_times(recipe, steps: int, shift: float, key: str) -> list[float]:
    """The pipeline scheduler's own sigmas for `steps` steps, ending in 0: what StableDiffusion3Pipeline (and so the
    exported LoRA pipeline) samples on; for SD3.5's FlowMatchEulerDiscreteScheduler shift(linspace(1, sigma_min,
    steps)) + [0], with sigma_min itself shifted. `shift` is the recipe's value under `key`, which must agree."""
    sched = load_scheduler(pipeline_folder(recipe))
    own = float(sched.config.get("shift", 1.0))
    if abs(own - shift) > 1e-6:
        raise UserError(f"recipe key '{key}' ({shift:g}) must be the SD3 pipeline scheduler's shift ({own:g}), "
                        f"which sets the sampling grid of model.arch sd3; set it to {own:g}")
    grid = type(sched).from_config(sched.config)   # a fresh copy: set_timesteps changes its scheduler
    grid.set_timesteps(steps)
    return [float(t) for t in grid.sigmas]


class SD3Backbone(nn.Module):
    loads_itself = True   # model.init_from is read here, not by cmgen.pretrained.load_init_weights

    def __init__(self, transformer, prompt_embeds: torch.Tensor, pooled: torch.Tensor, prompts: list[str]):
        super().__init__()
        self.transformer = transformer
        for m in transformer.modules():   # fixed buffers (SD3.5's 384^2 positional table) come from the base, not checkpoints
            m._non_persistent_buffers_set |= set(m._buffers)
        self.prompts = prompts
        self.register_buffer("prompt_embeds", prompt_embeds, persistent=False)   # rebuilt from the recipe
        self.register_buffer("pooled", pooled, persistent=False)

    def forward(self, x, c_noise, labels):
        return self.transformer(hidden_states=x, timestep=c_noise, encoder_hidden_states=self.prompt_embeds[labels],
                                pooled_projections=self.pooled[labels], return_dict=False)[0]

    @property
    def has_lora(self) -> bool:
        return bool(getattr(self.transformer, "peft_config", None))

    @contextlib.contextmanager
    def adapters_disabled(self):
        self.transformer.disable_adapters()
        try:
            yield
        finally:
            self.transformer.enable_adapters()


def add_lora(transformer, rank: int, alpha: float, targets=LORA_TARGETS) -> None:
    """Freeze the transformer and add a peft LoRA adapter (gaussian init of A, zero B: starts at the base)."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise UserError("recipe key 'method.lora_rank' > 0 needs peft; pip install 'cmgen[lora]'") from None
    transformer.requires_grad_(False)
    names = {n.rsplit(".", 1)[-1] for n, _ in transformer.named_modules()} | {n for n, _ in transformer.named_modules()}
    present = [t for t in targets if any(n.endswith(t) for n in names)]
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=present))


def build_sd3_backbone(recipe) -> SD3Backbone:
    pipe = load_pipeline(pipeline_folder(recipe))
    prompts = read_prompts(recipe.data.path)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False,
                                                  device="cpu")
    import copy

    transformer = copy.deepcopy(pipe.transformer)
    if transformer.config.in_channels != recipe.data.channels:
        raise UserError(f"recipe key 'data.channels' must be the transformer's latent channels "
                        f"({transformer.config.in_channels}), got {recipe.data.channels}")
    rank = getattr(recipe.method, "lora_rank", 0)
    if rank > 0:
        add_lora(transformer, rank, getattr(recipe.method, "lora_alpha", 0.0) or rank)
    return SD3Backbone(transformer, embeds.float(), pooled.float(), prompts)


class SD3Codec:
    """Latents <-> images through the pipeline's VAE (SD3's scaling and shift factors)."""

    def __init__(self, vae):
        self.vae = vae.requires_grad_(False).eval()
        self.scale, self.shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z.to(self.vae.dtype) / self.scale + self.shift, return_dict=False)[0].float().clamp(-1, 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return (self.vae.encode(x.to(self.vae.dtype)).latent_dist.mode() - self.shift) * self.scale

    def to(self, device):
        self.vae.to(device)
        return self


def sd3_codec(recipe) -> SD3Codec:
    import copy

    return SD3Codec(copy.deepcopy(load_pipeline(pipeline_folder(recipe)).vae))


# ----------------------------------------------------------------------------- a tiny pipeline for tests and --smoke

def _clip_tokenizer(folder: Path):
    """A byte-level CLIP tokenizer with no merges, written locally (no hub files)."""
    from transformers import CLIPTokenizer

    from cmgen.sd import byte_characters

    chars = byte_characters()
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": 256 + i for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": 512, "<|endoftext|>": 513}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def _t5_tokenizer(folder: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import T5TokenizerFast

    letters = "abcdefghijklmnopqrstuvwxyz0123456789 .,"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in letters]
    tk = Tokenizer(models.Unigram(vocab, unk_id=2))   # T5's tokenizer class expects a Unigram model
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    folder.mkdir(parents=True, exist_ok=True)
    tk.save(str(folder / "tokenizer.json"))
    return T5TokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token="</s>", pad_token="<pad>",
                           unk_token="<unk>", extra_ids=0, model_max_length=32)


def tiny_sd3_pipeline(folder) -> Path:
    """Write a seeded, randomly initialised SD3 pipeline (4 latent channels, 32 px images) to `folder`."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        clip = dict(bos_token_id=512, eos_token_id=513, hidden_size=16, intermediate_size=32, layer_norm_eps=1e-5,
                    num_attention_heads=2, num_hidden_layers=2, pad_token_id=513, vocab_size=514, hidden_act="gelu",
                    projection_dim=16)
        te, te2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip)), CLIPTextModelWithProjection(CLIPTextConfig(**clip))
        t5 = T5EncoderModel(T5Config(vocab_size=48, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                     decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
        transformer = SD3Transformer2DModel(sample_size=4, patch_size=1, in_channels=4, num_layers=1,
                                            attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16,
                                            joint_attention_dim=32, pooled_projection_dim=32, out_channels=4)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=1, norm_num_groups=8, sample_size=32, scaling_factor=1.5305,
                            shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    tmp = folder.parent / ".tok"
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=te, tokenizer=_clip_tokenizer(tmp / "clip"),
                                    text_encoder_2=te2, tokenizer_2=_clip_tokenizer(tmp / "clip2"),
                                    text_encoder_3=t5, tokenizer_3=_t5_tokenizer(tmp / "t5"))
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
