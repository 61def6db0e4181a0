"""Weight-backed expert rewards of RG-LCD (differentiable, on images about [-1, 1] and their prompts):
HPSv2.1, PickScore, ImageReward (capped at 2, as RG-LCD does), CLIPScore (ViT-H-14 laion2B) and the LAION
aesthetic predictor. cmgen never downloads: each loads local weights named by an environment variable (or
an open_clip / transformers cache) and otherwise stops with one sentence saying what to fetch.

Every expert is called as R(images, prompts) -> [B]; the prompts are the batch's text (class-conditional
runs have none and use the digits rewards instead).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from cmgen.errors import UserError

# name -> (environment variable for the weights, what to download)
EXPERTS = {
    "hpsv2.1": ("CMGEN_HPSV21", "HPS_v2.1_compressed.pt from the xswu/HPSv2 Hugging Face repo, plus open_clip's "
                               "ViT-H-14 laion2b_s32b_b79k"),
    "pickscore": ("CMGEN_PICKSCORE", "a local folder of yuvalkirstain/PickScore_v1 (transformers CLIPModel) with "
                                     "the laion/CLIP-ViT-H-14-laion2B-s32B-b79K processor files"),
    "imagereward": ("CMGEN_IMAGEREWARD", "ImageReward.pt and med_config.json from THUDM/ImageReward (package "
                                         "image-reward)"),
    "clipscore": ("CMGEN_CLIPSCORE", "open_clip's ViT-H-14 laion2b_s32b_b79k open_clip_pytorch_model.bin"),
    "aesthetic": ("CMGEN_AESTHETIC", "sac+logos+ava1-l14-linearMSE.pth and CLIP ViT-L/14 (CMGEN_CLIP)"),
}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def weights_file(name: str) -> Path:
    env, what = EXPERTS[name]
    given = os.environ.get(env)
    if not given or not Path(given).expanduser().exists():
        where = f"{env}='{given}' does not exist; " if given else ""
        raise UserError(f"reward '{name}' needs its weights ({where}download {what} and set {env}=PATH)")
    return Path(given).expanduser()


def clip_pixels(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """[-1, 1] NCHW -> CLIP's normalised 224x224 RGB input, differentiably (bicubic resize, no cropping)."""
    x = (images.float() + 1) / 2
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _open_clip(arch: str, weights: Path, device):
    try:
        import open_clip
    except ImportError:
        raise UserError("the weight-backed rewards need the open_clip package: pip install open_clip_torch") from None
    model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=str(weights), device=device)
    return model.eval().requires_grad_(False), open_clip.get_tokenizer(arch)


def _cosine_reward(model, tokenizer, device, scale: float = 1.0):
    def fn(images, prompts):
        img = model.encode_image(clip_pixels(images).to(device))
        txt = model.encode_text(tokenizer(list(prompts)).to(device))
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return scale * (img * txt).sum(-1)
    return fn


def build_expert(name: str, device="cpu") -> Callable:
    path = weights_file(name)
    if name == "hpsv2.1":
        model, tok = _open_clip("ViT-H-14", path, device)   # HPSv2.1 is a fine-tuned ViT-H-14 state dict
        return _cosine_reward(model, tok, device)
    if name == "clipscore":
        model, tok = _open_clip("ViT-H-14", path, device)
        return _cosine_reward(model, tok, device)
    if name == "pickscore":
        try:
            from transformers import AutoProcessor, CLIPModel
        except ImportError:
            raise UserError("reward 'pickscore' needs the transformers package: pip install transformers") from None
        model = CLIPModel.from_pretrained(str(path), local_files_only=True).to(device).eval().requires_grad_(False)
        proc = AutoProcessor.from_pretrained(str(path), local_files_only=True)

        def pick(images, prompts):
            img = model.get_image_features(pixel_values=clip_pixels(images).to(device))
            tok = proc(text=list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt").to(device)
            txt = model.get_text_features(**tok)
            img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
            return model.logit_scale.exp() * (img * txt).sum(-1)
        return pick
    if name == "imagereward":
        try:
            import ImageReward as RM
        except ImportError:
            raise UserError("reward 'imagereward' needs the image-reward package: pip install image-reward") from None
        model = RM.load(str(path), device=device, med_config=str(path.parent / "med_config.json")).eval()

        def image_reward(images, prompts):
            tok = model.blip.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=35,
                                       return_tensors="pt").to(device)
            emb = model.blip.visual_encoder(clip_pixels(images).to(device))
            att = torch.ones(emb.shape[:-1], dtype=torch.long, device=device)
            out = model.blip.text_encoder(tok.input_ids, attention_mask=tok.attention_mask, encoder_hidden_states=emb,
                                          encoder_attention_mask=att, return_dict=True).last_hidden_state[:, 0]
            r = (model.mlp(out)[:, 0] - model.mean) / model.std
            return r.clamp(max=2.0)   # RG-LCD caps ImageReward at 2
        return image_reward
    if name == "aesthetic":
        from cmgen.eval.features import load_clip
        from cmgen.eval.rewards import load_aesthetic_head

        head, _ = load_aesthetic_head(str(path))
        model, _ = load_clip(None, device)

        def aesthetic(images, prompts=None):
            x = model.encode_image(clip_pixels(images).to(device)).float()
            x = x / x.norm(dim=-1, keepdim=True)
            for w, b in head:
                x = x @ w.float().T.to(device) + (0 if b is None else b.float().to(device))
            return x[:, 0]
        return aesthetic
    raise UserError(f"reward '{name}' is unknown; weight-backed rewards: {', '.join(EXPERTS)}")
