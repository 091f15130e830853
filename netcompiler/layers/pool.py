"""maxpool2d and avgpool2d: one sliding-window base owns kernel/stride/padding/ceil_mode."""
from __future__ import annotations

from .base import Layer, LayerKind, Option, Shape, fmt_shape, window_out


class Pool2d(LayerKind):
    prefix = "pool"
    dilation = False  # only max-pooling has dilation

    def infer(self, layer: Layer, in_shape: Shape, error) -> Shape | None:
        o = layer.opts
        if len(in_shape) != 3:
            error(f"{layer.where()}: needs a 3-D input (channels, height, width), got {fmt_shape(in_shape)}", None)
            return None
        c, h, w = in_shape
        if o["stride"] is None:
            o["stride"] = o["kernel_size"]
        (kh, kw), (sh, sw), (ph, pw) = o["kernel_size"], o["stride"], o["padding"]
        dh, dw = o.get("dilation", (1, 1))
        # PyTorch: padding at most half of the kernel size (whatever the dilation).
        for p, k in ((ph, kh), (pw, kw)):
            if p > k // 2:
                error(f"{layer.where()}: padding {p} is more than half the kernel size {k}", "padding")
                return None
        ceil = o["ceil_mode"]
        oh = window_out(h, kh, sh, 2 * ph, dh, ceil, ph)
        ow = window_out(w, kw, sw, 2 * pw, dw, ceil, pw)
        if oh <= 0 or ow <= 0:
            if (ph, pw, dh, dw) == (0, 0, 1, 1) and not ceil:
                error(f"{layer.where()}: input {h}x{w} is smaller than kernel {kh}x{kw}", None)
            else:
                error(f"{layer.where()}: input {h}x{w} gives an empty output ({oh}x{ow}) for kernel {kh}x{kw}, "
                      f"stride {sh}x{sw}, padding {ph}x{pw}", None)
            return None
        return (c, oh, ow)

    def render_context(self, layer: Layer) -> dict:
        o = layer.opts
        c, h, w = layer.in_shape
        _, oh, ow = layer.out_shape
        dh, dw = o.get("dilation", (1, 1))
        return dict(C=c, H=h, W=w, OH=oh, OW=ow, KH=o["kernel_size"][0], KW=o["kernel_size"][1],
                    SH=o["stride"][0], SW=o["stride"][1], PH=o["padding"][0], PW=o["padding"][1],
                    DH=dh, DW=dw, count_include_pad=o.get("count_include_pad", True))

    def window(self, layer: Layer) -> int:
        return layer.opts["kernel_size"][0] * layer.opts["kernel_size"][1]


class MaxPool2d(Pool2d):
    kind = "maxpool2d"
    doc = "max pooling, as torch.nn.MaxPool2d; backward routes the gradient to the saved argmax"
    template = "maxpool2d.c.j2"
    options = (
        Option("kernel_size", "pair", doc="window height and width"),
        Option("stride", "pair", None, "step between windows (default: kernel_size)"),
        Option("padding", "pair", 0, "implicit -inf padding on each side (at most half the kernel)", minimum=0),
        Option("dilation", "pair", 1, "spacing between window taps"),
        Option("ceil_mode", "bool", False, "round the output size up instead of down"),
    )

    def flops(self, layer: Layer) -> tuple[int, int]:
        # forward: window-1 comparisons per output; backward: one add per output.
        return (layer.out_size * (self.window(layer) - 1), layer.out_size)

    def saved_slots(self, layer: Layer) -> dict:
        return {"argmax": ("int32_t", layer.out_size)}

    def torch_module(self, layer: Layer):
        import torch.nn as nn

        o = layer.opts
        return nn.MaxPool2d(o["kernel_size"], o["stride"], o["padding"], o["dilation"], ceil_mode=o["ceil_mode"])


class AvgPool2d(Pool2d):
    kind = "avgpool2d"
    doc = "average pooling, as torch.nn.AvgPool2d"
    template = "avgpool2d.c.j2"
    options = (
        Option("kernel_size", "pair", doc="window height and width"),
        Option("stride", "pair", None, "step between windows (default: kernel_size)"),
        Option("padding", "pair", 0, "implicit zero padding on each side (at most half the kernel)", minimum=0),
        Option("ceil_mode", "bool", False, "round the output size up instead of down"),
        Option("count_include_pad", "bool", True, "count padding zeros in the divisor"),
    )

    def flops(self, layer: Layer) -> tuple[int, int]:
        # forward: window-1 adds and one division per output; backward: one division and
        # window adds per output.
        return (layer.out_size * self.window(layer), layer.out_size * (self.window(layer) + 1))

    def torch_module(self, layer: Layer):
        import torch.nn as nn

        o = layer.opts
        return nn.AvgPool2d(o["kernel_size"], o["stride"], o["padding"], ceil_mode=o["ceil_mode"],
                            count_include_pad=o["count_include_pad"])
