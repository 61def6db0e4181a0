"""diffusers pipeline classes for cmgen models that stock diffusers classes cannot express.

`CMGenPipeline(unet, scheduler)` samples any single-time consistency network that saves as a
diffusers model (e.g. `cmgen.models.nsln.NsLNUNet2DModel`) with cmgen's own preconditioning
and sampler, so its images equal `cmgen sample` by construction. `CMGenScheduler` holds the
noise levels. `CMGenLatentPipeline(unet, scheduler, vae, latent_stats)` does the same in a VAE's
latent space and decodes (latent CT models). Load an exported folder offline with

    from cmgen.pipelines import CMGenPipeline
    pipe = CMGenPipeline.from_pretrained(folder)

or, through diffusers alone (cmgen must be installed):
`DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)`.

EDM and flow models export with diffusers' own schedulers, `EDMEulerScheduler` and
`FlowMatchEulerDiscreteScheduler`: `CMGenEDMPipeline` / `CMGenFlowPipeline` run their Euler
sampler through the stock scheduler's `scale_model_input`/`step` (which reproduces cmgen's Euler
sampler) and cmgen's own Heun and SDE samplers with the scheduler's constants otherwise.

Later methods add their pipeline classes here and one entry per (parameterisation, network class)
to `PIPELINES`, so `cmgen export` picks them automatically.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional, Sequence, Union

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, ModelMixin, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401  looked up by name when loading

from cmgen.models.nsln import NsLNUNet2DModel
from cmgen.models.two_time import TwoTimeUNet2DModel
from cmgen.precond import ConsistencyDenoiser, PrecondConfig

Generators = Union[torch.Generator, list[torch.Generator], None]


class CMGenScheduler(SchedulerMixin, ConfigMixin):
    """The noise levels of a cmgen model: EDM/CM constants and the default sampling sigmas."""

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5,
                 rho: float = 7.0, sample_sigmas: Sequence[float] = (80.0, 0.821), clip_denoised: bool = True,
                 c_noise: str = "cm"):
        self.init_noise_sigma = sigma_max
        self.sigmas: list[float] = [sigma_max]

    def precond(self) -> PrecondConfig:
        """The run's preconditioning, its c_noise convention included (folders written before it was stored: cm)."""
        c = self.config
        return PrecondConfig(sigma_min=c.sigma_min, sigma_max=c.sigma_max, sigma_data=c.sigma_data, rho=c.rho,
                             c_noise=c.c_noise)

    def set_timesteps(self, num_inference_steps: int = 1, sigmas: Optional[Sequence[float]] = None) -> list[float]:
        """Decreasing sigmas to evaluate at: explicit `sigmas`, or the recipe's schedule for that many steps."""
        from cmgen.sampling import default_sigmas

        if sigmas is None:
            # default_sigmas reads only recipe.precond and recipe.sample.sigmas
            recipe = SimpleNamespace(precond=self.precond(), sample=SimpleNamespace(sigmas=self.config.sample_sigmas))
            sigmas = default_sigmas(recipe, num_inference_steps)
        self.sigmas = [float(s) for s in sigmas]
        return self.sigmas


def generator_noise(generator: Generators, batch_size: int, shape: tuple[int, ...], device):
    """noise(k) for the sampler, drawn like diffusers' randn_tensor: one draw per image from a
    list of generators, else one batch draw; step k's noise is drawn when step k runs."""
    def noise(_k: int) -> torch.Tensor:
        if isinstance(generator, list):
            if len(generator) != batch_size:
                raise ValueError(f"got {len(generator)} generators for batch_size {batch_size}")
            return torch.cat([torch.randn((1, *shape), generator=g) for g in generator]).to(device)
        return torch.randn((batch_size, *shape), generator=generator).to(device)
    return noise


def _class_labels(unet, class_labels, batch_size: int, device, num_classes: Optional[int] = None):
    """Label j % classes for image j when none are given (as `cmgen sample` does); None if unconditional."""
    embeds = unet.config.num_class_embeds
    if not embeds:
        return None
    if class_labels is None:
        class_labels = torch.arange(batch_size) % (num_classes or embeds)
    return torch.as_tensor(class_labels, dtype=torch.long).reshape(-1).expand(batch_size).to(device)


def _sample_shape(unet) -> tuple[int, ...]:
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, (list, tuple)) else (cfg.sample_size,) * 2
    return (cfg.in_channels, *size)


