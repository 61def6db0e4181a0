"""Backbones: the bare networks F(x_in, noise_label, class_labels) that cmgen.precond wraps
(cmgen.generator.build_network builds the wrapped network a method trains)."""
from __future__ import annotations


def build_backbone(recipe, shape: tuple[int, ...], num_classes: int):
    """The bare network F for data of `shape` (C, H, W) or (D,); `num_classes` class embeddings."""
    m = recipe.model
    if m.arch == "sd3":  # a diffusers SD3 transformer from model.init_from, prompts as labels (LoRA optional)
        from cmgen.models.sd3 import build_sd3_backbone
        return build_sd3_backbone(recipe)
    if m.arch == "mlp":
        from cmgen.models.mlp import MLPBackbone

        if len(shape) != 1:
            from cmgen.errors import UserError
            raise UserError(f"recipe key 'model.arch' is mlp but the data are images of shape {shape}; use unet")
        return MLPBackbone(shape[0], m.hidden, m.depth, num_classes if m.class_conditional else 0, m.dropout)
    from diffusers import UNet2DModel

    from cmgen.models.unet import UNetBackbone, unet_kwargs

    if len(shape) != 3:
        from cmgen.errors import UserError
        raise UserError(f"recipe key 'model.arch' is unet but the data are points of shape {shape}; use mlp")
    unet_class = UNet2DModel
    if m.norm == "nsln":
        from cmgen.models.nsln import NsLNUNet2DModel as unet_class
    return UNetBackbone(unet_class(**unet_kwargs(m, shape[0], shape[1], num_classes)))

