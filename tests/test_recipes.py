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


def test_paper_settings_of_the_gpu_recipes():
    c10 = load_recipe("ict_cifar10")
    assert (c10.train.batch_size, c10.train.steps, c10.optim.lr, c10.optim.name) == (1024, 400_000, 1e-4, "radam")
    assert (c10.method.s0, c10.method.s1, c10.method.p_mean, c10.method.p_std) == (10, 1280, -1.1, 2.0)
    assert c10.model.dropout == 0.3 and c10.train.ema_decay == 0.99993 and c10.sample.sigmas == (80.0, 0.821)
    in64 = load_recipe("ict_imagenet64")
    assert in64.model.class_conditional and in64.model.dropout == 0.2 and in64.sample.sigmas == (80.0, 1.526)
    assert (in64.train.batch_size, in64.train.steps) == (4096, 800_000)


# The CIFAR-10 run keeps the recipe's bf16 autocast; this CPU emulates bf16 convolutions about 28x
# slower than fp32, so the 296M-parameter ImageNet 64 model runs its smoke steps in fp32.
@pytest.mark.slow
@pytest.mark.parametrize("name,params,extra", [
    ("ict_cifar10", "M parameters, data shape [3, 32, 32]", []),
    ("ict_imagenet64", "M parameters, data shape [3, 64, 64]", ["train.mixed_precision=no"])])
def test_gpu_recipes_smoke_on_the_cpu(capsys, name, params, extra):
    code = main(["train", name, *extra, "--smoke"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert params in out and "-> ok" in out
