"""Training methods. Each module holds a frozen `Config` dataclass and a `Method` class
(the protocol is in cmgen.methods.base). A method is chosen by `method.name`: a name below, or
the dotted import path of your own module (`method: {name: my_package.my_method}`).
"""
from __future__ import annotations

import difflib
import importlib

from cmgen.errors import UserError
from cmgen.methods.base import Batch, Dist, Method, Nets, Part, gate

# name -> module path; a new method adds one line here and one module
_MODULES = {
    "ict": "cmgen.methods.ict",
    "edm": "cmgen.methods.edm",
    "flow": "cmgen.methods.flow",
    "lct": "cmgen.methods.lct",
    "ctm": "cmgen.methods.ctm",
    "awm": "cmgen.methods.awm",
    "flowgrpo": "cmgen.methods.flowgrpo",
    "ldm": "cmgen.methods.ldm",
    "lcd": "cmgen.methods.lcd",
}

__all__ = ["Batch", "Dist", "Method", "Nets", "Part", "gate", "method_config_class", "method_name_of",
           "method_class", "build_method", "resolve_recipe"]


def _module(name: str):
    if isinstance(name, str) and name not in _MODULES and _importable(name):
        try:
            mod = importlib.import_module(name)
        except ImportError as exc:
            raise UserError(f"recipe key 'method.name' names the module '{name}', which cannot be imported "
                            f"({exc}); check the name and PYTHONPATH") from None
        if not (hasattr(mod, "Config") and hasattr(mod, "Method")):
            raise UserError(f"recipe key 'method.name': module '{name}' must define Config and Method")
        return mod
    if not isinstance(name, str) or name not in _MODULES:
        match = difflib.get_close_matches(str(name), list(_MODULES), n=1)
        hint = f"; did you mean '{match[0]}'?" if match else f"; known methods: {', '.join(_MODULES)}"
        raise UserError(f"recipe key 'method.name' names an unknown method {repr(name)[:40]}{hint}")
    return importlib.import_module(_MODULES[name])


def _importable(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def method_config_class(name: str):
    return _module(name).Config


def method_name_of(config) -> str:
    module = type(config).__module__
    for name, path in _MODULES.items():
        if module == path:
            return name
    return module  # a user's own method module


def method_class(recipe):
    return _module(method_name_of(recipe.method)).Method


def resolve_recipe(recipe):
    """The method's run-length defaults written into the recipe (see Method.resolve)."""
    return method_class(recipe).resolve(recipe)


def build_method(recipe, gen):
    return method_class(recipe)(recipe.method, recipe, gen)
