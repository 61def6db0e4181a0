"""AWM and the Flow-GRPO baseline: advantages, stratified times, the AWM loss and its penalties, the
previous-policy decay and EMA in the loop, the baseline's log-probability, ratio and KL, on-policy rounds."""
import copy
import math

import numpy as np
import pytest
import torch
from conftest import benchmark_module

from cmgen.errors import UserError
from cmgen.methods.awm import Config, ghuber, prev_decay, strata_edges, stratified_indices
from cmgen.methods.flowgrpo import clipped_objective, step_log_prob
from cmgen.methods.rollout import group_advantages, round_conditions
from cmgen.rng import BatchRNG, keyed_generator

TINY = ["model.block_out_channels=[16,32]", "model.norm_num_groups=8", "model.attention_head_dim=8"]
SMALL = ["train.batch_size=8", "method.group_size=4", "method.rollout_steps=6", "train.sample_n=4",
         "train.sample_every=0", "train.checkpoint_every=100", "train.log_every=1"]


def trainer_for(name, base, tmp_path, *over):
    from cmgen.recipe import load_recipe
    from cmgen.train import Trainer

    r = load_recipe(name, TINY + SMALL + [f"method.base={base}", *over])
    return Trainer(r, tmp_path / name, progress=False)


def round_of(tr, adv=None):
    """One collected micro-batch of the trainer's current step (optionally with advantages replaced)."""
    batches = tr.method.collect([tr._batch(0)], tr.nets, tr.step, tr.dist)
    if adv is not None:
        batches[0].extra["advantage"] = torch.full_like(batches[0].extra["advantage"], adv)
    return batches[0]


def fresh_rng(b):
    """The batch's keyed randomness from its first draw again (the loss re-draws the same noise)."""
    r = b.rng
    return BatchRNG(r.seed, r.step, r.global_batch, r.offset, r.count, r.device)


# ----------------------------------------------------------------------------- advantages

def stat_tracking(rewards, groups, global_std=True):
    """flow_grpo's StatTracker (numpy), then AWM's clip to +-5 and /5."""
    adv = np.zeros_like(rewards)
    for g in np.unique(groups):
        r = rewards[groups == g]
        std = (np.std(rewards) if global_std else np.std(r)) + 1e-4
        adv[groups == g] = (r - np.mean(r)) / std
    return np.clip(adv, -5, 5) / 5


def test_advantages_are_group_centred_and_divided_by_the_global_std():
    g = np.random.default_rng(0)
    groups = np.repeat(np.arange(4), 6)
    rewards = g.normal(size=24) * np.repeat([0.1, 1.0, 3.0, 0.5], 6) + np.repeat([0, 5, -3, 1], 6)
    got = group_advantages(torch.tensor(rewards), torch.tensor(groups)).numpy()
    np.testing.assert_allclose(got, stat_tracking(rewards, groups), rtol=1e-10, atol=1e-12)
    per_group = group_advantages(torch.tensor(rewards), torch.tensor(groups), global_std=False).numpy()
    np.testing.assert_allclose(per_group, stat_tracking(rewards, groups, global_std=False), rtol=1e-10, atol=1e-12)
    assert not np.allclose(got, per_group)   # the two normalisations really differ here
    for k in range(4):                       # centred within each group
        assert abs(got[groups == k].mean()) < 1e-12


def test_advantages_are_clipped_at_five_stds_then_scaled_into_unit_range():
    rewards = torch.tensor([0.0] * 30 + [100.0] + [0.0] * 31 + [1.0])   # one outlier in a group of 31
    groups = torch.tensor([0] * 31 + [1] * 32)
    a = group_advantages(rewards, groups)
    raw = (rewards[30] - rewards[:31].mean()) / (rewards.std(unbiased=False) + 1e-4)
    assert raw > 5 and a[30] == 1.0                       # clipped at +5, then /5
    assert a.abs().max() <= 1.0
    small = (rewards[0] - rewards[:31].mean()) / (rewards.std(unbiased=False) + 1e-4) / 5
    assert torch.isclose(a[0], small)                     # unclipped values are only scaled


def test_zero_std_groups_get_exactly_zero_advantage_and_stay():
    rewards = torch.tensor([0.7, 0.7, 0.7, 0.7, 0.1, 0.9, 0.5, 0.2], dtype=torch.float32)
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    a = group_advantages(rewards, groups)
    assert a.shape == rewards.shape and torch.equal(a[:4], torch.zeros(4))
    assert (a[4:] != 0).all()


