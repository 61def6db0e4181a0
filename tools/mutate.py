"""Mutation testing of the formulas: plant one wrong formula at a time, run the tests that should see it.

    OMP_NUM_THREADS=2 .venv/bin/python tools/mutate.py [--only NAME...] [--timeout 240]

Each mutant replaces one exact snippet of a source file (operator swap, constant change, dropped
no_grad/detach, sign flip, a draw that ignores its key...), runs the test files listed for that
module with `pytest -x`, and restores the file. It works on a private copy of the checkout (git's
tracked and untracked files, imported first through PYTHONPATH), so the checkout itself is never
touched. A mutant is killed when a test fails or the run times out; the score is killed / total.
Survivors are printed: each is a missing test or an equivalent mutant (EQUIVALENT, with the reason).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# the tests written against the mutants run last: with -x, a mutant an older test kills never reaches
# them, so one run scores the suite with them ("after") and without them ("before")
NEW = ("tests/test_mutants.py", "tests/test_scale.py")
CORE = ["tests/test_formulas.py", "tests/test_ict.py", "tests/test_ict_pinned.py", "tests/test_mutants.py"]
SAMPLING = ["tests/test_sampling.py", "tests/test_edm_flow.py", "tests/test_mutants.py"]
# the ImageNet-64 smoke test (two minutes) is left out: it checks that the recipe runs, not a formula
CTM_FILE = ["tests/test_ctm.py", "--deselect=tests/test_ctm.py::test_ctm_gpu_recipes_smoke_on_the_cpu"]
CTM = CTM_FILE + ["tests/test_mutants.py"]
AWM = ["tests/test_awm.py", "tests/test_awm_lora.py", "tests/test_mutants.py"]
EVAL = ["tests/test_eval_frechet.py", "tests/test_eval_metrics.py", "tests/test_eval_sanity.py", "tests/test_mutants.py"]
LCD = ["tests/test_ldm_formulas.py", "tests/test_lcd.py", "tests/test_ldm_rewards.py", "tests/test_lcd_sd.py",
       "tests/test_mutants.py"]
CKPT = ["tests/test_train.py", "tests/test_protocol.py", "tests/test_old_runs.py", "tests/test_awm_lora.py",
        "tests/test_reliability.py", "tests/test_mutants.py"]
EXPORT = ["tests/test_export.py", "tests/test_export_diffusion.py", "tests/test_export_nsln.py", "tests/test_mutants.py"]
SD3 = ["tests/test_awm_lora.py", "tests/test_awm.py", "tests/test_mutants.py"]
EVAL_CLI = ["tests/test_eval_cli.py", "tests/test_eval_sanity.py", "tests/test_eval_sources.py", "tests/test_eval_features.py",
            "tests/test_eval_rewards.py", "tests/test_eval_inloop.py", "tests/test_mutants.py"]
TESTS = {
    "cmgen/precond.py": CORE + ["tests/test_edm_flow.py", "tests/test_sampling.py", "tests/test_recipes.py"] + CTM_FILE,
    "cmgen/schedules.py": CORE,
    "cmgen/losses.py": CORE,
    "cmgen/methods/ict.py": CORE,
    "cmgen/ema.py": CORE + ["tests/test_protocol.py",
                            "tests/test_reliability.py::test_the_ema_follows_its_network_to_the_training_device"],
    "cmgen/rng.py": CORE + ["tests/test_scale.py::test_keyed_draws_are_the_same_for_any_process_count_and_on_resume",
                            "tests/test_scale.py::test_cpu_draws_are_those_of_a_cpu_generator_keyed_by_seed_step_and_draw"],
    "sampling/multistep.py": SAMPLING,
    "sampling/edm.py": SAMPLING,
    "sampling/generate.py": SAMPLING,
    "cmgen/models/two_time.py": ["tests/test_ctm_loading.py"] + CTM,
    "cmgen/methods/ctm.py": ["tests/test_ctm_loading.py", "tests/test_lpips.py",
                             "tests/test_recipes.py::test_recipe_values_outside_their_range_are_one_sentence_naming_the_key"] + CTM,
    "cmgen/methods/ctm_gan.py": ["tests/test_ctm_loading.py"] + CTM,
    "cmgen/perceptual.py": ["tests/test_lpips.py"],
    "sampling/ctm.py": CTM,
    "cmgen/methods/lct.py": ["tests/test_lct.py", "tests/test_mutants.py"],
    "cmgen/models/nsln.py": ["tests/test_nsln.py", "tests/test_export_nsln.py", "tests/test_mutants.py"],
    "cmgen/methods/awm.py": AWM,
    "cmgen/methods/rollout.py": AWM,
    "cmgen/vp.py": LCD,
    "cmgen/methods/lcd.py": LCD,
    "cmgen/rewards/lrm.py": LCD,
    "cmgen/models/ldm_unet.py": LCD,
    "sampling/lcm.py": LCD,
    "eval/frechet.py": EVAL + ["tests/test_eval_sources.py"],
    "eval/metrics.py": EVAL,
    "sampling/flow.py": SAMPLING + ["tests/test_awm.py"],
    "cmgen/latents.py": ["tests/test_latents.py", "tests/test_lct.py", "tests/test_mutants.py"],
    "cmgen/rewards/digits.py": ["tests/test_rewards.py", "tests/test_eval_rewards.py", "tests/test_mutants.py"],
    "cmgen/rewards/weights.py": ["tests/test_reward_models.py", "tests/test_eval_rewards.py", "tests/test_lcd.py",
                                 "tests/test_mutants.py"],
    "cmgen/rewards/image.py": ["tests/test_rewards.py", "tests/test_eval_rewards.py", "tests/test_ldm_rewards.py",
                               "tests/test_mutants.py"],
    "cmgen/train.py": ["tests/test_train.py", "tests/test_protocol.py", "tests/test_data.py", "tests/test_ict_pinned.py",
                       "tests/test_reliability.py::test_two_processes_match_one_process_and_resume",
                       "tests/test_reliability.py::test_a_nan_step_is_skipped_with_a_warning_naming_the_term",
                       "tests/test_reliability.py::test_repeated_nan_stops_the_run_with_the_last_good_checkpoint_intact",
                       "tests/test_lcd.py::test_target_ema_moves_after_the_model_phase_only_in_lrm_mode",
                       "tests/test_reliability.py::test_dropout_of_every_method_is_keyed_so_a_resumed_run_equals_a_straight_one",
                       "tests/test_reliability.py::test_the_ema_follows_its_network_to_the_training_device",
                       "tests/test_reliability.py::test_logged_terms_made_on_the_cpu_join_the_loss_on_the_training_device",
                       "tests/test_lcd.py::test_every_net_and_tensor_of_a_latent_rglcd_run_lives_on_the_training_device",
                       "tests/test_mutants.py"],
    "sampling/ddim.py": LCD,
    "cmgen/methods/edm.py": ["tests/test_edm_flow.py", "tests/test_mutants.py"],
    "cmgen/methods/flow.py": ["tests/test_edm_flow.py", "tests/test_mutants.py"],
    "cmgen/methods/flowgrpo.py": AWM,
    "sampling/registry.py": SAMPLING + ["tests/test_ctm_loading.py", "tests/test_export_diffusion.py", "tests/test_awm_lora.py"],
    "benchmarks/awm_vs_flowgrpo.py": ["tests/test_awm.py"],
    "recipes/rglcd_sd15_hps.yaml": ["tests/test_lcd_sd.py"],
    "cmgen/pipelines.py": ["tests/test_ctm_loading.py", "tests/test_export.py", "tests/test_export_diffusion.py",
                           "tests/test_mutants.py"],
    "cmgen/data/__init__.py": ["tests/test_data.py", "tests/test_recipes.py::test_paper_settings_of_the_latent_ct_recipes",
                               "tests/test_mutants.py"],
    "cmgen/plots.py": ["tests/test_plots.py", "tests/test_eval_sources.py", "tests/test_eval_cli.py",
                       "tests/test_eval_rewards.py", "tests/test_export.py", "tests/test_mutants.py"],
    "eval/sources.py": ["tests/test_eval_sources.py", "tests/test_eval_features.py", "tests/test_eval_sanity.py",
                        "tests/test_eval_cli.py", "tests/test_mutants.py"],
    "eval/digits_net.py": ["tests/test_eval_features.py", "tests/test_eval_sanity.py", "tests/test_eval_cli.py",
                           "tests/test_rewards.py", "tests/test_mutants.py"],
    "eval/features.py": ["tests/test_eval_features.py", "tests/test_eval_sources.py", "tests/test_eval_rewards.py",
                         "tests/test_mutants.py"],
    "eval/reward_eval.py": ["tests/test_eval_rewards.py", "tests/test_mutants.py"],
    "cmgen/rewards/__init__.py": ["tests/test_rewards.py", "tests/test_eval_rewards.py", "tests/test_mutants.py"],
    "cmgen/rewards/jpeg.py": ["tests/test_rewards.py", "tests/test_ldm_rewards.py", "tests/test_eval_rewards.py",
                              "tests/test_mutants.py"],
    "cmgen/rewards/differentiable.py": ["tests/test_ldm_rewards.py", "tests/test_reward_models.py", "tests/test_lcd.py",
                                        "tests/test_rewards.py", "tests/test_mutants.py"],
    "cmgen/vae_train.py": ["tests/test_latents.py", "tests/test_mutants.py"],
    "cmgen/methods/ldm.py": LCD,
    "cmgen/models/mlp.py": ["tests/test_formulas.py", "tests/test_edm_flow.py", *CTM],
    "cmgen/generator.py": ["tests/test_edm_flow.py", "tests/test_protocol.py", "tests/test_cli.py", "tests/test_latents.py",
                           "tests/test_eval_cli.py", *LCD],
    "cmgen/checkpoint.py": ["tests/test_eval_rewards.py", "tests/test_lpips.py", "tests/test_cli.py"] + CKPT,  # read_weights too
    "cmgen/state.py": CKPT,
    "cmgen/runs.py": ["tests/test_export.py", "tests/test_export_diffusion.py", "tests/test_cli.py", "tests/test_train.py",
                      "tests/test_awm_lora.py", "tests/test_lcd.py", "tests/test_mutants.py"],
    "cmgen/export.py": EXPORT + ["tests/test_ctm.py::test_export_of_a_run_whose_default_sampler_is_multistep_or_heun"],
    "cmgen/export_lcm.py": ["tests/test_lcd.py", "tests/test_lcd_sd.py", "tests/test_mutants.py"],
    "cmgen/pipelines_lcm.py": ["tests/test_lcd.py", "tests/test_lcd_sd.py", "tests/test_mutants.py"],
    "cmgen/lora.py": SD3,
    "cmgen/models/sd3.py": SD3,
    "cmgen/models/unet.py": ["tests/test_export.py", "tests/test_formulas.py", "tests/test_recipes.py", "tests/test_mutants.py"],
    "cmgen/data/cache.py": ["tests/test_data.py", "tests/test_latents.py", "tests/test_mutants.py", "tests/test_scale.py"],
    "cmgen/data/loader.py": ["tests/test_data.py", "tests/test_mutants.py", "tests/test_scale.py"],
    "eval/refstats.py": ["tests/test_eval_sources.py", "tests/test_eval_features.py", "tests/test_eval_cli.py",
                         "tests/test_eval_sanity.py", "tests/test_mutants.py"],
    "eval/inloop.py": ["tests/test_eval_inloop.py", "tests/test_eval_features.py", "tests/test_mutants.py",
                       "tests/test_scale.py::test_two_process_eval_and_in_loop_eval_equal_one_process"],
    "cmgen/methods/base.py": ["tests/test_protocol.py", *CTM],
    "cmgen/recipe.py": ["tests/test_recipes.py", "tests/test_cli.py", "tests/test_mutants.py"],
    "cmgen/pretrained.py": ["tests/test_export.py", "tests/test_export_diffusion.py", "tests/test_export_nsln.py",
                            "tests/test_nsln.py", "tests/test_latents.py", "tests/test_lcd.py", "tests/test_lcd_sd.py",
                            "tests/test_awm_lora.py", *CTM],
    "eval/fid.py": EVAL_CLI,
    "eval/cli.py": EVAL_CLI + ["tests/test_latents.py",
                               "tests/test_lcd.py::test_reward_against_a_latent_base_is_judged_on_decoded_images"],
    "eval/report.py": EVAL_CLI,
    "cmgen/cli.py": ["tests/test_cli.py", "tests/test_export.py", "tests/test_old_runs.py", *CTM],
    "cmgen/sd.py": ["tests/test_lcd_sd.py", "tests/test_lcd.py", "tests/test_ldm_formulas.py", "tests/test_mutants.py"],
    "cmgen/latents_cli.py": ["tests/test_latents.py", "tests/test_lcd_sd.py", "tests/test_mutants.py"],
    "cmgen/trackers.py": ["tests/test_scale.py", "tests/test_mutants.py"],
    "cmgen/methods/__init__.py": ["tests/test_recipes.py", "tests/test_protocol.py", "tests/test_train.py",
                                  "tests/test_old_runs.py", "tests/test_cli.py", "tests/test_mutants.py"],
}


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    old: str
    new: str


M = Mutant
MUTANTS = [
    # preconditioning (CM eq. 7, EDM Table 1, c_noise convention)
    M("c_skip: sigma_min shift dropped", "cmgen/precond.py", "((sigma - sigma_min) ** 2 + sigma_data**2)", "(sigma ** 2 + sigma_data**2)"),
    M("c_out: sign of the shift", "cmgen/precond.py", "(sigma - sigma_min) * sigma_data /", "(sigma + sigma_min) * sigma_data /"),
    M("c_in: sigma_data squared dropped", "cmgen/precond.py", "1.0 / (sigma**2 + sigma_data**2) ** 0.5", "1.0 / (sigma**2 + sigma_data) ** 0.5"),
    M("c_noise: 250 -> 1000", "cmgen/precond.py", "250.0 * torch.log(sigma + 1e-44)", "1000.0 * torch.log(sigma + 1e-44)"),
    M("edm c_out: sqrt dropped", "cmgen/precond.py", "sigma * sigma_data / (sigma**2 + sigma_data**2) ** 0.5", "sigma * sigma_data / (sigma**2 + sigma_data**2)"),
    M("edm loss weight inverted", "cmgen/precond.py", "(sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2", "(sigma * sigma_data) ** 2 / (sigma**2 + sigma_data**2)"),
    M("cm denoiser: backbone sees x, not c_in x", "cmgen/precond.py", "self.backbone((c_in(s, cfg.sigma_data) * x32)", "self.backbone((x32)"),
    # schedules (EDM eq. 5, iCT eq. 7, lognormal index draw)
    M("karras grid: rho ignored", "cmgen/schedules.py", "return ((lo + i / (n - 1) * (hi - lo)) ** rho).to(dtype)", "return ((lo + i / (n - 1) * (hi - lo)) ** 7.0).to(dtype)"),
    M("karras grid: n instead of n - 1", "cmgen/schedules.py", "i / (n - 1) * (hi - lo)", "i / n * (hi - lo)"),
    M("curriculum: + 1 dropped", "cmgen/schedules.py", "return min(s0 * 2 ** (step // k_prime), s1) + 1", "return min(s0 * 2 ** (step // k_prime), s1)"),
    M("curriculum: stage length off by one", "cmgen/schedules.py", "math.log2(math.floor(s1 / s0)) + 1))", "math.log2(math.floor(s1 / s0))))"),
    M("index probs: P_mean sign", "cmgen/schedules.py", "(torch.log(s) - p_mean)", "(torch.log(s) + p_mean)"),
    M("index probs: not normalised", "cmgen/schedules.py", "return mass / mass.sum()", "return mass"),
    # losses
    M("pseudo-Huber: - c dropped", "cmgen/losses.py", "return torch.sqrt(sq + c * c) - c", "return torch.sqrt(sq + c * c)"),
    M("pseudo-Huber: c not squared", "cmgen/losses.py", "torch.sqrt(sq + c * c)", "torch.sqrt(sq + c)"),
    M("huber c: 0.00054 -> 0.0054", "cmgen/losses.py", "0.00054 * math.sqrt(dim)", "0.0054 * math.sqrt(dim)"),
    # iCT wiring
    M("ict: teacher not under stop-gradient", "cmgen/methods/ict.py", "with torch.no_grad(), same_dropout(rng.dropout_seed, x.device):", "with same_dropout(rng.dropout_seed, x.device):"),
    M("ict: teacher and student levels swapped", "cmgen/methods/ict.py", "sigma_t = sigmas[i].to(", "sigma_t = sigmas[i + 1].to("),
    M("ict: lambda = sigma_{i+1} - sigma_i", "cmgen/methods/ict.py", "weight = 1.0 / (sigmas[i + 1] - sigmas[i])", "weight = (sigmas[i + 1] - sigmas[i])"),
    M("ict: index draw ignores the lognormal probs", "cmgen/methods/ict.py", "i = rng.multinomial(probs).cpu()", "i = rng.multinomial(torch.ones_like(probs)).cpu()"),
    M("ict: default c not the iCT one", "cmgen/methods/ict.py", "else ict_huber_c(math.prod(gen.shape))", "else ict_huber_c(1)"),
    M("ict: teacher dropout not shared", "cmgen/methods/ict.py", "        with same_dropout(rng.dropout_seed, x.device):\n            pred", "        with same_dropout(rng.dropout_seed + 1, x.device):\n            pred"),
    M("ict: student noise independent of teacher noise", "cmgen/methods/ict.py", "pred = model(x + sigma_s.view(view) * z,", "pred = model(x + sigma_s.view(view) * torch.randn_like(z),"),
    M("ict: loss weight dropped", "cmgen/methods/ict.py", "\"loss\": (p.weight * dist).mean()", "\"loss\": dist.mean()"),
    M("ict: curriculum K from the stored config ignored", "cmgen/methods/ict.py", "self.total_steps = self.cfg.total_steps or recipe.train.steps", "self.total_steps = recipe.train.steps"),
    # EMA
    M("ema: does not move", "cmgen/ema.py", "torch._foreach_lerp_(self.shadow, params, 1.0 - self.decay)", "pass"),
    M("ema: moves the wrong way (weight = decay)", "cmgen/ema.py", "params, 1.0 - self.decay)", "params, self.decay)"),
    M("target network: decay inverted", "cmgen/ema.py", "for p, q in zip(theirs, ours)], 1.0 - self.decay_at(step))", "for p, q in zip(theirs, ours)], self.decay_at(step))"),
    # keyed RNG
    M("rng: draws ignore the step", "cmgen/rng.py", "keyed_generator(self.seed, self.step, *self.stream, \"draw\", self._draws, device=self.device)", "keyed_generator(self.seed, *self.stream, \"draw\", self._draws, device=self.device)"),
    M("rng: every draw of a step the same", "cmgen/rng.py", "        self._draws += 1\n", ""),
    M("rng: slice ignores the offset", "cmgen/rng.py", "return t[self.offset:self.offset + self.count]", "return t[:self.count]"),
    M("rng: dropout seed ignores the step", "cmgen/rng.py", "key_seed(seed, step, \"dropout\", *dropout_key)", "key_seed(seed, \"dropout\", *dropout_key)"),
    M("rng: epoch permutation ignores the epoch", "cmgen/rng.py", "keyed_generator(seed, \"epoch\", epoch))", "keyed_generator(seed, \"epoch\", 0))"),
    # samplers
    M("multistep: no clamping", "sampling/multistep.py", "            x = x.clamp(-1, 1)\n", "            pass\n"),
    M("multistep: sigma_min not subtracted", "sampling/multistep.py", "(sigma**2 - sigma_min**2) ** 0.5 * z", "sigma * z"),
    M("multistep: same noise every step", "sampling/multistep.py", "        z = noise(k)\n", "        z = noise(0)\n"),
    M("heun: no second-order correction", "sampling/edm.py", "            x_next = x + (t_next - t_hat) * (0.5 * d + 0.5 * d_next)", "            pass"),
    M("heun: correction weights", "sampling/edm.py", "(0.5 * d + 0.5 * d_next)", "(0.25 * d + 0.75 * d_next)"),
    M("euler (edm): sign of the step", "sampling/edm.py", "x = x + (t_next - t) * (x - denoised) / t", "x = x - (t_next - t) * (x - denoised) / t"),
    M("flow euler: sign of the step", "sampling/flow.py", "x = x + (t_next - t) * v(x, t)", "x = x - (t_next - t) * v(x, t)"),
    M("flow sde: std without sqrt", "sampling/flow.py", "std = sig * math.sqrt(-dt)", "std = sig * (-dt)"),
    M("generate: image seed ignores its index", "sampling/generate.py", "noise = per_image_noise((seed + idx).tolist(), gen.shape, device)", "noise = per_image_noise([seed] * len(idx), gen.shape, device)"),
    # CTM (Kim et al. 2024): the jump, the two-time network, the draws, the losses, the GAN, gamma-sampling
    M("ctm jump: s/t inverted", "cmgen/precond.py", "ratio = _expand(s / t, x)", "ratio = _expand(t / s, x)"),
    M("ctm jump: skip and g weights swapped", "cmgen/precond.py", "return ratio * x.float() + (1.0 - ratio) * self.g(", "return (1.0 - ratio) * x.float() + ratio * self.g("),
    M("ctm g: scaled in s, not t", "cmgen/precond.py", "te, x32 = _expand(t, x), x.float()", "te, x32 = _expand(s, x), x.float()"),
    M("ctm g: backbone sees t as s", "cmgen/precond.py", "c_noise(t, conv), c_noise(s, conv), class_labels)", "c_noise(t, conv), c_noise(t, conv), class_labels)"),
    M("two-time unet: s projection dropped", "cmgen/models/two_time.py", "return super().forward(h_t) + self.s(h_s)", "return super().forward(h_t)"),
    M("two-time unet: s embedding of t", "cmgen/models/two_time.py", "self.time_embedding_s(self.time_proj(s).to(self.dtype))", "self.time_embedding_s(self.time_proj(t).to(self.dtype))"),
    M("two-time unet: s projection not zero at init", "cmgen/models/two_time.py", "        nn.init.zeros_(self.s.weight)\n", ""),
    M("ctm: P(k) uniform", "cmgen/methods/ctm.py", "    return k / k.sum()", "    return torch.ones_like(k) / len(k)"),
    M("ctm: k drawn from 0..K-1", "cmgen/methods/ctm.py", "generator=keyed_generator(rng.seed, rng.step, *rng.stream, \"ctm-k\")).item()) + 1", "generator=keyed_generator(rng.seed, rng.step, *rng.stream, \"ctm-k\")).item()) + 0"),
    M("ctm: t index may exceed N-1-k", "cmgen/methods/ctm.py", "i_t = rng.randint(0, N - k).cpu()", "i_t = rng.randint(0, N).cpu().clamp(max=N - 1 - k)"),
    M("ctm: s always at u", "cmgen/methods/ctm.py", "i_s = i_t + k + (rng.rand().cpu() * (N - i_t - k)).floor()", "i_s = i_t + k + (rng.rand().cpu() * 0).floor()"),
    M("ctm teacher: euler, not heun", "cmgen/methods/ctm.py", "            x = x + h * 0.5 * (d + d_e)", "            x = x_e"),
    M("ctm teacher: second slope at t", "cmgen/methods/ctm.py", "d_e = (x_e - teacher(x_e, t_next, labels).float()) / t_next.view(view)", "d_e = (x_e - teacher(x_e, t, labels).float()) / t.view(view)"),
    M("ctm teacher: k - 1 steps", "cmgen/methods/ctm.py", "        for j in range(k):\n", "        for j in range(k - 1):\n"),
    M("ctm: target from x_t, not x_u", "cmgen/methods/ctm.py", "tgt = self.outer(nets, nets.model(x_u, u, s, labels), s, labels)", "tgt = self.outer(nets, nets.model(x_t, u, s, labels), s, labels)"),
    M("ctm: target's inner jump by theta-minus", "cmgen/methods/ctm.py", "tgt = self.outer(nets, nets.model(x_u, u, s, labels), s, labels)", "tgt = self.outer(nets, nets.target(x_u, u, s, labels), s, labels)"),
    M("ctm: outer jump to s, not sigma_min", "cmgen/methods/ctm.py", "return nets.target(x_s, s, torch.full_like(s, self.recipe.precond.sigma_min), labels)", "return nets.target(x_s, s, s, labels)"),
    M("ctm: outer jump by the student", "cmgen/methods/ctm.py", "return nets.target(x_s, s, torch.full_like(s, self.recipe.precond.sigma_min), labels)", "return nets.model(x_s, s, torch.full_like(s, self.recipe.precond.sigma_min), labels)"),
    M("ctm: estimate without the outer jump", "cmgen/methods/ctm.py", "        est = self.outer(nets, leaf, s, batch.labels)\n", "        est = leaf\n"),
    M("ctm dsm: karras r not scaled", "cmgen/methods/ctm.py", "karras = dsm_karras_sigma(c.dsm_karras_r * rng.rand(),", "karras = dsm_karras_sigma(rng.rand(),"),
    M("ctm dsm: karras(r) runs from sigma_min", "cmgen/methods/ctm.py", "    return (hi + r * (lo - hi)) ** rho", "    return (lo + r * (hi - lo)) ** rho"),
    M("ctm dsm: lognormal half by local index", "cmgen/methods/ctm.py", "first = (rng.offset + torch.arange(rng.count, device=lognormal.device)) < rng.global_batch // 2", "first = torch.arange(rng.count, device=lognormal.device) < rng.count // 2"),
    M("ctm dsm: unweighted", "cmgen/methods/ctm.py", "return (edm_loss_weight(sigma, self.recipe.precond.sigma_data) * mse).mean()", "return mse.mean()"),
    M("ctm dsm: G, not g", "cmgen/methods/ctm.py", "g = nets.model(x + n, sigma, sigma, batch.labels, output=\"g\")", "g = nets.model(x + n, sigma, torch.full_like(sigma, 0.002), batch.labels)"),
    M("ctm adaptive weight: inverted", "cmgen/methods/ctm.py", "return (g_ref.norm() / (g_other.norm() + 1e-4)).clamp(lo, hi).detach()", "return (g_other.norm() / (g_ref.norm() + 1e-4)).clamp(lo, hi).detach()"),
    M("ctm adaptive weight: not clamped", "cmgen/methods/ctm.py", "return (g_ref.norm() / (g_other.norm() + 1e-4)).clamp(lo, hi).detach()", "return (g_ref.norm() / (g_other.norm() + 1e-4)).detach()"),
    M("ctm adaptive weight: first layer, not last", "cmgen/methods/ctm.py", "    return order[-1].weight", "    return order[0].weight"),
    M("ctm gan: lambda not clipped to [0.01, 10]", "cmgen/methods/ctm.py", "GAN_WEIGHT_RANGE = (0.01, 10.0)", "GAN_WEIGHT_RANGE = (0.0, 1e4)"),
    M("ctm pseudo-huber: c of iCT ignored", "cmgen/methods/ctm.py", "c = cfg.huber_c if cfg.huber_c is not None else ict_huber_c(dim)", "c = cfg.huber_c if cfg.huber_c is not None else ict_huber_c(1)"),
    M("hinge d: fake sign", "cmgen/methods/ctm_gan.py", "_head_mean([F.relu(1 + f) for f in fake_logits])", "_head_mean([F.relu(1 - f) for f in fake_logits])"),
    M("hinge g: sign", "cmgen/methods/ctm_gan.py", "return -_head_mean(fake_logits)", "return _head_mean(fake_logits)"),
    M("gan: discriminator sees the fake with its gradient", "cmgen/methods/ctm_gan.py", "fake_logits = disc(diff_augment(fake.detach().float(), rng, policy))", "fake_logits = disc(diff_augment(fake.float(), rng, policy))"),
    M("diffaugment: translation ratio 1/4", "cmgen/methods/ctm_gan.py", "TRANSLATION_RATIO = 1 / 8", "TRANSLATION_RATIO = 1 / 4"),
    M("diffaugment: cutout keeps the inside", "cmgen/methods/ctm_gan.py", "return x * (~inside)[:, None].to(x.dtype)", "return x * inside[:, None].to(x.dtype)"),
    M("diffaugment: contrast range", "cmgen/methods/ctm_gan.py", "return (x - mean) * (_u(rng, x) + 0.5) + mean", "return (x - mean) * (_u(rng, x) + 1.0) + mean"),
    M("gamma: s without sqrt(1 - gamma^2)", "sampling/ctm.py", "return math.sqrt(max(0.0, 1.0 - gamma * gamma)) * (t_next - sigma_min) + sigma_min", "return (1.0 - gamma) * (t_next - sigma_min) + sigma_min"),
    M("gamma: renoise to t_next, not sqrt(t_next^2 - s^2)", "sampling/ctm.py", "x = x + math.sqrt(max(0.0, t_next**2 - s**2)) * noise(n + 1).float()", "x = x + t_next * noise(n + 1).float()"),
    M("gamma: last jump to s, not sigma_min", "sampling/ctm.py", "s = gamma_target(t_next, gamma, sigma_min) if n + 1 < len(times) else sigma_min", "s = gamma_target(t_next, gamma, sigma_min)"),
    M("gamma: times one point short", "sampling/ctm.py", "grid = karras_sigmas(steps + 1, sigma_min, sigma_max, rho).flip(0)", "grid = karras_sigmas(steps, sigma_min, sigma_max, rho).flip(0)"),
    # latent CT (Dao et al. 2025)
    M("lct cauchy: 2c^2 -> c^2", "cmgen/methods/lct.py", "return torch.log1p(m / (2 * c * c))", "return torch.log1p(m / (c * c))"),
    M("lct cauchy: log dropped", "cmgen/methods/lct.py", "return torch.log1p(m / (2 * c * c))", "return m / (2 * c * c)"),
    M("lct adaptive c: exponent", "cmgen/methods/lct.py", "return math.exp(-1.15 * math.log(n - 1) - 0.85)", "return math.exp(-1.0 * math.log(n - 1) - 0.85)"),
    M("lct adaptive c: N, not N - 1", "cmgen/methods/lct.py", "return math.exp(-1.15 * math.log(n - 1) - 0.85)", "return math.exp(-1.15 * math.log(n) - 0.85)"),
    M("lct adaptive c: from the first stage", "cmgen/methods/lct.py", "if not self.cfg.adaptive_c or n <= self.cfg.s0 + 1:", "if not self.cfg.adaptive_c:"),
    M("lct c0: iCT's sqrt(d) scaling", "cmgen/methods/lct.py", "self.c0 = cfg.c if cfg.c is not None else C0", "self.c0 = cfg.c if cfg.c is not None else 0.00054 * math.prod(gen.shape) ** 0.5"),
    M("lct diffusion: mask from the teacher's index", "cmgen/methods/lct.py", "return (n - 2 - i) >= math.floor(self.cfg.diffusion_from * n)", "return i >= math.floor(self.cfg.diffusion_from * n)"),
    M("lct diffusion: weight 1/t^2 only", "cmgen/methods/lct.py", "per = (1.0 / sigma_s**2 + 1.0 / sd**2) * mse", "per = (1.0 / sigma_s**2) * mse"),
    M("lct diffusion: mean over the batch, not the masked samples", "cmgen/methods/lct.py", ".sum() / count.clamp(min=1)", ".sum() / len(mask)"),
    M("lct ot: the pairing not applied", "cmgen/methods/lct.py", "        z_all = z_all[ot_pairing(x_all, z_all)]\n", ""),
    M("lct ot: distance, not squared", "cmgen/methods/lct.py", "z.flatten(1).double().cpu()).pow(2).numpy()", "z.flatten(1).double().cpu()).pow(1).numpy()"),
    M("lct ot: noise not keyed by the step", "cmgen/methods/lct.py", "generator=keyed_generator(first.seed, first.step, \"ot-noise\"))", "generator=keyed_generator(first.seed, \"ot-noise\"))"),
    M("lct pseudo-huber: - c dropped", "cmgen/methods/lct.py", "    return torch.sqrt(m + c * c) - c", "    return torch.sqrt(m + c * c)"),
    M("nsln: gamma learnable (a weight)", "cmgen/models/nsln.py", "F.layer_norm(x.flatten(1), (n,), None, self.bias.flatten(), self.eps)", "F.layer_norm(x.flatten(1), (n,), 2.0 + self.bias.flatten(), self.bias.flatten(), self.eps)"),
    # AWM (Xue et al. 2025) and the rollouts
    M("awm: x_t interpolates the wrong way", "cmgen/methods/awm.py", "xt = (1 - tv) * x0r + tv * eps", "xt = tv * x0r + (1 - tv) * eps"),
    M("awm: velocity target sign", "cmgen/methods/awm.py", "m = (v - (eps - x0r).float()).pow(2)", "m = (v - (x0r - eps).float()).pow(2)"),
    M("awm: advantage not applied", "cmgen/methods/awm.py", "loss = (adv.float().repeat(T) * ell).mean()", "loss = ell.mean()"),
    M("awm: advantages of the wrong samples", "cmgen/methods/awm.py", "loss = (adv.float().repeat(T) * ell).mean()", "loss = (adv.float().repeat_interleave(T) * ell).mean()"),
    M("awm ghuber: not weighted by t", "cmgen/methods/awm.py", "return t * ((m + GHUBER_EPS) ** p - GHUBER_EPS ** p) / p", "return ((m + GHUBER_EPS) ** p - GHUBER_EPS ** p) / p"),
    M("awm prev decay: not capped", "cmgen/methods/awm.py", "    return min(cap, rate * step)", "    return rate * step"),
    M("awm: previous-policy copy with gradient", "cmgen/methods/awm.py", "        if c.beta_prev > 0:\n            with torch.no_grad():\n                v_prev", "        if c.beta_prev > 0:\n            if True:\n                v_prev"),
    M("awm times: strata ignored", "cmgen/methods/awm.py", "    return edges[:-1] + (u * (edges[1:] - edges[:-1])).long()", "    return edges[:-1]"),
    M("awm times: not keyed by the step", "cmgen/methods/awm.py", "gen = keyed_generator(batch.rng.seed, batch.rng.step, \"awm-times\", batch.rng.offset)", "gen = keyed_generator(batch.rng.seed, \"awm-times\", batch.rng.offset)"),
    M("advantages: std with ddof 1", "cmgen/methods/rollout.py", "std_all = r.std(unbiased=False)", "std_all = r.std(unbiased=True)"),
    M("advantages: not divided by the clip", "cmgen/methods/rollout.py", "return (adv.clamp(-clip, clip) / clip).to(rewards.dtype)", "return adv.clamp(-clip, clip).to(rewards.dtype)"),
    M("advantages: global mean, not the group's", "cmgen/methods/rollout.py", "adv[m] = (rg - rg.mean()) / (std + eps)", "adv[m] = (rg - r.mean()) / (std + eps)"),
    M("advantages: group std always", "cmgen/methods/rollout.py", "std = std_all if global_std else rg.std(unbiased=False)", "std = rg.std(unbiased=False)"),
    M("rollout conditions: not repeated in groups", "cmgen/methods/rollout.py", "return perm[:conditions].repeat_interleave(k)", "return perm[:conditions].repeat(k)"),
    # RG-LCD (Li et al. 2024) and the VP / LCM formulas
    M("vp: betas linear, not scaled-linear", "cmgen/vp.py", "return torch.linspace(self.beta_start**0.5, self.beta_end**0.5, t, dtype=torch.float32) ** 2", "return torch.linspace(self.beta_start, self.beta_end, t, dtype=torch.float32)"),
    M("vp: noise scale without sqrt", "cmgen/vp.py", "return _bcast(ab.sqrt(), like), _bcast((1 - ab).sqrt(), like)", "return _bcast(ab.sqrt(), like), _bcast(1 - ab, like)"),
    M("vp: v-prediction x0 sign", "cmgen/vp.py", "return a * z - s * out, a * out + s * z", "return a * z + s * out, a * out + s * z"),
    M("ddim: eps weight without sqrt", "cmgen/vp.py", "return ab.sqrt() * x0 + (1 - ab).sqrt() * eps", "return ab.sqrt() * x0 + (1 - ab) * eps"),
    M("lcm scalings: sd factor in c_out", "cmgen/vp.py", "c_out = s / (s**2 + sigma_data**2) ** 0.5", "c_out = s * sigma_data / (s**2 + sigma_data**2) ** 0.5"),
    M("lcm scalings: timestep scaling dropped", "cmgen/vp.py", "s = torch.as_tensor(t, dtype=torch.float32) * timestep_scaling", "s = torch.as_tensor(t, dtype=torch.float32)"),
    M("guidance embedding: w not times 1000", "cmgen/vp.py", "w = torch.as_tensor(w, dtype=torch.float32).reshape(-1) * 1000.0", "w = torch.as_tensor(w, dtype=torch.float32).reshape(-1)"),
    M("skip-step grid: k j, not k j - 1", "cmgen/vp.py", "return torch.arange(1, original_steps + 1, dtype=torch.long) * k - 1", "return torch.arange(0, original_steps, dtype=torch.long) * k"),
    M("lcd: guidance sign", "cmgen/methods/lcd.py", "x0_g, eps_g = x0_c + wv * (x0_c - x0_u), eps_c + wv * (eps_c - eps_u)", "x0_g, eps_g = x0_c - wv * (x0_c - x0_u), eps_c - wv * (eps_c - eps_u)"),
    M("lcd: guided x0 but unguided eps", "cmgen/methods/lcd.py", "x0_g, eps_g = x0_c + wv * (x0_c - x0_u), eps_c + wv * (eps_c - eps_u)", "x0_g, eps_g = x0_c + wv * (x0_c - x0_u), eps_c"),
    M("lcd: solver step to the same time", "cmgen/methods/lcd.py", "prev = torch.where(n > 0, grid[(n - 1).clamp(min=0)], torch.zeros_like(n))", "prev = grid[n]"),
    M("lcd: t_e = t_s", "cmgen/methods/lcd.py", "t_e = (t_s - self.k).clamp(min=0)", "t_e = t_s"),
    M("lcd: w drawn from [0, w_max]", "cmgen/methods/lcd.py", "w = (cfg.w_min + (cfg.w_max - cfg.w_min) * rng.rand()).to(x0.device)", "w = (cfg.w_max * rng.rand()).to(x0.device)"),
    M("lcd huber: - c dropped", "cmgen/methods/lcd.py", "return (torch.sqrt((a.float() - b.float()) ** 2 + c * c) - c).mean()", "return torch.sqrt((a.float() - b.float()) ** 2 + c * c).mean()"),
    M("rg-lcd: reward added, not subtracted", "cmgen/methods/lcd.py", "                loss = loss - cfg.reward_scale * r.mean()\n            elif", "                loss = loss + cfg.reward_scale * r.mean()\n            elif"),
    M("lrm kl: direction swapped", "cmgen/rewards/lrm.py", "kls.append((p_log.exp() * (p_log - q_log)).sum(1))", "kls.append((q_log.exp() * (q_log - p_log)).sum(1))"),
    M("lrm ce: the generated latent wins", "cmgen/rewards/lrm.py", "losses = [-torch.log_softmax(lrm[:, [a, 2]].float(), 1)[:, 1] for a in (0, 1)]", "losses = [-torch.log_softmax(lrm[:, [a, 2]].float(), 1)[:, 0] for a in (0, 1)]"),
    # evaluation: Frechet distance, streamed moments, precision/recall, KID, SWD, MMD
    M("fd: trace term not doubled", "eval/frechet.py", "np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)", "np.trace(sigma2) - trace_sqrt_product(sigma1, sigma2)"),
    M("fd: mean term not squared", "eval/frechet.py", "value = diff @ diff + np.trace(sigma1)", "value = np.abs(diff).sum() + np.trace(sigma1)"),
    M("fd: sqrt of S2 S1^1/2, not of the middle", "eval/frechet.py", "middle = _symmetric(root1 @ np.asarray(sigma2, np.float64) @ root1)", "middle = _symmetric(np.asarray(sigma2, np.float64) @ root1)"),
    M("feature stats: merge term dropped", "eval/frechet.py", "self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (self.n * b / total)", "self._m2 = self._m2 + m2_b"),
    M("feature stats: mean not weighted", "eval/frechet.py", "self._mean = self._mean + delta * (b / total)", "self._mean = self._mean + delta * 0.5"),
    M("feature stats: biased covariance", "eval/frechet.py", "return self._m2 / (self.n - 1)", "return self._m2 / self.n"),
    M("reservoir: slot from U{0..keep}", "eval/frechet.py", "slots = self._rng.integers(0, idx + 1)", "slots = self._rng.integers(0, self.keep, size=len(idx))"),
    M("precision/recall: k-th neighbour is the point itself", "eval/metrics.py", "out.append(d.kthvalue(k + 1, dim=1).values)", "out.append(d.kthvalue(k, dim=1).values)"),
    M("precision/recall: swapped", "eval/metrics.py", "    return precision, recall\n", "    return recall, precision\n"),
    M("kid: kernel cubic -> square", "eval/metrics.py", "return (x @ y.T / x.shape[1] + 1.0) ** 3", "return (x @ y.T / x.shape[1] + 1.0) ** 2"),
    M("kid: diagonal kept (biased)", "eval/metrics.py", "off = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))", "off = (kxx.sum() + kyy.sum()) / (m * m)"),
    M("swd: no sqrt", "eval/metrics.py", "return float(np.sqrt((diff ** 2).mean()))", "return float((diff ** 2).mean())"),
    M("swd: directions not unit", "eval/metrics.py", "return v / np.linalg.norm(v, axis=1, keepdims=True)", "return v"),
    M("mmd rbf: bandwidth not squared", "eval/metrics.py", "torch.exp(-d / (2 * h * h))", "torch.exp(-d / (2 * h))"),
    M("confidence interval: normal quantile", "eval/metrics.py", "half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1)", "half = float(stats.norm.ppf(0.5 + level / 2)"),
    # flow matching samplers and the Flow-GRPO SDE (AWM's rollouts)
    M("sd3 shift: inverted", "sampling/flow.py", "return shift * t / (1 + (shift - 1) * t)", "return t / (shift - (shift - 1) * t)"),
    M("sde: sigma without sqrt", "sampling/flow.py", "return a * math.sqrt(t / (1.0 - (t_cap if t >= 1.0 else t)))", "return a * t / (1.0 - (t_cap if t >= 1.0 else t))"),
    M("sde: drift's x term sign", "sampling/flow.py", "mean = x * (1 + sig**2 / (2 * t) * dt)", "mean = x * (1 - sig**2 / (2 * t) * dt)"),
    M("sde: drift's v term without (1 - t)", "sampling/flow.py", "v * (1 + sig**2 * (1 - t) / (2 * t)) * dt", "v * (1 + sig**2 / (2 * t)) * dt"),
    M("log prob: log std dropped", "sampling/flow.py", "per = -0.5 * z * z - torch.log(std) - 0.5 * math.log(2 * math.pi)", "per = -0.5 * z * z - 0.5 * math.log(2 * math.pi)"),
    # latent codec, rewards, LCM sampling
    M("latent codec: std and sigma_data swapped", "cmgen/latents.py", "return self.sigma_data * (z.float() - self.mean) / self.std", "return self.std * (z.float() - self.mean) / self.sigma_data"),
    M("latent codec: denormalise without the mean", "cmgen/latents.py", "return x.float() * self.std / self.sigma_data + self.mean", "return x.float() * self.std / self.sigma_data"),
    M("latent codec: sd shift sign", "cmgen/latents.py", "return (z.float() - self.shift_factor) * self.scaling_factor", "return (z.float() + self.shift_factor) * self.scaling_factor"),
    M("latent codec: sd scale default", "cmgen/latents.py", "return float(0.18215 if scale is None else scale), float(shift or 0.0)", "return float(1.0 if scale is None else scale), float(shift or 0.0)"),
    M("digit reward: luma weights", "cmgen/rewards/digits.py", "torch.tensor(LUMA_601, device", "torch.tensor((0.333, 0.333, 0.334), device"),
    M("digit reward: top class, not the condition", "cmgen/rewards/digits.py", "        if cond is None:\n            return probs.max(1).values\n", "        if True:\n            return probs.max(1).values\n"),
    M("lcm sampling: renoise without sqrt", "sampling/lcm.py", "z = ab.sqrt() * denoised + (1 - ab).sqrt() * z", "z = ab * denoised + (1 - ab) * z"),
    M("lcm sampling: same noise every step", "sampling/lcm.py", "        z = noise(k).float()\n", "        z = noise(0).float()\n"),
    M("lcm timesteps: strided rule", "cmgen/vp.py", "idx = np.floor(np.linspace(0, len(grid), num=steps, endpoint=False)).astype(np.int64)", "idx = (np.arange(steps) * (len(grid) // steps)).astype(np.int64)"),
    M("lcm consistency fn: c_skip on x0, c_out on z", "cmgen/models/ldm_unet.py", "return c_skip.view(view) * z.float() + c_out.view(view) * x0", "return c_out.view(view) * z.float() + c_skip.view(view) * x0"),
    M("ddim inference timesteps: offset dropped", "cmgen/vp.py", "return [ratio * i + steps_offset for i in reversed(range(steps))]", "return [ratio * i for i in reversed(range(steps))]"),
    # more of the four methods
    M("ctm: teacher's Heun from the student's x_t noise", "cmgen/methods/ctm.py", "x_u = self.teacher_heun(nets.teacher, x_t, i_t, k, labels)", "x_u = self.teacher_heun(nets.teacher, x + self.times[i_t].to(dev, torch.float32).view((-1,) + (1,) * (x.ndim - 1)) * torch.randn_like(z), i_t, k, labels)"),
    M("ctm: the GAN sees the inner jump, not the estimate", "cmgen/methods/ctm.py", "l_g = generator_loss(nets.disc, est, batch.rng, c.diffaug)", "l_g = generator_loss(nets.disc, leaf, batch.rng, c.diffaug)"),
    M("ctm: GAN phase on even steps", "cmgen/methods/ctm.py", "if gate(step, c.gan_start) and (step - c.gan_start) % c.gan_period != 0:", "if gate(step, c.gan_start) and (step - c.gan_start) % c.gan_period == 0:"),
    M("lct: OT noise slice ignores the micro-batch offset", "cmgen/methods/lct.py", "b.extra[\"z\"] = z_all[o:o + len(b.x)].to(b.x.device, b.x.dtype)", "b.extra[\"z\"] = z_all[:len(b.x)].to(b.x.device, b.x.dtype)"),
    M("lct: pseudo-huber baseline uses the cauchy", "cmgen/methods/lct.py", "dist = (cauchy if self.cfg.loss == \"cauchy\" else pseudo_huber_mean)(pred, p.target, c)", "dist = cauchy(pred, p.target, c)"),
    M("lct: diffusion loss on the target", "cmgen/methods/lct.py", "mse = (pred.float() - x.float()).flatten(1).pow(2).mean(1)", "mse = (p.target.float() - x.float()).flatten(1).pow(2).mean(1)"),
    M("rollout noise: slice ignores the offset", "cmgen/methods/rollout.py", "        return full[offset:].to(device)", "        return full[:count].to(device)"),
    M("advantages: zero-std groups kept", "cmgen/methods/rollout.py", "if rg.numel() < 2 or bool((rg == rg[0]).all()):", "if rg.numel() < 2:"),
    M("awm: kl_ref with the reference's gradient direction", "cmgen/methods/awm.py", "kl = (v - v_ref).pow(2).flatten(1).mean(1).mean()", "kl = (v - v_ref).abs().flatten(1).mean(1).mean()"),
    M("rg-lcd lrm: triplet without the real latent", "cmgen/methods/lcd.py", "latents = [*batch.extra[\"triplet\"], real]", "latents = [*batch.extra[\"triplet\"], batch.extra[\"triplet\"][1]]"),
    M("rg-lcd lrm: expert scale ignored", "cmgen/methods/lcd.py", "            expert = expert * self.cfg.expert_scale\n", ""),
    M("lrm pretrain: same-class partner ignores the class", "cmgen/methods/lcd.py", "k = (u * same.sum(1)).long()", "k = (u * n).long().clamp(max=n - 1)"),
    M("lcd: student and target at the same z", "cmgen/methods/lcd.py", "target = nets.target(z_prev, t_e, cond, w).float()", "target = nets.target(z, t_e, cond, w).float()"),
    # the training loop, data order, DDIM, image rewards
    M("lr: warmup starts at 0", "cmgen/train.py", "return cfg.lr * (step + 1) / w", "return cfg.lr * step / w"),
    M("lr: cosine without the 1/2", "cmgen/train.py", "return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * frac))", "return cfg.lr * (1.0 + math.cos(math.pi * frac)) / 1.5"),
    M("loop: micro-batch losses summed, not averaged", "cmgen/train.py", "acc.backward(terms[\"loss\"] / t.grad_accum)", "acc.backward(terms[\"loss\"])"),
    M("loop: logged terms summed over micro-batches", "cmgen/train.py", "sums[k] = sums.get(k, 0.0) + v.detach().float() / t.grad_accum", "sums[k] = sums.get(k, 0.0) + v.detach().float()"),
    M("loop: gradient clipping skipped", "cmgen/train.py", "            acc.clip_grad_norm_(part.module.parameters(), part.optim.grad_clip)\n", "            pass\n"),
    M("loop: target network not updated", "cmgen/train.py", "                    target.update(module, self.step)\n", "                    pass\n"),
    M("loop: micro-batch offset ignores the rank", "cmgen/train.py", "        offset = (micro_idx * self.world + self.rank) * self.micro\n        stream", "        offset = micro_idx * self.micro\n        stream"),
    M("loop: hflip on every image", "cmgen/train.py", "flip = rng.rand() < 0.5", "flip = rng.rand() < 1.0"),
    M("loop: non-finite steps kept", "cmgen/train.py", "        if vec[-1].item() > 0:\n", "        if False:\n"),
    M("ddim: last step to alpha_bar_T, not alpha_bar_0", "sampling/ddim.py", "z = ddim_step(x0, eps, ac[prev] if prev >= 0 else ac[0])", "z = ddim_step(x0, eps, ac[prev] if prev >= 0 else ac[int(t)])"),
    M("ddim: eps and x0 swapped", "sampling/ddim.py", "x0, eps = to_x0_eps(net(z, t_vec, class_labels), z, ac, t_vec, prediction_type)", "eps, x0 = to_x0_eps(net(z, t_vec, class_labels), z, ac, t_vec, prediction_type)"),
    M("brightness: not mapped to [0, 1]", "cmgen/rewards/image.py", "return ((x.float().clamp(-1, 1) + 1) / 2).flatten(1).mean(1)", "return x.float().clamp(-1, 1).flatten(1).mean(1)"),
    M("jpeg incompressibility: sign", "cmgen/rewards/image.py", "lambda x, cond=None: jpeg_size(x),", "lambda x, cond=None: -jpeg_size(x),"),
    # the EDM and flow-matching teachers, and the Flow-GRPO baseline AWM is compared with
    M("edm: sigma not lognormal", "cmgen/methods/edm.py", "sigma = torch.exp(self.cfg.p_mean + self.cfg.p_std * rng.randn())", "sigma = torch.exp(self.cfg.p_mean + self.cfg.p_std * rng.rand())"),
    M("edm: loss unweighted", "cmgen/methods/edm.py", "weighted = edm_loss_weight(sigma, sd) * err", "weighted = err"),
    M("label dropout: keeps the label with probability p", "cmgen/methods/edm.py", "return torch.where(rng.rand() < p, torch.full_like(labels, null), labels)", "return torch.where(rng.rand() < 1 - p, torch.full_like(labels, null), labels)"),
    M("flow: velocity target sign", "cmgen/methods/flow.py", "err = (v.float() - (eps - x0).float()).pow(2)", "err = (v.float() - (x0 - eps).float()).pow(2)"),
    M("flow: logit-normal time without the sigmoid", "cmgen/methods/flow.py", "t = torch.sigmoid(cfg.logit_mean + cfg.logit_std * rng.randn())", "t = (cfg.logit_mean + cfg.logit_std * rng.randn()).clamp(0, 1)"),
    M("flow: training times not shifted", "cmgen/methods/flow.py", "    return shift_time(t, cfg.shift)", "    return t"),
    M("flow-grpo: clipped objective min, not max", "cmgen/methods/flowgrpo.py", "return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - eps, 1 + eps))", "return torch.minimum(-adv * ratio, -adv * ratio.clamp(1 - eps, 1 + eps))"),
    M("flow-grpo: ratio inverted", "cmgen/methods/flowgrpo.py", "ratio = torch.exp(step_log_prob(xs[:, j + 1], mean, std) - old[:, j])", "ratio = torch.exp(old[:, j] - step_log_prob(xs[:, j + 1], mean, std))"),
    M("flow-grpo: kl without 1/(2 std^2)", "cmgen/methods/flowgrpo.py", "kl = ((mean - mean_ref).pow(2).flatten(1).mean(1) / (2 * std**2)).mean()", "kl = (mean - mean_ref).pow(2).flatten(1).mean(1).mean()"),
    M("flow-grpo: rollout step from the mean, no noise", "cmgen/methods/flowgrpo.py", "            x = mean + std * noise(j + 1).float()\n", "            x = mean + std * noise(1).float()\n"),
    # guidance and the diffusers pipelines
    M("cfg: guided around the conditional output", "sampling/registry.py", "return uncond + scale * (cond - uncond)", "return cond + scale * (cond - uncond)"),
    M("pipeline cfg: guided around the conditional output", "cmgen/pipelines.py", "return uncond + guidance_scale * (cond - uncond)", "return cond + guidance_scale * (cond - uncond)"),
    M("pipeline images: [-1, 1] not mapped to [0, 1]", "cmgen/pipelines.py", "image = (x / 2 + 0.5).clamp(0, 1)", "image = x.clamp(0, 1)"),
    # data
    M("digits: 0..16 mapped to [-1, 1] with 16, not 8", "cmgen/data/__init__.py", "x = torch.from_numpy(d.images.astype(np.float32) / 8.0 - 1.0)[:, None]", "x = torch.from_numpy(d.images.astype(np.float32) / 16.0 - 1.0)[:, None]"),
    M("uint8 images: 255 not halved", "cmgen/data/__init__.py", "return u8.float() / 127.5 - 1.0", "return u8.float() / 255.0 - 1.0"),
    M("holdout: overlaps the training set", "cmgen/data/__init__.py", "held, kept = perm[:holdout].sort().values, perm[holdout:].sort().values", "held, kept = perm[:holdout].sort().values, perm.sort().values"),
    M("ring: 8 modes spaced by 2 pi / 4", "cmgen/data/__init__.py", "ang = k.float() * (2 * np.pi / 8)", "ang = k.float() * (2 * np.pi / 4)"),
    # image conversions, feature preprocessing, the rewards' own formulas, the VAE and latent diffusion losses
    M("to_uint8: no clamp before the cast", "cmgen/plots.py", "x = ((x.float().clamp(-1, 1) + 1) * 127.5).round()", "x = ((x.float() + 1) * 127.5).round()"),
    M("to_uint8: truncates instead of rounding", "cmgen/plots.py", "* 127.5).round().to(torch.uint8)", "* 127.5).floor().to(torch.uint8)"),
    M("eval luma: weights reversed", "eval/sources.py", "np.array(LUMA_601, np.float32)", "np.array(LUMA_601[::-1], np.float32)"),
    M("digits features: 255 not halved", "eval/digits_net.py", "return x[:, None] / 127.5 - 1.0", "return x[:, None] / 255.0 - 1.0"),
    M("digits features: RGB luma weights reversed", "eval/digits_net.py", "x = x @ torch.tensor(LUMA_601)", "x = x @ torch.tensor(LUMA_601[::-1])"),
    M("digits features: not standardised", "eval/digits_net.py", "return (self.trunk(x) - self.feature_mean) / self.feature_std", "return self.trunk(x) - self.feature_mean"),
    M("inception: clean and legacy resizing swapped", "eval/features.py", "resize_inside=legacy)", "resize_inside=not legacy)"),
    M("clip input: mean and std swapped", "eval/features.py", "TF.normalize(x, CLIP_MEAN, CLIP_STD)", "TF.normalize(x, CLIP_STD, CLIP_MEAN)"),
    M("clip input: not divided by 255", "eval/features.py", "x = x.float() / 255.0", "x = x.float()"),
    M("confidence interval: one-sided quantile", "eval/metrics.py", "stats.t.ppf(0.5 + level / 2, len(v) - 1)", "stats.t.ppf(level, len(v) - 1)"),
    M("confidence interval: std, not the standard error", "eval/metrics.py", "* v.std(ddof=1) / math.sqrt(len(v)))", "* v.std(ddof=1))"),
    M("reward eval: delta vs base sign", "eval/reward_eval.py", "tuned[\"mean\"] - base[\"mean\"]", "base[\"mean\"] - tuned[\"mean\"]"),
    M("reward on uint8: 255 not halved", "cmgen/rewards/__init__.py", "permute(0, 3, 1, 2).float() / 127.5 - 1.0", "permute(0, 3, 1, 2).float() / 255.0 - 1.0"),
    M("jpeg: enlargement factor floored", "cmgen/rewards/jpeg.py", "f = max(1, -(-MIN_SIDE // min(x.shape[-2:])))", "f = max(1, MIN_SIDE // min(x.shape[-2:]))"),
    M("jpeg compressibility: sign", "cmgen/rewards/jpeg.py", "    return -jpeg_kb(images)", "    return jpeg_kb(images)"),
    M("jpeg surrogate: std not restored", "cmgen/rewards/jpeg.py", "return self.net(x.float())[:, 0] * self.kb_std + self.kb_mean", "return self.net(x.float())[:, 0] + self.kb_mean"),
    M("jpeg surrogate reward: sign", "cmgen/rewards/jpeg.py", "return lambda x, c: -net.to(x.device)(x)", "return lambda x, c: net.to(x.device)(x)"),
    M("ink: not mapped to [0, 1]", "cmgen/rewards/differentiable.py", "return ((images.float() + 1) / 2).flatten(1).mean(1)", "return images.float().flatten(1).mean(1)"),
    M("digit-class reward: top class, not the sample's own", "cmgen/rewards/differentiable.py", "if cond is not None and not cond.is_floating_point():", "if False:"),
    M("vae kl: sign of the log-variance", "cmgen/vae_train.py", "- 1.0 - post.logvar)", "- 1.0 + post.logvar)"),
    M("vae: posterior sample scaled by the variance", "cmgen/vae_train.py", "z = post.mean + post.std * torch.randn", "z = post.mean + post.var * torch.randn"),
    M("vae kl: not per pixel", "cmgen/vae_train.py", ".sum(1).mean() / x[0].numel()", ".sum(1).mean()"),
    M("ldm: epsilon and v targets swapped", "cmgen/methods/ldm.py", "target = eps if self.cfg.prediction_type == \"epsilon\" else velocity(x0, eps, self.alphas_cumprod, t)", "target = velocity(x0, eps, self.alphas_cumprod, t) if self.cfg.prediction_type == \"epsilon\" else eps"),
    M("ldm: label dropout skipped", "cmgen/methods/ldm.py", "labels = drop_labels(batch.labels, rng, self.cfg.label_dropout, self.gen.null_label)", "labels = batch.labels"),
    M("ldm: network sees x0, not z_t", "cmgen/methods/ldm.py", "out = nets.model(zt, t, labels)", "out = nets.model(x0, t, labels)"),
    M("mlp time embedding: sin first", "cmgen/models/mlp.py", "torch.cat([torch.cos(args), torch.sin(args)], dim=-1)", "torch.cat([torch.sin(args), torch.cos(args)], dim=-1)"),
    M("mlp time embedding: frequencies over half - 1", "cmgen/models/mlp.py", "dtype=torch.float32) / half)", "dtype=torch.float32) / (half - 1))"),
    M("null label: an index of a real class", "cmgen/generator.py", "        return num_classes\n", "        return num_classes - 1\n"),
    # round 9: checkpoints, resume, export, LoRA and SD3, UNet presets, the image cache, workers, references, in-loop eval
    M("checkpoints: listed newest first", "cmgen/checkpoint.py", "return [p for _, p in sorted(found)]", "return [p for _, p in sorted(found, reverse=True)]"),
    M("checkpoints: a folder without state.json counts", "cmgen/checkpoint.py", "if m and p.is_dir() and (p / DONE_FILE).is_file():", "if m and p.is_dir():"),
    M("prune: keeps the oldest", "cmgen/checkpoint.py", "for p in ckpts[:-keep_last]:", "for p in ckpts[keep_last:]:"),
    M("optimizer state: ids stay strings", "cmgen/checkpoint.py", "state[int(pid)] = ", "state[pid] = "),
    M("checkpoint: frozen parameters stored", "cmgen/state.py", "named_parameters() if not p.requires_grad}", "named_parameters() if p.requires_grad}"),
    M("checkpoint: EMA file holds the raw weights", "cmgen/state.py", "dict(weights) | part.ema.state_dict()", "part.ema.state_dict() | dict(weights)"),
    M("resume: the checkpoint step's metrics dropped", "cmgen/state.py", "if json.loads(line)[\"step\"] <= step:", "if json.loads(line)[\"step\"] < step:"),
    M("resume: eval.* keys may not change", "cmgen/state.py", "(k.endswith(\".\") and key.startswith(k))", "(k.endswith(\".\") and key == k)"),
    M("resume: run-length defaults from the new recipe", "cmgen/state.py", "fixed = {k: fo[k] for k, v in fn.items() if k.startswith(\"method.\") and v is None and fo.get(k) is not None}", "fixed = {}"),
    M("resume: EMA not restored", "cmgen/state.py", "part.ema.load_state_dict(ckpt_io.load_tensors(ckpt / ema_file))", "ckpt_io.load_tensors(ckpt / ema_file)"),
    M("resume: target networks not restored", "cmgen/state.py", "load_weights(target.module, ckpt_io.load_tensors(ckpt / f\"target-{name}.safetensors\"), str(ckpt))", "ckpt_io.load_tensors(ckpt / f\"target-{name}.safetensors\")"),
    M("resume: logged-loss sums reset", "cmgen/state.py", "trainer.pending = dict(state.get(\"pending\", {}))", "trainer.pending = {k: 0.0 for k in state.get(\"pending\", {})}"),
    M("run loading: the oldest checkpoint", "cmgen/runs.py", "    if ckpts:\n        return ckpts[-1]", "    if ckpts:\n        return ckpts[0]"),
    M("run loading: ema and raw weights swapped", "cmgen/runs.py", "(\"ema.safetensors\" if ema else \"model.safetensors\")", "(\"model.safetensors\" if ema else \"ema.safetensors\")"),
    M("foreign pipeline: 2-step sigma is sigma_max", "cmgen/runs.py", "mid = float(scheduler.sigmas[1])", "mid = float(scheduler.sigmas[0])"),
    M("karras grid: exact ignores the timestep", "cmgen/export.py", "exact += _smallest(n, i, same_sigma & same_t)", "exact += _smallest(n, i, same_sigma)"),
    M("karras grid: only the point below mid", "cmgen/export.py", "for offset in (0, 1):", "for offset in (0,):"),
    M("reward weights: unpickled", "cmgen/checkpoint.py", 'map_location="cpu", weights_only=True)', 'map_location="cpu", weights_only=False)'),
    M("export: pickles published", "cmgen/export.py", "        _assert_no_pickles(tmp)\n", "        pass\n"),
    M("export: a non-empty target is written into", "cmgen/export.py", "if out.exists() and (not out.is_dir() or any(out.iterdir())):", "if out.exists() and not out.is_dir():"),
    M("export: --no-ema ignored", "cmgen/export.py", "lm = load_model(source, ema=ema)", "lm = load_model(source, ema=True)"),
    M("edm export: exponential sigmas", "cmgen/export.py", "sigma_schedule=\"karras\", prediction_type=\"epsilon\"", "sigma_schedule=\"exponential\", prediction_type=\"epsilon\""),
    M("lcm export: trailing timesteps", "cmgen/export_lcm.py", "timestep_spacing=\"leading\"", "timestep_spacing=\"trailing\""),
    M("lcm pipeline: guidance w = scale, not scale - 1", "cmgen/pipelines_lcm.py", "w = torch.full((batch_size,), float(scale) - 1.0)", "w = torch.full((batch_size,), float(scale))"),
    M("lora export: adapter alpha dropped", "cmgen/lora.py", "safe_serialization=True, transformer_lora_adapter_metadata=config.to_dict())", "safe_serialization=True)"),
    M("sd3 codec: decode shifts before unscaling", "cmgen/models/sd3.py", "z.to(self.vae.dtype) / self.scale + self.shift", "(z.to(self.vae.dtype) + self.shift) / self.scale"),
    M("sd3 codec: encode shift sign", "cmgen/models/sd3.py", ".latent_dist.mode() - self.shift) * self.scale", ".latent_dist.mode() + self.shift) * self.scale"),
    M("sd3: every image sees prompt 0", "cmgen/models/sd3.py", "encoder_hidden_states=self.prompt_embeds[labels]", "encoder_hidden_states=self.prompt_embeds[labels * 0]"),
    M("sd3: base not frozen under LoRA", "cmgen/models/sd3.py", "    transformer.requires_grad_(False)\n    names", "    names"),
    M("sd3: reference keeps the adapter on", "cmgen/models/sd3.py", "        self.transformer.disable_adapters()\n", "        pass\n"),
    M("unet: default attention at the first level", "cmgen/models/unet.py", "else (levels - 1,)", "else (0,)"),
    M("unet: up blocks in down order", "cmgen/models/unet.py", "for i in reversed(range(levels)):", "for i in range(levels):"),
    M("image cache: fingerprint ignores mtime", "cmgen/data/cache.py", "{st.st_size}\\0{st.st_mtime_ns}\\n", "{st.st_size}\\n"),
    M("image cache: key ignores the spec", "cmgen/data/cache.py", "json.dumps([VERSION, str(source), spec], sort_keys=True)", "json.dumps([VERSION, str(source)], sort_keys=True)"),
    M("workers: every micro-batch reads the first offset", "cmgen/data/loader.py", "self.sampler.indices(step, self.global_batch, offset, self.count)", "self.sampler.indices(step, self.global_batch, self.offsets[0], self.count)"),
    M("ref stats: feature space not checked", "eval/refstats.py", "if protocol is not None and protocol.get(\"feature_id\") != net.id:", "if False:"),
    M("toy reference: the training draw", "eval/refstats.py", "d = toy2d(name, count, TOY_REF_SEED)", "d = toy2d(name, count, 0)"),
    M("in-loop eval: rows of a crashed run kept", "eval/inloop.py", "if old.get(\"step\", -1) < row[\"step\"]]", "]"),
    M("in-loop eval: noise moves with the step", "eval/inloop.py", "e.n, seed=0, device=device", "e.n, seed=step, device=device"),
    M("in-loop reference: training data despite a held-out split", "eval/inloop.py", "(holdout, \"held-out split\") if holdout is not None and len(holdout) > 1 else (data, \"training data\")", "(data, \"training data\")"),
    M("gate: switches on a step late", "cmgen/methods/base.py", "return start is not None and step >= start", "return start is not None and step > start"),
    # round 10: recipes, pretrained loading, the CLIs, the evaluation tables, SD teachers, trackers
    M("recipe base: a section replaced, not merged", "cmgen/recipe.py", "out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v", "out[k] = v"),
    M("recipe: true accepted as an integer", "cmgen/recipe.py", "if isinstance(value, bool) or not isinstance(value, int):", "if not isinstance(value, int):"),
    M("recipe: '1e-4' not read as a number", "cmgen/recipe.py", "value = float(value)\n", "value = value\n"),
    M("recipe: a bare no not read as 'no'", "cmgen/recipe.py", "elif value is False:  # a bare", "elif False:  # a bare"),
    M("recipe: pair length unchecked", "cmgen/recipe.py", "if len(value) != len(args):", "if False:"),
    M("recipe: sigmas order unchecked", "cmgen/recipe.py", "need(sampling_sigmas_ok(s, p.sigma_min, p.sigma_max),", "need(True,"),
    M("recipe: ema_decay of 1 accepted", "cmgen/recipe.py", "0.0 <= t.ema_decay < 1.0", "0.0 <= t.ema_decay <= 1.0"),
    M("recipe base: a loop not detected", "cmgen/recipe.py", "_seen + (str(p.resolve()),)", "_seen"),
    M("recipe: the method's own checks skipped", "cmgen/recipe.py", "for msg in problems() if problems else ():", "for msg in ():"),
    M("recipe: sample.gamma above 1 accepted", "cmgen/recipe.py", "0.0 <= r.sample.gamma <= 1.0", "0.0 <= r.sample.gamma"),
    M("pretrained: any module imported as a network class", "cmgen/pretrained.py", "if not (library == \"diffusers\" or library == \"cmgen\" or library.startswith(\"cmgen.\")):", "if False:"),
    M("init_from: sigmas of the source unchecked", "cmgen/pretrained.py", "for key in (\"sigma_min\", \"sigma_max\", \"sigma_data\"):", "for key in ():"),
    M("init_from: network class unchecked", "cmgen/pretrained.py", "if their_class != ours_class:", "if False:"),
    M("init_from: UNet config unchecked", "cmgen/pretrained.py", "if _plain(value) != _plain(ours[key]):", "if False:"),
    M("init_from: sharded weights ignored", "cmgen/pretrained.py", "if index.is_file() else", "if False else"),
    M("load_weights: frozen parameters required", "cmgen/pretrained.py", "missing = [k for k in own if k not in weights and k not in frozen]", "missing = [k for k in own if k not in weights]"),
    M("load_weights: shapes unchecked", "cmgen/pretrained.py", "        if own[k].shape != v.shape:\n            raise UserError(f\"weights in", "        if False:\n            raise UserError(f\"weights in"),
    M("load_vae: a pipeline's vae/ not entered", "cmgen/pretrained.py", "        path = path / \"vae\"\n", "        pass\n"),
    M("load_vae: any class accepted", "cmgen/pretrained.py", "if cls != \"AutoencoderKL\":", "if False:"),
    M("load_matching: shapes not compared", "cmgen/pretrained.py", "if k in own and own[k].shape == v.shape}", "if k in own}"),
    M("init_from: attention groups resolved backwards", "cmgen/pretrained.py", "None if scale_shift else cfg[\"norm_num_groups\"]", "cfg[\"norm_num_groups\"] if scale_shift else None"),
    M("eval: precision and recall swapped", "eval/fid.py", "precision_recall(uniform_rows(real, m, rng), uniform_rows(fake, m, rng),", "precision_recall(uniform_rows(fake, m, rng), uniform_rows(real, m, rng),"),
    M("sweep: NFE column is the step count", "eval/fid.py", "\"nfe\": gen.nfe(times, spec.name, guidance)", "\"nfe\": steps"),
    M("sweep: guidance not passed to the sampler", "eval/fid.py", "sampler=spec.name, guidance=guidance, seed=seed", "sampler=spec.name, guidance=1.0, seed=seed"),
    M("holdout floor: the held-out split against itself", "eval/cli.py", "real = splits[\"train\"]", "real = splits[\"holdout\"]"),
    M("eval out dir: a checkpoint's tables inside the checkpoint", "eval/cli.py", "run = p.parent.parent if", "run = p if"),
    M("eval files: no step tag", "eval/cli.py", "return f\"_step{step}\" if step is not None else \"\"", "return \"\""),
    M("eval files: the default sampler tagged", "eval/cli.py", "if p.get(\"sampler\") and p[\"sampler\"] != default else \"\"", "if p.get(\"sampler\") else \"\""),
    M("latent holdout: latents split by another seed", "eval/cli.py", "lat_train, _ = _split(lat, recipe.data.holdout, recipe.train.seed)", "lat_train, _ = _split(lat, recipe.data.holdout, recipe.train.seed + 1)"),
    M("eval: --n 1 accepted", "eval/cli.py", "if args.n is not None and args.n < 2:", "if args.n is not None and args.n < 1:"),
    M("reward --base: the base always at 1 step", "eval/cli.py", "[s] if s else [1]", "[1]"),
    M("sample: --gamma range unchecked", "cmgen/cli.py", "if not 0.0 <= args.gamma <= 1.0:", "if False:"),
    M("sample: --gamma not passed on", "cmgen/cli.py", "options[\"gamma\"] = args.gamma", "pass"),
    M("sample: --steps and --sigmas may disagree", "cmgen/cli.py", "if args.steps is not None and args.steps != len(times):", "if False:"),
    M("sample: --class-label of num_classes accepted", "cmgen/cli.py", "if not 0 <= args.class_label < gen.num_classes:", "if not 0 <= args.class_label <= gen.num_classes:"),
    M("sample: --no-ema ignored", "cmgen/cli.py", "gen = load_model(args.run, ema=not args.no_ema, device=device)", "gen = load_model(args.run, ema=True, device=device)"),
    M("sample npz: no uint8 images", "cmgen/cli.py", "arrays[\"images\"] = to_uint8(x)", "pass"),
    M("sd teacher: beta_start and beta_end swapped", "cmgen/sd.py", "VPSchedule(float(sched.get(\"beta_start\", 0.00085)), float(sched.get(\"beta_end\", 0.012)),", "VPSchedule(float(sched.get(\"beta_end\", 0.012)), float(sched.get(\"beta_start\", 0.00085)),"),
    M("sd teacher: prediction type ignored", "cmgen/sd.py", "sched.get(\"prediction_type\", \"epsilon\")", "\"epsilon\""),
    M("sd prompts: not padded to the tokenizer's length", "cmgen/sd.py", "padding=\"max_length\"", "padding=\"longest\""),
    M("latents encode: --hflip ignored", "cmgen/latents_cli.py", "hflip=bool(args.hflip)", "hflip=False"),
    M("latents encode: --seed ignored", "cmgen/latents_cli.py", "seed=int(args.seed)", "seed=0"),
    M("tensorboard: purges the checkpoint's own step", "cmgen/trackers.py", "{\"purge_step\": step + 1}", "{\"purge_step\": step}"),
    M("wandb: a new run id on resume", "cmgen/trackers.py", "    if not id_file.is_file():\n", "    if True:\n"),
    M("wandb: online without credentials", "cmgen/trackers.py", "mode = \"online\" if has_key else \"offline\"", "mode = \"online\""),
    M("methods: a shipped method saved by module path", "cmgen/methods/__init__.py", "        if module == path:\n            return name", "        if False:\n            return name"),
    M("report: KID shown without the x1e3", "eval/report.py", "f\"{1e3 * r['kid']:.3g}", "f\"{r['kid']:.3g}"),
    # round 11: the Generator and run loading
    M("nfe: LCM's embedded guidance counted twice", "cmgen/generator.py", "doubled = guidance != 1.0 and not getattr(self.net, \"embeds_guidance\", False)", "doubled = guidance != 1.0"),
    M("clip: latent estimates clamped", "cmgen/generator.py", "self.recipe.sample.clip_denoised and self.kind == \"image\")", "self.recipe.sample.clip_denoised and self.kind != \"points\")"),
    M("cfg: accepted without a null label", "cmgen/generator.py", "if guidance != 1.0 and self.null_label is None:", "if False:"),
    M("build_network: no embedding for the null label", "cmgen/generator.py", "embeds = num_classes + (1 if null_label(recipe, num_classes) is not None else 0)", "embeds = num_classes"),
    M("generator: latents returned undecoded", "cmgen/generator.py", "return self.codec.decode(z.float())", "return z.float()"),
    M("run loading: a fine-tuned run needs its init_from source", "cmgen/runs.py", "if recipe.model.init_from and not all(p.requires_grad for p in gen.net.parameters()):", "if recipe.model.init_from:"),
    M("pipeline: the scheduler's constants over the run's recipe", "cmgen/runs.py", "        precond = recipe.precond\n", "        pass\n"),
    M("foreign pipeline: class count of the UNet ignored", "cmgen/runs.py", "int(info.get(\"num_classes\", cfg.num_class_embeds or 0))", "int(info.get(\"num_classes\", 0))"),
    # round 12: CTM from real files (LPIPS, the teacher run, the discriminator's backbones, the run's samplers)
    M("lpips: max-pools kept under avg", "cmgen/perceptual.py", "nn.AvgPool2d(2, 2) if pooling == \"avg\" else nn.MaxPool2d(2, 2)", "nn.MaxPool2d(2, 2)"),
    M("lpips: features not unit-normalised", "cmgen/perceptual.py", "out.append(f / (f.pow(2).sum(1, keepdim=True).sqrt() + EPS))", "out.append(f)"),
    M("lpips: inputs not mapped to [0, 1]", "cmgen/perceptual.py", "h, out = ((x + 1) / 2 - self.mean) / self.std, []", "h, out = (x - self.mean) / self.std, []"),
    M("lpips: not divided by the std", "cmgen/perceptual.py", "h, out = ((x + 1) / 2 - self.mean) / self.std, []", "h, out = ((x + 1) / 2 - self.mean), []"),
    M("lpips: linear weights ignored", "cmgen/perceptual.py", "((fa - fb).pow(2) * w).sum(1)", "((fa - fb).pow(2)).sum(1)"),
    M("lpips: summed over positions", "cmgen/perceptual.py", ".sum(1).mean((1, 2))", ".sum(1).sum((1, 2))"),
    M("lpips: taps before the ReLUs", "cmgen/perceptual.py", "TAPS = (3, 8, 15, 22, 29)", "TAPS = (2, 7, 14, 21, 28)"),
    M("lpips: not resized to 224", "cmgen/perceptual.py", "size=224, mode=\"bilinear\"", "size=112, mode=\"bilinear\""),
    M("ctm teacher: the raw weights, not the EMA", "cmgen/methods/ctm.py", "teacher = load_model(cfg.teacher, ema=True)", "teacher = load_model(cfg.teacher, ema=False)"),
    M("ctm teacher: sigma_data not compared", "cmgen/methods/ctm.py", "if (tp.sigma_data, tp.c_noise) != (p.sigma_data, p.c_noise):", "if tp.c_noise != p.c_noise:"),
    M("ctm teacher: shapes not compared", "cmgen/methods/ctm.py", "if tuple(teacher.shape) != tuple(gen.shape):", "if False:"),
    M("timm features: not standardised", "cmgen/methods/ctm_gan.py", "x = ((x + 1) / 2 - self.mean) / self.std", "x = x"),
    M("timm features: weights read leniently", "cmgen/methods/ctm_gan.py", "full.load_state_dict(state.get(\"state_dict\", state) if isinstance(state, dict) else state)", "full.load_state_dict(state.get(\"state_dict\", state) if isinstance(state, dict) else state, strict=False)"),
    M("timm features: batch norms in train mode", "cmgen/methods/ctm_gan.py", "        super().train(mode)\n        self.net.eval()\n", "        super().train(mode)\n"),
    M("digits features: the FD-digits net shared", "cmgen/methods/ctm_gan.py", "self.trunk = copy.deepcopy(net.trunk).cpu().requires_grad_(False)", "self.trunk = net.trunk.requires_grad_(False)"),
    M("ctm multistep sampler: gamma 0", "sampling/registry.py", "_run_ctm_gamma(net, noise, times, labels, gen, {\"gamma\": 1.0})", "_run_ctm_gamma(net, noise, times, labels, gen, {\"gamma\": 0.0})"),
    M("ctm heun sampler: the gamma sampler's times", "sampling/registry.py", "\"heun\": Sampler(\"heun\", _edm_times, _heun_nfe, _run_ctm_heun,", "\"heun\": Sampler(\"heun\", _ctm_times, _heun_nfe, _run_ctm_heun,"),
    M("cifar10 cache: one row per batch file", "cmgen/data/__init__.py", "setting=cache, count=lambda: len(get().data))", "setting=cache)"),
    M("cifar10 in RAM: NHWC rows read as NCHW", "cmgen/data/__init__.py", "np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2))", "np.ascontiguousarray(ds.data.reshape(-1, 3, 32, 32))"),
    M("image rows: unsorted reads in file order", "cmgen/data/__init__.py", "out[order] = self.images[idx[order]]", "out[:] = self.images[idx[order]]"),
    M("image folder: crop from the top-left corner", "cmgen/data/__init__.py", "left, top = (im.width - side) // 2, (im.height - side) // 2", "left, top = 0, 0"),
    M("checkpoint: a re-saved step keeps the old files", "cmgen/checkpoint.py", "        os.rename(tmp, final)\n        shutil.rmtree(old, ignore_errors=True)", "        os.rename(old, final)\n        shutil.rmtree(tmp, ignore_errors=True)"),
    M("prune: a dead process's temporary folder kept", "cmgen/checkpoint.py", "        if pid != str(os.getpid()):", "        if False:"),
    M("prune: this process's save in progress removed", "cmgen/checkpoint.py", "        if pid != str(os.getpid()):", "        if True:"),
    M("resume: data shape unchecked", "cmgen/state.py", "if tuple(state[\"data_shape\"]) != tuple(trainer.data.shape):", "if False:"),
    M("recipe: data.cache off read as a folder named no", "cmgen/recipe.py", "BOOL_WORDS = {\"data.cache\": (\"auto\", \"off\")}", "BOOL_WORDS = {}"),
    M("refstats: a cached reference never reused", "eval/refstats.py", "    if path.is_file():\n        ref = load_stats(path, net)", "    if False:\n        ref = load_stats(path, net)"),
    M("refstats: clean-fid's statistics for any Inception file", "eval/refstats.py", "if net.kind != \"inception\" or net.protocol.get(\"warning\"):", "if net.kind != \"inception\":"),
    M("eval sources: grey not repeated to RGB", "eval/sources.py", "        return np.repeat(batch, 3, axis=-1)\n", "        return batch\n"),
    M("eval sources: a folder's --n ignored", "eval/sources.py", "    files = subset(image_files(folder), n)\n", "    files = image_files(folder)\n"),
    M("eval sources: Fortran-ordered npz read as C order", "eval/sources.py", "if fortran and len(shape) > 1:", "if False:"),
    M("sample: --gamma accepted without the gamma sampler", "cmgen/cli.py", "        if sampler != \"gamma\":\n", "        if False:\n"),
    M("sample: --class-label on an unconditional model", "cmgen/cli.py", "        if not gen.conditional:\n", "        if False:\n"),
    M("sample: any --out suffix", "cmgen/cli.py", "if out.suffix.lower() not in (\".png\", \".npz\", \"\"):", "if False:"),
    M("two-time unet: center_input_sample ignored", "cmgen/models/two_time.py", "        if self.config.center_input_sample:\n            sample = 2 * sample - 1.0\n", ""),
    M("two-time unet: timestep class embedding fed raw labels", "cmgen/models/two_time.py", "                class_labels = self.time_proj(class_labels)\n", "                pass\n"),
    M("two-time unet: NCSN++ skip path dropped", "cmgen/models/two_time.py", "            sample = sample + skip_sample\n", "            pass\n"),
    M("lcd: the l2 option is the mean absolute error", "cmgen/methods/lcd.py", "lcd = (pred.float() - target).pow(2).mean()", "lcd = (pred.float() - target).abs().mean()"),
    M("lrm: the ce option trains with the kl loss", "cmgen/methods/lcd.py", "        if self.cfg.lrm_loss == \"kl\":\n", "        if True:\n"),
    M("pipeline images: np output left CHW", "cmgen/pipelines.py", "image = image.cpu().permute(0, 2, 3, 1).numpy()", "image = image.cpu().numpy()"),
    M("pipeline noise: one generator for every image", "cmgen/pipelines.py", "return torch.cat([torch.randn((1, *shape), generator=g) for g in generator]).to(device)", "return torch.randn((batch_size, *shape), generator=generator[0]).to(device)"),
    M("pipeline json: a list accepted as a JSON object", "cmgen/pretrained.py", "    if not isinstance(data, dict):\n", "    if False:\n"),
    M("latent cache: an unfinished encode read as a cache", "cmgen/latents.py", "    if not (folder / FINAL).is_file():\n", "    if False:\n"),
    # CLIP-family rewards (round 13)
    M("pickscore: not divided by 26", "cmgen/rewards/weights.py", "return model.logit_scale.exp() * sim / 26.0", "return model.logit_scale.exp() * sim"),
    M("pickscore: logit_scale used as stored (a log)", "cmgen/rewards/weights.py", "return model.logit_scale.exp() * sim / 26.0", "return model.logit_scale * sim / 26.0"),
    M("clipscore: negative cosines kept", "cmgen/rewards/weights.py", "device).clamp(min=0)", "device)"),
    M("clip input: top-left crop", "cmgen/rewards/weights.py", "top, left = (x.shape[2] - size) // 2, (x.shape[3] - size) // 2", "top, left = 0, 0"),
    M("clip input: longest side resized to 224", "cmgen/rewards/weights.py", "s = size / min(h, w)", "s = size / max(h, w)"),
    M("clip input: bilinear resize", "cmgen/rewards/weights.py", 'mode="bicubic",\n                      align_corners=False, antialias=True)', 'mode="bilinear",\n                      align_corners=False, antialias=True)'),
    M("clip input: mean and std swapped", "cmgen/rewards/weights.py", "    return (x - mean) / std\n", "    return (x - std) / mean\n"),
    M("clip similarity: image features unprojected", "cmgen/rewards/weights.py", "img = _projected(model.get_image_features(pixel_values=clip_input(x).to(device)))", "img = model.vision_model(pixel_values=clip_input(x).to(device)).pooler_output[..., :16]"),
    M("pipeline: a stock EDM/flow pipeline without cmgen's recipe read as a cm model", "cmgen/runs.py", "    if recipe is None and sched.get(\"_class_name\") in (", "    if False and sched.get(\"_class_name\") in ("),
    M("hpsv2.1: image embeddings not normalised", "cmgen/rewards/weights.py", "img = model.encode_image(clip_input(x).to(device), normalize=True)", "img = model.encode_image(clip_input(x).to(device))"),
    M("hpsv2.1: checkpoint's state_dict nesting ignored", "cmgen/rewards/weights.py", "model.load_state_dict(state.get(\"state_dict\", state))", "model.load_state_dict(state, strict=False)"),
    # round 14: the latent codec, NsLN, the LCD student, generation, pipelines' labels, Flow-GRPO / AWM penalties
    M("latent posterior: the mean, not a sample", "cmgen/latents.py", "return dist.mean.float() + dist.std.float() * eps", "return dist.mean.float()"),
    M("latent posterior: var for std", "cmgen/latents.py", "return dist.mean.float() + dist.std.float() * eps", "return dist.mean.float() + dist.var.float() * eps"),
    M("latent cache: model latents without sigma_data", "cmgen/latents.py", "return LATENT_STD * (self.latents - self.mean) / self.std", "return (self.latents - self.mean) / self.std"),
    M("latent codec: sd denormalise multiplies by the scale", "cmgen/latents.py", "return x.float() / self.scaling_factor + self.shift_factor", "return x.float() * self.scaling_factor + self.shift_factor"),
    M("latent codec: sd std map without sigma_data", "cmgen/latents.py", "torch.full(tuple(shape), LATENT_STD / scale)", "torch.full(tuple(shape), 1.0 / scale)"),
    M("latent codec: image side one factor too large", "cmgen/latents.py", "factor = 2 ** (len(vae.config.block_out_channels) - 1)", "factor = 2 ** len(vae.config.block_out_channels)"),
    M("nsln: beta dropped", "cmgen/models/nsln.py", "F.layer_norm(x.flatten(1), (n,), None, self.bias.flatten(), self.eps)", "F.layer_norm(x.flatten(1), (n,), None, None, self.eps)"),
    M("nsln: statistics per channel", "cmgen/models/nsln.py", "return F.layer_norm(x.flatten(1), (n,), None, self.bias.flatten(), self.eps).view(x.shape)", "return F.group_norm(x.reshape(x.shape[0], x.shape[1], -1), x.shape[1], eps=self.eps).view(x.shape) + self.bias.view(x.shape[1:])"),
    M("lcm student: the guidance embedding ignores w", "cmgen/models/ldm_unet.py", "emb = guidance_embedding(w.expand(z.shape[0]) if w.ndim == 0 else w, self.w_dim)", "emb = guidance_embedding(torch.zeros(z.shape[0]), self.w_dim)"),
    M("lcd: z noised to t_e", "cmgen/methods/lcd.py", "z = add_noise(x0, eps, self.alphas_cumprod, t_s)", "z = add_noise(x0, eps, self.alphas_cumprod, t_e)"),
    M("lcd: the null label is the condition", "cmgen/methods/lcd.py", "torch.full_like(cond, int(self.null_cond))", "cond.clone()"),
    M("rg-lcd: reward decodes normalised latents", "cmgen/methods/lcd.py", "return vae.decode(codec.denormalise(z).to(", "return vae.decode(z.float().to("),
    M("rg-lcd: lrm pretraining one step longer", "cmgen/methods/lcd.py", "(\"lrm\",) if step < self.cfg.lrm_pretrain_steps else", "(\"lrm\",) if step <= self.cfg.lrm_pretrain_steps else"),
    M("lcd: skip k = 1", "cmgen/methods/lcd.py", "self.k = cfg.num_train_timesteps // cfg.original_steps", "self.k = 1"),
    M("generate: every image label 0", "sampling/generate.py", "y = (labels[idx] if labels is not None else idx % gen.num_classes).to(device)", "y = (labels[idx] if labels is not None else 0 * idx).to(device)"),
    M("generate: karras tail to sigma_min", "sampling/generate.py", "lo = sig[-1] if len(sig) > 1 else 0.5", "lo = p.sigma_min"),
    M("generate: karras grid increasing", "sampling/generate.py", "grid = karras_sigmas(steps, lo, p.sigma_max, p.rho).flip(0)", "grid = karras_sigmas(steps, lo, p.sigma_max, p.rho)"),
    M("generate: autocast never on", "sampling/generate.py", "enabled=autocast_dtype is not None)", "enabled=False)"),
    M("sampling sigmas: repeated values accepted", "cmgen/precond.py", "all(a > b for a, b in zip(values, values[1:]))", "all(a >= b for a, b in zip(values, values[1:]))"),
    M("generate: a shard makes every batch from its rank on", "sampling/generate.py", "starts = list(range(0, n, batch_size))[rank::world]", "starts = list(range(0, n, batch_size))[rank:]"),
    M("pipeline labels: modulo the embeddings (null label included)", "cmgen/pipelines.py", "class_labels = torch.arange(batch_size) % (num_classes or embeds)", "class_labels = torch.arange(batch_size) % embeds"),
    M("flow-grpo log prob: summed over elements", "cmgen/methods/flowgrpo.py", "    return per.flatten(1).mean(1)\n", "    return per.flatten(1).sum(1)\n"),
    M("flow-grpo log prob: log std dropped", "cmgen/methods/flowgrpo.py", "per = -0.5 * z * z - math.log(std) - 0.5 * math.log(2 * math.pi)", "per = -0.5 * z * z - 0.5 * math.log(2 * math.pi)"),
    M("flow-grpo: steps summed, not averaged", "cmgen/methods/flowgrpo.py", "total = total + loss_j / steps", "total = total + loss_j"),
    M("flow-grpo: kl weight ignored", "cmgen/methods/flowgrpo.py", "loss_j = loss_j + self.cfg.beta * kl", "loss_j = loss_j + kl"),
    M("awm: kl_ref weight ignored", "cmgen/methods/awm.py", "loss = loss + c.beta * kl", "loss = loss + kl"),
    M("awm: previous-policy penalty summed over elements", "cmgen/methods/awm.py", "prev = (v - v_prev).pow(2).flatten(1).mean(1).mean()", "prev = (v - v_prev).pow(2).flatten(1).sum(1).mean()"),
    M("awm: previous-policy weight ignored", "cmgen/methods/awm.py", "loss = loss + c.beta_prev * prev", "loss = loss + prev"),
    M("reward fn: uint8 mapped to [0, 1]", "cmgen/rewards/__init__.py", ".permute(0, 3, 1, 2).float() / 127.5 - 1.0", ".permute(0, 3, 1, 2).float() / 255.0"),
    M("reward eval: population std", "eval/reward_eval.py", "float(values.std(ddof=1))", "float(values.std())"),
    M("lcm export: linear betas", "cmgen/export_lcm.py", "beta_schedule=\"scaled_linear\", prediction_type=m.prediction_type", "beta_schedule=\"linear\", prediction_type=m.prediction_type"),
    M("lcm export: prediction type always epsilon", "cmgen/export_lcm.py", "prediction_type=m.prediction_type,", "prediction_type=\"epsilon\","),
    M("lcm export: default guidance 1", "cmgen/export_lcm.py", "default_guidance=m.guidance, num_classes", "default_guidance=1.0, num_classes"),
    # round 15: EDM Algorithm 2 (churn), the samplers' recipe options and the pipelines' defaults, LCM / DDIM steps
    M("heun churn: gamma not capped at sqrt(2) - 1", "sampling/edm.py", "gamma = min(churn / steps, math.sqrt(2.0) - 1.0) if", "gamma = churn / steps if"),
    M("heun churn: S_churn not divided by N", "sampling/edm.py", "gamma = min(churn / steps, math.sqrt(2.0) - 1.0) if", "gamma = min(churn, math.sqrt(2.0) - 1.0) if"),
    M("heun churn: noise std without sqrt", "sampling/edm.py", "x = x + math.sqrt(t_hat**2 - t**2) * s_noise * noise(i + 1).float()", "x = x + (t_hat**2 - t**2) * s_noise * noise(i + 1).float()"),
    M("heun churn: s_noise ignored", "sampling/edm.py", "x = x + math.sqrt(t_hat**2 - t**2) * s_noise * noise(i + 1).float()", "x = x + math.sqrt(t_hat**2 - t**2) * noise(i + 1).float()"),
    M("heun churn: denoised at t, not t_hat", "sampling/edm.py", "        denoised = D(x, t_hat)\n", "        denoised = D(x, t)\n"),
    M("heun nfe: the last step counted twice", "sampling/edm.py", "return 2 * steps - sum(1 for s in sigmas[1:] if s == 0)", "return 2 * steps"),
    M("heun sampler: the recipe's churn ignored", "sampling/registry.py", "churn=opt.get(\"churn\", gen.recipe.sample.churn)", "churn=opt.get(\"churn\", 0.0)"),
    M("sde sampler: the recipe's sde_a ignored", "sampling/registry.py", "a=opt.get(\"sde_a\", gen.recipe.sample.sde_a)", "a=opt.get(\"sde_a\", 0.7)"),
    M("pipelines: the run's sampler options ignored", "cmgen/pipelines.py", "**(self.config.default_options or {}),\n", "\n"),
    M("export: the recipe's sampler options not stored", "cmgen/export.py", "default_options={k: getattr(s, k) for k in pipeline_class.option_names}", "default_options={}"),
    M("lcm sampling: renoised to the previous timestep", "sampling/lcm.py", "ab = alphas_cumprod[int(t)].to(z.device)", "ab = alphas_cumprod[int(timesteps[k - 1])].to(z.device)"),
    M("lcm sampling: returns the noised input", "sampling/lcm.py", "    return denoised\n", "    return z\n"),
    M("ddim: each step to its own timestep", "sampling/ddim.py", "prev = int(timesteps[i + 1]) if", "prev = int(timesteps[i]) if"),
    # round 16: an audit against the research notes and reference code (latent CT, iCT, CTM, AWM, RG-LCD, eval)
    M("data: latents flipped in the loop", "cmgen/data/__init__.py", "    if r.data.hflip and r.data.name == \"latents\":", "    if False:"),
    M("recipe: eval.mode accepted for non-Inception features", "cmgen/recipe.py", "need(e.mode == \"clean\" or e.features in (\"inception\", \"auto\"),", "need(True,"),
    M("ncsnpp preset: mult 1,2,2", "cmgen/models/unet.py", "block_out_channels=(256, 256, 256), layers_per_block=4,\n    down_block_types=(\"ResnetDownsampleBlock2D\"", "block_out_channels=(128, 256, 256), layers_per_block=4,\n    down_block_types=(\"ResnetDownsampleBlock2D\""),
    M("lct ot: each rank pairs its own rows", "cmgen/methods/lct.py", "x_all = torch.cat([dist.gather(b.x) for b in batches])", "x_all = torch.cat([b.x for b in batches])"),
    M("lct: iCT's s1 as the default", "cmgen/methods/lct.py", "s1: int = 640", "s1: int = 1280"),
    M("hinge: heads summed, not averaged", "cmgen/methods/ctm_gan.py", "return sum(h.mean() for h in per_head) / len(per_head)", "return sum(h.mean() for h in per_head)"),
    M("hinge d: relu of each head's mean logit", "cmgen/methods/ctm_gan.py", "_head_mean([F.relu(1 - r) for r in real_logits])", "_head_mean([F.relu(1 - r.mean(1, keepdim=True)) for r in real_logits])"),
    M("ctm: theta- keeps its decay in the GAN stage", "cmgen/methods/ctm.py", "return c.target_decay_gan if gate(step, c.gan_start) else c.target_decay", "return c.target_decay"),
    M("ctm: theta- decay from the evaluation EMA", "cmgen/methods/ctm.py", "return {\"target\": c.target_decay if c.target_decay_gan is None", "return {\"target\": self.recipe.train.ema_decay if c.target_decay_gan is None"),
    M("ctm: the discriminator's fakes are the inner jumps", "cmgen/methods/ctm.py", "fake, _, _ = self.estimate_and_target(nets, batch, with_target=False)", "fake, _, _ = self.inner_and_target(nets, batch, with_target=False)"),
    M("ctm gan: real images not augmented", "cmgen/methods/ctm_gan.py", "real_logits = disc(diff_augment(real.float(), rng, policy))", "real_logits = disc(real.float())"),
    M("in-loop eval: the recipe's inception mode ignored", "eval/inloop.py", "mode = recipe.eval.mode if name == \"inception\" else \"clean\"", "mode = \"clean\""),
    M("refstats: clean-fid's clean cifar10 statistics for every mode", "eval/refstats.py", "f\"cifar10_{net.protocol['mode']}_train_32.npz\"", "\"cifar10_clean_train_32.npz\""),
    M("features: the resizing mode not part of the feature space", "eval/features.py", "for k in (\"features\", \"mode\", \"weights_sha256\")", "for k in (\"features\", \"weights_sha256\")"),
    M("clip input: squashed to 224 x 224", "eval/features.py", "TF.resize(Image.fromarray(img), 224, ", "TF.resize(Image.fromarray(img), [224, 224], "),
    M("clip input: torch's bicubic, not PIL's (clean-fid's)", "eval/features.py", "pil = TF.center_crop(TF.resize(Image.fromarray(img), 224, interpolation=TF.InterpolationMode.BICUBIC), 224)", "pil = TF.center_crop(TF.resize(torch.from_numpy(img).permute(2, 0, 1), 224, interpolation=TF.InterpolationMode.BICUBIC, antialias=True), 224).permute(1, 2, 0)"),
    M("kid: one fixed subset of the fakes", "eval/metrics.py", "y = fake[rng.choice(len(fake), m, replace=False)]", "y = fake[:m]"),
    M("frechet: stored covariance not rescaled to a sum", "eval/frechet.py", "np.asarray(cov, np.float64) * max(1, s.n - 1)", "np.asarray(cov, np.float64)"),
    M("ctm: teacher without the labels", "cmgen/methods/ctm.py", "d = (x - teacher(x, t, labels).float()) / t.view(view)", "d = (x - teacher(x, t, None).float()) / t.view(view)"),
    M("awm times: strata end one short", "cmgen/methods/awm.py", "    return first + torch.arange(count + 1) * (last + 1 - first) // count", "    return first + torch.arange(count + 1) * (last - first) // count"),
    M("awm times: the old default last index", "cmgen/methods/awm.py", "return int(0.9 * self.rollout_steps) - 1 if self.t_last is None else self.t_last", "return self.rollout_steps - 2 if self.t_last is None else self.t_last"),
    M("awm prev decay: counted from 1", "cmgen/methods/awm.py", "lambda step: prev_decay(step, c.prev_decay_rate, c.prev_decay_max)", "lambda step: prev_decay(step + 1, c.prev_decay_rate, c.prev_decay_max)"),
    M("awm: rollout_sampler ignored", "cmgen/methods/awm.py", "sampler = self.gen.sampler(self.cfg.rollout_sampler)", "sampler = self.gen.sampler(\"euler\")"),
    M("awm: rollout sde_a ignored", "cmgen/methods/awm.py", "{\"sde_a\": self.cfg.sde_a}", "{}"),
    M("sd3 grid: the scheduler's shift dropped", "cmgen/models/sd3.py", "    grid = type(sched).from_config(sched.config)", "    grid = type(sched).from_config(sched.config, shift=1.0)"),
    M("sd3 grid: sampling on evenly spaced shifted times", "sampling/registry.py", "    if recipe.model.arch == \"sd3\":\n        from cmgen.models.sd3 import scheduler_times", "    if recipe.model.arch == \"sd35\":\n        from cmgen.models.sd3 import scheduler_times"),
    M("sd3 grid: rollouts on evenly spaced shifted times", "cmgen/methods/rollout.py", "        from cmgen.sampling.registry import flow_grid\n        return flow_grid(self.recipe, self.cfg.rollout_steps, self.cfg.rollout_shift, \"method.rollout_shift\")", "        from cmgen.sampling.flow import flow_times\n        return flow_times(self.cfg.rollout_steps, self.cfg.rollout_shift)"),
    M("awm benchmark: previous-policy penalty left on", "benchmarks/awm_vs_flowgrpo.py", "NO_PENALTY = {\"awm\": [\"method.beta=0\", \"method.beta_prev=0\"], \"flowgrpo\": [\"method.beta=0\"]}", "NO_PENALTY = {\"awm\": [\"method.beta=0\"], \"flowgrpo\": [\"method.beta=0\"]}"),
    M("rollout: reference copied before the base is loaded", "cmgen/methods/rollout.py", "            self._load_base(cfg.base)\n            self.reference = copy.deepcopy(gen.net).requires_grad_(False).eval()", "            self.reference = copy.deepcopy(gen.net).requires_grad_(False).eval()\n            self._load_base(cfg.base)"),
    M("sd3 lora: alpha = rank", "cmgen/models/sd3.py", "add_lora(transformer, rank, getattr(recipe.method, \"lora_alpha\", 0.0) or rank)", "add_lora(transformer, rank, rank)"),
    M("sd3 lora: context output projection left out", "cmgen/models/sd3.py", "\"add_v_proj\", \"to_add_out\")", "\"add_v_proj\")"),
    M("sd3 lora: context stream projections left out", "cmgen/models/sd3.py", "\"to_out.0\", \"add_q_proj\", \"add_k_proj\", \"add_v_proj\", \"to_add_out\")", "\"to_out.0\")"),
    M("lrm: KL averaged over the pairs", "cmgen/rewards/lrm.py", "    return torch.stack(kls, 1).sum(1).mean(), torch.stack(agree, 1).mean()\n", "    return torch.stack(kls, 1).mean(), torch.stack(agree, 1).mean()\n"),
    M("lrm: the (target, real) pair dropped", "cmgen/rewards/lrm.py", "PAIRS = ((0, 1), (0, 2), (1, 2))", "PAIRS = ((0, 1), (0, 2))"),
    M("imagereward: training cap dropped", "cmgen/rewards/weights.py", "reward.score(x, cond).clamp(max=IMAGEREWARD_CAP)", "reward.score(x, cond)"),
    M("hps + imagereward: weight 1", "cmgen/rewards/weights.py", "hps(x, cond) + 0.1 * ir(x, cond)", "hps(x, cond) + ir(x, cond)"),
    M("aesthetic: no gradient", "cmgen/rewards/weights.py", "lambda x, cond=None: predict(clip_input(x)).float()", "lambda x, cond=None: predict(clip_input(x).detach()).float()"),
    M("aesthetic: evaluation on float preprocessing", "cmgen/rewards/weights.py", "        return predict(clip_preprocess(images)).cpu().numpy()\n", "        return predict(clip_input(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)).cpu().numpy()\n"),
    M("lcd: reward net not frozen (never moved to the device)", "cmgen/methods/lcd.py", "        nets = {\"teacher\": self.teacher, \"reward\": getattr(self.reward_fn, \"module\", None),\n", "        nets = {\"teacher\": self.teacher, \"reward\": None,\n"),
    M("hps: scored on the CPU", "cmgen/rewards/weights.py", "        device = device_of(model)\n        img = model.encode_image", "        device = \"cpu\"\n        img = model.encode_image"),
    M("imagereward: device attribute stale", "cmgen/rewards/weights.py", "        model.device = device = device_of(model)", "        device = device_of(model)"),
    M("lcd: expert logit scale not the expert's", "cmgen/methods/lcd.py", "dataclasses.replace(cfg, expert_scale=getattr(self.expert, \"logit_scale\", None) or 1.0)", "dataclasses.replace(cfg, expert_scale=1.0)"),
    M("hps: logit scale used as stored (a log)", "cmgen/rewards/weights.py", "logit_scale=float(model.logit_scale.exp()))", "logit_scale=float(model.logit_scale))"),
    M("pickscore: logit scale inverted", "cmgen/rewards/weights.py", "logit_scale=26.0)", "logit_scale=1.0 / 26.0)"),
    M("rglcd sd15 recipe: deviations unnamed", "recipes/rglcd_sd15_hps.yaml", "  64x64 latents), not SD 2.1 (v-prediction, 768 px), and the optimizer is plain AdamW, not the 8-bit Adam\n", "  64x64 latents), and the optimizer is plain AdamW\n"),
    M("lcd: the lrm reward detached from the student", "cmgen/methods/lcd.py", "                r = nets.lrm(pred, batch.labels, scaled=False)", "                r = nets.lrm(pred.detach(), batch.labels, scaled=False)"),
    M("lcd: zero null text embedding", "cmgen/methods/lcd.py", "        return self.null_cond.to(cond.device).expand_as(cond) if cond.is_floating_point() else \\", "        return torch.zeros_like(cond) if cond.is_floating_point() else \\"),
    M("ctm: target_decay_gan without gan_start accepted", "cmgen/methods/ctm.py", "if self.target_decay_gan is not None and self.gan_start is None:", "if False:"),
    M("rollout: sample.shift not checked at the start", "cmgen/methods/rollout.py", "        if recipe.model.arch == \"sd3\":   # sample.shift", "        if False:   # sample.shift"),
    # round 17: sets cut by a seeded draw, not their first rows; latent bases judged on images; --ref train without
    # a holdout; RG-LCD's CLIP rewards as the bare cosine
    M("precision/recall: the first m rows", "eval/metrics.py", "    return x[np.sort(rng.choice(len(x), m, replace=False))]", "    return x[:m]"),
    M("eval sources: --n takes the first rows", "eval/sources.py", "    picked = uniform_rows(np.arange(len(rows)), n, np.random.default_rng(SUBSAMPLE_SEED))", "    picked = np.arange(n)"),
    M("eval sources: npz rows of a draw misplaced", "eval/sources.py", "        pending.append(b[picked[lo:hi] - seen])", "        pending.append(b[: hi - lo])"),
    M("eval reward: a latent base judged on latents", "eval/cli.py", "        net = _feature_net(args, judged_shape(obj), device)", "        net = _feature_net(args, obj.shape, device)"),
    M("eval: --ref train needs a holdout", "eval/cli.py", "    if held is None and ref == \"holdout\":", "    if held is None:"),
    M("rglcd: clip rewards in the registry's scale", "cmgen/rewards/differentiable.py", "device=device, cosine=True)", "device=device)"),
    M("rglcd cosine: logit scale as stored (a log)", "cmgen/rewards/weights.py", "module=model, logit_scale=float(model.logit_scale.exp()))\n\n\ndef pickscore", "module=model, logit_scale=float(model.logit_scale))\n\n\ndef pickscore"),
    M("train: the ema stays on the CPU", "cmgen/train.py", "                part.ema.to(next(acc.unwrap_model(part.module).parameters()).device)", "                pass"),
    M("ema: to() keeps the old device", "cmgen/ema.py", "        self.shadow = [s.to(device) for s in self.shadow]", "        self.shadow = [s for s in self.shadow]"),
    M("train: dropout from the unkeyed global RNG", "cmgen/train.py", "            with ctx, same_dropout(batch.rng.dropout_seed, self.device):", "            with ctx:"),
    M("export: c_noise not stored in the scheduler", "cmgen/export.py", "sample_sigmas=list(s.sigmas), clip_denoised=s.clip_denoised, c_noise=p.c_noise)", "sample_sigmas=list(s.sigmas), clip_denoised=s.clip_denoised)"),
    M("export: the stock pipeline for any c_noise", "cmgen/export.py", "    if type(unet) is UNet2DModel and p.c_noise == \"cm\":", "    if type(unet) is UNet2DModel:"),
    M("pipelines: the scheduler's c_noise ignored", "cmgen/pipelines.py", "                             c_noise=c.c_noise)", "                             c_noise=\"cm\")"),
    M("ctm export: multistep exported as the recipe's gamma", "cmgen/export.py", "    gamma = 1.0 if s.sampler == \"multistep\" else s.gamma", "    gamma = s.gamma"),
    M("ctm heun: churn ignored", "sampling/registry.py", "    return _run_heun(net.denoise, noise, times, labels, gen, opt)", "    return _run_heun(net.denoise, noise, times, labels, gen, {\"churn\": 0.0})"),
    # round 17, third part: GPU paths (meta stands in for the GPU) and one-line errors for bad input
    M("train: logged terms left on their own device", "cmgen/train.py", "        sums[k] = sums.get(k, 0.0) + v.detach().float().to(device) / grad_accum", "        sums[k] = sums.get(k, 0.0) + v.detach().float() / grad_accum"),
    M("train: the codec stays on the CPU", "cmgen/train.py", "        self.gen.to(self.device)   # a latent", "        pass   # a latent"),
    M("runs: a pipeline's codec stays on the CPU", "cmgen/runs.py", "step=info.get(\"step\"), source=folder).to(device)", "step=info.get(\"step\"), source=folder)"),
    M("cli: a count below its minimum accepted", "cmgen/cli.py", "        if value < low:", "        if False:"),
    M("checkpoint: a state.json of any shape accepted", "cmgen/checkpoint.py", "            raise ValueError(\"not a cmgen state\")", "            pass"),
    M("train: targets move after every phase", "cmgen/train.py", "            if phase == \"model\":\n                for target in self.targets.values():", "            if phase in self.parts:\n                for target in self.targets.values():"),
]

# mutants that change no observable behaviour, with the reason (checked by hand)
EQUIVALENT: dict[str, str] = {
    "gamma: last jump to s, not sigma_min": "gamma_target(sigma_min, gamma, sigma_min) is sigma_min for every gamma",
    "awm: previous-policy copy with gradient": "the copy's weights never take a gradient (TargetNetwork is "
                                               "requires_grad False), so v_prev carries none either way",
    "sd3: base not frozen under LoRA": "peft's inject_adapter (diffusers' add_adapter) marks only the adapter "
                                       "trainable itself; the explicit freeze documents it",
    "lcm export: trailing timesteps": "diffusers' LCMScheduler.set_timesteps never reads timestep_spacing: its "
                                      "timesteps come from original_inference_steps",
    "advantages: zero-std groups kept": "equal rewards have r - mean = 0 (to rounding), so A is 0 either way; "
                                        "the early exit only saves the arithmetic",
}


def private_copy() -> Path:
    """The checkout's files in a temporary folder, with cmgen.sampling/eval/recipes laid out as imported."""
    import shutil
    import tempfile

    dst = Path(tempfile.mkdtemp(prefix="cmgen-mutate-"))
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.splitlines()
    for rel in listed:
        if (ROOT / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dst / rel)
    for pkg, folder in (("sampling", "sampling"), ("eval", "eval"), ("recipes", "recipes")):
        (dst / "cmgen" / pkg).symlink_to(dst / folder, target_is_directory=True)
    return dst


