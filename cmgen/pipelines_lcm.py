"""Pipelines for latent consistency students (LCD / RG-LCD).

Text students export as diffusers' stock `LatentConsistencyModelPipeline` (cmgen.export_lcm). A
class-conditional student has no stock pipeline: `CMGenLCMPipeline(unet, scheduler, vae, latent_stats)` runs
diffusers' own `LCMScheduler` (timesteps, boundary scalings, noise between steps) over the UNet with the LCM
pipeline's guidance embedding, and decodes through the VAE and the latent statistics (`LatentStatistics`, as
latent CT's export does), so its images equal `cmgen sample` of the run. Load it with `CMGenLCMPipeline.from_pretrained(folder)` or
`DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)`.
"""
from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput

from cmgen.pipelines import Generators, LatentStatistics, _class_labels, _images, _sample_shape, generator_noise
from cmgen.vp import guidance_embedding


class CMGenLCMPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "unet->vae"

    def __init__(self, unet, scheduler, vae, latent_stats: LatentStatistics, default_guidance: float = 8.0,
                 num_classes: int = 0):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae, latent_stats=latent_stats)
        self.register_to_config(default_guidance=default_guidance, num_classes=num_classes)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, class_labels=None, num_inference_steps: int = 4,
                 guidance_scale=None, generator: Generators = None, output_type: str = "pil",
                 return_dict: bool = True):
        """Images from `num_inference_steps` LCM steps; w = guidance_scale - 1 enters as the w-embedding.
        Without `class_labels`, image j has label j % num_classes (as `cmgen sample`)."""
        device = self._execution_device
        scale = self.config.default_guidance if guidance_scale is None else guidance_scale
        labels = _class_labels(self.unet, class_labels, batch_size, device, self.config.num_classes or None)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        shape = _sample_shape(self.unet)
        z = generator_noise(generator, batch_size, shape, device)(0)
        w = torch.full((batch_size,), float(scale) - 1.0)
        emb = guidance_embedding(w, self.unet.config.time_cond_proj_dim).to(device)
        denoised = z
        for t in self.scheduler.timesteps:
            out = self.unet(z, t, encoder_hidden_states=None, class_labels=labels, timestep_cond=emb).sample
            z, denoised = self.scheduler.step(out, t, z, generator=generator, return_dict=False)
        x = self.latent_stats.codec(self.vae).decode(denoised)   # the decode `cmgen sample` runs
        image = _images(x, output_type, self.numpy_to_pil)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=image) if return_dict else (image,)