def _images(x: torch.Tensor, output_type: str, numpy_to_pil):
    image = (x / 2 + 0.5).clamp(0, 1)
    if output_type in ("np", "pil"):
        image = image.cpu().permute(0, 2, 3, 1).numpy()
        if output_type == "pil":
            image = numpy_to_pil(image)
    elif output_type != "pt":
        raise ValueError(f"output_type must be pt, np or pil, got {output_type!r}")
    return image


class CMGenPipeline(DiffusionPipeline):
    """One- or few-step sampling of a consistency network f = c_skip x + c_out F(c_in x, 250 ln sigma, y)."""

    model_cpu_offload_seq = "unet"

    def __init__(self, unet, scheduler: CMGenScheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    def denoiser(self) -> ConsistencyDenoiser:
        """The consistency function f(x, sigma, labels), sharing this pipeline's network."""
        from cmgen.models.unet import UNetBackbone

        return ConsistencyDenoiser(UNetBackbone(self.unet), self.scheduler.precond()).eval()

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, class_labels=None, num_inference_steps: int = 1,
                 sigmas: Optional[Sequence[float]] = None, generator: Generators = None,
                 output_type: str = "pil", return_dict: bool = True):
        """Images from `num_inference_steps` steps of the exported schedule, or at explicit `sigmas`.

        Class-conditional models without `class_labels` use label j % num_classes for image j, as
        `cmgen sample` does.
        """
        from cmgen.sampling import consistency_multistep

        device = self._execution_device
        sigmas = self.scheduler.set_timesteps(num_inference_steps, sigmas)
        labels = _class_labels(self.unet, class_labels, batch_size, device)
        noise = generator_noise(generator, batch_size, _sample_shape(self.unet), device)
        x = consistency_multistep(self.denoiser(), noise, sigmas, sigma_min=self.scheduler.config.sigma_min,
                                  class_labels=labels, clip_denoised=self.scheduler.config.clip_denoised)
        image = _images(self.decode(x), output_type, self.numpy_to_pil)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=image) if return_dict else (image,)


    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """The sampler's output as images in [-1, 1] (pixel models sample images directly)."""
        return x


class LatentStatistics(ModelMixin, ConfigMixin):
    """The per-element mean/std maps of a latent model's training latents: the model sees
    x = sigma_data (z - mean) / std (cmgen.latents), so decoding needs them beside the VAE. With
    `scaling: sd` the model saw Stable Diffusion's (z - shift) * scaling_factor and decoding uses the VAE's
    factors (the maps then hold the equivalent constants)."""

    @register_to_config
    def __init__(self, shape: Sequence[int] = (4, 32, 32), sigma_data: float = 0.5, scaling: str = "normalised"):
        super().__init__()
        self.register_buffer("mean", torch.zeros(tuple(shape)))
        self.register_buffer("std", torch.ones(tuple(shape)))

    @classmethod
    def from_codec(cls, codec) -> "LatentStatistics":
        stats = cls(shape=list(codec.mean.shape), sigma_data=codec.sigma_data,
                    scaling=getattr(codec, "scaling", "normalised"))
        stats.mean.copy_(codec.mean)
        stats.std.copy_(codec.std)
        return stats

    def codec(self, vae, image_shape=None):
        from cmgen.latents import LatentCodec

        return LatentCodec(vae, self.mean, self.std, self.config.sigma_data, image_shape=image_shape,
                           scaling=getattr(self.config, "scaling", "normalised"))


class CMGenLatentPipeline(CMGenPipeline):
    """A latent consistency model (latent CT): cmgen's consistency sampler over the normalised latents
    (estimates not clipped), then the VAE decoder through the training latents' statistics, the same
    decode `cmgen sample` runs."""

    model_cpu_offload_seq = "unet->vae"

    def __init__(self, unet, scheduler: CMGenScheduler, vae, latent_stats: LatentStatistics):
        DiffusionPipeline.__init__(self)
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae, latent_stats=latent_stats)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return self.latent_stats.codec(self.vae).decode(x)


