"""Recipes: YAML files loaded into frozen, typed dataclasses.

Every key is checked: an unknown key or a value of the wrong type is a one-line error that
names the dotted key and, where one is close, the valid key meant. Dotted overrides
(`train.steps=2000`) are applied before validation, so they obey the same rules.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml

from cmgen.errors import UserError
from cmgen.precond import PrecondConfig, sampling_sigmas_ok


def _recipe_dir() -> Path:
    """The shipped recipes: package data `cmgen.recipes` (the top-level recipes/ folder of a checkout)."""
    from importlib.resources import files

    return Path(str(files("cmgen.recipes")))


RECIPE_DIR = _recipe_dir()


@dataclass(frozen=True)
class DataConfig:
    name: str = "digits"            # digits | toy2d | folder | cifar10 | random | latents
    path: Optional[str] = None      # folder: image directory; cifar10: torchvision root; latents: cache folder
    toy: str = "ring"               # toy2d: ring | moons
    n_points: int = 20000           # toy2d: size of the fixed training set
    resolution: Optional[int] = None  # folder/random: side length; digits are 8x8, cifar10 32x32
    channels: int = 3               # random/folder: image channels (used by --smoke without the data)
    num_classes: int = 0            # random/folder: label count (used by --smoke without the data)
    hflip: bool = False             # random horizontal flips
    holdout: int = 0                # examples kept out of training (evaluation reference)
    num_workers: int = 0            # DataLoader worker processes reading batches (and threads decoding a new cache)
    cache: str = "auto"             # folder/cifar10: uint8 memory-mapped cache, 'auto' ($CMGEN_CACHE), 'off' or a folder


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "unet"              # unet | mlp
    preset: Optional[str] = None    # named UNet2DModel configuration (see cmgen.models.unet.PRESETS)
    block_out_channels: Optional[tuple[int, ...]] = None
    layers_per_block: Optional[int] = None
    # indices of levels with self-attention; unset: the preset's, or the last level if block_out_channels changes the count
    attention_levels: Optional[tuple[int, ...]] = None
    attention_head_dim: Optional[int] = None
    norm_num_groups: Optional[int] = None
    norm: str = "group"             # group | nsln (every GroupNorm -> NsLN, latent_ct.md)
    dropout: float = 0.0
    class_conditional: bool = False
    hidden: int = 256               # mlp: width
    depth: int = 4                  # mlp: hidden layers
    init_from: Optional[str] = None  # diffusers pipeline folder, UNet folder or hub id


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64
    seed: int = 0
    grad_accum: int = 1
    mixed_precision: str = "no"     # no | bf16 | fp16
    ema_decay: float = 0.9999
    checkpoint_every: int = 1000
    keep_last: int = 3
    log_every: int = 10
    sample_every: int = 0           # 0 = only at the end
    sample_n: int = 64
    max_nonfinite: int = 5          # consecutive non-finite losses before the run stops
    threads: int = 0                # torch intra-op threads; 0 = one per physical core, at most 8
    log_with: str = "none"          # none | tensorboard | wandb (accelerate trackers; may change on resume)


@dataclass(frozen=True)
class OptimConfig:
    name: str = "radam"             # adam | adamw | radam
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    decay: str = "constant"         # constant | cosine | linear: lr from its peak after warmup to 0 at train.steps
    grad_clip: float = 0.0          # 0 = off


@dataclass(frozen=True)
class SampleConfig:
    sigmas: tuple[float, ...] = (80.0, 0.821)   # consistency models: the first entry is sigma_max
    clip_denoised: bool = True      # consistency models: clamp each estimate to [-1, 1] (images)
    sampler: Optional[str] = None   # default sampler (cm: multistep, edm: heun, flow: euler, ctm: gamma, ...)
    steps: int = 1                  # `cmgen sample` without --steps
    churn: float = 0.0              # edm heun: S_churn (0 = deterministic Algorithm 1)
    shift: float = 1.0              # flow: SD3 timestep shift of the sampling times
    sde_a: float = 0.7              # flow sde: sigma_t = a sqrt(t / (1 - t))
    gamma: float = 0.0              # ctm gamma-sampling: 0 = deterministic jumps, 1 = consistency multistep


@dataclass(frozen=True)
class EvalConfig:
    every: int = 0                  # run an evaluation every N steps (0 = off)
    n: int = 1000
    steps: tuple[int, ...] = (1, 2)
    features: str = "auto"          # auto | inception | clip | digits | points
    ref: Optional[str] = None
    mode: str = "clean"             # Inception resizing: clean | legacy_tensorflow (papers' CIFAR-10 protocol)


@dataclass(frozen=True)
class Recipe:
    name: str
    method: Any                     # the method's own frozen config (cmgen.methods registry)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    precond: PrecondConfig = field(default_factory=PrecondConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    description: str = ""


# ---------------------------------------------------------------------------- typing

def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _show(value, limit: int = 60) -> str:
    """A value as it appears in a one-line error: repr, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# string keys whose words YAML 1.1 reads as booleans: (what true means, what false means)
