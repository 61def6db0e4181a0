"""Every shipped recipe loads; the GPU-sized ones build their real model and run 2 steps (--smoke)."""
import pytest

from cmgen.cli import main
from cmgen.recipe import RECIPE_DIR, dump_recipe, from_tree, load_recipe
import yaml

SHIPPED = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_loads_and_round_trips(name):
    r = load_recipe(name)
    assert r.name == name and r.description
    assert from_tree(yaml.safe_load(dump_recipe(r))) == r


def test_a_bare_no_is_the_string_no_not_false():
    # YAML 1.1 reads `no` as false; `train.mixed_precision=no` must still mean "no autocast"
    assert load_recipe("ict_digits", ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert from_tree({"method": "ict", "train": {"mixed_precision": False}}).train.mixed_precision == "no"
    with pytest.raises(Exception, match="mixed_precision"):
        load_recipe("ict_digits", ["train.mixed_precision=yes"])



def test_a_bare_off_or_on_for_the_image_cache_means_off_or_auto_not_a_folder():
    # YAML 1.1 reads `off`/`no` as false and `on`/`yes` as true; data.cache names a folder otherwise
    for word, want in [("off", "off"), ("no", "off"), ("on", "auto"), ("auto", "auto"), ("cache_dir", "cache_dir")]:
        assert load_recipe("ict_digits", [f"data.cache={word}"]).data.cache == want
    assert from_tree(yaml.safe_load("method: ict\ndata: {cache: off}\n")).data.cache == "off"


def test_paper_settings_of_the_gpu_recipes():
    c10 = load_recipe("ict_cifar10")
    assert (c10.train.batch_size, c10.train.steps, c10.optim.lr, c10.optim.name) == (1024, 400_000, 1e-4, "radam")
    assert (c10.method.s0, c10.method.s1, c10.method.p_mean, c10.method.p_std) == (10, 1280, -1.1, 2.0)
    assert c10.model.dropout == 0.3 and c10.train.ema_decay == 0.99993 and c10.sample.sigmas == (80.0, 0.821)
    from cmgen.models.unet import unet_kwargs

    from cmgen.models.unet import PRESETS

    assert PRESETS["ncsnpp_cifar10"]["block_out_channels"] == (128, 256, 256, 256)   # older runs' layout, kept
    kw = unet_kwargs(c10.model, 3, 32, 0)   # NCSN++: 128 x mult (2, 2, 2) at 32/16/8, attention at 16x16 only
    assert kw["block_out_channels"] == (256, 256, 256) and kw["layers_per_block"] == 4
    assert [("Attn" in b) for b in kw["down_block_types"]] == [False, True, False]
    assert all("Resnet" in b or "Attn" in b for b in kw["down_block_types"] + kw["up_block_types"])
    in64 = load_recipe("ict_imagenet64")
    assert in64.model.class_conditional and in64.model.dropout == 0.2 and in64.sample.sigmas == (80.0, 1.526)
    assert (in64.train.batch_size, in64.train.steps) == (4096, 800_000)


# The CIFAR-10 run keeps the recipe's bf16 autocast; this CPU emulates bf16 convolutions about 28x
# slower than fp32, so the 296M-parameter ImageNet 64 model runs its smoke steps in fp32.
@pytest.mark.slow
@pytest.mark.parametrize("name,params,extra", [
    ("ict_cifar10", "M parameters, data shape [3, 32, 32]", []),
    ("ict_imagenet64", "M parameters, data shape [3, 64, 64]", ["train.mixed_precision=no"]),
    ("edm_cifar10", "M parameters, data shape [3, 32, 32]", [])])
def test_gpu_recipes_smoke_on_the_cpu(capsys, name, params, extra):
    code = main(["train", name, *extra, "--smoke"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert params in out and "-> ok" in out


def test_paper_settings_of_the_latent_ct_recipes():
    for name, batch in (("lct_celebahq256", 128), ("lct_ffhq256", 128), ("lct_lsun_church256", 256)):
        r = load_recipe(name)
        m = r.method
        assert (m.s0, m.s1, m.loss, m.adaptive_c, m.diffusion_weight, m.diffusion_from, m.ot) == \
            (10, 640, "cauchy", True, 5.0, 0.75, True)
        assert r.model.norm == "nsln" and r.model.block_out_channels == (128, 256, 384, 512)
        assert r.model.layers_per_block == 4 and r.model.attention_levels == (1, 2) and r.model.dropout == 0.0
        assert (r.optim.name, r.optim.lr, r.optim.weight_decay, r.train.ema_decay) == ("radam", 1e-4, 1e-4, 0.99993)
        assert r.train.batch_size == batch and r.sample.sigmas == (80.0, 0.529) and r.data.name == "latents"
        assert not r.data.hflip   # LSUN's flips are encoded into its cache, never applied to latents in the loop
        if name == "lct_lsun_church256":   # a flipped latent is no image's latent: refused when training starts
            from cmgen.data import training_data
            from cmgen.errors import UserError

            flipped = load_recipe(name, ["data.hflip=true"])          # a stored recipe like it still loads
            with pytest.raises(UserError, match="'data.hflip' must be false when data.name is latents.*--hflip"):
                training_data(flipped, smoke=True)
        from cmgen.models.unet import unet_kwargs

        kw = unet_kwargs(r.model, 4, 32, 0)   # DhariwalUNet: resampling in residual blocks, scale-shift embedding
        assert kw["resnet_time_scale_shift"] == "scale_shift"
        assert kw["down_block_types"] == ("ResnetDownsampleBlock2D", "AttnDownBlock2D", "AttnDownBlock2D",
                                          "ResnetDownsampleBlock2D")
    base = load_recipe("ilct_celebahq256")
    assert (base.method.loss, base.method.adaptive_c, base.method.diffusion_weight, base.method.ot,
            base.method.s1, base.model.norm) == ("pseudo_huber", False, 0.0, False, 1280, "group")


@pytest.mark.slow
def test_latent_ct_recipe_smoke_runs_on_a_tiny_vae_without_a_cache(capsys):
    code = main(["train", "lct_celebahq256", "--smoke"])
    out = capsys.readouterr().out
    assert code == 0 and "data shape [4, 32, 32]" in out and "-> ok" in out


@pytest.mark.parametrize("suffix,key,value", [("no_cauchy", "loss", "pseudo_huber"), ("no_adaptive_c", "adaptive_c", False),
                                              ("no_diffusion", "diffusion_weight", 0.0), ("no_ot", "ot", False)])
def test_each_lct_ablation_recipe_switches_off_exactly_one_technique(suffix, key, value):
    import dataclasses

    full, ablation = load_recipe("lct_digits"), load_recipe(f"lct_digits_{suffix}")
    assert getattr(ablation.method, key) == value != getattr(full.method, key)
    same = dataclasses.replace(ablation, name=full.name, description=full.description,
                               method=dataclasses.replace(ablation.method, **{key: getattr(full.method, key)}))
    assert same == full
    nsln = load_recipe("lct_digits_no_nsln")
    assert nsln.model.norm == "group" and dataclasses.replace(nsln, name=full.name, description=full.description,
                                                              model=full.model) == full


def test_base_recipes_merge_key_by_key_and_refuse_loops(tmp_path):
    from cmgen.errors import UserError

    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(f"base: {b}\nname: a\ntrain:\n  steps: 7\n")
    b.write_text("base: ict_digits\ndescription: b\ntrain:\n  batch_size: 16\n")
    r = load_recipe(a)
    assert (r.name, r.description, r.train.steps, r.train.batch_size, r.method.s1) == ("a", "b", 7, 16, 160)
    b.write_text(f"base: {a}\n")
    with pytest.raises(UserError, match="its own base"):
        load_recipe(a)


@pytest.mark.parametrize("recipe, override, words", [
    ("ict_digits", "train.steps=true", ["'train.steps'", "integer", "True"]),           # a YAML bool is not an int
    ("ict_digits", "optim.betas=[0.9]", ["'optim.betas'", "2 entries", "got 1"]),
    ("ict_digits", "sample.sigmas=[0.5,80]", ["'sample.sigmas'", "decreasing"]),
    ("ict_digits", "sample.sigmas=[80,80]", ["'sample.sigmas'", "decreasing"]),
    ("ict_digits", "train.ema_decay=1.0", ["'train.ema_decay'", "[0, 1)"]),             # an EMA that never moves
    ("ict_digits", "sample.gamma=1.5", ["'sample.gamma'", "[0, 1]"]),
    ("ctm_digits", "method.gan_period=1", ["'method.gan_period'", "at least 2"]),       # the method's own check
    ("ctm_digits", "method.target_decay_gan=0.9", ["'method.target_decay_gan'", "method.gan_start"]),
    ("lct_digits", "method.loss=l1", ["'method.loss'", "cauchy or pseudo_huber"]),
    ("edm_digits", "eval.mode=legacy_tensorflow", ["'eval.mode'", "eval.features: inception"]),
])
def test_recipe_values_outside_their_range_are_one_sentence_naming_the_key(recipe, override, words):
    from cmgen.errors import UserError

    with pytest.raises(UserError) as exc:
        load_recipe(recipe, [override])
    msg = str(exc.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
