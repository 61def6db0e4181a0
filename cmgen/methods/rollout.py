"""What reward fine-tuning methods (AWM, Flow-GRPO) share: the base model, groups of rollouts per
condition, rewards and group-normalised advantages (flow_grpo's `stat_tracking.py` as AWM runs it).

A round draws `train.batch_size / group_size` distinct conditions (a keyed permutation of the classes,
as `DistributedKRepeatSampler` draws prompts without replacement), repeats each `group_size` times
in the global batch (so a group may span processes), samples every rollout from the current policy
with noise keyed by (seed, step, global index), scores it, gathers the rewards of all processes and
computes A_i = clip((r_i - mean of i's group) / (std + eps), -c, c) / c with std over the whole
gathered batch (`global_std`) or over i's group; a group whose rewards are all equal gets A = 0.
Every step is one rollout round and one optimizer step: the update is on-policy.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from cmgen.errors import UserError
from cmgen.methods.base import Method as BaseMethod
from cmgen.rng import keyed_generator


@dataclass(frozen=True)
class RolloutConfig:
    base: str = ""                  # run or checkpoint folder of the pretrained flow model (its EMA weights)
    null_label: bool = False        # the base has a null-label (CFG) embedding; rollouts stay conditional
    reward: str = "digit-class"     # a name in cmgen.rewards
    group_size: int = 8             # k rollouts per condition; train.batch_size = conditions x k
    rollout_steps: int = 10         # sampler steps of a rollout
    rollout_shift: float = 1.0      # time shift of the rollout grid (model.arch sd3: its scheduler's, 3 for SD3.5)
    sde_a: float = 0.7              # SDE noise level a: sigma_t = a sqrt(t / (1 - t))
    global_std: bool = True         # normalise by the std of the whole gathered batch (else the group's)
    adv_clip: float = 5.0           # A clipped to +-adv_clip, then divided by it (A in [-1, 1])
    adv_eps: float = 1e-4           # added to the std
    lora_rank: int = 0              # > 0: train a peft LoRA adapter of this rank on a model.arch sd3 transformer
    lora_alpha: float = 0.0         # LoRA alpha (scale alpha / rank); 0 = the rank

    def problems(self):
        if self.group_size < 2:
            yield f"recipe key 'method.group_size' must be at least 2 (advantages are relative), got {self.group_size}"
        if self.rollout_steps < 2:
            yield f"recipe key 'method.rollout_steps' must be at least 2, got {self.rollout_steps}"
        if self.adv_clip <= 0 or self.adv_eps < 0:
            yield "recipe keys 'method.adv_clip' must be > 0 and 'method.adv_eps' >= 0"
        if self.lora_rank < 0 or self.lora_alpha < 0:
            yield "recipe keys 'method.lora_rank' and 'method.lora_alpha' must be >= 0 (rank 0 = full fine-tuning)"


def group_advantages(rewards: torch.Tensor, groups: torch.Tensor, *, global_std: bool = True, eps: float = 1e-4,
                     clip: float = 5.0) -> torch.Tensor:
    """(r - group mean) / (std + eps), clipped to +-clip and divided by clip; zero-std groups give 0.
    std is numpy's (ddof 0), over all rewards (global_std) or over the group."""
    r = rewards.double()
    adv = torch.zeros_like(r)
    std_all = r.std(unbiased=False)
    for g in groups.unique():
        m = groups == g
        rg = r[m]
        if rg.numel() < 2 or bool((rg == rg[0]).all()):
            continue                         # no signal in this group: A = 0, the sample stays (KL still acts)
        std = std_all if global_std else rg.std(unbiased=False)
        adv[m] = (rg - rg.mean()) / (std + eps)
    return (adv.clamp(-clip, clip) / clip).to(rewards.dtype)


def round_conditions(seed: int, step: int, conditions: int, num_classes: int, k: int) -> torch.Tensor:
    """The class of every global-batch slot: `conditions` distinct classes, each repeated k times in a row."""
    if conditions > num_classes:
        raise UserError(f"train.batch_size / method.group_size = {conditions} conditions per round, but the model "
                        f"has {num_classes} classes; lower train.batch_size or raise method.group_size")
    perm = torch.randperm(num_classes, generator=keyed_generator(seed, step, "rollout-conditions"))
    return perm[:conditions].repeat_interleave(k)


