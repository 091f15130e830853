"""conv2d: 2-D cross-correlation, as torch.nn.Conv2d."""
from __future__ import annotations

import math

from ..target import current
from .base import MAX_ELEMENTS, KernelPath, Layer, Option, Shape, WeightLayer, fmt_shape, side_pads, window_out


class Conv2d(WeightLayer):
    kind = "conv2d"
    prefix = "conv"
    doc = "2-D convolution (cross-correlation), as torch.nn.Conv2d"
    template = "conv2d.c.j2"
    aliases = ("convolution2d", "conv")
    options = (
        Option("out_channels", "int", doc="number of output channels"),
        Option("kernel_size", "pair", doc="kernel height and width (int or [h, w])"),
        Option("stride", "pair", 1, "step between windows"),
        Option("padding", "padding", 0, "zeros added on each side: int, [h, w], [top, bottom, left, right], "
               "'same' or 'valid'", minimum=0),
        Option("dilation", "pair", 1, "spacing between kernel taps"),
        Option("groups", "int", 1, "split channels into this many independent groups"),
        Option("bias", "bool", True, "add a learnable bias per output channel"),
        Option("in_channels", "int", None, "optional: checked against the input, never required"),
    )

    def infer(self, layer: Layer, in_shape: Shape, error) -> Shape | None:
        o = layer.opts
        if len(in_shape) != 3:
            error(f"{layer.where()}: needs a 3-D input (channels, height, width), got {fmt_shape(in_shape)}", None)
            return None
        cin, h, w = in_shape
        if o["in_channels"] is not None and o["in_channels"] != cin:
            error(f"{layer.where()}: in_channels is {o['in_channels']} but the input has {cin} channels", "in_channels")
            return None
        g = o["groups"]
        if cin % g or o["out_channels"] % g:
            error(f"{layer.where()}: groups={g} must divide both in_channels ({cin}) and out_channels "
                  f"({o['out_channels']})", "groups")
            return None
        (kh, kw), (sh, sw), (dh, dw) = o["kernel_size"], o["stride"], o["dilation"]
        pad = o["padding"]
        if pad == "same":
            if (sh, sw) != (1, 1):
                error(f"{layer.where()}: padding='same' needs stride 1 (as in PyTorch), got stride "
                      f"{sh}x{sw}", "padding")
                return None
            # PyTorch puts the odd pixel of 'same' padding at the bottom/right.
            tot = (dh * (kh - 1), dw * (kw - 1))
            pads = ((tot[0] // 2, tot[0] - tot[0] // 2), (tot[1] // 2, tot[1] - tot[1] // 2))
        else:
            pads = side_pads((0, 0) if pad == "valid" else pad)
        oh = window_out(h, kh, sh, sum(pads[0]), dh)
        ow = window_out(w, kw, sw, sum(pads[1]), dw)
        if oh <= 0 or ow <= 0:
            error(f"{layer.where()}: {self._too_small(h, w, kh, kw, sh, sw, pads, dh, dw, oh, ow)}", None)
            return None
        padded = (cin // g) * (h + sum(pads[0])) * (w + sum(pads[1]))
        if padded > MAX_ELEMENTS:  # the zero-bordered copy of a group's input planes
            error(f"{layer.where()}: the padded input of a group has {padded:,} elements; at most "
                  f"{MAX_ELEMENTS:,}", "padding")
            return None
        layer.derived.update(pad_top=pads[0][0], pad_left=pads[1][0], pads=pads)
        return (o["out_channels"], oh, ow)

    @staticmethod
    def _too_small(h, w, kh, kw, sh, sw, pads, dh, dw, oh, ow) -> str:
        plain = pads == ((0, 0), (0, 0)) and (sh, sw, dh, dw) == (1, 1, 1, 1)
        if plain:
            which = f"1+{h}-{kh} = {oh}" if oh <= 0 else f"1+{w}-{kw} = {ow}"
            return f"input {h}x{w} is smaller than kernel {kh}x{kw} ({which})"
        if oh <= 0:
            n, k, s, p, d, out, dim = h, kh, sh, sum(pads[0]), dh, oh, "height"
        else:
            n, k, s, p, d, out, dim = w, kw, sw, sum(pads[1]), dw, ow, "width"
        return (f"input {h}x{w} is too small for kernel {kh}x{kw}: output {dim} "
                f"floor(({n} + {p} - {d}*({k}-1) - 1)/{s}) + 1 = {out}")

    def param_shapes(self, layer: Layer) -> dict[str, Shape]:
        o = layer.opts
        cout, cin = o["out_channels"], layer.in_shape[0]
        shapes = {"weight": (cout, cin // o["groups"], *o["kernel_size"])}
        if o["bias"]:
            shapes["bias"] = (cout,)
        return shapes

    def macs(self, layer: Layer) -> int:
        kh, kw = layer.opts["kernel_size"]
        return layer.out_size * (layer.in_shape[0] // layer.opts["groups"]) * kh * kw

    def kernel_paths(self):
        return CONV_PATHS

    def render_context(self, layer: Layer) -> dict:
        choice = self.kernel_choice(layer)
        return dict(choice.path.context(layer), PATH=choice.path.name, TEMPLATE=choice.path.template)

    def scratch(self, layer: Layer) -> int:
        c = self.render_context(layer)
        return c["SCRATCH"]

    def chunk_accum(self, layer: Layer) -> int:
        """The Winograd weight gradient's M[16][CINP][COUTP], summed over a chunk's samples."""
        if self.kernel_choice(layer).path.name not in WINOGRAD_DW_PATHS:
            return 0
        cin, (cout, oh, ow) = layer.in_shape[0], layer.out_shape
        return 16 * winograd_dw_blocking(cin, cout, oh, ow)["DW_MPS"]

    def applies_relu(self, layer: Layer) -> bool:
        return True

    def folds_eval_affine(self, layer: Layer) -> bool:
        return self.kernel_choice(layer).evaluates.folds_bn

    def eval_render_context(self, layer: Layer) -> dict | None:
        path = self.kernel_choice(layer).eval_path
        return path and dict(path.context(layer), PATH=path.name, TEMPLATE=path.template)

    def cache_shapes(self, layer: Layer) -> dict[str, Shape]:
        path = self.kernel_choice(layer).path.name
        if path not in WINOGRAD_PATHS:
            return {}
        cin, (cout, oh, ow) = layer.in_shape[0], layer.out_shape
        # the weights the transformed ones were made from, and the transformed weights
        shapes = {"wino_src": (cout * cin * 9,), "wino_u": (16 * winograd_blocking(cin, cout, oh, ow, layer.in_shape[2])["WG_UPS"],)}
        if path in WINOGRAD_DX_PATHS:  # and the transformed flipped ones of the input gradient
            shapes["wino_ut"] = (16 * winograd_blocking(cout, cin, *layer.in_shape[1:], ow)["WG_UPS"],)
        return shapes

    def torch_module(self, layer: Layer):
        import torch.nn as nn

        o = layer.opts
        pads = layer.derived["pads"]
        symmetric = pads[0][0] == pads[0][1] and pads[1][0] == pads[1][1]
        args = (layer.in_shape[0], o["out_channels"], o["kernel_size"])
        kw = dict(stride=o["stride"], dilation=o["dilation"], groups=o["groups"], bias=o["bias"])
        if symmetric or o["padding"] == "same":
            return nn.Conv2d(*args, padding=(pads[0][0], pads[1][0]) if symmetric else "same", **kw)
        from ..torchref import PaddedConv2d

        return PaddedConv2d(*args, pads=pads, **kw)


GATHER_MAX_VECTORS = 1024  # pixel vectors of a gathered im2col (its tables: 17 ints each)


def _largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# ---- kernel paths ----------------------------------------------------------------------
# Each path is a row of CONV_PATHS: applies(layer), cost(layer) (vector operations per sample,
# forward and backward, one unit for every path), its render context and its template.  The
# plan runs the cheapest that applies (the first of equal costs) unless one is forced
# (check.force_kernels); `netc report --kernels` shows the choice.

def _sizes(layer: Layer) -> tuple[int, int, int, int]:
    """(groups, M channels per group, K taps per group, N output pixels)"""
    o = layer.opts
    g = o["groups"]
    kh, kw = o["kernel_size"]
    return g, layer.out_shape[0] // g, layer.in_shape[0] // g * kh * kw, layer.out_shape[1] * layer.out_shape[2]


def _gather(layer: Layer) -> tuple[list, list] | None:
    o = layer.opts
    (pt, pb), (pl, pr) = layer.derived["pads"]
    g, m, k, n = _sizes(layer)
    np_ = conv_gemm_blocking(m, k, n)["NP"]
    return pixel_gather(layer.out_shape[1], layer.out_shape[2], o["stride"][0], o["stride"][1],
                        layer.in_shape[2] + pl + pr, np_)


# What a GEMM path spends on each group in each pass beyond its FMAs, loads and copies (the
# group's im2col and GEMM set-up), in the same units: mobilenetv2_cifar's layers.13.conv2 (576
# groups of one channel, 3x3, stride 2, 8x8 -> 4x4) took 75.8 us forward on the im2col path,
# where 51,840 operations and 576 groups at this cost make 363,000 at the 0.54 cycles an
# operation of resnet8's stack3.conv1 (one group, the same path: 19.2 us).
GROUP_COST = 540


def _gemm_forward(layer: Layer, loads: int, copies: bool) -> float:
    """FMAs of the per-group GEMM, plus `loads` operations per tap and vector of pixels for
    every block of channels (a load from an im2col buffer or the input planes 1, a gather of
    two loads and a shuffle 2), plus half a cycle per tap copied into an im2col buffer, plus
    GROUP_COST a group."""
    VEC = current().vec
    g, m, k, n = _sizes(layer)
    blocks = -(-m // _largest_divisor(m, 8))
    return g * k * -(-n // VEC) * (m + loads * blocks) + (g * k * n / 2 if copies else 0) + g * GROUP_COST


def _gemm_dw(layer: Layer) -> float:
    """The GEMM paths' weight gradient over rows of taps (copied: im2row)."""
    VEC = current().vec
    g, m, k, n = _sizes(layer)
    return g * n * -(-k // VEC) * (m + 1) + g * k * n / 2 + g * GROUP_COST


def _gemm_din(layer: Layer) -> float:
    """The GEMM paths' input gradient: its GEMM and its col2im (none without an input gradient)."""
    VEC = current().vec
    g, m, k, n = _sizes(layer)
    return g * k * -(-n // VEC) * (m + 1) + g * k * n / VEC + g * GROUP_COST if layer.grad_input else 0


def _gemm_backward(layer: Layer) -> float:
    """The GEMM paths' backward: the weight gradient, the input gradient."""
    return _gemm_dw(layer) + _gemm_din(layer)


def _is_winograd_shape(layer: Layer) -> bool:
    VEC = current().vec
    o = layer.opts
    return ((o["kernel_size"], o["stride"], o["dilation"], o["groups"]) == ((3, 3), (1, 1), (1, 1), 1)
            and layer.in_shape[0] >= VEC and layer.out_shape[0] >= VEC)


def _winograd_factor(oh: int, ow: int) -> float:
    """Winograd F(2x2, 3x3) over a direct 3x3 convolution with an oh x ow output: the multiplies
    it keeps (16 per 2x2 tile instead of 36), over 3/4 for its transforms."""
    return 16 * -(-oh // 2) * -(-ow // 2) / (0.75 * 9 * oh * ow)


def _winograd_forward(layer: Layer) -> float:
    """The direct forward it replaces, times _winograd_factor."""
    direct = _gemm_forward(layer, 2, False) if _gather(layer) else _gemm_forward(layer, 1, True)
    return direct * _winograd_factor(*layer.out_shape[1:])


# samples a chunk is taken to hold, for costs paid once a chunk (a batch of 64 on 2 threads)
CHUNK_SAMPLES = 32


def _winograd_dw(layer: Layer) -> float:
    """The Winograd weight gradient of one sample (winograd_dw_blocking): the 16 GEMMs over the
    tiles (FMAs and vector loads, and their sums' loads), the two transforms into them and their
    copies to channels last; once a chunk (CHUNK_SAMPLES), the sums zeroed and G^T m G of every
    kernel added into dW one weight at a time."""
    VEC = current().vec
    (cin, h, w), (cout, oh, ow) = layer.in_shape, layer.out_shape
    b = winograd_dw_blocking(cin, cout, oh, ow)
    cinp, coutp, t, ib, cb = b["DW_CINP"], b["DW_COUTP"], b["DW_T"], b["DW_IB"], b["DW_CB"]
    gemm = 16 * (cinp // ib) * (coutp // (cb * VEC)) * (t * (ib * cb + cb) + 2 * ib * cb)
    transforms = 3 * 16 * t * (cinp + coutp) / VEC + (cin * h * w + cout * oh * ow) / VEC * 2
    per_chunk = 16 * cinp * coutp / VEC + cin * coutp / VEC * 40 + 9 * cin * cout
    return gemm + transforms + per_chunk / CHUNK_SAMPLES


def _winograd_cost(layer: Layer) -> float:
    """The Winograd forward; the GEMM backward."""
    return _winograd_forward(layer) + _gemm_backward(layer)


def _winograd_dw_cost(layer: Layer) -> float:
    """The Winograd forward and weight gradient; the GEMM input gradient."""
    return _winograd_forward(layer) + _winograd_dw(layer) + _gemm_din(layer)


def _is_winograd_dx(layer: Layer) -> bool:
    """The input gradient of a 3x3 stride-1 convolution with padding 1 on every side is a 3x3
    stride-1 convolution with padding 1 of the output gradient (same size as the input)."""
    return _is_winograd_shape(layer) and layer.grad_input and layer.derived["pads"] == ((1, 1), (1, 1))


def _winograd_din(layer: Layer) -> float:
    """The Winograd input gradient: the input gradient's GEMM (its FMAs and loads, no col2im)
    times _winograd_factor."""
    VEC = current().vec
    g, m, k, n = _sizes(layer)
    return g * k * -(-n // VEC) * (m + 1) * _winograd_factor(*layer.in_shape[1:])


def _winograd_dx_cost(layer: Layer) -> float:
    """The Winograd forward and input gradient; the GEMM weight gradient."""
    return _winograd_forward(layer) + _gemm_dw(layer) + _winograd_din(layer)


def _winograd_dw_dx_cost(layer: Layer) -> float:
    """The Winograd forward, weight gradient and input gradient."""
    return _winograd_forward(layer) + _winograd_dw(layer) + _winograd_din(layer)


def _is_pointwise(layer: Layer) -> bool:
    VEC = current().vec
    o = layer.opts
    return ((o["kernel_size"], o["stride"], o["dilation"], o["groups"]) == ((1, 1), (1, 1), (1, 1), 1)
            and layer.derived["pads"] == ((0, 0), (0, 0)) and layer.out_shape[1] * layer.out_shape[2] >= VEC)


def _pointwise_cost(layer: Layer) -> float:
    """Forward, input gradient and weight gradient: each a GEMM of vector loads from the planes."""
    fwd = _gemm_forward(layer, 1, False)
    return fwd * (3 if layer.grad_input else 2)


def _is_depthwise(layer: Layer) -> bool:
    o = layer.opts
    c = layer.in_shape[0]
    return (o["groups"] == c == layer.out_shape[0] and o["kernel_size"] == (3, 3) and o["dilation"] == (1, 1)
            and o["stride"] in ((1, 1), (2, 2)) and layer.derived["pads"] == ((1, 1), (1, 1)))


def _depthwise_flat(layer: Layer) -> int:
    """Outputs the depthwise forward computes as one run of vectors across rows of the bordered
    plane (output (oy, ox) at oy WP + ox, its taps at the same offset in xp, the 2 pixels after
    each row unused): stride 1 with rows that are not whole vectors (8x8, 4x4, 28x28 planes);
    0 for the others, which run row by row."""
    _, oh, ow = layer.out_shape
    return (oh - 1) * (layer.in_shape[2] + 2) + ow if layer.opts["stride"] == (1, 1) and ow % current().vec else 0


def _depthwise_cost(layer: Layer) -> float:
    """Per channel and vector of output pixels, 9 FMAs fed by vector loads (stride 2: gathers, 2),
    for the forward (stride 1 with rows that are not whole vectors: vectors across rows of the
    bordered plane) and for the weight gradient; the input gradient is 9 FMAs per vector of
    input pixels over the output gradient spread onto a zero plane (stride 2: half a cycle per
    value spread); the copies into zero-bordered planes."""
    VEC = current().vec
    c, oh, ow = layer.out_shape
    h, w = layer.in_shape[1:]
    per = 1 if layer.opts["stride"] == (1, 1) else 2
    row_vectors = oh * -(-ow // VEC)
    forward_vectors = -(-_depthwise_flat(layer) // VEC) or row_vectors
    copies = c * h * -(-w // VEC)
    din = c * (h * -(-w // VEC) * 9 + (0 if per == 1 else oh * ow / 2)) + copies if layer.grad_input else 0
    return c * (forward_vectors + row_vectors) * 9 * per + copies + din


def pointwise_context(layer: Layer) -> dict:
    """1x1, stride 1, no padding, one group: out = W x over the input planes, a GEMM of
    M = out channels, K = in channels, N = pixels; no im2col, no gather.  Blocks of MB
    channels x NV vectors of pixels; the last VEC pixels are one more vector that overlaps the
    one before (N >= VEC), recomputing the same values."""
    tg = current()
    VEC = tg.vec
    cin, h, w = layer.in_shape
    cout = layer.out_shape[0]
    n = h * w
    mb = _largest_divisor(cout, tg.acc_max // 2)  # AVX-512: 12 x 2 vectors, 24 accumulators, 2 pixel vectors
    nv = 2 if n >= 2 * VEC else 1
    kb = _largest_divisor(cin, 8)  # input-gradient tiles: KB channels x NV vectors
    # weight gradient: DMB x DKB lane sums, the tile with the fewest loads per FMA (DMB + DKB per
    # DMB x DKB) among those that fit the registers (DMB x DKB accumulators, DMB output-gradient
    # vectors, one input vector: at most tile_regs)
    dmb, dkb = max(((a, b) for a in range(1, 9) for b in range(1, 9)
                    if cout % a == 0 and cin % b == 0 and a * b + a + 1 <= tg.tile_regs and a * b <= tg.acc_max),
                   key=lambda t: (t[0] * t[1] / (t[0] + t[1]), t[0] * t[1]))
    return dict(CIN=cin, COUT=cout, N=n, MB=mb, NV=nv, NB=nv * VEC, N_MAIN=n - n % (nv * VEC),
                N_VEC=n - n % VEC, N_LAST=n - VEC, N_REM=n % VEC, N_DONE=(VEC - n % VEC) % VEC, KB=kb, DMB=dmb, DKB=dkb, DW_ACC=_round_up(dmb * dkb, VEC),
                DW_SUMS=list(range(0, dmb * dkb, VEC)),
                bias=layer.opts["bias"], SCRATCH=0, VEC=VEC)


# the most floats of bordered input planes the depthwise kernels fill at a time (16 KiB of float32)
DEPTHWISE_PAD_FLOATS = 4096


def depthwise_context(layer: Layer) -> dict:
    """groups = in = out channels, 3x3, stride 1 or 2, padding 1: per channel, direct loops
    over vectors of output pixels of a zero-bordered copy of the input plane (xp, HP x WP);
    stride 2 gathers the even lanes of two vectors.  The input gradient correlates the
    output gradient, spread onto a zero plane dz (dz[S oy + 1][S ox + 1] = d[oy][ox], HP x WP),
    with the flipped kernel, one vector of input pixels at a time."""
    VEC = current().vec
    c, h, w = layer.in_shape
    _, oh, ow = layer.out_shape
    s = layer.opts["stride"][0]
    hp, wp = h + 2, w + 2
    # loads reach up to 2 VEC reals past the last pixel a vector starts at: slack after each plane
    plane = _round_up(hp * wp + 2 * VEC + 2, VEC)
    prefix = f"{layer.cname.upper()}_SCRATCH_"
    # flat (_depthwise_flat): the forward computes rows of WP pixels into yp, then copies the
    # rows out: (OH - 1) WP + OW outputs in whole vectors instead of OH whole and partial ones
    flat_n = _depthwise_flat(layer)
    flat = flat_n > 0
    # forward and backward copy the rows of CB input planes (and the backward the output
    # gradients of CB channels) into their bordered planes before they read any: vector loads
    # right after the small stores that wrote their lanes would wait for them (no store
    # forwarding across stores); the borders are zeroed once a call
    cb = _largest_divisor(c, max(1, DEPTHWISE_PAD_FLOATS // plane))
    planes = f"[{hp}][{wp}] + slack" if cb == 1 else f"[{cb}][{plane}]: {cb} planes [{hp}][{wp}] + slack"
    regions = {"XPAD": (0, f"xp {planes}")}
    if layer.grad_input:  # and the output gradients of CB planes spread onto zero planes
        regions["DZ"] = (cb * plane, f"dz {planes}")
    end = cb * plane * (2 if layer.grad_input else 1)
    if flat:
        regions["YPAD"] = (end, f"yp [{oh}][{wp}] rounded up to whole vectors")
        end += _round_up(flat_n, VEC)
    return dict(C=c, H=h, W=w, OH=oh, OW=ow, S=s, HP=hp, WP=wp, PLANE=plane, IN_PLANE=h * w, OUT_PLANE=oh * ow,
                FLAT=flat, FLAT_N=_round_up(flat_n, VEC), CB=cb,
                ROW_STEP=s * wp, OW_FULL=ow - ow % VEC, OW_REM=ow % VEC, OW_FULL_IN=s * (ow - ow % VEC),
                W_FULL=w - w % VEC, W_REM=w % VEC,
                bias=layer.opts["bias"], VEC=VEC, EVEN=list(range(0, 2 * VEC, 2)),
                # the weight gradient's 9 tap sums, in whole vectors of accumulators
                TAP_ACC=_round_up(9, VEC), TAP_SUMS=list(range(0, 9, VEC)),
                SCR={k: prefix + k for k in regions},
                SCRATCH_DEFS=[(prefix + k, off, shape) for k, (off, shape) in regions.items()],
                SCRATCH=end)


WINOGRAD_NEEDS = "3x3, stride 1, no dilation, one group, at least {vec} channels in and out"
WINOGRAD_DX_NEEDS = ("3x3, stride 1, padding 1, no dilation, one group, at least {vec} channels in and out, "
                     "an input gradient")


def _gemm_paths_context(path: str):
    return lambda layer: gemm_context(layer, path)


CONV_PATHS = (
    KernelPath("pointwise", "GEMM over the input planes", "GEMMs over the planes (dW: lane sums)",
               "conv2d_pointwise.c.j2", _is_pointwise, _pointwise_cost, pointwise_context,
               needs="1x1, stride 1, no padding, no dilation, one group, at least {vec} output pixels", folds_bn=True,
               eval_first=True),
    KernelPath("depthwise", "direct 3x3 per channel over vectors of pixels", "direct per channel",
               "conv2d_depthwise.c.j2", _is_depthwise, _depthwise_cost, depthwise_context,
               needs="groups = in_channels = out_channels, 3x3, stride 1 or 2, padding 1, no dilation",
               folds_bn=True),
    KernelPath("winograd", "Winograd F(2x2, 3x3)", "GEMM (im2row dW, dcol col2im)", "conv2d_winograd.c.j2",
               _is_winograd_shape, _winograd_cost, _gemm_paths_context("winograd"), needs=WINOGRAD_NEEDS, folds_bn=True),
    KernelPath("winograd_dx", "Winograd F(2x2, 3x3)", "GEMM dW (im2row), Winograd F(2x2, 3x3) dX",
               "conv2d_winograd.c.j2", _is_winograd_dx, _winograd_dx_cost, _gemm_paths_context("winograd_dx"),
               needs=WINOGRAD_DX_NEEDS, folds_bn=True),
    KernelPath("winograd_dw", "Winograd F(2x2, 3x3)", "Winograd F(2x2, 3x3) dW, GEMM dX (col2im)",
               "conv2d_winograd.c.j2", _is_winograd_shape, _winograd_dw_cost, _gemm_paths_context("winograd_dw"),
               needs=WINOGRAD_NEEDS, folds_bn=True),
    KernelPath("winograd_dw_dx", "Winograd F(2x2, 3x3)", "Winograd F(2x2, 3x3) dW and dX",
               "conv2d_winograd.c.j2", _is_winograd_dx, _winograd_dw_dx_cost, _gemm_paths_context("winograd_dw_dx"),
               needs=WINOGRAD_DX_NEEDS, folds_bn=True),
    KernelPath("gather", "GEMM over gathered pixel vectors (im2col on the fly)", "GEMM",
               "conv2d_gemm.c.j2", lambda layer: _gather(layer) is not None,
               lambda layer: _gemm_forward(layer, 2, False) + _gemm_backward(layer),
               _gemm_paths_context("gather"),
               needs="the taps of every {vec} output pixels within {vec2} reals of an input row, at most 1024 "
                     "vectors of pixels"),
    KernelPath("im2col", "GEMM over an im2col buffer", "GEMM", "conv2d_gemm.c.j2", lambda layer: True,
               lambda layer: _gemm_forward(layer, 1, True) + _gemm_backward(layer),
               _gemm_paths_context("im2col")),
)


# the paths with a Winograd forward (and its cache); those with a Winograd input gradient (and the
# flipped kernels' transforms in the cache); those with a Winograd weight gradient
WINOGRAD_PATHS = ("winograd", "winograd_dx", "winograd_dw", "winograd_dw_dx")
WINOGRAD_DX_PATHS = ("winograd_dx", "winograd_dw_dx")
WINOGRAD_DW_PATHS = ("winograd_dw", "winograd_dw_dx")


def gemm_context(layer: Layer, path: str) -> dict:
    """The render context of the GEMM paths: im2col, gather (pixel_gather, with dot_tail),
    winograd (its forward; its backward is the GEMM one), winograd_dx (winograd's, with the
    input gradient as a Winograd convolution too: WGX, the sizes of that convolution),
    winograd_dw (winograd's, with the weight gradient as Winograd's transposed: DW_*, DWY the
    output gradient's copy to channels last) and winograd_dw_dx (both)."""
    tg = current()
    VEC = tg.vec
    o, d = layer.opts, layer.derived
    cin, h, w = layer.in_shape
    cout, oh, ow = layer.out_shape
    g = o["groups"]
    kh, kw = o["kernel_size"]
    gemm = conv_gemm_blocking(cout // g, (cin // g) * kh * kw, oh * ow)
    # stride 1 and no dilation: col2im sums whole vectors of an input row at a time, with
    # loads that reach up to KW + VEC - 1 reals either side of a dcol row (masked lanes)
    row_col2im = (o["stride"], o["dilation"]) == ((1, 1), (1, 1))
    if row_col2im:
        gemm["DPAD_OFF"] = _round_up(gemm["DPAD_OFF"] + kw + VEC, VEC)
        gemm["SCRATCH"] = gemm["DPAD_OFF"] + (gemm["SCRATCH"] - gemm["DCOL_OFF"] - gemm["K"] * gemm["NP"])
    (pt, pb), (pl, pr) = d["pads"]
    hp, wp = h + pt + pb, w + pl + pr
    # a zero-bordered copy of the input for the GEMMs that read taps (the forward's and the weight
    # gradient's; Winograd's transforms make their own borders)
    padded = (pt, pb, pl, pr) != (0, 0, 0, 0) and path not in WINOGRAD_DW_PATHS
    # the padded copy of a group's input planes follows the GEMM scratch
    xpad_off = _round_up(gemm.pop("SCRATCH"), VEC)
    scratch = xpad_off + ((cin // g) * hp * wp if padded else 0)
    wino = winograd_blocking(cin, cout, oh, ow, w) if path in WINOGRAD_PATHS else {}
    if wino:
        scratch = max(scratch, wino["WG_SCRATCH"])
    # winograd_dx: dX = the correlation of dY, with a zero border of 2 - pad = 1, with the
    # kernels flipped and in and out channels swapped; after the weight gradient, in the same scratch
    wgx = {}
    if path in WINOGRAD_DX_PATHS:
        wgx = dict(CIN=cout, COUT=cin, H=oh, W=ow, OH=h, OW=w, PT=2 - d["pads"][0][0], PL=2 - d["pads"][1][0],
                   bias=False, VEC=VEC, **winograd_blocking(cout, cin, h, w, ow))
        scratch = max(scratch, wgx["WG_SCRATCH"])
    # winograd_dw: dW from the forward's V and the output gradient's tiles, in the same scratch
    wdw = winograd_dw_blocking(cin, cout, oh, ow) if path in WINOGRAD_DW_PATHS else {}
    if wdw:
        wdw["DWY"] = dict(CIN=cout, H=oh, W=ow, PT=0, PL=0, WG_HT=2 * wino["WG_TH"], WG_WT=2 * wino["WG_TW"],
                          WG_CINP=wdw["DW_COUTP"], WG_IN_WFULL=ow - ow % VEC, WG_CIN_FULL=cout - cout % VEC, VEC=VEC)
        wdw["DW_V_OFF"] = 0
        wdw["DW_D_OFF"] = 16 * wino["WG_VPS"]
        wdw["DW_R_OFF"] = wdw["DW_D_OFF"] + 16 * wdw["DW_DPS"]  # xt, then dyt (M is the chunk's sums)
        wdw["DW_COUT_FULL"] = cout - cout % VEC
        scratch = max(scratch, wdw["DW_R_OFF"] + max(wino["WG_HT"] * wino["WG_WT"] * wino["WG_CINP"],
                                                     4 * wino["WG_TH"] * wino["WG_TW"] * wdw["DW_COUTP"]))
    gather = _gather(layer) if path == "gather" else None
    if gather and gemm["NV"] == 1:
        # every gathered vector of pixels serves up to half the registers' channels (accumulators)
        gemm["MB"] = _largest_divisor(cout // g, tg.regs // 2)
    # a group's K = CIN_G x KH x KW taps, and each one's offset in the (padded) input planes
    k_all = (cin // g) * kh * kw
    taps = [(ic * hp + ky * o["dilation"][0]) * wp + kx * o["dilation"][1]
            for ic in range(cin // g) for ky in range(kh) for kx in range(kw)]
    # the weight gradient from gathered pixel vectors too (no im2row), when the lane sums it
    # then needs (one per weight) are few next to its FMAs: at least 16 vectors of pixels
    dwg = {}
    if gather and gemm["NP"] >= 16 * VEC:
        mb = _largest_divisor(cout // g, tg.regs // 4)
        # mb x kb accumulators, mb output-gradient vectors, 2 more
        kb = max(1, min(8, k_all, (tg.tile_regs - mb) // mb))
        dwg = dict(DWG_MB=mb, DWG_KB=kb, DWG_K_MAIN=k_all - k_all % kb, DWG_K_TAIL=k_all % kb, DWG_TAPS=taps)
    # im2row (stride 1, no dilation, output rows of at least VEC pixels): VEC taps x VEC pixels
    # of an output row loaded as vectors from the input rows and transposed; the taps' offsets.
    # KP is K rounded up to VEC, so the taps after K_VFULL are one vector, zero from K.
    assert gemm["KP"] == _round_up(k_all, VEC)
    im2row_vec = (not dwg and row_col2im and ow >= VEC and dict(
        ROW_TAPS=taps, OW_FULL=ow - ow % VEC, K_VFULL=k_all - k_all % VEC))
    tail = dot_tail(gemm, gather is not None)
    if tail:
        tail["TAIL_OFF"] = [tap0(p, ow, o["stride"][0], o["stride"][1], wp) for p in range(gemm["N_FULL"], oh * ow)]
    m, k, np_, kp = gemm["M"], gemm["K"], gemm["NP"], gemm["KP"]
    # the per-thread scratch regions this layer's paths use: name -> (offset, shape)
    regions = {}
    if wino:
        regions.update(_winograd_regions(wino, "", "xt"))
    elif tail:
        regions["TAIL"] = (0, f"tail rows of taps [{tail['TAIL_R']}][{tail['TAIL_KT']}]")
    elif not gather:
        regions["COL"] = (0, f"col [{kp}][{np_}]")
    if wdw:
        r = wdw["DW_R_OFF"]
        regions.update(
            DW_V=(0, f"V [16][{wino['WG_VPS']}]"), DW_D=(wdw["DW_D_OFF"], f"D [16][{wdw['DW_DPS']}]"),
            DW_XT=(r, f"xt [{wino['WG_HT']}][{wino['WG_WT']}][{wino['WG_CINP']}]"),
            DW_DYT=(r, f"dyt [{2 * wino['WG_TH']}][{2 * wino['WG_TW']}][{wdw['DW_COUTP']}]"))
    elif not dwg:
        regions["COLT"] = (0, f"colT [{gemm['N']}][{kp}]")
    if wgx:
        regions.update(_winograd_regions(wgx, "DX_", "dyt"))
    needs_din = layer.grad_input and not wgx  # the GEMM's input gradient (dcol, col2im)
    if needs_din:
        regions["DCOL"] = (gemm["DCOL_OFF"], f"dcol [{k}][{np_}]")
    if needs_din and np_ != gemm["N"]:
        regions["DPAD"] = (gemm["DPAD_OFF"], f"d [{m}][{np_}]")
    if padded:
        regions["XPAD"] = (xpad_off, f"xpad [{cin // g}][{hp}][{wp}]")
    prefix = f"{layer.cname.upper()}_SCRATCH_"
    scr = {key: prefix + key for key in regions}
    return dict(
        SCR=scr, SCRATCH_DEFS=[(prefix + key, off, shape) for key, (off, shape) in regions.items()],
        # the forward uses scratch (an im2col, a padded input, tail rows or Winograd's buffers)
        FWD_SCRATCH=bool(wino) or padded or bool(tail) or not gather,
        CIN=cin, H=h, W=w, COUT=cout, OH=oh, OW=ow,
        KH=kh, KW=kw, SH=o["stride"][0], SW=o["stride"][1],
        DH=o["dilation"][0], DW=o["dilation"][1], PT=d["pad_top"], PL=d["pad_left"],
        GROUPS=g, CIN_G=cin // g, COUT_G=cout // g, bias=o["bias"],
        PADDED=padded, HP=hp, WP=wp, XPAD_OFF=xpad_off, SCRATCH=scratch, **gemm,
        WINO=bool(wino), **wino, WINO_DX=bool(wgx), WGX=wgx, WINO_DW=bool(wdw), **wdw,
        GEMM_DIN=needs_din, ROW_COL2IM=row_col2im, W_FULL=w - w % VEC,
        GATHER=gather is not None, GATHER_START=gather and gather[0], GATHER_LANES=gather and gather[1],
        GATHER_DW=bool(dwg), **dwg, IM2ROW_VEC=bool(im2row_vec), **(im2row_vec or {}), DOT_TAIL=bool(tail), **tail,
        # a partial last block of pixels needs only this many of its vectors
        NV_TAIL=-(-(oh * ow - gemm["N_FULL"]) // VEC),
    )


# a Winograd block's V and M together (reals): a third of a 48 KB first-level data cache in
# float32, so U's planes and the rows of XT the block reads fit beside them (resnet8's 16-channel
# convolution took about 26 us per sample in blocks of 8 tiles, 29 in blocks of 16, 33 in 32)
BLOCK_REALS = 4096


def _winograd_regions(w: dict, prefix: str, xt_name: str) -> dict:
    """The scratch regions of one Winograd pipeline (winograd_blocking's sizes w): a block's V
    and M, the channels-last input (named xt_name in the C's comment) and the output tiles."""
    return {
        prefix + "V": (w["WG_V_OFF"], f"V [16][{w['WG_VPSB']}]"),
        prefix + "M": (w["WG_M_OFF"], f"M [16][{w['WG_MPSB']}]"),
        prefix + "XT": (w["WG_XT_OFF"], f"{xt_name} [{w['WG_HT']}][{w['WG_WT']}][{w['WG_CINP']}]"),
        prefix + "YT": (w["WG_YT_OFF"], f"yt [{2 * w['WG_TH']}][{2 * w['WG_TW']}][{w['WG_COUTP']}]"),
    }


def winograd_blocking(cin: int, cout: int, oh: int, ow: int, w: int) -> dict:
    """Sizes of the Winograd F(2x2, 3x3) forward of one sample (input w wide).

    Tiles of 2x2 output pixels (TH x TW of them, T in all) read 4x4 input patches.  The
    input, the transformed input V[16][tile][ci] and the products M[16][tile][co] keep
    channels last, padded to vectors (CINP, COUTP), so every transform and the 16 GEMMs
    M[e] = V[e] U[e] run on vectors of channels.  U[16][ci][co] are the transformed
    weights.  The GEMM accumulates TB tiles x CB vectors of output channels.  Each of the
    16 planes is one vector longer than it needs to be, so the 16 values of one tile do not
    all land in the same cache set.

    The forward (and winograd_dx's input gradient) runs blocks of BT tiles, input transform,
    GEMM and output transform one block after the other, so that a block's V and M (planes
    VPSB, MPSB) stay in the first-level cache between them: BT is the largest multiple of TB
    dividing TP whose V and M fit BLOCK_REALS (resnet8's 16-channel 32x32 convolutions, whose V
    and M of all 256 tiles are 526 KB: about 33 -> 25 us per sample in evaluation).  The weight
    gradient reads V of all the tiles at once (planes VPS, TP tiles).
    """
    tg = current()
    VEC, ACC_MAX = tg.vec, tg.acc_max
    th, tw = -(-oh // 2), -(-ow // 2)
    t = th * tw
    # the copies between the planes and channels last transpose VEC channels x VEC pixels of a row
    # at a time: the whole vectors of columns and channels
    full = dict(WG_IN_WFULL=w - w % VEC, WG_OUT_WFULL=ow - ow % VEC, WG_CIN_FULL=cin - cin % VEC,
                WG_COUT_FULL=cout - cout % VEC)
    cinp, coutp = _round_up(cin, VEC), _round_up(cout, VEC)
    cb = _largest_divisor(coutp // VEC, 4)
    tb_max = min(8, ACC_MAX // cb)
    # the fewest padded tiles among the wider blocks, then the widest block
    tb = min(range(max(1, tb_max // 2), tb_max + 1), key=lambda b: (_round_up(t, b), -b))
    tp = _round_up(t, tb)
    ht, wt = 2 * th + 2, 2 * tw + 2
    vps, ups = tp * cinp + VEC, cin * coutp + VEC
    bt = max(k * tb for k in range(1, tp // tb + 1)
             if (tp // tb) % k == 0 and (k == 1 or 16 * k * tb * (cinp + coutp) <= BLOCK_REALS))
    vpsb, mpsb = bt * cinp + VEC, bt * coutp + VEC
    # per-thread scratch: a block's V and M, the input XT, the output tiles YT
    m_off = 16 * vpsb
    xt_off = m_off + 16 * mpsb
    yt_off = xt_off + ht * wt * cinp
    return dict(**full, WG_TH=th, WG_TW=tw, WG_T=t, WG_TP=tp, WG_TB=tb, WG_CB=cb, WG_CINP=cinp, WG_COUTP=coutp,
                WG_HT=ht, WG_WT=wt, WG_VPS=vps, WG_UPS=ups, WG_BT=bt, WG_VPSB=vpsb, WG_MPSB=mpsb,
                WG_V_OFF=0, WG_M_OFF=m_off, WG_XT_OFF=xt_off, WG_YT_OFF=yt_off,
                WG_SCRATCH=yt_off + 2 * th * 2 * tw * coutp)


def winograd_dw_blocking(cin: int, cout: int, oh: int, ow: int) -> dict:
    """Sizes of the Winograd weight gradient of one sample: Winograd F(2x2, 3x3) transposed.

    The forward is Y = A^T [U . V] A per tile, U = G g G^T, so dL/dU[e][ci][co] = sum over the
    T tiles of D[e][t][co] V[e][t][ci], D = A dY A^T of the tile's 2x2 output gradient, and
    dL/dg = G^T (dL/dU) G.  V is the forward's (planes of WG_VPS); D[16][T][COUTP] and
    M[16][CINP][COUTP] keep channels last (planes DPS and MPS, a vector longer than they need,
    as the forward's), and the 16 GEMMs accumulate IB input channels x CB vectors of output
    channels over the tiles: the tile with the most FMAs per load among those that fit."""
    tg = current()
    VEC, ACC_MAX = tg.vec, tg.acc_max
    t = -(-oh // 2) * -(-ow // 2)
    cinp, coutp = _round_up(cin, VEC), _round_up(cout, VEC)
    ib, cb = max(((i, j) for i in range(1, ACC_MAX + 1) for j in range(1, 5)
                  if cinp % i == 0 and (coutp // VEC) % j == 0 and i * j <= ACC_MAX),
                 key=lambda p: (p[0] * p[1] / (p[0] + p[1]), p[0] * p[1]))
    return dict(DW_T=t, DW_CINP=cinp, DW_COUTP=coutp, DW_IB=ib, DW_CB=cb,
                DW_DPS=t * coutp + VEC, DW_MPS=cinp * coutp + VEC)


def tap0(p: int, ow: int, sh: int, sw: int, wp: int) -> int:
    """Where output pixel p reads its tap 0 in its group's (padded) input planes, WP wide."""
    return (p // ow) * sh * wp + (p % ow) * sw


def pixel_gather(oh: int, ow: int, sh: int, sw: int, wp: int, np_: int) -> tuple[list, list] | None:
    """The forward's im2col on the fly: the input taps of VEC output pixels, for one tap, as
    one shuffle of two vectors loaded from the (padded) input rows.

    Output pixel p = oy * OW + ox reads tap 0 at off(p) = tap0(p) = oy * SH * WP + ox * SW of its
    group's input planes (WP wide), and tap (ic, ky, kx) at that plus a constant.  Per vector of pixels
    from p0: start = where the 2 x VEC reals loaded begin, lanes = off(p) - start.  The pixels
    past the last real one (padding of the last block) repeat it, and the last vectors start
    early enough that no load passes the last input a real pixel reads.  None when some vector
    spans more than 2 x VEC reals (narrow output rows in wide inputs, large strides)."""
    VEC = current().vec
    n = oh * ow
    if np_ > GATHER_MAX_VECTORS * VEC:  # the tables grow with the pixels: large maps keep im2col
        return None

    def off(p: int) -> int:
        return tap0(min(p, n - 1), ow, sh, sw, wp)

    end = off(n - 1) + 1  # one past the last input tap 0 reads
    if end < 2 * VEC:
        return None
    starts, lanes = [], []
    for p0 in range(0, np_, VEC):
        start = min(off(p0), end - 2 * VEC)
        idx = [off(p0 + lane) - start for lane in range(VEC)]
        if max(idx) >= 2 * VEC:
            return None
        starts.append(start)
        lanes.append(idx)
    return starts, lanes


def dot_tail(gemm: dict, gather: bool) -> dict:
    """The last R < VEC pixels of a gathered forward as dot products over vectors of taps,
    instead of one more vector of pixels (VEC - R lanes of it padding) for every channel.

    Each of the R pixels gets a row of its K taps (an im2row of R rows, KT reals each); the
    weight rows are read as they are, so a row's last vector is the weights' last VEC reals
    and the taps row puts its last K % VEC taps in the top lanes of its last vector, zeros
    below.  OB channels x R pixels accumulate together and one vsumN reduces them.
    Taken when it costs under 70% of the vector it replaces (M x K FMAs), counting its FMAs,
    half a cycle per tap copied (lenet5's conv2: 600 taps in 0.09 us) and about 40 per
    vsum16 (15 adds, 30 shuffles; fewer for narrower vectors): few tail pixels, many channels, K >= VEC."""
    VEC = current().vec
    m, k, n, n_full = gemm["M"], gemm["K"], gemm["N"], gemm["N_FULL"]
    r = n - n_full
    if not gather or gemm["NV"] != 1 or r == 0 or k < VEC:
        return {}
    ob = _largest_divisor(m, VEC // r) if r <= VEC // 2 else 1
    kt = _round_up(k, VEC)
    cost = m * r * (kt // VEC) + r * k / 2 + 40 * -(-m // ob)
    if cost >= 0.7 * m * k:
        return {}
    return dict(TAIL_R=r, TAIL_OB=ob, TAIL_KT=kt, TAIL_KFULL=k - k % VEC, TAIL_SHIFT=(VEC - k % VEC) % VEC)


def conv_gemm_blocking(m: int, k: int, n: int) -> dict:
    """Register blocking of the per-sample GEMMs of a convolution group.

    Forward: out[m][p] = sum_k W[m][k] col[k][p] with M=m output channels, K=k taps,
    N=n output pixels.  `col` rows are padded to NP pixels (a multiple of the pixel block
    NB) and to KP rows (a multiple of the tap blocks) with zeros, so every block is full and its
    loops have literal bounds; padded results are never stored.
    - MB output channels x NB pixels are accumulated at once (at most half the vector registers).
    The backward tiles use up to ACC_MAX accumulators:
    - weight gradient: MBW channels x NVW vectors of taps, over colT (im2row: rows of KP taps).
    - input gradient: KB2 taps x NB pixels, straight from the weights (K_MAIN taps in whole
      blocks, then a tail block of K_TAIL).
    """
    tg = current()
    VEC, ACC_MAX = tg.vec, tg.acc_max
    mb = _largest_divisor(m, 8)
    nv = 2 if mb <= 8 and _round_up(n, 2 * VEC) <= 1.10 * _round_up(n, VEC) else 1
    if mb * nv > tg.regs // 2:
        nv = 1
    nb = nv * VEC
    np_ = _round_up(n, nb)
    # the fewest padded taps, then the widest tap block
    nvw = min(range(1, 5), key=lambda v: (_round_up(k, v * VEC), -v))
    mbw = _largest_divisor(m, ACC_MAX // nvw)
    kp = _round_up(k, nvw * VEC)
    # input-gradient tiles: KB2 taps x NV vectors; a divisor of K when one fills at least half
    # the accumulators, otherwise the widest block and a tail block of K % KB2 taps
    kb_max = ACC_MAX // nv
    kb2 = _largest_divisor(k, kb_max)
    if 2 * kb2 < kb_max:
        kb2 = min(kb_max, k)
    col = kp * np_
    return dict(VEC=VEC, M=m, K=k, N=n, MB=mb, NB=nb, NV=nv, NP=np_, KP=kp, MBW=mbw, NVW=nvw,
                # the full blocks of pixels (forward) and of taps (weight gradient) end at
                # N_FULL and KW_FULL; a partial last block after them is stored separately
                N_FULL=n - n % nb, KW_FULL=kp if kp == k else kp - nvw * VEC,
                KB2=kb2, K_MAIN=k - k % kb2, K_TAIL=k % kb2,
                # per-thread scratch: forward uses col (KP x NP); backward colT (N x KP) in the same
                # place, then dcol (K x NP) and the output gradient with rows padded to NP pixels
                COL_OFF=0, COLT_OFF=0, DCOL_OFF=col, DPAD_OFF=col + k * np_,
                SCRATCH=col + k * np_ + (m * np_ if np_ != n else 0))