def run_one(m: Mutant, timeout: int, python: str, root: Path) -> tuple[str, float]:
    path = root / m.file
    original = path.read_text()
    path.write_text(original.replace(m.old, m.new))
    # CMGEN_TEST_THREADS=2: the pinned iCT checksums were taken at two threads (they differ at one)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(root), CMGEN_TEST_THREADS="2")
    t0 = time.time()
    try:
        proc = subprocess.run([python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--timeout", str(timeout),
                               *TESTS[m.file]], cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode == 0:
            status = "survived"
        else:
            failed = re.search(r"^FAILED (\S+?)::", proc.stdout, re.M)
            status = f"killed by {failed.group(1) if failed else 'an error'}"
    except subprocess.TimeoutExpired:
        status = "killed (timeout)"
    finally:
        path.write_text(original)
    return status, time.time() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="run the mutants whose name contains one of these words")
    ap.add_argument("--timeout", type=int, default=240, help="seconds per mutant (a timeout counts as killed)")
    ap.add_argument("--exclude", nargs="*", default=[], help="leave out test entries containing these words "
                    "(e.g. the tests added since, to score the suite as it was)")
    ap.add_argument("--shard", default="0/1", help="K/N: run every N-th mutant from the K-th (parallel runs)")
    ap.add_argument("--from", dest="first", type=int, default=1, metavar="K",
                    help="start at the K-th chosen mutant (go on with a run that was stopped at K)")
    ap.add_argument("--list", action="store_true", help="print the mutants and exit")
    args = ap.parse_args(argv)
    import signal

    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))  # restore, then stop
    chosen = [m for m in MUTANTS if not args.only or any(w in m.name for w in args.only)]
    k, n = map(int, args.shard.split("/"))
    chosen = chosen[k::n]
    skipped = args.first - 1
    chosen = chosen[skipped:]
    for f in TESTS:
        TESTS[f] = [t for t in TESTS[f] if not any(w in t for w in args.exclude)]
    if args.list:
        for m in chosen:
            print(f"{m.file:24s} {m.name}")
        return 0
    stale = [m for m in chosen if (ROOT / m.file).read_text().count(m.old) != 1]
    if stale:  # found before an hour of runs, not at the mutant's turn
        for m in stale:
            print(f"stale mutant: its snippet is not found exactly once in {m.file}: {m.name}")
        return 1
    root = private_copy()
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(root), CMGEN_TEST_THREADS="2")
    probe = subprocess.run([sys.executable, "-c", "import cmgen.rng, cmgen.sampling; print(cmgen.rng.__file__, "
                            "cmgen.sampling.__file__)"], cwd=root, env=env, capture_output=True, text=True)
    if not all(p.startswith(str(root)) for p in probe.stdout.split()):
        print(f"the copy {root} is not what python imports ({probe.stdout.strip()} {probe.stderr[-300:]})")
        return 1
    baseline = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                               *sorted({f for m in chosen for f in TESTS[m.file]})], cwd=root, env=env,
                              capture_output=True, text=True)
    if baseline.returncode != 0:
        print("the unmutated code fails its tests; fix that first:\n" + baseline.stdout[-2000:])
        return 1
    survivors, killed, killed_before, t0 = [], 0, 0, time.time()
    for k, m in enumerate(chosen, 1):
        status, secs = run_one(m, args.timeout, sys.executable, root)
        print(f"[{k + skipped:2d}/{len(chosen) + skipped}] {status:40s} {secs:5.0f}s  {m.file}: {m.name}", flush=True)
        if status.startswith("killed"):
            killed += 1
            if not any(status.endswith(t) for t in NEW):
                killed_before += 1
            else:
                print(f"        (survives the suite without {', '.join(NEW)})")
        else:
            survivors.append((m, status))
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    print(f"\nmutation score: {killed}/{len(chosen)} killed ({100 * killed / max(1, len(chosen)):.0f}%) "
          f"in {time.time() - t0:.0f}s; without {', '.join(NEW)}: {killed_before}/{len(chosen)}")
    for m, status in survivors:
        note = EQUIVALENT.get(m.name)
        print(f"  SURVIVED ({status}) {m.file}: {m.name}" + (f"  [equivalent: {note}]" if note else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
