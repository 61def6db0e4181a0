"""Samplers: pure functions over a network and a time list (imported as cmgen.sampling).

cm: consistency multistep; edm: Heun and Euler; flow: Euler ODE and SDE. `registry` maps a
parameterisation and a sampler name to the function, its time list and its NFE.
"""
from cmgen.sampling.multistep import consistency_multistep, per_image_noise
from cmgen.sampling.edm import edm_euler, edm_heun, edm_sigmas
from cmgen.sampling.flow import flow_euler, flow_sde, flow_times, sde_step
from cmgen.sampling.generate import generate, parse_sigmas, default_sigmas
from cmgen.sampling.registry import DEFAULT_SAMPLER, SAMPLERS, get_sampler

__all__ = ["consistency_multistep", "per_image_noise", "edm_euler", "edm_heun", "edm_sigmas", "flow_euler",
           "flow_sde", "flow_times", "sde_step", "generate", "parse_sigmas", "default_sigmas", "DEFAULT_SAMPLER",
           "SAMPLERS", "get_sampler"]