def test_round_conditions_are_distinct_classes_each_repeated_k_times():
    c = round_conditions(0, 7, 5, 10, 3)
    groups = c.view(5, 3)
    assert (groups == groups[:, :1]).all() and len(set(groups[:, 0].tolist())) == 5
    assert not torch.equal(c, round_conditions(0, 8, 5, 10, 3))      # a new draw every step
    with pytest.raises(UserError, match="method.group_size"):
        round_conditions(0, 0, 11, 10, 2)


# ----------------------------------------------------------------------------- AWM pieces

def test_stratified_indices_take_one_index_from_each_stratum_uniformly():
    counts = np.zeros(13)
    for s in range(3000):
        idx = stratified_indices(keyed_generator(s), 4, 1, 12).numpy()
        strata = np.array_split(np.arange(1, 13), 4)
        assert all(lo[0] <= i <= lo[-1] for i, lo in zip(idx, strata))
        counts[idx] += 1
    assert counts[0] == 0 and (counts[1:] > 0).all()
    np.testing.assert_allclose(counts[1:] / 3000, 1 / 3, atol=0.04)   # 3 indices per stratum, each 1/3


def reference_discrete_indices(gen, count, first, end):
    """The reference's draw (train_sd3_awm.py, time_type discrete / discrete_wo_init) with end = int(14 * 0.9):
    float32 linspace edges truncated, index lower + floor(u (upper - lower)); u drawn as cmgen draws it."""
    b = torch.linspace(first, end, count + 1)
    lo, hi = b[:-1].long(), b[1:].long()
    u = torch.rand(count, generator=gen, dtype=torch.float64)
    return lo + (u * (hi - lo)).long()


def test_loss_time_strata_are_the_references_for_14_steps_and_the_sd35_recipe():
    from cmgen.recipe import load_recipe

    geneval = Config(rollout_steps=14, timesteps=6)                 # t_first 1, t_last default (discrete_wo_init)
    pick = load_recipe("awm_sd35_pickscore").method                  # t_first 0 (PickScore's discrete)
    want = {geneval: [{1}, {2, 3}, {4, 5}, {6, 7}, {8, 9}, {10, 11}],
            pick: [{0, 1}, {2, 3}, {4, 5}, {6, 7}, {8, 9}, {10, 11}]}
    for c, strata in want.items():
        e = strata_edges(c.timesteps, c.t_first, c.last_index()).tolist()
        assert [set(range(lo, hi)) for lo, hi in zip(e, e[1:])] == strata
        seen = [set() for _ in strata]
        for s in range(400):
            idx = stratified_indices(keyed_generator(s), c.timesteps, c.t_first, c.last_index())
            ref = reference_discrete_indices(keyed_generator(s), c.timesteps, c.t_first, int(14 * 0.9))
            assert torch.equal(idx, ref)                              # the same index for the same u
            for j, i in enumerate(idx.tolist()):
                seen[j].add(i)
        assert seen == strata                                        # every index of a stratum is drawn; 12 never


def test_last_loss_index_defaults_to_the_references_timestep_fraction():
    # int(steps * 0.9) is the reference's exclusive end: 14 steps -> 11; 10 (the digits recipes) -> 8; 6 -> 4
    assert [Config(rollout_steps=n).last_index() for n in (14, 10, 6, 4)] == [11, 8, 4, 2]
    assert Config(rollout_steps=14, t_last=13).last_index() == 13


def test_ghuber_value_and_gradient():
    m = torch.tensor([1e-4, 0.01, 0.3, 2.0], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.9, 0.5, 0.2, 0.7], dtype=torch.float64)
    p = 0.25
    out = ghuber(m, t, p)
    expect = t * ((m + 1e-10) ** p - 1e-10 ** p) / p
    assert torch.allclose(out, expect)
    out.sum().backward()
    assert torch.allclose(m.grad, t * (m.detach() + 1e-10) ** (p - 1))
    assert ghuber(torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)).item() == 0.0
    # p = 1 is the plain error times t
    assert torch.allclose(ghuber(m.detach(), t, 1.0), t * m.detach(), atol=1e-12)


def test_previous_policy_decay_grows_then_caps():
    for step in range(0, 1200, 37):
        assert prev_decay(step) == pytest.approx(min(0.3, 0.001 * step))
    assert prev_decay(50, rate=0.01, cap=0.9) == pytest.approx(0.5)


