"""upsample: nearest-neighbour upsampling by integer factors, as torch.nn.Upsample(mode='nearest').

Output pixel (oy, ox) is input pixel (oy / sh, ox / sw); the input gradient of a pixel is
the sum of the output gradients of its sh x sw copies.
"""
from __future__ import annotations

from .base import Layer, LayerKind, Option, Shape, fmt_shape


class Upsample(LayerKind):
    kind = "upsample"
    aliases = ("upsampling2d",)  # Keras UpSampling2D
    prefix = "up"
    doc = "nearest-neighbour upsampling by integer factors, as torch.nn.Upsample(mode='nearest')"
    template = "upsample.c.j2"
    options = (
        Option("scale_factor", "pair", doc="integer factor for height and width (int or [h, w])"),
        Option("mode", "choice", "nearest", "interpolation: only 'nearest' is supported", choices=("nearest",)),
    )

    def infer(self, layer: Layer, in_shape: Shape, error) -> Shape | None:
        if len(in_shape) != 3:
            error(f"{layer.where()}: needs a 3-D input (channels, height, width), got {fmt_shape(in_shape)}", None)
            return None
        c, h, w = in_shape
        sh, sw = layer.opts["scale_factor"]
        return (c, h * sh, w * sw)

    def flops(self, layer: Layer) -> tuple[int, int]:
        # forward copies; backward adds the sh x sw output gradients of each input pixel
        sh, sw = layer.opts["scale_factor"]
        return (0, layer.in_size * (sh * sw - 1))

    def render_context(self, layer: Layer) -> dict:
        c, h, w = layer.in_shape
        _, oh, ow = layer.out_shape
        sh, sw = layer.opts["scale_factor"]
        return dict(C=c, H=h, W=w, OH=oh, OW=ow, SH=sh, SW=sw)

    def torch_module(self, layer: Layer):
        import torch.nn as nn

        sh, sw = layer.opts["scale_factor"]
        return nn.Upsample(scale_factor=(float(sh), float(sw)), mode="nearest")