def keyed_noise(seed: int, step: int, shape, offset: int, count: int, device):
    """noise(i): unit noise for sampler draw i of the global batch, sliced to [offset, offset + count)."""
    def noise(i: int) -> torch.Tensor:
        full = torch.randn((offset + count, *shape), generator=keyed_generator(seed, step, "rollout", i))
        return full[offset:].to(device)
    return noise


class RewardMethod(BaseMethod):
    """Base of AWM and Flow-GRPO: loads the base model, keeps a frozen reference copy, runs the rounds."""
    parameterisation = "flow"
    curves = ("reward",)            # the loop plots these logged terms as PNG beside loss.png

    def __init__(self, cfg, recipe, gen):
        super().__init__(cfg, recipe, gen)
        if recipe.train.batch_size % cfg.group_size:
            raise UserError(f"recipe key 'train.batch_size' ({recipe.train.batch_size}) must be a multiple of "
                            f"method.group_size ({cfg.group_size})")
        if not gen.conditional:
            raise UserError("reward fine-tuning here draws groups per class label; set model.class_conditional: true")
        self.backbone = gen.net.backbone
        if getattr(self.backbone, "loads_itself", False):
            # a diffusers transformer: model.init_from is the base; with LoRA the reference is the adapter switched off
            if cfg.lora_rank > 0:
                self.reference = None
            else:
                self.reference = copy.deepcopy(gen.net).requires_grad_(False).eval()
        else:
            if cfg.lora_rank > 0:
                raise UserError("recipe key 'method.lora_rank' applies to model.arch sd3; set it to 0 for this model")
            self._load_base(cfg.base)
            self.reference = copy.deepcopy(gen.net).requires_grad_(False).eval()
        from cmgen.rewards import REWARDS, canonical
        self.reward_name = canonical(cfg.reward, "recipe key 'method.reward'")
        self.reward_entry = REWARDS[self.reward_name]
        self._reward = None
        self.times = torch.tensor(self.rollout_times(), dtype=torch.float64)
        if recipe.model.arch == "sd3":   # sample.shift must be the scheduler's too: refused now, not at the first preview
            from cmgen.sampling.registry import flow_grid
            flow_grid(recipe, 1, recipe.sample.shift, "sample.shift")

    def rollout_times(self) -> list[float]:
        """The rollout grid, which the loss times index: an SD3 pipeline's scheduler sigmas, else shifted even times."""
        from cmgen.sampling.registry import flow_grid
        return flow_grid(self.recipe, self.cfg.rollout_steps, self.cfg.rollout_shift, "method.rollout_shift")

    def _load_base(self, base: str) -> None:
        if not base:
            raise UserError("recipe key 'method.base' must name the pretrained flow run or checkpoint "
                            "(e.g. runs/fm_digits)")
        from pathlib import Path

        from cmgen.runs import load_model
        if not Path(base).exists():
            raise UserError(f"recipe key 'method.base' ('{base}') does not exist; train the base first "
                            "(cmgen train fm_digits) or fix the path")
        src = load_model(base, ema=True)
        if src.parameterisation != "flow":
            raise UserError(f"recipe key 'method.base' ('{base}') is a {src.parameterisation} model; give a flow run")
        try:
            self.gen.net.load_state_dict(src.net.state_dict())
        except RuntimeError:
            raise UserError(f"recipe key 'method.base' ('{base}') has another architecture than this recipe's "
                            "model section (null label: set method.null_label to match its label_dropout); copy "
                            "the base run's model section") from None

    def frozen(self) -> dict:
        return {"reference": self.reference} if self.uses_reference() and self.reference is not None else {}

    @torch.no_grad()
    def reference_velocity(self, nets, x, t, labels) -> torch.Tensor:
        """The base model's output: the frozen copy, or the trained network with its LoRA adapter disabled."""
        if self.reference is not None:
            return nets.reference(x, t, labels)
        with self.backbone.adapters_disabled():
            return nets.model(x, t, labels)

    def condition(self, labels):
        """What a conditioned reward scores against: the class labels, or the prompts they index."""
        prompts = getattr(self.backbone, "prompts", None)
        return labels if prompts is None else [prompts[i] for i in labels.tolist()]

    @classmethod
    def smoke_recipe(cls, recipe):
        """--smoke of a model.arch sd3 recipe: a tiny seeded SD3 pipeline and prompts written locally, and an
        offline reward in place of a weight-backed one."""
        if recipe.model.arch != "sd3":
            return recipe
        from dataclasses import replace

        from cmgen.eval.digits_net import cache_dir
        from cmgen.models.sd3 import tiny_sd3_pipeline
        from cmgen.rewards import REWARDS, canonical

        folder = tiny_sd3_pipeline(cache_dir() / "tiny-sd3-v1" / "pipeline")
        prompts = folder.parent / "prompts.txt"
        prompts.write_text("a red apple\na blue car\na cat on a mat\na green tree\n")
        m = recipe.method
        entry = REWARDS[canonical(m.reward, "recipe key 'method.reward'")]
        offline = not entry.factory.startswith("cmgen.rewards.weights")
        changes = {"reward": m.reward if offline else "jpeg-compressibility", "group_size": 2, "rollout_steps": 4,
                   "timesteps": 2, "t_first": 0, "t_last": 2, "lora_rank": min(m.lora_rank, 4),
                   "lora_alpha": 8.0 if m.lora_rank else 0.0}
        method = replace(m, **{k: v for k, v in changes.items() if hasattr(m, k)})
        train = replace(recipe.train, batch_size=4, grad_accum=1)   # 2 prompts x 2 rollouts
        return replace(recipe, method=method, model=replace(recipe.model, init_from=str(folder)), train=train,
                       data=replace(recipe.data, path=str(prompts), channels=4, resolution=32),
                       sample=replace(recipe.sample, steps=2), eval=replace(recipe.eval, steps=(2,), every=0))

    def uses_reference(self) -> bool:
        return self.cfg.beta > 0

    def reward(self, device):
        if self._reward is None:
            from cmgen.rewards import build_reward
            self._reward = build_reward(self.reward_name, "recipe key 'method.reward'", device=device)
        return self._reward

    # ------------------------------------------------------------------ one round
    def rollout(self, policy, noise, labels) -> tuple[torch.Tensor, dict]:
        """(final samples in model space, extra tensors for the loss) for one micro-batch."""
        raise NotImplementedError

    @torch.no_grad()
    def collect(self, batches, nets, step, dist):
        first, k = batches[0].rng, self.cfg.group_size
        conds = round_conditions(first.seed, step, first.global_batch // k, self.gen.num_classes, k)
        policy = nets.model
        was_training = policy.training
        policy.eval()
        rewards = []
        for b in batches:
            o, n = b.rng.offset, len(b.x)
            labels = conds[o:o + n].to(b.x.device)
            x0, extra = self.rollout(policy, keyed_noise(first.seed, step, self.gen.shape, o, n, b.x.device), labels)
            images = self.gen.codec.decode(x0.float())
            reward = self.reward(b.x.device)
            r = reward(images, self.condition(labels) if reward.needs_condition else None).float().to(b.x.device)
            b.x, b.labels = x0.to(b.x.dtype), labels
            b.extra |= extra | {"reward": r}
            rewards.append(r)
        policy.train(was_training)
        r_all = torch.cat([dist.gather(r) for r in rewards])          # micro-batch-major, rank-minor: global order
        adv = group_advantages(r_all.cpu(), conds, global_std=self.cfg.global_std, eps=self.cfg.adv_eps,
                               clip=self.cfg.adv_clip)
        for b in batches:
            b.extra["advantage"] = adv[b.rng.offset:b.rng.offset + len(b.x)].to(b.x.device)
        return batches

    def round_terms(self, batch) -> dict:
        r, a = batch.extra["reward"], batch.extra["advantage"]
        return {"reward": r.mean(), "reward_std": r.std(unbiased=False), "adv_abs": a.abs().mean(),
                "adv_zero": (a == 0).float().mean()}
