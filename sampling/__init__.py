"""Samplers: pure functions over a denoiser and a noise-level schedule (imported as cmgen.sampling)."""
from cmgen.sampling.multistep import consistency_multistep, per_image_noise
from cmgen.sampling.generate import generate, parse_sigmas, default_sigmas

__all__ = ["consistency_multistep", "per_image_noise", "generate", "parse_sigmas", "default_sigmas"]
