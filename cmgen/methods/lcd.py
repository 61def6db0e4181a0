"""Latent consistency distillation (Luo et al. 2023, LCM; diffusers' train_lcm_distill_sd_wds.py) with the
reward guidance of RG-LCD (Li et al. 2024, arXiv 2403.11027; Ji4chenLi/rg-lcd).

Per sample: n ~ U{0..N-1} on the skip-step grid t_j = k j - 1 (N = 50, k = T / N = 20), t_s = t_n,
t_e = max(t_s - k, 0); z = sqrt(ab_{t_s}) x_0 + sqrt(1 - ab_{t_s}) eps; w ~ U[w_min, w_max] (w-form, guidance
scale w + 1), embedded as `timestep_cond`. The student f(z, t_s, c, w) = c_skip(t_s) z + c_out(t_s) x_0(z).
The frozen teacher takes one guided DDIM step: x_0 = x_0^c + w (x_0^c - x_0^0), eps likewise (the null
condition: the null label or the empty prompt), z' = sqrt(ab_{t_e}) x_0 + sqrt(1 - ab_{t_e}) eps (ab_0 when
n = 0); the target is the EMA copy theta^- (decay 0.95, no gradient) at (z', t_e, c, w).
L_LCD = mean_j sqrt((f - target)_j^2 + c^2) - c, c = 0.001 (pseudo-Huber, `loss: huber`) or mean squared error
(`loss: l2`, diffusers' default).

Reward guidance: L = L_LCD - reward_scale * mean R(f), R on the student's one-step output f:
- `reward_mode: direct`: R = the named differentiable reward of the decoded images (gradient through the
  VAE decoder and the reward net into f);
- `reward_mode: lrm`: R = the latent proxy reward model (cmgen.rewards.lrm) of f itself, frozen in the model
  step; after every model step the LRM takes its own optimizer step on the pairwise KL between the expert's
  and its own preferences over the triplet {f, target, real latent}, summed over the 3 pairs (the expert may
  be non-differentiable; its pair logits are expert_scale x R, by default the expert's own logit scale:
  the CLIP logit scale x cos for HPSv2.1, PickScore and CLIPScore, as RG-LCD scores them).
The rewards take RG-LCD's training forms (cmgen.rewards.differentiable): PickScore and CLIPScore the bare cosine,
ImageReward capped at 2; the reward networks run on the run's device (frozen()).
With reward_scale = 0 no reward is computed: the student's updates are plain LCD's, bit for bit.

Text teachers (a Stable Diffusion pipeline) train on a latent cache in SD's scaling (`cmgen latents encode
--scaling sd`; a normalised cache is refused in one sentence) and condition each latent on its caption (a
captioned folder's cache) or, for caches without captions, on method.prompts[label].
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from cmgen.errors import UserError
from cmgen.latents import read_captions
from cmgen.methods.base import Method as BaseMethod
from cmgen.methods.base import Part, gate
from cmgen.vp import VPSchedule, add_noise, ddim_step, skip_step_grid


@dataclass(frozen=True)
class Config:
    teacher: str = ""               # ldm run folder, or a StableDiffusionPipeline folder / cached hub id
    original_steps: int = 50        # N of the skip-step grid (skip k = T / N)
    w_min: float = 5.0              # guidance draw, w-form (scale = w + 1); SD: [5, 15]
    w_max: float = 15.0
    guidance: float = 8.0           # default sampling guidance scale (LCM pipeline's, = w + 1)
    loss: str = "huber"             # huber (RG-LCD) | l2 (diffusers' default)
    huber_c: float = 0.001
    target_decay: float = 0.95      # EMA of the target network theta^-
    prediction_type: str = "epsilon"  # must equal the teacher's
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    reward_mode: str = "none"       # none | direct | lrm
    reward: Optional[str] = None    # direct: the differentiable reward; lrm: the expert (any reward)
    reward_scale: float = 1.0       # beta of L = L_LCD - beta mean R(f)
    target_class: Optional[int] = None  # digit-class reward on unconditional models (conditional: own label)
    lrm_loss: str = "kl"            # kl: pairwise KL to the expert's preferences | ce: the real latent wins
    lrm_lr: float = 3.3e-6          # AdamW of the LRM (RG-LCD's)
    lrm_width: int = 512            # LRM embedding width (digits: an MLP; SD: see cmgen.rewards.lrm)
    expert_scale: Optional[float] = None  # expert reward -> pair logit scale; None: the expert's logit scale
                                    # (HPSv2.1, PickScore, CLIPScore: their CLIP's, ~100), else 1
    lrm_warmup_steps: int = 0       # steps before the LRM reward enters the student's loss
    lrm_pretrain_steps: int = 0     # first steps of the run in which only the LRM trains, on real latents and
                                    # noised copies scored by the expert (stand-in for RG-LCD's separately
                                    # pretrained latent CLIP, which has no public weights); the student's
                                    # steps follow, so train.steps counts both
    lrm_pretrain_noise: float = 0.5  # noised copies: z + sigma eps, sigma ~ U[0, lrm_pretrain_noise]
    prompts: tuple[str, ...] = ()   # text teachers, caches without captions: class label k means prompt k

    def problems(self):
        if not self.teacher:
            yield "recipe key 'method.teacher' is required: an ldm run folder or a Stable Diffusion pipeline"
        if self.loss not in ("huber", "l2"):
            yield f"recipe key 'method.loss' must be huber or l2, got '{self.loss}'"
        if not 0 <= self.w_min <= self.w_max:
            yield "recipe keys 'method.w_min' <= 'method.w_max' must be at least 0"
        if self.num_train_timesteps % self.original_steps:
            yield "recipe key 'method.original_steps' must divide 'method.num_train_timesteps'"
        if not 0 <= self.target_decay < 1:
            yield "recipe key 'method.target_decay' must be in [0, 1)"
        if self.reward_mode not in ("none", "direct", "lrm"):
            yield f"recipe key 'method.reward_mode' must be none, direct or lrm, got '{self.reward_mode}'"
        if self.reward_mode != "none" and not self.reward:
            yield "recipe key 'method.reward' must name a reward when method.reward_mode is direct or lrm"
        if self.lrm_loss not in ("kl", "ce"):
            yield f"recipe key 'method.lrm_loss' must be kl or ce, got '{self.lrm_loss}'"
        if self.reward_scale < 0:
            yield "recipe key 'method.reward_scale' must be at least 0"
        if self.lrm_pretrain_steps < 0 or self.lrm_pretrain_noise < 0:
            yield "recipe keys 'method.lrm_pretrain_steps' and 'method.lrm_pretrain_noise' must be at least 0"
        if self.expert_scale is not None and self.expert_scale <= 0:
            yield "recipe key 'method.expert_scale' must be positive (or left out: the expert's own logit scale)"
        if self.lrm_pretrain_steps and self.reward_mode != "lrm":
            yield "recipe key 'method.lrm_pretrain_steps' needs method.reward_mode: lrm (set it to 0 otherwise)"

    @property
    def schedule(self) -> VPSchedule:
        return VPSchedule(self.beta_start, self.beta_end, self.num_train_timesteps)


def pseudo_huber_elementwise(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """mean_j sqrt((a - b)_j^2 + c^2) - c over all elements (diffusers' / RG-LCD's huber reduction)."""
    return (torch.sqrt((a.float() - b.float()) ** 2 + c * c) - c).mean()


def guided_solver_step(teacher, z, t_s, cond, null, w, n, grid, alphas_cumprod) -> torch.Tensor:
    """One guided DDIM step of the teacher from t_s = grid[n] to grid[n - 1] (alpha_bar_0 for n = 0):
    x_0 = x_0^c + w (x_0^c - x_0^0), eps likewise, z' = sqrt(ab_prev) x_0 + sqrt(1 - ab_prev) eps.
    `teacher(z, t, c)` returns (x_0, eps)."""
    x0_c, eps_c = teacher(z, t_s, cond)
    x0_u, eps_u = teacher(z, t_s, null)
    wv = torch.as_tensor(w, dtype=torch.float32, device=z.device).reshape(-1, *([1] * (z.ndim - 1)))
    x0_g, eps_g = x0_c + wv * (x0_c - x0_u), eps_c + wv * (eps_c - eps_u)
    n = torch.as_tensor(n).long().cpu()
    prev = torch.where(n > 0, grid[(n - 1).clamp(min=0)], torch.zeros_like(n))
    return ddim_step(x0_g, eps_g, alphas_cumprod[prev].to(z.device))


def is_pipeline(source: str) -> bool:
    """A diffusers pipeline folder or a hub id (not an existing run folder)."""
    from cmgen.pretrained import HUB_ID, resolve_init_source

    p = Path(source)
    if (p / "model_index.json").is_file():
        return True
    if p.exists() or not HUB_ID.match(source):
        return False
    try:  # a hub id only when cached: a run folder not trained yet reads like one
        return (resolve_init_source(source) / "model_index.json").is_file()
    except UserError:
        return False


def pipeline_folder(source: str) -> Path:
    from cmgen.pretrained import resolve_init_source

    try:
        return resolve_init_source(source)
    except UserError:
        raise UserError(f"recipe key 'method.teacher' ('{source}') is neither a run folder, a pipeline folder "
                        "nor a cached hub id; train one with `cmgen train ldm_digits` or pass a folder") from None


class Method(BaseMethod):
    parameterisation = "lcm"

    # ------------------------------------------------------------------ the student network
    @classmethod
    def build_network(cls, recipe, shape, num_classes: int):
        from diffusers import UNet2DConditionModel

        from cmgen.methods.ldm import build_unet
        from cmgen.models.ldm_unet import W_EMBED_DIM, CondUNetBackbone, LatentConsistency

        cfg = recipe.method
        if cfg.teacher and is_pipeline(cfg.teacher):
            folder = pipeline_folder(cfg.teacher)
            config = dict(UNet2DConditionModel.load_config(str(folder / "unet")))
            unet = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": W_EMBED_DIM})
        else:  # the ldm teacher's layout (recipe.model) with its null label, plus the w-embedding
            embeds = num_classes + 1 if recipe.model.class_conditional and num_classes else 0
            unet = build_unet(recipe, shape, embeds, time_cond_proj_dim=W_EMBED_DIM)
        return LatentConsistency(CondUNetBackbone(unet), cfg.schedule, cfg.prediction_type)

    # ------------------------------------------------------------------ set-up
    def __init__(self, cfg: Config, recipe, gen):
        super().__init__(cfg, recipe, gen)
        self.teacher, self.null_cond = load_teacher(cfg, gen)
        cache = latent_cache_of(recipe)   # label i of a captioned cache means caption i
        self.captions = None if cache is None else cached_captions(str(cache.resolve()))
        if self.text and not cfg.prompts and self.captions is None:
            raise UserError("a Stable Diffusion teacher needs captions: set data.path to a cache of a captioned "
                            "folder (cmgen latents encode FOLDER --scaling sd) or list recipe key 'method.prompts' "
                            "(class label k -> prompt k)")
        self._check_teacher()
        unet = gen.net.backbone.unet
        try:
            missing = unet.load_state_dict(self.teacher.backbone.unet.state_dict(), strict=False).missing_keys
        except RuntimeError:  # shapes differ
            missing = ["a tensor of another shape"]
        if any(not k.startswith("time_embedding.cond_proj") for k in missing):
            raise UserError(f"recipe section 'model' does not fit the teacher '{cfg.teacher}' ({missing[0]}); copy "
                            "the teacher recipe's model section into this recipe")
        self.grid = skip_step_grid(cfg.num_train_timesteps, cfg.original_steps)
        self.k = cfg.num_train_timesteps // cfg.original_steps
        self.alphas_cumprod = cfg.schedule.alphas_cumprod()
        self.reward_fn = self.expert = self.lrm = None
        if cfg.reward_mode == "direct":
            from cmgen.rewards.differentiable import build_reward

            self.reward_fn = build_reward(cfg.reward, target_class=cfg.target_class, differentiable=True)
        elif cfg.reward_mode == "lrm":
            from cmgen.rewards.differentiable import build_reward
            from cmgen.rewards.lrm import build_lrm

            self.expert = build_reward(cfg.reward, target_class=cfg.target_class, differentiable=False)
            if cfg.expert_scale is None:   # the expert's own logit scale (RG-LCD's expert logits), else 1
                self.cfg = dataclasses.replace(cfg, expert_scale=getattr(self.expert, "logit_scale", None) or 1.0)
            self.lrm = build_lrm(gen.shape, gen.num_classes, cfg.lrm_width, cond_dim=self._cond_dim())

    @property
    def text(self) -> bool:
        """A text teacher (Stable Diffusion): conditions are prompt embeddings."""
        return self.null_cond is not None and self.null_cond.is_floating_point()

    def _cond_dim(self):
        return self.null_cond.shape[-1] if self.text else None

    def _check_teacher(self):
        t, c = self.teacher, self.cfg
        if t.prediction_type != c.prediction_type or t.schedule != c.schedule:
            raise UserError(f"recipe keys 'method.prediction_type' and 'method.beta_*' must equal the teacher's "
                            f"({t.prediction_type}, {t.schedule}); copy them from the teacher")

    def frozen(self):
        """The teacher and the reward networks (direct reward, LRM expert), which the loop moves to its device."""
        nets = {"teacher": self.teacher, "reward": getattr(self.reward_fn, "module", None),
                "expert": getattr(self.expert, "module", None)}
        return {name: net for name, net in nets.items() if net is not None}

    def targets(self):
        return {"target": self.cfg.target_decay}

    def parts(self):
        if self.lrm is None:
            return {}
        from cmgen.recipe import OptimConfig

        return {"lrm": Part(self.lrm, OptimConfig(name="adamw", lr=self.cfg.lrm_lr, weight_decay=0.0))}

    def phases(self, step: int):
        if self.lrm is None:
            return ("model",)
        return ("lrm",) if step < self.cfg.lrm_pretrain_steps else ("model", "lrm")

    # ------------------------------------------------------------------ the losses
    def prompts_of(self, labels: torch.Tensor) -> list[str]:
        return label_texts(self.captions, self.cfg.prompts, labels)

    @classmethod
    def sample_condition(cls, recipe, labels: torch.Tensor):
        """Sampling a text student (previews, cmgen sample / eval): label i -> the text-encoder embeddings of
        its caption in the run's latent cache (or of method.prompts[i]); class labels pass through."""
        if labels.is_floating_point() or not is_pipeline(recipe.method.teacher):
            return labels
        from cmgen.sd import encode_prompts

        cache = latent_cache_of(recipe)
        texts = label_texts(None if cache is None else cached_captions(str(cache.resolve())), recipe.method.prompts,
                            labels)
        return encode_prompts(pipeline_folder(recipe.method.teacher), texts).to(labels.device)

    @torch.no_grad()
    def collect(self, batches, nets, step, dist):
        """Text teachers: each label becomes its caption's (or prompt's) text-encoder embeddings, and the text
        stays in the batch for the rewards."""
        if not self.text:
            return batches
        from cmgen.sd import encode_prompts

        folder = pipeline_folder(self.cfg.teacher)
        out = []
        for b in batches:
            prompts = self.prompts_of(b.labels)
            b.extra["prompts"] = prompts
            out.append(dataclasses.replace(b, labels=encode_prompts(folder, prompts).to(b.x.device)))
        return out

    def reward_cond(self, batch):
        return batch.extra.get("prompts", batch.labels)

    def null(self, cond):
        if cond is None:
            return None
        return self.null_cond.to(cond.device).expand_as(cond) if cond.is_floating_point() else \
            torch.full_like(cond, int(self.null_cond))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> images (about [-1, 1]), differentiable (the codec's decode is not)."""
        codec = self.gen.codec
        vae = codec.vae
        return vae.decode(codec.denormalise(z).to(next(vae.parameters()).dtype)).sample.float()

    def lcd_pair(self, nets, batch):
        """(student f(z, t_s, c, w), target theta^-(z', t_e, c, w)) for one micro-batch."""
        x0, cond, rng = batch.x, batch.labels, batch.rng
        cfg = self.cfg
        n = rng.randint(0, cfg.original_steps).cpu()
        t_s = self.grid[n].to(x0.device)
        t_e = (t_s - self.k).clamp(min=0)
        eps = rng.randn(*x0.shape[1:]).to(x0.dtype)
        w = (cfg.w_min + (cfg.w_max - cfg.w_min) * rng.rand()).to(x0.device)
        z = add_noise(x0, eps, self.alphas_cumprod, t_s)
        pred = nets.model(z, t_s, cond, w)
        with torch.no_grad():
            z_prev = guided_solver_step(nets.teacher.x0_eps, z, t_s, cond, self.null(cond), w, n, self.grid,
                                        self.alphas_cumprod)
            target = nets.target(z_prev, t_e, cond, w).float()
        return pred, target

    def loss(self, nets, batch, step: int) -> dict:
        cfg = self.cfg
        if batch.phase == "lrm":
            return self.lrm_loss(nets, batch)
        pred, target = self.lcd_pair(nets, batch)
        if cfg.loss == "huber":
            lcd = pseudo_huber_elementwise(pred, target, cfg.huber_c)
        else:
            lcd = (pred.float() - target).pow(2).mean()
        out = {"lcd": lcd.detach()}
        loss = lcd
        if self.lrm is not None:
            batch.extra["triplet"] = (pred.detach(), target)  # the LRM's step after this one
        if cfg.reward_mode != "none" and cfg.reward_scale > 0:
            if cfg.reward_mode == "direct":
                r = self.reward_fn(self.decode(pred), self.reward_cond(batch))
                loss = loss - cfg.reward_scale * r.mean()
            elif gate(step, cfg.lrm_warmup_steps):
                r = nets.lrm(pred, batch.labels, scaled=False)   # the cosine: bounded, as RG-LCD's CLIP reward
                loss = loss - cfg.reward_scale * r.mean()
            else:
                r = torch.zeros(())
            out["reward"] = r.detach().mean()
        return {"loss": loss} | out

    def lrm_loss(self, nets, batch) -> dict:
        """Pairwise KL(softmax(expert logits) || softmax(LRM logits)) over (f, target), (f, real), (target, real)
        (or, with lrm_loss: ce, cross-entropy with the real latent the winner of its pairs)."""
        from cmgen.rewards.lrm import pairwise_kl, pairwise_real_ce

        real, cond = batch.x.float(), batch.labels
        if "triplet" in batch.extra:
            latents = [*batch.extra["triplet"], real]
        else:  # a pretraining step: no student output yet
            latents = noised_partner_triplet(real, cond, batch.rng, self.cfg.lrm_pretrain_noise)
        with torch.no_grad():
            expert = torch.stack([self.expert(self.decode(z), self.reward_cond(batch)).float().to(real.device)
                                  for z in latents], 1)   # an expert may score on the CPU (JPEG size)
            expert = expert * self.cfg.expert_scale
        lrm = torch.stack([nets.lrm(z, cond) for z in latents], 1)
        if self.cfg.lrm_loss == "kl":
            loss, agree = pairwise_kl(expert, lrm)
        else:
            loss, agree = pairwise_real_ce(lrm), torch.tensor(float("nan"))
        return {"loss": loss, "agree": agree, "expert": expert[:, 0].mean() / self.cfg.expert_scale}


def noised_partner_triplet(real: torch.Tensor, labels, rng, noise: float) -> list[torch.Tensor]:
    """The LRM's pretraining triplet for each real latent z_i: (z_i + a eps, z_j + b eps', z_i), with z_j a row
    of the batch drawn among those of z_i's class (z_i itself when it is alone or unlabelled, or the conditions
    are text), a, b ~ U[0, noise]."""
    n = len(real)
    u = rng.rand().cpu()
    j = torch.arange(n)
    if labels is not None and not labels.is_floating_point():
        same = labels.view(-1, 1).cpu() == labels.view(1, -1).cpu()
        k = (u * same.sum(1)).long()                   # the k-th row of z_i's class, uniformly
        j = (same.long().cumsum(1) <= k.view(-1, 1)).sum(1)
    view = (n,) + (1,) * (real.ndim - 1)
    a = noise * rng.rand().view(view).to(real)
    b = noise * rng.rand().view(view).to(real)
    eps_a, eps_b = rng.randn(*real.shape[1:]).to(real), rng.randn(*real.shape[1:]).to(real)
    return [real + a * eps_a, real[j.to(real.device)] + b * eps_b, real]


def label_texts(captions: Optional[list], prompts, labels: torch.Tensor) -> list[str]:
    """Each label's text: its caption (a captioned cache), else prompts[label % len(prompts)]."""
    idx = labels.long().cpu().tolist()
    if captions is not None:
        return [captions[i] for i in idx]
    if not prompts:
        raise UserError("a text student's labels need captions (a captioned latent cache in data.path) or recipe "
                        "key 'method.prompts'")
    return [prompts[i % len(prompts)] for i in idx]


@lru_cache(maxsize=2)
def cached_captions(folder: str) -> Optional[list]:
    return read_captions(folder)


def latent_cache_of(recipe) -> Optional[Path]:
    """The complete latent cache a recipe trains on, or None (--smoke without one, or other data)."""
    from cmgen.latents import FINAL

    path = recipe.data.path
    if recipe.data.name != "latents" or not path or not (Path(path) / FINAL).is_file():
        return None
    return Path(path)


SCALING_WORDS = {"normalised": "normalised to std 0.5 per element (latent CT's convention)",
                 "sd": "in Stable Diffusion's scaling (VAE latents times its scaling_factor)"}


def check_scaling(recipe, expected: str, teacher: str, vae: str) -> None:
    """One sentence when the recipe's latent cache is not in the scaling (`expected`) its teacher works in."""
    from cmgen.latents import cache_scaling

    cache = latent_cache_of(recipe)
    if cache is None or (have := cache_scaling(cache)) == expected:
        return
    raise UserError(f"latent cache '{cache}' is {SCALING_WORDS[have]}, but {teacher} expects latents "
                    f"{SCALING_WORDS[expected]}; re-encode with `cmgen latents encode DATA --vae {vae} --scaling "
                    f"{expected} --out NEW_CACHE` and set data.path to it")


def load_teacher(cfg: Config, gen):
    """(frozen NoisePredictor, null condition): an ldm run (EMA weights; the null label) or a Stable Diffusion
    pipeline (its UNet and scheduler constants; the empty prompt's embeddings)."""
    if not is_pipeline(cfg.teacher):
        from cmgen.runs import load_model

        if not Path(cfg.teacher).exists():
            from cmgen.pretrained import HUB_ID

            hint = (f"it is no cached hub id either: run `hf download {cfg.teacher}` once while online, or pass a "
                    "pipeline folder" if HUB_ID.match(cfg.teacher) and "runs/" not in cfg.teacher
                    else "train the teacher first (cmgen train ldm_digits) or pass its run folder")
            raise UserError(f"recipe key 'method.teacher' ('{cfg.teacher}') does not exist; {hint}")
        tg = load_model(cfg.teacher)
        if tg.parameterisation != "ldm":
            raise UserError(f"recipe key 'method.teacher' ('{cfg.teacher}') is a {tg.parameterisation} run; "
                            "LCD distils an ldm teacher (cmgen train ldm_digits)")
        own = latent_cache_of(tg.recipe)
        if own is not None:   # the teacher's latents: the scaling and VAE of the cache it was trained on
            from cmgen.latents import cache_scaling, read_spec

            check_scaling(gen.recipe, cache_scaling(own), f"the teacher '{cfg.teacher}' (trained on '{own}')",
                          read_spec(own).get("vae_source", "VAE"))
        if gen.conditional and tg.null_label is None:
            raise UserError(f"the teacher '{cfg.teacher}' was trained without method.label_dropout; guided "
                            "distillation needs its null label")
        null = torch.tensor(tg.null_label) if tg.null_label is not None else None
        return tg.net.eval().requires_grad_(False), null
    from cmgen.sd import load_sd_teacher

    check_scaling(gen.recipe, "sd", f"the Stable Diffusion teacher '{cfg.teacher}'", cfg.teacher)
    return load_sd_teacher(pipeline_folder(cfg.teacher))
