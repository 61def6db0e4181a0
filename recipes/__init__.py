"""cmgen's shipped recipes, installed as the package data `cmgen.recipes` (read with importlib.resources)."""
