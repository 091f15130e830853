"""maxpool2d and avgpool2d: one sliding-window base owns kernel/stride/padding/ceil_mode."""
from __future__ import annotations

from .base import Layer, LayerKind, Option, Shape, fmt_shape, side_pads, window_out


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
        (kh, kw), (sh, sw) = o["kernel_size"], o["stride"]
        (pt, pb), (pl, pr) = pads = side_pads(o["padding"])
        dh, dw = o.get("dilation", (1, 1))
        # PyTorch: padding at most half of the kernel size (whatever the dilation), on each side.
        for p, k in ((pt, kh), (pb, kh), (pl, kw), (pr, kw)):
            if p > k // 2:
                error(f"{layer.where()}: padding {p} is more than half the kernel size {k}", "padding")
                return None
        ceil = o["ceil_mode"]
        if ceil and (pt != pb or pl != pr):
            error(f"{layer.where()}: ceil_mode needs the same padding on both sides; with padding "
                  f"[top, bottom, left, right] give the extra rows and columns as bottom and right padding",
                  "ceil_mode")
            return None
        oh = window_out(h, kh, sh, pt + pb, dh, ceil, pt)
        ow = window_out(w, kw, sw, pl + pr, dw, ceil, pl)
        if oh <= 0 or ow <= 0:
            if (pt, pb, pl, pr, dh, dw) == (0, 0, 0, 0, 1, 1) and not ceil:
                error(f"{layer.where()}: input {h}x{w} is smaller than kernel {kh}x{kw}", None)
            else:
                shown = f"{pt}x{pl}" if (pt, pl) == (pb, pr) else f"[{pt}, {pb}, {pl}, {pr}]"
                error(f"{layer.where()}: input {h}x{w} gives an empty output ({oh}x{ow}) for kernel {kh}x{kw}, "
                      f"stride {sh}x{sw}, padding {shown}", None)
            return None
        layer.derived["pads"] = pads
        return (c, oh, ow)

    def asymmetric(self, layer: Layer) -> bool:
        (pt, pb), (pl, pr) = layer.derived["pads"]
        return (pt, pl) != (pb, pr)

    def render_context(self, layer: Layer) -> dict:
        o = layer.opts
        c, h, w = layer.in_shape
        _, oh, ow = layer.out_shape
        dh, dw = o.get("dilation", (1, 1))
        (pt, pb), (pl, pr) = layer.derived["pads"]
        # PH, PW: padding above and left of the input; PB, PR: below and right
        return dict(C=c, H=h, W=w, OH=oh, OW=ow, KH=o["kernel_size"][0], KW=o["kernel_size"][1],
                    SH=o["stride"][0], SW=o["stride"][1], PH=pt, PW=pl, PB=pb, PR=pr,
                    DH=dh, DW=dw, count_include_pad=o.get("count_include_pad", True))

    def window(self, layer: Layer) -> int:
        return layer.opts["kernel_size"][0] * layer.opts["kernel_size"][1]


