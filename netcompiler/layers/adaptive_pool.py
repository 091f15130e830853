"""adaptive_avgpool2d and global_avgpool2d: average pooling to a fixed output size, as
torch.nn.AdaptiveAvgPool2d.

Output row i averages input rows floor(i * H / OH) to ceil((i + 1) * H / OH) (exclusive),
PyTorch's bins: uneven when OH does not divide H, and overlapping then.  global_avgpool2d is
the output size 1 (AdaptiveAvgPool2d(1)): one mean per channel, output (C, 1, 1).
"""
from __future__ import annotations

from .base import Layer, LayerKind, Option, Shape, fmt_shape


def adaptive_bins(size: int, out: int) -> list[tuple[int, int]]:
    """PyTorch's bins [start, end) of an adaptive pooling of `size` inputs to `out` outputs."""
    return [((i * size) // out, -(-((i + 1) * size) // out)) for i in range(out)]


class AdaptiveAvgPool2d(LayerKind):
    kind = "adaptive_avgpool2d"
    prefix = "pool"
    doc = "average pooling to a fixed output size, as torch.nn.AdaptiveAvgPool2d"
    template = "adaptive_avgpool2d.c.j2"
    options = (Option("output_size", "pair", doc="output height and width (int or [h, w])"),)

    def output_size(self, layer: Layer) -> tuple[int, int]:
        return layer.opts["output_size"]

    def infer(self, layer: Layer, in_shape: Shape, error) -> Shape | None:
        if len(in_shape) != 3:
            error(f"{layer.where()}: needs a 3-D input (channels, height, width), got {fmt_shape(in_shape)}", None)
            return None
        return (in_shape[0], *self.output_size(layer))

    def _bins(self, layer: Layer) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        _, h, w = layer.in_shape
        _, oh, ow = layer.out_shape
        return adaptive_bins(h, oh), adaptive_bins(w, ow)

    def window_sum(self, layer: Layer) -> int:
        """Input elements read per channel, over all outputs (bins may overlap)."""
        rows, cols = self._bins(layer)
        return sum(y1 - y0 for y0, y1 in rows) * sum(x1 - x0 for x0, x1 in cols)

    def flops(self, layer: Layer) -> tuple[int, int]:
        # forward: window - 1 adds and one division per output; backward: one division per
        # output and one add per input element of its window (as avgpool2d)
        c, n = layer.in_shape[0], layer.out_size
        return (c * self.window_sum(layer), c * self.window_sum(layer) + n)

    def render_context(self, layer: Layer) -> dict:
        c, h, w = layer.in_shape
        _, oh, ow = layer.out_shape
        rows, cols = self._bins(layer)
        return dict(C=c, H=h, W=w, OH=oh, OW=ow, HW=h * w, N_IN=c * h * w, GLOBAL=(oh, ow) == (1, 1),
                    Y0=[b[0] for b in rows], Y1=[b[1] for b in rows], X0=[b[0] for b in cols],
                    X1=[b[1] for b in cols])

    def torch_module(self, layer: Layer):
        import torch.nn as nn

        return nn.AdaptiveAvgPool2d(self.output_size(layer))


class GlobalAvgPool2d(AdaptiveAvgPool2d):
    kind = "global_avgpool2d"
    aliases = ("global_average_pooling2d",)  # Keras
    doc = "the mean of each channel, output (C, 1, 1), as torch.nn.AdaptiveAvgPool2d(1)"
    options = ()

    def output_size(self, layer: Layer) -> tuple[int, int]:
        return (1, 1)
