"""diffusers pipeline classes for cmgen models that stock diffusers classes cannot express.

`CMGenPipeline(unet, scheduler)` samples any single-time consistency network that saves as a
diffusers model (e.g. `cmgen.models.nsln.NsLNUNet2DModel`) with cmgen's own preconditioning
and sampler, so its images equal `cmgen sample` by construction. `CMGenScheduler` holds the
noise levels. Load an exported folder offline with

    from cmgen.pipelines import CMGenPipeline
    pipe = CMGenPipeline.from_pretrained(folder)

or, through diffusers alone (cmgen must be installed):
`DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)`.

Later methods add their pipeline classes here and one entry per network class to `PIPELINES`,
so `cmgen export` picks them automatically.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional, Sequence, Union

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401  looked up by name when loading

from cmgen.models.nsln import NsLNUNet2DModel
from cmgen.precond import ConsistencyDenoiser, PrecondConfig

Generators = Union[torch.Generator, list[torch.Generator], None]


class CMGenScheduler(SchedulerMixin, ConfigMixin):
    """The noise levels of a cmgen model: EDM/CM constants and the default sampling sigmas."""

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5,
                 rho: float = 7.0, sample_sigmas: Sequence[float] = (80.0, 0.821), clip_denoised: bool = True):
        self.init_noise_sigma = sigma_max
        self.sigmas: list[float] = [sigma_max]

    def precond(self) -> PrecondConfig:
        c = self.config
        return PrecondConfig(sigma_min=c.sigma_min, sigma_max=c.sigma_max, sigma_data=c.sigma_data, rho=c.rho)

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

        cfg, device = self.unet.config, self._execution_device
        sigmas = self.scheduler.set_timesteps(num_inference_steps, sigmas)
        labels = None
        if cfg.num_class_embeds:
            labels = torch.arange(batch_size) % cfg.num_class_embeds if class_labels is None else class_labels
            labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1).expand(batch_size).to(device)
        size = cfg.sample_size if isinstance(cfg.sample_size, (list, tuple)) else (cfg.sample_size,) * 2
        noise = generator_noise(generator, batch_size, (cfg.in_channels, *size), device)
        x = consistency_multistep(self.denoiser(), noise, sigmas, sigma_min=self.scheduler.config.sigma_min,
                                  class_labels=labels, clip_denoised=self.scheduler.config.clip_denoised)
        image = (x / 2 + 0.5).clamp(0, 1)
        if output_type == "np" or output_type == "pil":
            image = image.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        elif output_type != "pt":
            raise ValueError(f"output_type must be pt, np or pil, got {output_type!r}")
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=image) if return_dict else (image,)


# The registry: network class -> the cmgen pipeline class that samples it (looked up along the
# class's MRO). A new exportable network adds one entry here. Its module is thereby imported with
# cmgen.pipelines, which diffusers 0.42 requires: it loads components only from modules already
# imported, so `CMGenPipeline.from_pretrained` in a fresh process relies on these imports.
PIPELINES: dict[type, type] = {UNet2DModel: CMGenPipeline, NsLNUNet2DModel: CMGenPipeline}


def pipeline_class_for(network: torch.nn.Module) -> Optional[type]:
    for cls in type(network).__mro__:
        if cls in PIPELINES:
            return PIPELINES[cls]
    return None
