"""Which sampler serves which parameterisation: one table, read by the Generator and the CLI.

A sampler is a pure function in this package; its entry here says how a step count becomes its
time list (from the recipe's constants) and how many network evaluations (NFE) that list costs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from cmgen.errors import UserError


@dataclass(frozen=True)
class Sampler:
    name: str
    times: Callable      # (recipe, steps) -> decreasing times (sigmas, or flow times in [0, 1])
    nfe: Callable        # times -> network evaluations per sample
    run: Callable        # (net, noise, times, labels, gen, options) -> samples
    help: str


def _cm_times(recipe, steps):
    from cmgen.sampling.generate import default_sigmas

    return default_sigmas(recipe, steps)


def _edm_times(recipe, steps):
    from cmgen.sampling.edm import edm_sigmas

    p = recipe.precond
    return edm_sigmas(steps, p.sigma_min, p.sigma_max, p.rho)


def flow_grid(recipe, steps: int, shift: float, key: str) -> list[float]:
    """Flow times for `steps` steps: a model.arch sd3 pipeline's own scheduler sigmas (what its exported pipeline
    samples on), else evenly spaced times shifted by `shift` (the recipe's value under `key`)."""
    if recipe.model.arch == "sd3":
        from cmgen.models.sd3 import scheduler_times

        return scheduler_times(recipe, steps, shift, key)
    from cmgen.sampling.flow import flow_times

    return flow_times(steps, shift)


def _flow_times(recipe, steps):
    return flow_grid(recipe, steps, recipe.sample.shift, "sample.shift")


def _run_multistep(net, noise, times, labels, gen, opt):
    from cmgen.sampling.multistep import consistency_multistep

    return consistency_multistep(net, noise, times, sigma_min=gen.recipe.precond.sigma_min, class_labels=labels,
                                 clip_denoised=gen.clip)


def _run_heun(net, noise, times, labels, gen, opt):
    from cmgen.sampling.edm import edm_heun

    return edm_heun(net, noise, times, class_labels=labels, churn=opt.get("churn", gen.recipe.sample.churn))


def _run_edm_euler(net, noise, times, labels, gen, opt):
    from cmgen.sampling.edm import edm_euler

    return edm_euler(net, noise, times, class_labels=labels)


def _run_flow_euler(net, noise, times, labels, gen, opt):
    from cmgen.sampling.flow import flow_euler

    return flow_euler(net, noise, times, class_labels=labels)


def _run_flow_sde(net, noise, times, labels, gen, opt):
    from cmgen.sampling.flow import flow_sde

    return flow_sde(net, noise, times, class_labels=labels, a=opt.get("sde_a", gen.recipe.sample.sde_a))


def _ctm_times(recipe, steps):
    from cmgen.sampling.ctm import ctm_times

    p = recipe.precond
    return ctm_times(steps, p.sigma_min, p.sigma_max, p.rho)


def _run_ctm_gamma(net, noise, times, labels, gen, opt):
    from cmgen.sampling.ctm import ctm_gamma

    gamma = opt.get("gamma")
    return ctm_gamma(net, noise, times, gamma=gen.recipe.sample.gamma if gamma is None else gamma,
                     sigma_min=gen.recipe.precond.sigma_min, class_labels=labels, clip_denoised=gen.clip)


def _run_ctm_multistep(net, noise, times, labels, gen, opt):
    return _run_ctm_gamma(net, noise, times, labels, gen, {"gamma": 1.0})


def _run_ctm_heun(net, noise, times, labels, gen, opt):
    """EDM's Heun (churn included) on CTM's own denoiser D(x, t) = g(x, t, t)."""
    return _run_heun(net.denoise, noise, times, labels, gen, opt)


def _ddim_times(recipe, steps):
    from cmgen.vp import ddim_timesteps

    return ddim_timesteps(steps, recipe.method.num_train_timesteps)


def _run_ddim(net, noise, times, labels, gen, opt):
    from cmgen.sampling.ddim import ddim

    return ddim(net, noise, [int(t) for t in times], gen.net.alphas_cumprod, gen.net.prediction_type,
                class_labels=labels)


def _lcm_times(recipe, steps):
    from cmgen.vp import lcm_timesteps

    return lcm_timesteps(steps, recipe.method.original_steps, recipe.method.num_train_timesteps)


def _run_lcm(net, noise, times, labels, gen, opt):
    from cmgen.sampling.lcm import lcm_multistep

    guidance = opt.get("guidance", 1.0)  # --cfg; 1 (the CLI default) means the run's method.guidance
    w = (guidance if guidance != 1.0 else gen.recipe.method.guidance) - 1.0
    return lcm_multistep(net, noise, [int(t) for t in times], gen.net.alphas_cumprod, w=w, class_labels=labels)


def _heun_nfe(times):
    from cmgen.sampling.edm import heun_nfe

    return heun_nfe(times)


SAMPLERS: dict[str, dict[str, Sampler]] = {
    "cm": {"multistep": Sampler("multistep", _cm_times, len, _run_multistep,
                                "consistency multistep (CM Algorithm 1): one evaluation per sigma")},
    "edm": {"heun": Sampler("heun", _edm_times, _heun_nfe, _run_heun,
                            "EDM Heun (Algorithm 1; churn > 0: Algorithm 2), 2N - 1 evaluations"),
            "euler": Sampler("euler", _edm_times, lambda t: len(t) - 1, _run_edm_euler,
                             "Euler on the probability-flow ODE, N evaluations")},
    "flow": {"euler": Sampler("euler", _flow_times, lambda t: len(t) - 1, _run_flow_euler,
                              "Euler ODE, N evaluations"),
             "sde": Sampler("sde", _flow_times, lambda t: len(t) - 1, _run_flow_sde,
                            "SDE with the ODE's marginals (Flow-GRPO), N evaluations")},
    "ctm": {"gamma": Sampler("gamma", _ctm_times, len, _run_ctm_gamma,
                             "CTM gamma-sampling (--gamma 0: ODE jumps, 1: consistency multistep), N evaluations"),
            "multistep": Sampler("multistep", _ctm_times, len, _run_ctm_multistep,
                                 "consistency multistep with f(x, t) = G(x, t, sigma_min) (gamma = 1), N evaluations"),
            "heun": Sampler("heun", _edm_times, _heun_nfe, _run_ctm_heun,
                            "EDM Heun on CTM's denoiser g(x, t, t), 2N - 1 evaluations")},
    "ldm": {"ddim": Sampler("ddim", _ddim_times, len, _run_ddim,
                            "DDIM (eta 0) on SD's leading timesteps, N evaluations")},
    "lcm": {"lcm": Sampler("lcm", _lcm_times, len, _run_lcm,
                           "LCM multistep on LCMScheduler's timesteps, N evaluations")},
}
DEFAULT_SAMPLER = {"cm": "multistep", "edm": "heun", "flow": "euler", "ctm": "gamma", "ldm": "ddim", "lcm": "lcm"}


def get_sampler(parameterisation: str, name=None) -> Sampler:
    table = SAMPLERS[parameterisation]
    name = name or DEFAULT_SAMPLER[parameterisation]
    if name not in table:
        raise UserError(f"--sampler '{name}' does not apply to a {parameterisation} model; use one of "
                        f"{', '.join(table)}")
    return table[name]


def guided(net, scale: float, null_label: int):
    """Classifier-free guidance: out_uncond + w (out_cond - out_uncond), both halves in one batch."""
    if scale == 1.0:
        return net

    def call(x, t, labels):
        null = torch.full_like(labels, null_label)
        out = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
        cond, uncond = out.chunk(2)
        return uncond + scale * (cond - uncond)

    return call
