"""The sampler: deterministic per seed, 1 step is f(sigma_max z), batching does not change images."""
import pytest
import torch

from cmgen.generator import Generator
from cmgen.recipe import load_recipe
from cmgen.sampling import consistency_multistep, default_sigmas, generate, per_image_noise


def _model(*overrides):
    recipe = load_recipe("ict_digits", ["model.block_out_channels=[16,32]", "model.norm_num_groups=8",
                                        "model.attention_head_dim=8", *overrides])
    torch.manual_seed(0)
    return Generator.build(recipe, (1, 8, 8), 10).eval(), recipe


def _all(gen, n, sigmas, seed, batch_size, **options):
    return torch.cat([x for x, _ in generate(gen, n, sigmas, seed=seed, batch_size=batch_size, progress=False,
                                             **options)])


def test_sampling_is_deterministic_for_a_seed_and_differs_across_seeds():
    model, recipe = _model()
    sig = default_sigmas(recipe, 2)
    a, b = _all(model, 6, sig, 0, 6), _all(model, 6, sig, 0, 6)
    assert torch.equal(a, b)
    assert not torch.allclose(a, _all(model, 6, sig, 1, 6))


def test_images_do_not_depend_on_the_batch_they_were_drawn_in():
    model, recipe = _model()
    sig = default_sigmas(recipe, 2)
    assert torch.allclose(_all(model, 7, sig, 3, 7), _all(model, 7, sig, 3, 2), atol=1e-6)


def test_one_step_equals_f_of_sigma_max_times_z():
    model, recipe = _model()
    z = torch.stack([torch.randn((1, 1, 8, 8), generator=torch.Generator().manual_seed(5 + j))[0] for j in range(4)])
    with torch.no_grad():
        want = model.net(80.0 * z, torch.full((4,), 80.0))
    got = _all(model, 4, [80.0], 5, 4)
    assert torch.allclose(got, want.clamp(-1, 1), atol=1e-6)
    raw = consistency_multistep(model.net, per_image_noise(range(5, 9), (1, 8, 8)), [80.0], clip_denoised=False)
    assert torch.allclose(raw, want, atol=1e-6)


def test_two_step_renoises_with_sqrt_sigma_sq_minus_sigma_min_sq():
    seen = []

    def spy(x, sigma, labels=None):
        seen.append((x.clone(), float(sigma[0])))
        return torch.zeros_like(x) + 0.25

    noise = per_image_noise([11, 12], (1, 8, 8))
    consistency_multistep(spy, noise, [80.0, 0.821], sigma_min=0.002)
    (x0, s0), (x1, s1) = seen
    assert s0 == 80.0 and abs(s1 - 0.821) < 1e-6
    assert torch.allclose(x0, 80.0 * noise(0))
    assert torch.allclose(x1, 0.25 + (0.821**2 - 0.002**2) ** 0.5 * noise(1))


def test_default_sigmas_follow_the_recipe():
    _, recipe = _model()
    assert default_sigmas(recipe, 1) == [80.0]
    assert default_sigmas(recipe, 2) == [80.0, 0.821]
    four = default_sigmas(recipe, 4)
    assert len(four) == 4 and four[0] == 80.0 and four == sorted(four, reverse=True)
    # more steps than the recipe lists: a Karras grid (rho 7) from sigma_max down to the recipe's last sigma
    ramp = torch.linspace(80.0 ** (1 / 7), 0.821 ** (1 / 7), 4) ** 7
    assert torch.allclose(torch.tensor(four), ramp, rtol=1e-5)


def test_a_sigmas_list_must_decrease_within_the_range():
    from cmgen.errors import UserError
    from cmgen.sampling import parse_sigmas

    assert parse_sigmas("80, 0.821", 0.002, 80.0) == [80.0, 0.821]
    for bad in ("0.821,80", "80,80", "81", "80,0.001", "80,x"):
        with pytest.raises(UserError, match="--sigmas"):
            parse_sigmas(bad, 0.002, 80.0)


def test_generate_labels_images_j_mod_classes_and_shards_partition_the_batches():
    model, recipe = _model("model.class_conditional=true")
    assert model.conditional
    out = list(generate(model, 23, [80.0], seed=2, batch_size=5, progress=False))
    x = torch.cat([b for b, _ in out])
    assert torch.equal(torch.cat([y for _, y in out]), torch.arange(23) % 10)
    given = (torch.arange(23) * 3) % 10
    assert torch.equal(torch.cat([y for _, y in generate(model, 23, [80.0], batch_size=5, labels=given,
                                                          progress=False)]), given)
    # shard (rank, 3): batches rank, rank + 3, ... of the one-process run, exactly those images
    batches = [list(generate(model, 23, [80.0], seed=2, batch_size=5, progress=False, shard=(r, 3)))
               for r in range(3)]
    assert [len(b) for b in batches] == [2, 2, 1]
    for i in range(5):
        assert torch.equal(batches[i % 3][i // 3][0], x[5 * i:5 * i + 5])


def test_generate_autocasts_to_the_given_dtype():
    model, recipe = _model()
    sig = default_sigmas(recipe, 2)
    full = _all(model, 4, sig, 0, 4)
    half = _all(model, 4, sig, 0, 4, autocast_dtype=torch.bfloat16)
    assert not torch.equal(full, half) and (full - half).abs().max() < 0.1
