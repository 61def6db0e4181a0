"""Training methods. Each module registers a frozen config dataclass and a Method class.

A method is a loss over the preconditioned denoiser:

    method = Method(config, recipe, data_shape)
    terms = method.loss(model, x, labels, step, rng)   # {"loss": scalar to minimise, term: detached scalars}

and owns its schedule (curriculum, noise-level draws). The loop knows nothing else about it.
"""
from __future__ import annotations

import difflib
import importlib

from cmgen.errors import UserError

# name -> module path; a new method adds one line here and one module
_MODULES = {
    "ict": "cmgen.methods.ict",
}


def _module(name: str):
    if not isinstance(name, str) or name not in _MODULES:
        match = difflib.get_close_matches(str(name), list(_MODULES), n=1)
        hint = f"; did you mean '{match[0]}'?" if match else f"; known methods: {', '.join(_MODULES)}"
        raise UserError(f"recipe key 'method.name' names an unknown method {repr(name)[:40]}{hint}")
    return importlib.import_module(_MODULES[name])


def method_config_class(name: str):
    return _module(name).Config


def method_name_of(config) -> str:
    for name, path in _MODULES.items():
        if type(config).__module__ == path:
            return name
    raise KeyError(type(config))


def build_method(recipe, shape):
    mod = _module(method_name_of(recipe.method))
    return mod.Method(recipe.method, recipe, shape)