class MaxPool2d(Pool2d):
    kind = "maxpool2d"
    doc = "max pooling, as torch.nn.MaxPool2d; backward routes the gradient to the saved argmax"
    template = "maxpool2d.c.j2"
    aliases = ("max_pooling2d", "max_pool2d")
    options = (
        Option("kernel_size", "pair", doc="window height and width"),
        Option("stride", "pair", None, "step between windows (default: kernel_size)"),
        Option("padding", "pads", 0, "implicit -inf padding on each side (at most half the kernel): int, [h, w] "
               "or [top, bottom, left, right]", minimum=0),
        Option("dilation", "pair", 1, "spacing between window taps"),
        Option("ceil_mode", "bool", False, "round the output size up instead of down"),
    )

    def flops(self, layer: Layer) -> tuple[int, int]:
        # forward: window-1 comparisons per output; backward: one add per output.
        return (layer.out_size * (self.window(layer) - 1), layer.out_size)

    def saved_slots(self, layer: Layer) -> dict:
        return {"argmax": ("int32_t", layer.out_size)}

    def masks_relu_grad(self, layer: Layer) -> bool:
        # the input at a window's argmax is its output: the derivative of a ReLU before the
        # pool is (out > 0) per window
        return True

    def render_context(self, layer: Layer) -> dict:
        c = super().render_context(layer)
        c["tiles"] = tiling(c)
        return c

    def torch_module(self, layer: Layer):
        import torch.nn as nn

        o = layer.opts
        if self.asymmetric(layer):
            from ..torchref import PaddedMaxPool2d

            return PaddedMaxPool2d(o["kernel_size"], o["stride"], dilation=o["dilation"], pads=layer.derived["pads"])
        pads = layer.derived["pads"]
        return nn.MaxPool2d(o["kernel_size"], o["stride"], (pads[0][0], pads[1][0]), o["dilation"],
                            ceil_mode=o["ceil_mode"])


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def tiling(c: dict) -> dict | None:
    """The numbers of max-pooling's tiled path, or None when it does not apply.

    The tiled path is for windows that tile the input: stride = kernel, no padding and
    dilation 1, any ceil_mode.  Windows never overlap, so backward writes each input
    gradient once instead of zeroing and scattering; every loop bound is a literal.

    FULL_OH x FULL_OW windows lie wholly inside the input.  With ceil_mode the last row
    (column) of windows may be cut to EDGE_KH input rows (EDGE_KW columns; 0: not cut).
    Input rows from USED_H on (REST_N elements) are in no window (floor mode).

    SIMD says what gcc vectorises, in blocks of BLOCK (a power of two, at most 16 floats:
    one AVX-512 register): "channels" for small planes (rows of few windows), else
    "columns": the first VEC_OW windows of a row, the rest (SCALAR_COLUMNS: a row's only
    whole window, or the cut last window) in branchless scalar code.  Backward ("columns")
    zeroes the ZERO_N input columns from ZERO_X on, then sets the gradients of
    SCALAR_COLUMNS; backward ("channels") zeroes the PLANE values of a plane and then sets
    the gradients of its OUT_PLANE windows.
    """
    if (c["SH"], c["SW"]) != (c["KH"], c["KW"]) or (c["PH"], c["PW"], c["PB"], c["PR"]) != (0, 0, 0, 0) \
            or (c["DH"], c["DW"]) != (1, 1):
        return None
    kh, kw = c["KH"], c["KW"]
    full_oh, full_ow = c["H"] // kh, c["W"] // kw
    # ceil_mode adds at most one output row (column): a window that starts inside the input
    edge_kh = c["H"] - full_oh * kh if c["OH"] > full_oh else 0
    edge_kw = c["W"] - full_ow * kw if c["OW"] > full_ow else 0
    assert c["OH"] == full_oh + (edge_kh > 0) and c["OW"] == full_ow + (edge_kw > 0), c
    used_h, used_w = full_oh * kh + edge_kh, full_ow * kw + edge_kw

    notes = []  # for the comment above the generated functions
    if edge_kh:
        notes.append(f"ceil_mode cuts the last row of windows to {_count(edge_kh, 'input row')}.")
    if edge_kw:
        notes.append(f"ceil_mode cuts the last column of windows to {_count(edge_kw, 'input column')}.")
    if c["H"] > used_h:
        notes.append(f"Input rows from {used_h} on are in no window.")
    if c["W"] > used_w:
        notes.append(f"Input columns from {used_w} on are in no window.")
    edge_col = f"ceil_mode: the row's last window, cut to {_count(edge_kw, 'input column')}"

    # gcc vectorises over channels (16 planes as 16 vector loads and shuffles) when the
    # windows cover a plane of a power-of-two size up to 16 values; on other planes it
    # gives up, or leaves scalar code with branches, so those go by output columns
    plane = c["H"] * c["W"]
    small = plane <= 16 and plane & (plane - 1) == 0 and (used_h, used_w) == (c["H"], c["W"])
    simd = "channels" if full_ow < 4 and c["C"] >= 4 and small else "columns"
    vec_ow, scalar = 0, []
    if simd == "columns":
        vec_ow = full_ow if full_ow >= 2 else 0
        if full_ow == 1:
            scalar.append((0, kw, "the row's only whole window"))
        if edge_kw:
            scalar.append((full_ow, edge_kw, edge_col))
    zero_x = vec_ow * kw
    lanes = vec_ow if simd == "columns" else c["C"]
    return dict(
        FULL_OH=full_oh, FULL_OW=full_ow, EDGE_KH=edge_kh, EDGE_KW=edge_kw, USED_H=used_h,
        SIMD=simd, VEC_OW=vec_ow, BLOCK=min(16, 1 << (max(lanes, 1).bit_length() - 1)), SCALAR_COLUMNS=scalar,
        ZERO_X=zero_x, ZERO_N=c["W"] - zero_x if simd == "columns" else 0, REST_N=(c["H"] - used_h) * c["W"],
        PLANE=plane, OUT_PLANE=c["OH"] * c["OW"],
        ZERO_WHY="columns of the scalar windows (set below) or in no window" if scalar else "columns in no window",
        NOTES=notes, EDGE_COL=edge_col,
        EDGE_ROW=f"ceil_mode: the last row of windows, cut to {_count(edge_kh, 'input row')}",
    )


class AvgPool2d(Pool2d):
    kind = "avgpool2d"
    doc = "average pooling, as torch.nn.AvgPool2d"
    template = "avgpool2d.c.j2"
    aliases = ("average_pooling2d", "avg_pool2d")
    options = (
        Option("kernel_size", "pair", doc="window height and width"),
        Option("stride", "pair", None, "step between windows (default: kernel_size)"),
        Option("padding", "pads", 0, "implicit zero padding on each side (at most half the kernel): int, [h, w] "
               "or [top, bottom, left, right]", minimum=0),
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
        if self.asymmetric(layer):
            from ..torchref import PaddedAvgPool2d

            return PaddedAvgPool2d(o["kernel_size"], o["stride"], pads=layer.derived["pads"],
                                   count_include_pad=o["count_include_pad"])
        pads = layer.derived["pads"]
        return nn.AvgPool2d(o["kernel_size"], o["stride"], (pads[0][0], pads[1][0]), ceil_mode=o["ceil_mode"],
                            count_include_pad=o["count_include_pad"])