def manual_awm(tr, b, weighting="plain", p=0.25):
    """The AWM objective computed step by step from the recipe's description (no shared code with loss)."""
    m, c = tr.method, tr.method.cfg
    rng = fresh_rng(b)
    gen = keyed_generator(b.rng.seed, b.rng.step, "awm-times", b.rng.offset)
    idx = stratified_indices(gen, c.timesteps, c.t_first, c.last_index())
    times = [float(m.times[i]) for i in idx]
    fm, ref, prev = [], [], []
    for t in times:
        eps = rng.randn(*b.x.shape[1:])
        xt = (1 - t) * b.x + t * eps
        tt = torch.full((len(b.x),), t)
        v = tr.nets.model(xt, tt, b.labels)
        err = ((v - (eps - b.x)) ** 2).mean((1, 2, 3))
        fm.append(b.extra["advantage"] * (err if weighting == "plain" else t * ((err + 1e-10) ** p - 1e-10 ** p) / p))
        ref.append(((v - tr.nets.reference(xt, tt, b.labels)) ** 2).mean((1, 2, 3)) if "reference" in tr.nets else 0 * err)
        prev.append(((v - tr.nets.previous(xt, tt, b.labels)) ** 2).mean((1, 2, 3)))
    mean = lambda xs: torch.stack(xs).mean()
    return mean(fm), mean(ref), mean(prev)


@pytest.mark.parametrize("weighting", ["plain", "ghuber"])
def test_awm_loss_is_the_advantage_weighted_flow_matching_error(base_run, tmp_path, weighting):
    tr = trainer_for("awm_digits_class", base_run, tmp_path, f"method.weighting={weighting}", "method.timesteps=2",
                     "method.beta=0.3", "method.beta_prev=0.7")
    with torch.no_grad():       # move the model off the reference and the previous copy so the penalties bite
        for q in tr.model.parameters():
            q.add_(0.01 * torch.randn_like(q))
    b = round_of(tr)
    assert b.extra["advantage"].abs().sum() > 0
    got = tr.method.loss(tr.nets, b, 0)
    fm, ref, prev = manual_awm(tr, b, weighting)
    assert ref > 0 and prev > 0
    assert torch.allclose(got["loss"], fm + 0.3 * ref + 0.7 * prev, rtol=1e-5, atol=1e-7)
    assert torch.allclose(got["kl_ref"], ref, rtol=1e-5) and torch.allclose(got["kl_prev"], prev, rtol=1e-5)


def test_zero_advantage_with_zero_penalties_gives_an_exactly_zero_gradient(base_run, tmp_path):
    tr = trainer_for("awm_digits_class", base_run, tmp_path, "method.beta=0", "method.beta_prev=0")
    b = round_of(tr, adv=0.0)
    tr.method.loss(tr.nets, b, 0)["loss"].backward()
    grads = [q.grad for q in tr.model.parameters()]
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads)
    # and a non-zero advantage does move the model (the test above would pass for a detached loss)
    tr.model.zero_grad()
    b = round_of(tr, adv=0.5)
    tr.method.loss(tr.nets, b, 0)["loss"].backward()
    assert any(g is not None and torch.count_nonzero(g) > 0 for g in (q.grad for q in tr.model.parameters()))


def test_positive_advantage_lowers_the_samples_flow_error_and_negative_raises_it(base_run, tmp_path):
    tr = trainer_for("awm_digits_class", base_run, tmp_path, "method.beta=0", "method.beta_prev=0")
    b = round_of(tr)
    for sign in (1.0, -1.0):
        net = copy.deepcopy(tr.model)
        b.extra["advantage"] = torch.full((len(b.x),), sign)
        nets = type(tr.nets)(tr.nets | {"model": net})
        b.rng = fresh_rng(b)                      # the same noise for every evaluation below
        before = tr.method.loss(nets, b, 0)["fm_error"]
        net.zero_grad()
        b.rng = fresh_rng(b)
        tr.method.loss(nets, b, 0)["loss"].backward()
        with torch.no_grad():
            for q in net.parameters():
                if q.grad is not None:
                    q.sub_(1e-3 * q.grad)
        b.rng = fresh_rng(b)
        after = tr.method.loss(nets, b, 0)["fm_error"]
        assert (after - before) * sign < 0


# ----------------------------------------------------------------------------- the loop