class _GuidedPipeline(DiffusionPipeline):
    """An EDM or flow network with a stock scheduler, class labels and classifier-free guidance.

    `null_label` (stored in model_index.json) is the class index that means "no class"; it is set
    when the model was trained with label dropout, and guidance_scale != 1 needs it.
    """

    model_cpu_offload_seq = "unet"
    samplers: tuple[str, ...] = ()
    option_names: tuple[str, ...] = ()  # the recipe's sample.* keys its samplers read (stored by `cmgen export`)

    def __init__(self, unet, scheduler, null_label: Optional[int] = None, num_classes: Optional[int] = None,
                 default_sampler: Optional[str] = None, default_steps: int = 1, default_options: Optional[dict] = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(null_label=null_label, num_classes=num_classes,
                                default_sampler=default_sampler or self.samplers[0], default_steps=default_steps,
                                default_options=dict(default_options or {}))

    def _raw(self, x, t, labels, guidance_scale: float):
        """The UNet's output F, guided as uncond + w (cond - uncond) (D and v are affine in F)."""
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(x.shape[0])
        if guidance_scale == 1.0:
            return self.unet(x, t, class_labels=labels).sample
        null = torch.full_like(labels, self.config.null_label)
        out = self.unet(torch.cat([x, x]), torch.cat([t, t]), class_labels=torch.cat([labels, null])).sample
        cond, uncond = out.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def _guided(self, net, guidance_scale: float):
        from cmgen.sampling.registry import guided

        return guided(net, guidance_scale, self.config.null_label)

    def _check(self, sampler: str, guidance_scale: float, labels) -> None:
        if sampler not in self.samplers:
            raise ValueError(f"sampler must be one of {', '.join(self.samplers)}, got {sampler!r}")
        if guidance_scale != 1.0 and (labels is None or self.config.null_label is None):
            raise ValueError("guidance_scale != 1 needs a class-conditional model trained with label dropout")

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, class_labels=None, num_inference_steps: Optional[int] = None,
                 sampler: Optional[str] = None, guidance_scale: float = 1.0, generator: Generators = None,
                 output_type: str = "pil", return_dict: bool = True, **options):
        """Images from `num_inference_steps` steps of `sampler` (defaults: the recipe's).

        Class-conditional models without `class_labels` use label j % num_classes for image j, as
        `cmgen sample` does. `options`: churn (EDM Heun), sde_a (flow SDE); unset ones are the run's recipe
        values (`default_options`, written by `cmgen export`), else the recipe defaults.
        """
        from cmgen.recipe import SampleConfig

        options = {**{k: getattr(SampleConfig, k) for k in self.option_names}, **(self.config.default_options or {}),
                   **options}
        device = self._execution_device
        sampler = sampler or self.config.default_sampler
        steps = num_inference_steps or self.config.default_steps
        labels = _class_labels(self.unet, class_labels, batch_size, device, self.config.num_classes)
        self._check(sampler, guidance_scale, labels)
        noise = generator_noise(generator, batch_size, _sample_shape(self.unet), device)
        x = self._sample(sampler, steps, noise, labels, guidance_scale, options)
        image = _images(x, output_type, self.numpy_to_pil)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=image) if return_dict else (image,)


class CMGenEDMPipeline(_GuidedPipeline):
    """EDM denoiser D = c_skip x + c_out F(c_in x, 0.25 ln sigma, y) with an `EDMEulerScheduler`.

    `sampler="euler"` runs the stock scheduler; `"heun"` runs cmgen's EDM Heun (Algorithm 1, or 2
    with `churn`) on the scheduler's Karras levels. The initial noise is scaled by sigma_max (EDM);
    the scheduler's `init_noise_sigma` (sqrt(sigma_max^2 + 1)) is not used.
    """

    samplers = ("heun", "euler")
    option_names = ("churn",)

    def denoiser(self):
        from cmgen.models.unet import UNetBackbone
        from cmgen.precond import EDMDenoiser

        c = self.scheduler.config
        precond = PrecondConfig(sigma_min=c.sigma_min, sigma_max=c.sigma_max, sigma_data=c.sigma_data, rho=c.rho,
                                c_noise="edm")
        return EDMDenoiser(UNetBackbone(self.unet), precond).eval()

    def _sample(self, sampler, steps, noise, labels, guidance_scale, options):
        from cmgen.sampling.edm import edm_heun, edm_sigmas

        sched, c = self.scheduler, self.scheduler.config
        if sampler == "heun":
            sigmas = edm_sigmas(steps, c.sigma_min, c.sigma_max, c.rho)
            return edm_heun(self._guided(self.denoiser(), guidance_scale), noise, sigmas, class_labels=labels,
                            churn=float(options["churn"]))
        sched.set_timesteps(steps, device=self._execution_device)
        x = noise(0).float() * sched.sigmas[0]
        for t in sched.timesteps:
            out = self._raw(sched.scale_model_input(x, t), t, labels, guidance_scale)
            x = sched.step(out, t, x).prev_sample
        return x


