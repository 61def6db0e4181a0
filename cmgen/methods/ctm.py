"""Consistency trajectory models (Kim, Lai et al., ICLR 2024), distilled from an EDM teacher.

The network is the jump G(x, t, s) = (s/t) x + (1 - s/t) g(x, t, s) (cmgen.precond.TrajectoryJump);
the student copies its teacher by name, the s branch starting at zero, so at step 0 G is the teacher's
Euler step. One loss step (the reference code's defaults, ../shared/research/ctm.md sec. 2):

1. k ~ P(k) ∝ k over 1..K, once per batch; per sample t = t_n with n ~ U{0..N-1-k}, u = t_{n+k},
   s = t_m with m ~ U{n+k..N-1}, on the descending Karras grid t_0 = sigma_max .. t_{N-1} = sigma_min.
2. x_t = x_0 + t z; x_u = k teacher Heun steps along the grid from t to u (no grad).
3. L_CTM = d(G⁻(G(x_t, t, s), s, sigma_min), G⁻(sg G(x_u, u, s), s, sigma_min)): theta⁻ is the EMA
   target; the gradient flows through the inner call of the estimate only.
4. L_DSM = lambda(sigma) ||g(x_sigma, sigma, sigma) - x_0||^2, lambda = (sigma^2 + sd^2)/(sigma sd)^2;
   sigma lognormal(P_mean, P_std) for the first half of the global batch, Karras(r), r ~ U[0, 0.7],
   for the second.
5. L = L_CTM + lambda_DSM L_DSM (+ lambda_GAN L_G), lambda_DSM = ||dL_CTM/dW|| / (||dL_DSM/dW|| + 1e-4)
   clamped to [0, 1e4], W the network's output layer (found by tracing a forward pass).
6. From `gan_start` on, steps alternate G / D (cmgen.methods.ctm_gan): hinge loss, DiffAugment, the
   discriminator on RAdam(2e-3, 0.5/0.9), lambda_GAN clipped to [0.01, 10]; the EMAs move on G steps only.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from cmgen.errors import UserError
from cmgen.losses import ict_huber_c, pseudo_huber
from cmgen.methods.base import Method as BaseMethod
from cmgen.methods.base import Part, gate
from cmgen.precond import edm_loss_weight
from cmgen.rng import keyed_generator
from cmgen.schedules import karras_sigmas

DISTANCES = ("l2", "pseudo_huber", "lpips")
DSM_WEIGHT_RANGE = (0.0, 1e4)       # lambda_DSM clamp (reference code)
GAN_WEIGHT_RANGE = (0.01, 10.0)     # lambda_GAN clip (reference code)


@dataclass(frozen=True)
class Config:
    teacher: Optional[str] = None   # EDM run or checkpoint folder; null = a random teacher (smoke tests only)
    grid: int = 18                  # N, points of the Karras time grid (CIFAR 18, ImageNet 40)
    max_k: int = 17                 # K, most teacher Heun steps per estimate (CIFAR 17, ImageNet 39 / 20)
    distance: str = "lpips"         # lpips (the paper's; needs method.lpips_weights) | l2 | pseudo_huber
    huber_c: Optional[float] = None  # pseudo_huber c; null = 0.00054 sqrt(d)
    lpips_weights: Optional[str] = None  # folder: torchvision's vgg16-397923af.pth (+ lpips' vgg.pth), cmgen.perceptual
    lpips_pooling: str = "avg"      # avg: the reference code's LPIPS (piq, replace_pooling=True) | max: original VGG
    target_decay: float = 0.999     # mu of the EMA target theta⁻ the outer jumps use
    target_decay_gan: Optional[float] = None  # mu of theta⁻ from gan_start on (CIFAR-10's GAN run 0.9999); null = same
    dsm_weight: float = 1.0         # multiplier of the DSM term on top of its adaptive weight; 0 = off
    adaptive_dsm: bool = True       # lambda_DSM from gradient norms at the output layer (else 1)
    p_mean: float = -1.2            # DSM: lognormal sigma for the first half of the batch
    p_std: float = 1.2
    dsm_karras_r: float = 0.7       # DSM: Karras(r), r ~ U[0, dsm_karras_r], for the second half
    gan_start: Optional[int] = None  # step from which G and D steps alternate; null = no GAN
    gan_weight: float = 1.0         # multiplier of L_G on top of its adaptive weight
    gan_period: int = 2             # a G step when (step - gan_start) % gan_period == 0, else a D step
    disc_lr: float = 2.0e-3         # discriminator RAdam
    disc_betas: tuple[float, float] = (0.5, 0.9)
    disc_features: str = "own"      # own (a conv net trained here) | digits (cmgen's digits net) | timm:NAME
    disc_weights: Optional[str] = None  # weights file of the frozen feature network (timm:NAME needs one)
    disc_channels: int = 64         # width of the discriminator heads
    diffaug: str = "color,translation,cutout"   # DiffAugment policies, comma-separated; "" = none

    def problems(self):
        if self.grid < 3:
            yield f"recipe key 'method.grid' must be at least 3, got {self.grid}"
        if not 1 <= self.max_k <= self.grid - 1:
            yield f"recipe key 'method.max_k' must be in [1, method.grid - 1 = {self.grid - 1}], got {self.max_k}"
        if self.distance not in DISTANCES:
            yield f"recipe key 'method.distance' must be one of {', '.join(DISTANCES)}, got '{self.distance}'"
        if self.lpips_pooling not in ("avg", "max"):
            yield f"recipe key 'method.lpips_pooling' must be avg or max, got '{self.lpips_pooling}'"
        for key in ("target_decay", "target_decay_gan"):
            mu = getattr(self, key)
            if mu is not None and not 0 <= mu < 1:
                yield f"recipe key 'method.{key}' must be in [0, 1), got {mu}"
        if self.dsm_weight < 0 or self.gan_weight < 0:
            yield "recipe keys 'method.dsm_weight' and 'method.gan_weight' must be at least 0"
        if not 0 < self.dsm_karras_r <= 1:
            yield f"recipe key 'method.dsm_karras_r' must be in (0, 1], got {self.dsm_karras_r}"
        if self.target_decay_gan is not None and self.gan_start is None:
            yield "recipe key 'method.target_decay_gan' needs method.gan_start (the GAN stage); set it or drop the key"
        if self.gan_start is not None and self.gan_start < 0:
            yield f"recipe key 'method.gan_start' must be at least 0 (or null for no GAN), got {self.gan_start}"
        if self.gan_period < 2:
            yield f"recipe key 'method.gan_period' must be at least 2 (G and D steps alternate), got {self.gan_period}"
        from cmgen.methods.ctm_gan import DIFFAUG_POLICIES

        bad = [p for p in self.diffaug.split(",") if p.strip() and p.strip() not in DIFFAUG_POLICIES]
        if bad:
            yield f"recipe key 'method.diffaug' names unknown policies {bad}; use {', '.join(DIFFAUG_POLICIES)}"


# ----------------------------------------------------------------------------- formulas

def k_probs(max_k: int) -> torch.Tensor:
    """P(k) ∝ k for k = 1..K (index k - 1)."""
    k = torch.arange(1, max_k + 1, dtype=torch.float64)
    return k / k.sum()


def dsm_karras_sigma(r: torch.Tensor, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """Karras(r) = (sigma_max^(1/rho) + r (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (hi + r * (lo - hi)) ** rho


def adaptive_weight(loss_ref: torch.Tensor, loss_other: torch.Tensor, layer: torch.Tensor, lo: float,
                    hi: float) -> torch.Tensor:
    """||d loss_ref / d W|| / (||d loss_other / d W|| + 1e-4), clamped to [lo, hi] and detached (VQGAN)."""
    g_ref = torch.autograd.grad(loss_ref, layer, retain_graph=True)[0]
    g_other = torch.autograd.grad(loss_other, layer, retain_graph=True)[0]
    return (g_ref.norm() / (g_other.norm() + 1e-4)).clamp(lo, hi).detach()


def output_layer(net: torch.nn.Module, x: torch.Tensor, *args) -> torch.nn.Parameter:
    """The weight of the last layer a forward pass of `net(x, *args)` runs (the network's output layer)."""
    order = []
    hooks = [m.register_forward_hook(lambda mod, i, o: order.append(mod)) for m in net.modules()
             if isinstance(getattr(m, "weight", None), torch.nn.Parameter) and m.weight.ndim >= 2
             and m.weight.requires_grad]
    try:
        with torch.no_grad():
            net(x, *args)
    finally:
        for h in hooks:
            h.remove()
    if not order:
        raise UserError("the CTM network has no trainable layer with a weight matrix; check model.* in the recipe")
    return order[-1].weight


def distance_fn(cfg: Config, shape: tuple[int, ...], device):
    """Per-sample distance, shape [B]: l2 = mean squared error over a sample's elements; pseudo_huber =
    sqrt(||a - b||^2 + c^2) - c (iCT's); lpips = LPIPS(VGG16) on images resized to 224 (the paper's;
    cmgen.perceptual)."""
    dim = math.prod(shape)
    if cfg.distance == "l2":
        return lambda a, b: (a.float() - b.float()).flatten(1).pow(2).mean(1)
    if cfg.distance == "pseudo_huber":
        c = cfg.huber_c if cfg.huber_c is not None else ict_huber_c(dim)
        return lambda a, b: pseudo_huber(a, b, c)
    from cmgen.perceptual import load_lpips, lpips_224

    if len(shape) != 3 or shape[0] not in (1, 3):
        raise UserError(f"method.distance=lpips compares images (1 or 3 channels), the data have shape {list(shape)}; "
                        "set method.distance=pseudo_huber (or l2)")
    return lpips_224(load_lpips(cfg.lpips_weights, cfg.lpips_pooling).to(device))


# ----------------------------------------------------------------------------- teacher

def load_teacher(cfg: Config, recipe, gen) -> torch.nn.Module:
    """The frozen EDM denoiser D(x, t) the student distils: a run/checkpoint, or (teacher null) a freshly
    initialised EDM network of the recipe's model."""
    from cmgen.generator import build_network

    if cfg.teacher is None:
        warnings.warn("method.teacher is null: distilling a randomly initialised teacher (smoke tests only)",
                      stacklevel=2)
        from dataclasses import replace

        from cmgen.methods.edm import Config as EDMConfig

        edm_recipe = replace(recipe, method=EDMConfig())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.train.seed)
            return build_network(edm_recipe, gen.shape, gen.num_classes)
    if not Path(cfg.teacher).exists():
        raise UserError(f"method.teacher '{cfg.teacher}' does not exist; train the EDM teacher first (cmgen train "
                        "edm_digits) or point method.teacher at its run folder")
    from cmgen.runs import load_model

    teacher = load_model(cfg.teacher, ema=True)
    if teacher.parameterisation != "edm":
        raise UserError(f"method.teacher '{cfg.teacher}' is a {teacher.parameterisation} model; CTM distils an EDM "
                        "denoiser (a run of method edm)")
    tp, p = teacher.recipe.precond, recipe.precond
    if (tp.sigma_data, tp.c_noise) != (p.sigma_data, p.c_noise):
        raise UserError(f"method.teacher was trained with precond.sigma_data={tp.sigma_data}, c_noise={tp.c_noise}; "
                        f"set the same in this recipe (now {p.sigma_data}, {p.c_noise})")
    if tuple(teacher.shape) != tuple(gen.shape):
        raise UserError(f"method.teacher models data of shape {list(teacher.shape)}, this recipe's data have "
                        f"{list(gen.shape)}; use the teacher of this data set")
    return teacher.net


def init_from_teacher(student: torch.nn.Module, teacher: torch.nn.Module, where: str) -> None:
    """Copy every teacher tensor into the student by name; only the s branch may stay as initialised
    (its projections are zero, so the student is the teacher's Euler step)."""
    from cmgen.models.two_time import is_s_branch
    from cmgen.pretrained import load_matching

    left, unused = load_matching(student, teacher.state_dict())
    bad = [k for k in left if not is_s_branch(k)] + unused
    if bad:
        raise UserError(f"method.teacher '{where}' does not fit the recipe's model (e.g. '{bad[0]}'); give this "
                        "recipe the teacher's model.* settings")


# ----------------------------------------------------------------------------- method

class Method(BaseMethod):
    parameterisation = "ctm"

    def __init__(self, cfg: Config, recipe, gen):
        super().__init__(cfg, recipe, gen)
        p = recipe.precond
        self.teacher = load_teacher(cfg, recipe, gen)
        init_from_teacher(gen.net, self.teacher, str(cfg.teacher))
        self.times = karras_sigmas(cfg.grid, p.sigma_min, p.sigma_max, p.rho).flip(0)   # t_0 = sigma_max
        self.distance = distance_fn(cfg, tuple(gen.shape), "cpu")   # LPIPS follows the inputs' device
        x = torch.zeros(1, *gen.shape)
        labels = torch.zeros(1, dtype=torch.long) if gen.conditional else None
        self.layer = output_layer(gen.net, x, torch.ones(1), torch.ones(1), labels)
        self.disc = None
        if cfg.gan_start is not None:
            from cmgen.methods.ctm_gan import build_discriminator

            self.disc = build_discriminator(cfg, gen.shape)

    def frozen(self):
        return {"teacher": self.teacher}

    def targets(self):
        c = self.cfg   # target_decay_gan needs gan_start (Config.problems)
        return {"target": c.target_decay if c.target_decay_gan is None else self.target_decay_at}

    def target_decay_at(self, step: int) -> float:
        """theta⁻'s EMA decay after the model step `step`: target_decay_gan once the GAN stage is on."""
        c = self.cfg
        return c.target_decay_gan if gate(step, c.gan_start) else c.target_decay

    def parts(self):
        if self.disc is None:
            return {}
        from cmgen.recipe import OptimConfig

        return {"disc": Part(self.disc, OptimConfig(name="radam", lr=self.cfg.disc_lr, betas=self.cfg.disc_betas))}

    def phases(self, step: int):
        c = self.cfg
        if gate(step, c.gan_start) and (step - c.gan_start) % c.gan_period != 0:
            return ("disc",)
        return ("model",)

    # ------------------------------------------------------------------ draws
    def draw(self, rng, n: int):
        """(k, index of t, index of s) on the descending grid; k once per optimizer step (all micro-batches
        and processes share it), n ~ U{0..N-1-k}, m ~ U{n+k..N-1} per sample."""
        N = self.cfg.grid
        k = int(torch.multinomial(k_probs(self.cfg.max_k).float(), 1,
                                  generator=keyed_generator(rng.seed, rng.step, *rng.stream, "ctm-k")).item()) + 1
        i_t = rng.randint(0, N - k).cpu()
        i_s = i_t + k + (rng.rand().cpu() * (N - i_t - k)).floor().long().clamp(max=N - 1 - i_t - k)
        return k, i_t, i_s

    @torch.no_grad()
    def teacher_heun(self, teacher, x: torch.Tensor, i_t: torch.Tensor, k: int, labels=None) -> torch.Tensor:
        """k Heun steps of the PF-ODE dx/dt = (x - D(x, t))/t along the grid from t_{i_t} to t_{i_t + k}."""
        view = (-1,) + (1,) * (x.ndim - 1)
        x = x.float()
        for j in range(k):
            t = self.times[i_t + j].to(x.device, torch.float32)
            t_next = self.times[i_t + j + 1].to(x.device, torch.float32)
            h = (t_next - t).view(view)
            d = (x - teacher(x, t, labels).float()) / t.view(view)
            x_e = x + h * d
            d_e = (x_e - teacher(x_e, t_next, labels).float()) / t_next.view(view)
            x = x + h * 0.5 * (d + d_e)
        return x

    def inner_and_target(self, nets, batch, with_target: bool = True):
        """(G(x_t, t, s) with the gradient, x_tgt without any (None without `with_target`: the discriminator's
        fakes need no teacher), draws (k, t, u, s))."""
        x, labels, rng = batch.x, batch.labels, batch.rng
        k, i_t, i_s = self.draw(rng, len(x))
        dev = x.device
        t = self.times[i_t].to(dev, torch.float32)
        u = self.times[i_t + k].to(dev, torch.float32)
        s = self.times[i_s].to(dev, torch.float32)
        z = rng.randn(*x.shape[1:]).to(x.dtype)
        x_t = x + t.view((-1,) + (1,) * (x.ndim - 1)) * z
        inner = nets.model(x_t, t, s, labels)
        if not with_target:
            return inner, None, (k, t, u, s)
        x_u = self.teacher_heun(nets.teacher, x_t, i_t, k, labels)
        with torch.no_grad():
            tgt = self.outer(nets, nets.model(x_u, u, s, labels), s, labels)
        return inner, tgt, (k, t, u, s)

    def outer(self, nets, x_s, s, labels=None):
        """G⁻(x_s, s, sigma_min): the target network's jump to sigma_min."""
        return nets.target(x_s, s, torch.full_like(s, self.recipe.precond.sigma_min), labels)

    def estimate_and_target(self, nets, batch, with_target: bool = True):
        """(x_est = G⁻(G(x_t, t, s), s, sigma_min) with the gradient of the inner call, x_tgt without any,
        draws)."""
        inner, tgt, draws = self.inner_and_target(nets, batch, with_target)
        return self.outer(nets, inner, draws[3], batch.labels), tgt, draws

    def dsm_sigmas(self, rng) -> torch.Tensor:
        """Lognormal for the first half of the global batch, Karras(r), r ~ U[0, dsm_karras_r], for the rest."""
        p, c = self.recipe.precond, self.cfg
        lognormal = torch.exp(c.p_mean + c.p_std * rng.randn())
        karras = dsm_karras_sigma(c.dsm_karras_r * rng.rand(), p.sigma_min, p.sigma_max, p.rho)
        first = (rng.offset + torch.arange(rng.count, device=lognormal.device)) < rng.global_batch // 2
        return torch.where(first, lognormal, karras)

    def dsm(self, nets, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean lambda(sigma) ||g(x_sigma, sigma, sigma) - x_0||^2 over the batch, the unweighted MSE)."""
        x, rng = batch.x, batch.rng
        sigma = self.dsm_sigmas(rng).to(x.device)
        n = rng.randn(*x.shape[1:]).to(x.dtype) * sigma.view((-1,) + (1,) * (x.ndim - 1))
        g = nets.model(x + n, sigma, sigma, batch.labels, output="g")
        mse = (g.float() - x.float()).flatten(1).pow(2).mean(1)
        return (edm_loss_weight(sigma, self.recipe.precond.sigma_data) * mse).mean(), mse.detach().mean()

    # ------------------------------------------------------------------ loss
    def loss(self, nets, batch, step: int) -> dict:
        """L_CTM + lambda_DSM L_DSM (+ lambda_GAN L_G). Each term that runs through the outer (target) jump is
        backpropagated through theta⁻ once, to the inner output G(x_t, t, s) (theta⁻ takes no gradient); its
        surrogate <G(x_t, t, s), dL/dG> then carries the same gradient to theta, so the adaptive weights'
        gradient norms at the output layer and the final backward do not run through theta⁻ again. The
        returned loss has the value of the sum of the terms and the gradient of it."""
        if batch.phase == "disc":
            from cmgen.methods.ctm_gan import discriminator_loss

            with torch.no_grad():
                fake, _, _ = self.estimate_and_target(nets, batch, with_target=False)
            return discriminator_loss(nets.disc, batch.x, fake, batch.rng, self.cfg.diffaug)
        c = self.cfg
        inner, tgt, (k, _t, _u, s) = self.inner_and_target(nets, batch)
        leaf = inner.detach().requires_grad_(True)
        est = self.outer(nets, leaf, s, batch.labels)
        l_ctm = self.distance(est, tgt).mean()
        gan = gate(step, c.gan_start)

        def surrogate(term, keep):
            return (inner * torch.autograd.grad(term, leaf, retain_graph=keep)[0]).sum()

        s_ctm = surrogate(l_ctm, gan)
        loss, value = s_ctm, l_ctm.detach()
        terms = {"ctm": l_ctm.detach(), "k": torch.tensor(float(k))}
        if c.dsm_weight > 0:
            l_dsm, mse = self.dsm(nets, batch)
            lam = adaptive_weight(s_ctm, l_dsm, self.layer, *DSM_WEIGHT_RANGE) if c.adaptive_dsm else torch.tensor(1.0)
            loss, value = loss + c.dsm_weight * lam * l_dsm, value + c.dsm_weight * lam * l_dsm.detach()
            terms |= {"dsm": l_dsm.detach(), "dsm_mse": mse, "lambda_dsm": lam}
        if gan:
            from cmgen.methods.ctm_gan import generator_loss

            l_g = generator_loss(nets.disc, est, batch.rng, c.diffaug)
            s_g = surrogate(l_g, False)
            lam = adaptive_weight(s_ctm, s_g, self.layer, *GAN_WEIGHT_RANGE)
            loss, value = loss + c.gan_weight * lam * s_g, value + c.gan_weight * lam * l_g.detach()
            terms |= {"gan_g": l_g.detach(), "lambda_gan": lam}
        return {"loss": loss - loss.detach() + value} | terms