def test_previous_policy_copy_and_eval_ema_follow_their_decays(base_run, tmp_path):
    tr = trainer_for("awm_digits_class", base_run, tmp_path, "method.prev_decay_rate=0.25",
                     "method.prev_decay_max=0.3", "train.ema_decay=0.99", "optim.lr=1e-3")
    prev = tr.targets["previous"]
    for step in range(3):
        old_prev = [q.detach().clone() for q in prev.module.parameters()]
        old_ema = [s.clone() for s in tr.parts["model"].ema.shadow]
        tr.train_step()
        new = [q.detach() for q in tr.model.parameters()]
        d = min(0.3, 0.25 * step)        # 0, 0.25, then capped at 0.3
        for o, q, n in zip(old_prev, prev.module.parameters(), new):
            assert torch.allclose(q, d * o + (1 - d) * n, atol=1e-6)
        for o, s, n in zip(old_ema, tr.parts["model"].ema.shadow, new):
            assert torch.allclose(s, 0.99 * o + 0.01 * n, atol=1e-6)
    assert not torch.allclose(old_prev[0], new[0])   # the model did move
    assert [prev.decay_at(s) for s in (0, 1, 2)] == [0.0, 0.25, 0.3]


def test_previous_copy_decay_is_the_notes_min_of_03_and_0001_step(base_run, tmp_path):
    tr = trainer_for("awm_digits_class", base_run, tmp_path)     # the default rate 0.001 and cap 0.3
    prev = tr.targets["previous"]
    # the loop passes the index of the step just taken (0 for the first)
    assert [prev.decay_at(s) for s in (0, 1, 299, 300, 5000)] == pytest.approx([0.0, 0.001, 0.299, 0.3, 0.3])


def test_reference_copy_is_taken_after_the_base_is_loaded(base_run, tmp_path):
    from cmgen.generator import Generator
    from cmgen.runs import load_model

    # seed 1: the trainer's own initial weights differ from the base's (seed 0, barely trained)
    tr = trainer_for("awm_digits_class", base_run, tmp_path, "method.beta=0.1", "train.seed=1")
    g = torch.Generator().manual_seed(3)
    x, t, y = torch.randn(4, *tr.gen.shape, generator=g), torch.tensor([0.9, 0.6, 0.3, 0.1]), torch.tensor([0, 3, 5, 9])
    torch.manual_seed(1)
    fresh = Generator.build(tr.recipe, tr.gen.shape, tr.gen.num_classes).net.eval()
    with torch.no_grad():
        ref, model = tr.nets.reference(x, t, y), tr.nets.model.eval()(x, t, y)
        base = load_model(base_run, ema=True).net(x, t, y)
        init = fresh(x, t, y)
    assert torch.allclose(ref, model, atol=1e-6) and torch.allclose(ref, base, atol=1e-6)
    assert (ref - init).abs().max() > 1e-2


def test_sde_rollouts_are_the_flow_sde_on_the_keyed_noise(base_run, tmp_path):
    from cmgen.methods.rollout import keyed_noise
    from cmgen.sampling.flow import flow_euler, flow_sde, flow_times

    tr = trainer_for("awm_digits_class", base_run, tmp_path, "method.rollout_sampler=sde", "method.sde_a=0.5")
    b = round_of(tr)
    noise = keyed_noise(b.rng.seed, 0, tr.gen.shape, b.rng.offset, len(b.x), b.x.device)
    times, net = flow_times(6), tr.nets.model.eval()                # method.rollout_steps=6, shift 1
    with torch.no_grad():
        sde = flow_sde(net, noise, times, class_labels=b.labels, a=0.5)
        other = flow_sde(net, noise, times, class_labels=b.labels, a=0.7)
        ode = flow_euler(net, noise, times, class_labels=b.labels)
    assert torch.allclose(b.x, sde, atol=1e-5)
    assert (b.x - ode).abs().max() > 1e-2 and (b.x - other).abs().max() > 1e-2


def test_grad_accum_gathers_the_round_before_normalising(base_run, tmp_path):
    """Advantages are computed over the whole global batch: 2 micro-batches see what 1 batch sees."""
    one = trainer_for("awm_digits_class", base_run, tmp_path / "a")
    two = trainer_for("awm_digits_class", base_run, tmp_path / "b", "train.grad_accum=2")
    b1 = one.method.collect([one._batch(0)], one.nets, 0, one.dist)
    b2 = two.method.collect([two._batch(0), two._batch(1)], two.nets, 0, two.dist)
    r1, a1 = b1[0].extra["reward"], b1[0].extra["advantage"]
    r2 = torch.cat([b.extra["reward"] for b in b2])
    a2 = torch.cat([b.extra["advantage"] for b in b2])
    assert torch.allclose(r1, r2, atol=1e-5) and torch.allclose(a1, a2, atol=1e-4)
    assert torch.equal(torch.cat([b.labels for b in b2]), b1[0].labels)
    # the groups of 4 straddle nothing here, but the std is global: it differs from a per-micro-batch std
    local = group_advantages(r2[:4], torch.zeros(4, dtype=torch.long))
    assert not torch.allclose(local, a2[:4], atol=1e-3)