class CMGenFlowPipeline(_GuidedPipeline):
    """Flow velocity v = F(x, 1000 t, y) with a `FlowMatchEulerDiscreteScheduler` (its `shift` is SD3's).

    `sampler="euler"` runs the stock scheduler on evenly spaced times; `"sde"` runs cmgen's SDE
    sampler with the same marginals (Flow-GRPO) on the same shifted times.
    """

    samplers = ("euler", "sde")
    option_names = ("sde_a",)

    def velocity(self):
        from cmgen.models.unet import UNetBackbone
        from cmgen.precond import FlowVelocity

        return FlowVelocity(UNetBackbone(self.unet)).eval()

    def _sample(self, sampler, steps, noise, labels, guidance_scale, options):
        import numpy as np

        from cmgen.sampling.flow import flow_sde, flow_times

        sched = self.scheduler
        if sampler == "sde":
            return flow_sde(self._guided(self.velocity(), guidance_scale), noise,
                            flow_times(steps, sched.config.shift), class_labels=labels,
                            a=float(options["sde_a"]))
        sched.set_timesteps(sigmas=list(np.linspace(1.0, 0.0, steps + 1)[:-1]), device=self._execution_device)
        x = noise(0).float()
        for t in sched.timesteps:
            x = sched.step(self._raw(x, t, labels, guidance_scale), t, x).prev_sample
        return x


class CMGenCTMPipeline(DiffusionPipeline):
    """CTM jump G(x, t, s) over a `TwoTimeUNet2DModel` with a `CMGenScheduler` (its constants) and
    cmgen's gamma-sampling: `gamma=0` deterministic jumps along the ODE, `gamma=1` consistency multistep,
    on the first N points of a Karras grid of N + 1 (or explicit decreasing `sigmas`)."""

    model_cpu_offload_seq = "unet"

    def __init__(self, unet, scheduler: CMGenScheduler, c_noise: str = "edm", default_gamma: float = 0.0,
                 default_steps: int = 1):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(c_noise=c_noise, default_gamma=default_gamma, default_steps=default_steps)

    def jump(self):
        from dataclasses import replace

        from cmgen.models.two_time import TwoTimeUNetBackbone
        from cmgen.precond import TrajectoryJump

        precond = replace(self.scheduler.precond(), c_noise=self.config.c_noise)   # older folders: the pipeline's
        return TrajectoryJump(TwoTimeUNetBackbone(self.unet), precond).eval()

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, class_labels=None, num_inference_steps: Optional[int] = None,
                 gamma: Optional[float] = None, sigmas: Optional[Sequence[float]] = None,
                 generator: Generators = None, output_type: str = "pil", return_dict: bool = True):
        from cmgen.sampling.ctm import ctm_gamma, ctm_times

        device, c = self._execution_device, self.scheduler.config
        steps = num_inference_steps or self.config.default_steps
        times = list(sigmas) if sigmas is not None else ctm_times(steps, c.sigma_min, c.sigma_max, c.rho)
        labels = _class_labels(self.unet, class_labels, batch_size, device)
        noise = generator_noise(generator, batch_size, _sample_shape(self.unet), device)
        x = ctm_gamma(self.jump(), noise, times, gamma=self.config.default_gamma if gamma is None else gamma,
                      sigma_min=c.sigma_min, class_labels=labels, clip_denoised=c.clip_denoised)
        image = _images(x, output_type, self.numpy_to_pil)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=image) if return_dict else (image,)


# The registry: parameterisation -> network class -> the cmgen pipeline class that samples it
# (looked up along the class's MRO). A new exportable network adds one entry here. Its module is
# thereby imported with cmgen.pipelines, which diffusers 0.42 requires: it loads components only
# from modules already imported, so `CMGenPipeline.from_pretrained` in a fresh process relies on
# these imports.
PIPELINES: dict[str, dict[type, type]] = {
    "cm": {UNet2DModel: CMGenPipeline, NsLNUNet2DModel: CMGenPipeline},
    "edm": {UNet2DModel: CMGenEDMPipeline, NsLNUNet2DModel: CMGenEDMPipeline},
    "flow": {UNet2DModel: CMGenFlowPipeline, NsLNUNet2DModel: CMGenFlowPipeline},
    "ctm": {TwoTimeUNet2DModel: CMGenCTMPipeline},
}


def pipeline_class_for(network: torch.nn.Module, parameterisation: str = "cm") -> Optional[type]:
    table = PIPELINES.get(parameterisation, {})
    for cls in type(network).__mro__:
        if cls in table:
            return table[cls]
    return None


def __getattr__(name: str):
    """`from cmgen.pipelines import CMGenLCMPipeline` (the name `cmgen export` prints) without importing the LCM
    module, which imports this one, at load time."""
    if name == "CMGenLCMPipeline":
        from cmgen.pipelines_lcm import CMGenLCMPipeline

        return CMGenLCMPipeline
    raise AttributeError(f"module 'cmgen.pipelines' has no attribute '{name}'")
