"""iCT's teacher: the student under stop-gradient, with the same noise and the same dropout mask."""
import torch
from torch import nn

from cmgen.generator import Generator
from cmgen.methods import Batch, Nets, build_method as _build_method
from cmgen.generator import build_network
from cmgen.recipe import load_recipe
from cmgen.rng import BatchRNG, same_dropout


def _recipe(extra=()):
    return load_recipe("ict_digits", ["model.block_out_channels=[16,32]", "model.norm_num_groups=8",
                                      "model.attention_head_dim=8", "model.dropout=0.5", *extra])


def _record_dropout_masks(model):
    masks = []

    def hook(mod, inp, out):
        masks.append((out != 0).clone())

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Dropout) and m.p > 0]
    return masks, handles


def test_teacher_and_student_share_the_dropout_mask():
    recipe = _recipe()
    model = build_network(recipe, (1, 8, 8), 10).train()
    method = build_method(recipe)
    masks, handles = _record_dropout_masks(model)
    x = torch.rand(6, 1, 8, 8) * 2 - 1
    rng = BatchRNG(0, 5, 6, 0, 6)
    out = method.loss(Nets(model=model), Batch(x, None, rng), 5)
    n_dropout = len(handles)
    assert n_dropout > 0 and len(masks) == 2 * n_dropout  # one teacher pass, one student pass
    teacher, student = masks[:n_dropout], masks[n_dropout:]
    for a, b in zip(teacher, student):
        assert torch.equal(a, b)
    assert any((~m).any() for m in student)  # dropout really dropped something
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad


def test_dropout_masks_differ_between_steps():
    recipe = _recipe()
    model = build_network(recipe, (1, 8, 8), 10).train()
    method = build_method(recipe)
    masks, handles = _record_dropout_masks(model)
    x = torch.zeros(4, 1, 8, 8)
    method.loss(Nets(model=model), Batch(x, None, BatchRNG(0, 0, 4, 0, 4)), 0)
    first = list(masks)
    masks.clear()
    method.loss(Nets(model=model), Batch(x, None, BatchRNG(0, 1, 4, 0, 4)), 1)
    assert not all(torch.equal(a, b) for a, b in zip(first, masks))


def test_same_dropout_leaves_the_global_rng_alone():
    torch.manual_seed(3)
    before = torch.get_rng_state()
    with same_dropout(123, "cpu"):
        torch.rand(10)
    assert torch.equal(torch.get_rng_state(), before)


def test_student_sits_one_grid_step_above_the_teacher_with_the_same_noise():
    recipe = _recipe(["model.dropout=0.0"])
    method = build_method(recipe)
    seen = []

    def spy(x, sigma, labels=None):
        seen.append((x.clone(), sigma.clone()))
        return x * 0 + sigma.view(-1, 1, 1, 1) * 0  # any function of the inputs

    x = torch.rand(8, 1, 8, 8)
    method.loss(Nets(model=spy), Batch(x, None, BatchRNG(1, 0, 8, 0, 8)), 0)
    (x_t, s_t), (x_s, s_s) = seen
    sigmas, _ = method.grid(method.discretisation(0))
    idx = torch.searchsorted(sigmas.float(), s_t)
    assert torch.allclose(s_s, sigmas.float()[idx + 1])
    z_t = (x_t - x) / s_t.view(-1, 1, 1, 1)
    z_s = (x_s - x) / s_s.view(-1, 1, 1, 1)
    assert torch.allclose(z_t, z_s, atol=1e-4)


def test_loss_weight_is_inverse_sigma_gap():
    recipe = _recipe(["model.dropout=0.0", "method.huber_c=0.5"])
    method = build_method(recipe)
    calls = []

    def const_gap(x, sigma, labels=None):
        calls.append(sigma)
        # student output differs from teacher output by exactly 1 per element
        return torch.full_like(x, float(len(calls) == 2))

    out = method.loss(Nets(model=const_gap), Batch(torch.zeros(16, 1, 8, 8), None, BatchRNG(0, 0, 16, 0, 16)), 0)
    s_t, s_s = calls
    d = (64 + 0.25) ** 0.5 - 0.5
    assert torch.allclose(out["loss"], (d / (s_s - s_t)).mean())


def build_method(recipe):
    return _build_method(recipe, Generator.build(recipe, (1, 8, 8), 10))