def test_one_rollout_round_per_optimizer_step_keeps_the_baseline_on_policy(base_run, tmp_path):
    tr = trainer_for("flowgrpo_digits_class", base_run, tmp_path, "optim.lr=1e-2", "method.beta=0.01")
    calls = []
    collect = tr.method.collect
    tr.method.collect = lambda *a: calls.append(1) or collect(*a)
    w0 = [q.detach().clone() for q in tr.model.parameters()]
    for step in range(3):
        terms = tr.train_step()
        assert len(calls) == step + 1
        assert abs(terms["ratio"] - 1) < 1e-5 and terms["ratio_dev"] < 1e-4 and terms["clip_frac"] == 0
    assert any(not torch.allclose(a, b) for a, b in zip(w0, tr.model.parameters()))   # it did learn


# ----------------------------------------------------------------------------- Flow-GRPO formulas

def test_step_log_prob_is_the_normal_log_density_averaged_over_elements():
    g = torch.Generator().manual_seed(0)
    x, mean = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    for std in (0.05, 0.3, 1.7):
        ref = torch.distributions.Normal(mean, std).log_prob(x).mean((1, 2, 3))
        assert torch.allclose(step_log_prob(x, mean, std), ref, atol=1e-5)


def test_rollout_log_probs_match_normal_on_the_recorded_trajectory(base_run, tmp_path):
    tr = trainer_for("flowgrpo_digits_class", base_run, tmp_path)
    b = round_of(tr)
    xs, lp, m = b.extra["trajectory"], b.extra["log_prob"], tr.method
    assert torch.equal(xs[:, -1], b.x)
    for j in range(xs.shape[1] - 1):
        t, tn = float(m.times[j]), float(m.times[j + 1])
        with torch.no_grad():
            v = tr.nets.model(xs[:, j], torch.full((len(b.x),), t), b.labels)
        sig = 0.7 * math.sqrt(t / (1 - (tn if j == 0 else t)))   # sigma_t; at t = 1 the next time caps it
        mean = xs[:, j] * (1 + sig**2 / (2 * t) * (tn - t)) + v * (1 + sig**2 * (1 - t) / (2 * t)) * (tn - t)
        ref = torch.distributions.Normal(mean, sig * math.sqrt(t - tn)).log_prob(xs[:, j + 1]).mean((1, 2, 3))
        assert torch.allclose(lp[:, j], ref, atol=1e-4)


def test_clipped_objective_is_ppo_and_the_baseline_kl_is_the_gaussian_kl(base_run, tmp_path):
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 0.5])
    ratio = torch.tensor([1.5, 0.5, 1.5, 0.5, 1.0], requires_grad=True)
    eps = 0.2
    out = clipped_objective(adv, ratio, eps)
    expect = -torch.min(adv * ratio, adv * ratio.clamp(1 - eps, 1 + eps))
    assert torch.allclose(out, expect)
    out.sum().backward()
    # clipped where the ratio moved past the clip in the advantage's favour: no gradient there
    assert torch.allclose(ratio.grad, torch.tensor([0.0, -1.0, 1.0, 0.0, -0.5]))
    # the KL term: mean over elements of KL(N(mu, s^2) || N(mu_ref, s^2)) = (mu - mu_ref)^2 / (2 s^2)
    tr = trainer_for("flowgrpo_digits_class", base_run, tmp_path, "method.beta=0.5")
    with torch.no_grad():
        for q in tr.model.parameters():
            q.add_(0.01 * torch.randn_like(q))
    b = round_of(tr, adv=0.0)
    got = tr.method.loss(tr.nets, b, 0)
    xs, kls = b.extra["trajectory"], []
    for j in range(xs.shape[1] - 1):
        mu, s = tr.method._step(tr.nets.model, xs[:, j], j, b.labels)
        mu_ref, _ = tr.method._step(tr.nets.reference, xs[:, j], j, b.labels)
        kl = torch.distributions.kl_divergence(torch.distributions.Normal(mu, s), torch.distributions.Normal(mu_ref, s))
        kls.append(kl.mean((1, 2, 3)).mean())
    assert torch.allclose(got["kl_ref"], torch.stack(kls).mean(), rtol=1e-4)
    assert torch.allclose(got["loss"], 0.5 * torch.stack(kls).mean(), rtol=1e-4)   # A = 0: only beta KL remains


