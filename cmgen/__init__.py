"""cmgen: consistency and diffusion generative models.

    from cmgen.recipe import load_recipe
    from cmgen.train import train
    run = train(load_recipe("ict_digits"), "runs/demo")

Pipelines load lazily (no diffusers import on `import cmgen`):
    pipe = cmgen.CMGenPipeline.from_pretrained("exported/")
"""
__version__ = "0.1.0"

_LAZY = {"CMGenPipeline": "cmgen.pipelines", "CMGenScheduler": "cmgen.pipelines",
         "CMGenEDMPipeline": "cmgen.pipelines", "CMGenFlowPipeline": "cmgen.pipelines",
         "CMGenLatentPipeline": "cmgen.pipelines"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cmgen' has no attribute '{name}'")
