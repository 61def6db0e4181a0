"""Weight-backed rewards: LAION aesthetic, PickScore, HPSv2.1, ImageReward, CLIPScore, and RG-LCD's
HPSv2.1 + 0.1 min(ImageReward, 2).

cmgen never downloads: each reads its weights from a path given as an option or an environment
variable and, without them, raises one sentence naming what to download and where to point it.
Prompted rewards take `cond` as a list of prompts, one per image. Each scores on the device of its
network (Reward.module), wherever a training loop has moved it.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional

import torch

from cmgen.errors import UserError
from cmgen.eval.features import CLIP_MEAN, CLIP_STD
from cmgen.rewards import Reward, device_of

AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                 "sac+logos+ava1-l14-linearMSE.pth")
IMAGEREWARD_CAP = 2.0   # RG-LCD trains on min(ImageReward, 2) (reward_fn.py); evaluation reads the raw score


def weights_path(explicit: Optional[str], env: str, what: str, source: str, option: str) -> Path:
    """An existing file or folder from `explicit` or $env, else one clear sentence."""
    given = explicit or os.environ.get(env)
    if given and Path(given).expanduser().exists():
        return Path(given).expanduser()
    where = f"'{given}' does not exist; " if given else ""
    raise UserError(f"reward {what} needs its weights ({where}download {source} and pass it with {option} PATH "
                    f"or {env}=PATH)")


def clip_input(x: torch.Tensor, size: int = 224) -> torch.Tensor:
    """[-1, 1] NCHW -> CLIP's normalised 224x224 input, differentiably (bicubic resize, centre crop)."""
    import torch.nn.functional as F

    x = (x.float().clamp(-1, 1) + 1) / 2
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    h, w = x.shape[2:]
    s = size / min(h, w)
    x = F.interpolate(x, size=(max(size, round(h * s)), max(size, round(w * s))), mode="bicubic",
                      align_corners=False, antialias=True)
    top, left = (x.shape[2] - size) // 2, (x.shape[3] - size) // 2
    x = x[:, :, top:top + size, left:left + size]
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def load_state_dict(path: Path, option: str, fix: str) -> dict:
    """Tensors from a .safetensors file or a torch file read with weights_only=True: a file that needs
    unpickling of arbitrary objects is refused in one sentence, never executed."""
    from cmgen.checkpoint import read_weights

    try:
        state = read_weights(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise UserError(f"{option} '{path}' is not a plain state dict of tensors ({exc.__class__.__name__}: cmgen "
                        f"loads weights only, never pickled objects); {fix}, or re-save it as safetensors") from None
    if not isinstance(state, dict):
        raise UserError(f"{option} '{path}' holds a {type(state).__name__}, not a state dict; {fix}")
    return state


def _prompts(cond, n: int, what: str) -> list[str]:
    if cond is None or isinstance(cond, torch.Tensor) or len(cond) != n:
        raise UserError(f"reward {what} scores images against prompts; give one prompt per image (a text model)")
    return [str(p) for p in cond]


# ----------------------------------------------------------------------------- aesthetic

def linear_stack_from_state(state: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """LAION's predictor is Linear/Dropout layers with no activation: keep the (weight, bias) pairs in order."""
    pairs = []
    prefixes = sorted({k.rsplit(".", 1)[0] for k in state if k.endswith(".weight")},
                      key=lambda p: [int(t) if t.isdigit() else t for t in p.split(".")])
    for prefix in prefixes:
        w, b = state[f"{prefix}.weight"], state.get(f"{prefix}.bias")
        if w.ndim != 2:
            raise ValueError(f"'{prefix}.weight' is not a linear layer")
        pairs.append((w.double(), None if b is None else b.double()))
    if not pairs:
        raise ValueError("no linear layers found")
    return pairs


def load_aesthetic_head(explicit: Optional[str]) -> tuple[list, Path]:
    from cmgen.eval.features import CLIP_L14_URL

    given = explicit or os.environ.get("CMGEN_AESTHETIC")
    if not given or not Path(given).expanduser().is_file():
        where = f"'{given}' is not a file; " if given else ""
        raise UserError(f"--reward aesthetic needs the predictor weights ({where}download {AESTHETIC_URL} and pass "
                        "it with --aesthetic PATH or CMGEN_AESTHETIC=PATH, plus CLIP ViT-L/14 from "
                        f"{CLIP_L14_URL} with --clip PATH)")
    path = Path(given).expanduser()
    state = load_state_dict(path, "--aesthetic", f"download {AESTHETIC_URL}")
    try:
        return linear_stack_from_state(state), path
    except (ValueError, KeyError, AttributeError) as exc:
        raise UserError(f"--aesthetic '{path}' is not a state dict of linear layers ({exc}); "
                        f"download {AESTHETIC_URL}") from None


def aesthetic(aesthetic: Optional[str] = None, clip: Optional[str] = None, device="cpu") -> Reward:
    """The LAION predictor on unit-norm CLIP embeddings. Training (`score`) preprocesses float images
    differentiably (clip_input); evaluation (`fn`) keeps clean-fid's uint8 CLIP input (clip_preprocess)."""
    from cmgen.eval.features import clip_preprocess, load_clip

    head, head_path = load_aesthetic_head(aesthetic)
    model, clip_file = load_clip(clip, device)
    model.requires_grad_(False)

    def predict(pixels: torch.Tensor) -> torch.Tensor:
        emb = model.encode_image(pixels.to(device_of(model))).double()
        e = emb / emb.norm(dim=-1, keepdim=True)  # the predictor was trained on unit-norm CLIP embeddings
        if e.shape[1] != head[0][0].shape[1]:
            raise UserError(f"--clip gives {e.shape[1]}-d embeddings but --aesthetic expects "
                            f"{head[0][0].shape[1]}-d (CLIP ViT-L/14); pass matching files")
        for w, b in head:
            e = e @ w.T.to(e.device) + (0 if b is None else b.to(e.device))
        return e[:, 0]

    @torch.no_grad()
    def evaluate(images, cond=None):
        return predict(clip_preprocess(images)).cpu().numpy()

    return Reward("aesthetic", lambda x, cond=None: predict(clip_input(x)).float(),
                  "LAION aesthetic predictor on CLIP image embeddings", module=model, evaluate=evaluate,
                  details={"aesthetic_weights": str(head_path), "clip_weights": str(clip_file)})


# ----------------------------------------------------------------------------- CLIP-family, prompted

def _hf_clip(path: Path, what: str, device):
    try:
        from transformers import AutoTokenizer, CLIPModel
    except ImportError:
        raise UserError(f"reward {what} needs the 'transformers' package; pip install 'cmgen[lora]'") from None
    model = CLIPModel.from_pretrained(str(path)).to(device).eval().requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(str(path))


def _clip_similarity(model, tokenizer, x, prompts, device) -> torch.Tensor:
    """Cosine similarity of image and text embeddings (HF CLIPModel), per pair."""
    tokens = tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt").to(device)
    img = _projected(model.get_image_features(pixel_values=clip_input(x).to(device)))
    txt = _projected(model.get_text_features(**tokens))
    return torch.nn.functional.cosine_similarity(img, txt, dim=-1)


def _projected(out) -> torch.Tensor:
    """transformers 4 returns the projected embeddings; 5 returns an output whose pooler_output holds them."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _cosine(name: str, model, tok, path) -> Reward:
    """RG-LCD's form of a CLIP-model reward (reward_fn.py): the bare cos(image, prompt); its preference logits
    (the LRM expert's) are the model's own logit scale x cos."""
    def score(x, cond=None):
        return _clip_similarity(model, tok, x, _prompts(cond, len(x), name), device_of(model))

    return Reward(name, score, f"cos(image, prompt) of {name}'s CLIP model", details={"weights": str(path)},
                  module=model, logit_scale=float(model.logit_scale.exp()))


def pickscore(pickscore: Optional[str] = None, device="cpu", cosine: bool = False) -> Reward:
    """PickScore (Kirstain et al. 2023): logit_scale * cos(image, prompt), divided by 26 as flow_grpo does;
    `cosine`: the bare cosine, as RG-LCD trains on it."""
    path = weights_path(pickscore, "CMGEN_PICKSCORE", "pickscore", "yuvalkirstain/PickScore_v1 (a CLIP model folder)",
                        "--pickscore")
    model, tok = _hf_clip(path, "pickscore", device)
    if cosine:
        return _cosine("pickscore", model, tok, path)

    def score(x, cond=None):
        device = device_of(model)
        sim = _clip_similarity(model, tok, x, _prompts(cond, len(x), "pickscore"), device)
        return model.logit_scale.exp() * sim / 26.0

    return Reward("pickscore", score, "PickScore logit / 26", details={"weights": str(path)}, module=model,
                  logit_scale=26.0)


def clipscore(clipscore: Optional[str] = None, device="cpu", cosine: bool = False) -> Reward:
    """CLIPScore (Hessel et al. 2021) as torchmetrics reports it: 100 max(cos, 0); `cosine`: the bare cosine, as
    RG-LCD trains on it (with a laion ViT-H-14 CLIP folder, RG-LCD's model)."""
    path = weights_path(clipscore, "CMGEN_CLIPSCORE", "clipscore", "openai/clip-vit-large-patch14 (a CLIP model folder)",
                        "--clipscore")
    model, tok = _hf_clip(path, "clipscore", device)
    if cosine:
        return _cosine("clipscore", model, tok, path)

    def score(x, cond=None):
        device = device_of(model)
        return 100 * _clip_similarity(model, tok, x, _prompts(cond, len(x), "clipscore"), device).clamp(min=0)

    return Reward("clipscore", score, "CLIPScore 100 max(cos, 0)", details={"weights": str(path)}, module=model)


def hpsv21(hpsv21: Optional[str] = None, device="cpu") -> Reward:
    """HPSv2.1 (Wu et al. 2023): an OpenCLIP ViT-H-14 fine-tuned on human preferences, cos(image, prompt)."""
    path = weights_path(hpsv21, "CMGEN_HPSV21", "hpsv2.1", "HPS_v2.1_compressed.pt from xswu/HPSv2", "--hpsv21")
    state = load_state_dict(path, "--hpsv21", "download HPS_v2.1_compressed.pt from xswu/HPSv2")
    try:
        import open_clip
    except ImportError:
        raise UserError("reward hpsv2.1 needs the 'open_clip' package; pip install 'cmgen[hps]' (open-clip-torch)") from None
    model, _, _ = open_clip.create_model_and_transforms("ViT-H-14", pretrained=None, device=device)
    model.load_state_dict(state.get("state_dict", state))
    model.eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer("ViT-H-14")

    def score(x, cond=None):
        device = device_of(model)
        img = model.encode_image(clip_input(x).to(device), normalize=True)
        txt = model.encode_text(tokenizer(_prompts(cond, len(x), "hpsv2.1")).to(device), normalize=True)
        return (img * txt).sum(-1)

    # RG-LCD's expert logits for the LRM are logit_scale x cos (reward_fn.py, return_logits)
    return Reward("hpsv2.1", score, "HPSv2.1 cos(image, prompt)", details={"weights": str(path)}, module=model,
                  logit_scale=float(model.logit_scale.exp()))


def imagereward(imagereward: Optional[str] = None, device="cpu") -> Reward:
    """ImageReward (Xu et al. 2023) through its own package's loader."""
    path = weights_path(imagereward, "CMGEN_IMAGEREWARD", "imagereward", "ImageReward.pt from THUDM/ImageReward "
                        "(with med_config.json beside it)", "--imagereward")
    med_config = path.parent / "med_config.json"
    if not path.is_file() or not med_config.is_file():
        raise UserError(f"--imagereward '{path}' must be the ImageReward.pt file with med_config.json beside it (both "
                        "from THUDM/ImageReward); the package would otherwise download the missing one")
    try:
        import ImageReward as RM
    except ImportError:
        raise UserError("reward imagereward needs the 'image-reward' package; pip install image-reward") from None
    model = RM.load(str(path), device=device, med_config=str(med_config)).eval()

    def score(x, cond=None):
        prompts = _prompts(cond, len(x), "imagereward")
        model.device = device = device_of(model)   # score_gard reads this attribute, which .to() leaves alone
        ids = model.blip.tokenizer(prompts, padding="max_length", truncation=True, max_length=35,
                                   return_tensors="pt").to(device)
        return model.score_gard(ids.input_ids, ids.attention_mask, clip_input(x).to(device))[:, 0]

    return Reward("imagereward", score, "ImageReward score", details={"weights": str(path)}, module=model)


def capped_imagereward(reward: Reward) -> Reward:
    """min(ImageReward, 2), the ImageReward RG-LCD trains on (reward_fn.py: -relu(2 - r)), direct or as the
    LRM's expert; `cmgen eval reward imagereward` reads the raw score."""
    return dataclasses.replace(reward, score=lambda x, cond=None: reward.score(x, cond).clamp(max=IMAGEREWARD_CAP),
                               description=f"min({reward.description}, {IMAGEREWARD_CAP:g})")


def hpsv21_imagereward(hpsv21: Optional[str] = None, imagereward: Optional[str] = None, device="cpu") -> Reward:
    """RG-LCD's weighted reward (reward_fn.py): HPSv2.1 + 0.1 min(ImageReward, 2)."""
    from cmgen.rewards import build_reward

    hps = build_reward("hpsv2.1", hpsv21=hpsv21, device=device)
    ir = capped_imagereward(build_reward("imagereward", imagereward=imagereward, device=device))
    return Reward("hpsv2.1+0.1imagereward", lambda x, cond=None: hps(x, cond) + 0.1 * ir(x, cond),
                  f"{hps.description} + 0.1 {ir.description}",
                  details={"hpsv2.1": hps.details, "imagereward": ir.details},
                  module=torch.nn.ModuleDict({"hpsv21": hps.module, "imagereward": ir.module}))