# ----------------------------------------------------------------------------- user errors

@pytest.mark.parametrize("override, field", [
    ("method.weighting=huber", "method.weighting"),
    ("method.timesteps=99", "method.timesteps"),
    ("method.group_size=1", "method.group_size"),
    ("method.rollout_sampler=heun", "method.rollout_sampler"),
    ("method.rollout_steps=1", "method.rollout_steps"),
    ("method.adv_clip=0", "method.adv_clip"),
    ("method.adv_eps=-1", "method.adv_eps"),
    ("method.lora_rank=-4", "method.lora_rank"),
    ("method.t_last=99", "method.t_last"),
    ("method.beta=-0.1", "method.beta"),
])
def test_bad_awm_settings_are_one_sentence(override, field):
    from cmgen.recipe import load_recipe

    with pytest.raises(UserError) as err:
        load_recipe("awm_digits_class", [override])
    assert field in str(err.value) and "\n" not in str(err.value)


def test_missing_base_and_bad_batch_are_one_sentence(base_run, tmp_path):
    with pytest.raises(UserError, match="method.base"):
        trainer_for("awm_digits_class", tmp_path / "nowhere", tmp_path)
    with pytest.raises(UserError, match="method.group_size"):
        trainer_for("awm_digits_class", base_run, tmp_path, "method.group_size=3")
    with pytest.raises(UserError, match="method.reward"):
        trainer_for("awm_digits_class", base_run, tmp_path, "method.reward=prettiness")
    with pytest.raises(UserError, match="null_label"):
        trainer_for("awm_digits_class", base_run, tmp_path, "method.null_label=false")


def test_speed_benchmark_runs_both_methods_without_any_penalty(base_run, tmp_path):
    """The beta = 0 ceiling: AWM keeps no previous-policy copy either, as the baseline has none."""
    import argparse

    from cmgen.recipe import load_recipe
    from cmgen.train import Trainer

    b = benchmark_module("awm_vs_flowgrpo")
    a = argparse.Namespace(base=str(base_run), reward="brightness", steps=1, threads=1)
    for method, name in b.RECIPES.items():
        r = load_recipe(name, TINY + SMALL + b.run_overrides(method, 1e-3, 0, a))
        tr = Trainer(r, tmp_path / method, progress=False)
        assert tr.targets == {} and "reference" not in tr.nets
        terms = tr.method.loss(tr.nets, round_of(tr), 0)
        assert not {"kl_ref", "kl_prev"} & set(terms)


def test_speed_benchmark_extends_the_lr_grid_until_the_best_is_bracketed():
    b = benchmark_module("awm_vs_flowgrpo")
    assert [b.half_decade(x, True) for x in (3e-4, 1e-3, 3e-3)] == [1e-3, 3e-3, 1e-2]
    assert [b.half_decade(x, False) for x in (3e-4, 1e-3, 1e-4)] == [1e-4, 3e-4, 3e-5]
    peak = {1e-4: 0.4, 3e-4: 0.5, 1e-3: 0.6, 3e-3: 0.7, 1e-2: 0.65, 3e-2: float("nan")}
    tried = []

    def run(lr):
        tried.append(lr)
        return {"lr": lr, "curve": [(0, 0.3), (5, peak[lr])]}

    best, rows = b.tune_lr(run, [3e-4, 1e-3, 3e-3])
    assert best == 3e-3 and tried == [3e-4, 1e-3, 3e-3, 1e-2]          # best at the top edge: one more point
    assert [w["lr"] for w in rows] == [3e-4, 1e-3, 3e-3, 1e-2]
    tried.clear()
    assert b.tune_lr(run, [1e-2, 3e-2])[0] == 3e-3                       # a diverged (NaN) run never wins
    assert tried == [1e-2, 3e-2, 3e-3, 1e-3]                              # extended down until bracketed
    assert b.tune_lr(run, [3e-4, 1e-3], max_extend=0)[0] == 1e-3         # no extension allowed: the edge stays
