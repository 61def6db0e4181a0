"""The Generator: what a trained model *is*, rebuilt from its recipe alone.

Training, `cmgen sample`, `cmgen eval`, `cmgen export`, the loop's previews and run loading all
hold one of these. It is the parameterised network (`net`, called as net(x, time, labels)), the
facts needed to sample it (data shape and kind, classes, the recipe's noise constants), a codec
between model space and images (identity for pixels and points) and one `sample` entry that
dispatches to the pure functions in cmgen.sampling.

Parameterisations (cmgen.precond.NETWORKS): `cm` consistency function f(x, sigma), `edm` denoiser
D(x, sigma), `flow` velocity v(x, t). A method declares which one it trains.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn


class IdentityCodec:
    """Model space is image (or point) space."""

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x


def parameterisation_of(recipe) -> str:
    from cmgen.methods import method_class

    return method_class(recipe).parameterisation


def null_label(recipe, num_classes: int) -> Optional[int]:
    """The label index that means 'no class' (classifier-free guidance), when the method drops labels."""
    cfg = recipe.method  # a fine-tuning method keeps its base model's null label (`null_label: true`)
    if recipe.model.class_conditional and num_classes and (getattr(cfg, "label_dropout", 0.0) > 0
                                                           or getattr(cfg, "null_label", False)):
        return num_classes
    return None


def build_network(recipe, shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The method's parameterisation around the recipe's backbone, freshly initialised."""
    from cmgen.methods import method_class
    from cmgen.models import build_backbone
    from cmgen.precond import NETWORKS

    own = getattr(method_class(recipe), "build_network", None)  # a method whose network is not a precond wrapper
    if own is not None:
        return own(recipe, tuple(shape), num_classes)
    embeds = num_classes + (1 if null_label(recipe, num_classes) is not None else 0)
    return NETWORKS[parameterisation_of(recipe)](build_backbone(recipe, shape, embeds), recipe.precond)


class Generator:
    def __init__(self, net: nn.Module, recipe, shape: Sequence[int], num_classes: int, kind: str = "image", *,
                 codec=None, step: Optional[int] = None, source: Optional[Path] = None):
        self.net = net
        self.recipe = recipe
        self.shape = tuple(shape)
        self.num_classes = int(num_classes)
        self.kind = kind
        self.codec = codec or IdentityCodec()
        self.step = step
        self.source = source
        self.parameterisation = parameterisation_of(recipe)

    @classmethod
    def build(cls, recipe, shape, num_classes: int, kind: str = "image", **kw) -> "Generator":
        if kind == "latent" and kw.get("codec") is None:
            from cmgen.latents import codec_for

            kw["codec"] = codec_for(recipe)
        return cls(build_network(recipe, tuple(shape), num_classes), recipe, shape, num_classes, kind, **kw)

    # ------------------------------------------------------------------ facts
    @property
    def conditional(self) -> bool:
        return bool(self.recipe.model.class_conditional and self.num_classes)

    @property
    def null_label(self) -> Optional[int]:
        return null_label(self.recipe, self.num_classes)

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The shape of what `sample` returns (decoded images for latent models)."""
        return tuple(getattr(self.codec, "image_shape", None) or self.shape)

    @property
    def output_kind(self) -> str:
        """What `sample` returns: image, points (latent models return decoded images)."""
        return "image" if self.kind == "latent" else self.kind

    @property
    def clip(self) -> bool:
        """Clamp intermediate estimates to [-1, 1] (consistency sampling of images)."""
        return bool(self.recipe.sample.clip_denoised and self.kind == "image")

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.net.parameters() if p.requires_grad]

    def to(self, device) -> "Generator":
        self.net.to(device)
        if hasattr(self.codec, "to"):
            self.codec.to(device)
        return self

    def eval(self) -> "Generator":
        self.net.eval()
        return self

    # ------------------------------------------------------------------ sampling
    def sampler(self, name: Optional[str] = None):
        from cmgen.sampling.registry import get_sampler

        return get_sampler(self.parameterisation, name or self.recipe.sample.sampler)

    def times(self, steps: int, sampler: Optional[str] = None) -> list[float]:
        from cmgen.errors import UserError

        if steps < 1:
            raise UserError(f"--steps must be at least 1, got {steps}")
        return [float(t) for t in self.sampler(sampler).times(self.recipe, steps)]

    def nfe(self, times: Sequence[float], sampler: Optional[str] = None, guidance: float = 1.0) -> int:
        """Network evaluations per sample (guidance runs the conditional and unconditional halves)."""
        doubled = guidance != 1.0 and not getattr(self.net, "embeds_guidance", False)
        return self.sampler(sampler).nfe(list(times)) * (2 if doubled else 1)

    def check_guidance(self, guidance: float) -> None:
        from cmgen.errors import UserError

        if getattr(self.net, "embeds_guidance", False):  # the guidance is a network input (LCM's w-embedding)
            return
        if guidance != 1.0 and self.null_label is None:
            raise UserError(f"--cfg {guidance:g} needs a class-conditional model trained with method.label_dropout > 0; "
                            "this one was not, use --cfg 1")

    def condition(self, labels: Optional[torch.Tensor]):
        """What the network is conditioned on for `labels`: the labels themselves, unless the method maps them
        (a text LCD student: each label's caption or prompt through the teacher's text encoder)."""
        from cmgen.methods import method_class

        hook = getattr(method_class(self.recipe), "sample_condition", None)
        return labels if hook is None or labels is None else hook(self.recipe, labels)

    def sample(self, noise, times: Sequence[float], *, sampler: Optional[str] = None,
               labels: Optional[torch.Tensor] = None, guidance: float = 1.0, **options) -> torch.Tensor:
        """Samples in data space from `noise(k)` (cmgen.sampling.per_image_noise) over `times`."""
        from cmgen.sampling.registry import guided

        self.check_guidance(guidance)
        labels = self.condition(labels)
        if getattr(self.net, "embeds_guidance", False):
            net, options = self.net, {**options, "guidance": guidance}
        else:
            net = guided(self.net, guidance, self.null_label) if guidance != 1.0 else self.net
        z = self.sampler(sampler).run(net, noise, list(times), labels, self, options)
        return self.codec.decode(z.float())