BOOL_WORDS = {"data.cache": ("auto", "off")}


def _coerce(value, tp, key: str):
    """Check `value` against the annotation `tp`; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            if origin is tuple and isinstance(value, (int, float)) and args and args[-1] is Ellipsis:
                value = [value]
            else:
                raise UserError(f"recipe key '{key}' must be a list, got {_show(value)}")
        if args and args[-1] is Ellipsis:
            items = [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        elif args:
            if len(value) != len(args):
                raise UserError(f"recipe key '{key}' must have {len(args)} entries, got {len(value)}")
            items = [_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            items = list(value)
        return tuple(items) if origin is tuple else items
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"recipe key '{key}' must be a number, got {_show(value)}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"recipe key '{key}' must be an integer, got {_show(value)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"recipe key '{key}' must be true or false, got {_show(value)}")
        return value
    if tp is str:
        if isinstance(value, bool) and key in BOOL_WORDS:  # YAML 1.1 reads on/off and yes/no as booleans
            value = BOOL_WORDS[key][0 if value else 1]
        elif value is False:  # a bare `no` (mixed_precision: no, log_with: no)
            value = "no"
        if not isinstance(value, str):
            raise UserError(f"recipe key '{key}' must be a string, got {_show(value)}")
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    return value


def _closest(name: str, options, prefix: str = "") -> str:
    dot = f"{prefix}." if prefix else ""
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    if match:
        return f"; did you mean '{dot}{match[0]}'?"
    return f"; valid keys: {', '.join(dot + o for o in sorted(options))}"


def build(cls, data, prefix: str = ""):
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    where = prefix or "the recipe"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"recipe section '{where}' must be a mapping of keys to values, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise UserError(f"unknown recipe key '{dotted}'{_closest(str(key), names, prefix)}")
        kwargs[key] = _coerce(value, hints[key], dotted)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise UserError(f"recipe section '{where}' is incomplete: {exc}") from None


# ---------------------------------------------------------------------------- loading

def _set_dotted(tree: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise UserError(f"override '{dotted}': '{part}' is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(items) -> list[tuple[str, Any]]:
    out = []
    for item in items or []:
        if "=" not in item:
            raise UserError(f"override '{item}' must look like key=value, e.g. train.steps=2000")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        out.append((key.strip(), value))
    return out


def read_yaml(path: Path) -> dict:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise UserError(f"recipe file '{path}' does not exist; `cmgen recipes` lists the shipped ones") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise UserError(f"recipe file '{path}' cannot be read ({exc.__class__.__name__}); pass a YAML file") from None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid syntax"
        raise UserError(f"recipe file '{path}' is not valid YAML{line}: {problem}") from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise UserError(f"recipe file '{path}' must hold a mapping of sections (name, method, data, ...)")
    return tree


def resolve_recipe_path(name_or_path: str) -> Path:
    """A path, or the name of a shipped recipe (`ict_digits` or `ict_digits.yaml`)."""
    p = Path(name_or_path)
    if p.exists():
        return p
    for cand in (RECIPE_DIR / name_or_path, RECIPE_DIR / f"{name_or_path}.yaml"):
        if cand.exists():
            return cand
    return p


def from_tree(tree: dict, overrides=()) -> Recipe:
    import copy

    from cmgen.methods import method_config_class

    tree = copy.deepcopy(tree)
    for key, value in overrides:
        _set_dotted(tree, key, value)
    method = tree.get("method")
    if isinstance(method, str):
        method = {"name": method}
    if not isinstance(method, dict) or "name" not in method:
        raise UserError("recipe key 'method.name' is required (e.g. method: {name: ict})")
    method = dict(method)
    mname = method.pop("name")
    mcls = method_config_class(mname)
    method_cfg = build(mcls, method, "method")
    tree.pop("method")
    tree.setdefault("name", mname)
    # the rest is typed by Recipe; the method config's class is chosen by method.name
    hints = typing.get_type_hints(Recipe)
    names = {f.name for f in fields(Recipe)}
    kwargs = {}
    for key, value in tree.items():
        if key not in names:
            raise UserError(f"unknown recipe key '{key}'{_closest(str(key), names)}")
        kwargs[key] = _coerce(value, hints[key], key)
    recipe = Recipe(method=method_cfg, **kwargs)
    validate(recipe)
    return recipe


def load_recipe(path, overrides: list[str] = ()) -> Recipe:
    """Load a recipe file (or shipped recipe name) and apply `key=value` overrides."""
    return from_tree(read_tree(path), parse_overrides(overrides))


def read_tree(path, _seen: tuple = ()) -> dict:
    """A recipe file's tree; `base: OTHER` (a shipped name or a path) starts from OTHER's tree and
    overrides it key by key (an ablation recipe names only what it changes)."""
    p = resolve_recipe_path(str(path))
    tree = read_yaml(p)
    base = tree.pop("base", None)
    if base is None:
        return tree
    if not isinstance(base, str):
        raise UserError(f"recipe key 'base' in '{p}' must name a recipe, got {_show(base)}")
    if str(p.resolve()) in _seen:
        raise UserError(f"recipe '{p}' is its own base (through 'base:'); remove the loop")
    return _merge(read_tree(base, _seen + (str(p.resolve()),)), tree)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def validate(r: Recipe) -> None:
    """Cross-field checks that types alone cannot express."""
    def need(cond, msg):
        if not cond:
            raise UserError(msg)

    t = r.train
    need(t.steps >= 1, f"recipe key 'train.steps' must be at least 1, got {t.steps}")
    need(t.batch_size >= 1, f"recipe key 'train.batch_size' must be at least 1, got {t.batch_size}")
    need(t.grad_accum >= 1, f"recipe key 'train.grad_accum' must be at least 1, got {t.grad_accum}")
    need(t.mixed_precision in ("no", "bf16", "fp16"),
         f"recipe key 'train.mixed_precision' must be no, bf16 or fp16, got '{t.mixed_precision}'")
    need(0.0 <= t.ema_decay < 1.0, f"recipe key 'train.ema_decay' must be in [0, 1), got {t.ema_decay}")
    need(t.checkpoint_every >= 1, "recipe key 'train.checkpoint_every' must be at least 1")
    need(t.keep_last >= 1, "recipe key 'train.keep_last' must be at least 1 (the newest checkpoint is always kept)")
    need(t.max_nonfinite >= 1, "recipe key 'train.max_nonfinite' must be at least 1")
    need(r.optim.name in ("adam", "adamw", "radam"),
         f"recipe key 'optim.name' must be adam, adamw or radam, got '{r.optim.name}'")
    need(r.optim.lr > 0, f"recipe key 'optim.lr' must be positive, got {r.optim.lr}")
    need(r.optim.decay in ("constant", "cosine", "linear"),
         f"recipe key 'optim.decay' must be constant, cosine or linear, got '{r.optim.decay}'")
    need(r.data.name in ("digits", "toy2d", "folder", "cifar10", "random", "latents", "prompts"),
         f"recipe key 'data.name' must be digits, toy2d, folder, cifar10, random, latents or prompts, got '{r.data.name}'")
    need(r.data.toy in ("ring", "moons"), f"recipe key 'data.toy' must be ring or moons, got '{r.data.toy}'")
    need(r.model.arch in ("unet", "mlp", "sd3"), f"recipe key 'model.arch' must be unet, mlp or sd3, got '{r.model.arch}'")
    need(r.model.norm in ("group", "nsln"), f"recipe key 'model.norm' must be group or nsln, got '{r.model.norm}'")
    need(0.0 <= r.model.dropout < 1.0, "recipe key 'model.dropout' must be in [0, 1)")
    from cmgen.eval.features import FEATURE_CHOICES, INCEPTION_MODES

    e = r.eval
    need(e.features in FEATURE_CHOICES,
         f"recipe key 'eval.features' must be one of {', '.join(FEATURE_CHOICES)}, got '{e.features}'")
    need(e.mode in INCEPTION_MODES, f"recipe key 'eval.mode' must be {' or '.join(INCEPTION_MODES)}, got '{e.mode}'")
    need(e.mode == "clean" or e.features in ("inception", "auto"),
         f"recipe key 'eval.mode' ({e.mode}) is Inception's resizing; set eval.features: inception or eval.mode: clean")
    need(e.every >= 0 and e.n >= 2, "recipe keys 'eval.every' must be >= 0 and 'eval.n' at least 2")
    need(len(e.steps) > 0 and all(s >= 1 for s in e.steps),
         f"recipe key 'eval.steps' must be step counts of 1 or more, got {list(e.steps)}")
    p = r.precond
    need(0 < p.sigma_min < p.sigma_max, "recipe keys 'precond.sigma_min' < 'precond.sigma_max' must both be positive")
    need(p.c_noise in ("cm", "edm"), f"recipe key 'precond.c_noise' must be cm or edm, got '{p.c_noise}'")
    from cmgen.methods import method_class
    from cmgen.sampling.registry import SAMPLERS

    problems = getattr(r.method, "problems", None)  # a method's own cross-field checks, one sentence each
    for msg in problems() if problems else ():
        raise UserError(msg)
    param = method_class(r).parameterisation
    need(r.sample.sampler is None or r.sample.sampler in SAMPLERS[param],
         f"recipe key 'sample.sampler' must be one of {', '.join(SAMPLERS[param])} for method "
         f"'{type(r.method).__module__.rsplit('.', 1)[-1]}', got '{r.sample.sampler}'")
    need(r.sample.steps >= 1, "recipe key 'sample.steps' must be at least 1")
    need(0.0 <= r.sample.gamma <= 1.0, f"recipe key 'sample.gamma' must be in [0, 1], got {r.sample.gamma}")
    need(r.sample.shift > 0 and r.sample.churn >= 0 and r.sample.sde_a > 0,
         "recipe keys 'sample.shift' and 'sample.sde_a' must be positive and 'sample.churn' at least 0")
    s = r.sample.sigmas
    need(sampling_sigmas_ok(s, p.sigma_min, p.sigma_max),
         f"recipe key 'sample.sigmas' must be decreasing values in (sigma_min, sigma_max], got {list(s)}")


def recipe_to_dict(r: Recipe) -> dict:
    from cmgen.methods import method_name_of

    d = dataclasses.asdict(r)
    d["method"] = {"name": method_name_of(r.method), **dataclasses.asdict(r.method)}

    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    d = plain(d)
    order = ["name", "description", "method", "data", "model", "precond", "train", "optim", "sample", "eval"]
    return {k: d[k] for k in order}


def dump_recipe(r: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(r), sort_keys=False)


def list_recipes() -> list[tuple[str, str]]:
    out = []
    for p in sorted(RECIPE_DIR.glob("*.yaml")):
        try:
            desc = (yaml.safe_load(p.read_text()) or {}).get("description", "")
        except yaml.YAMLError:
            desc = "(invalid YAML)"
        out.append((p.stem, " ".join(str(desc).split())))
    return out
