"""conv2d: 2-D cross-correlation, as torch.nn.Conv2d."""
from __future__ import annotations

import math

from .base import MAX_ELEMENTS, Layer, Option, Shape, WeightLayer, fmt_shape, side_pads, window_out


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

    def render_context(self, layer: Layer) -> dict:
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
        padded = (pt, pb, pl, pr) != (0, 0, 0, 0)
        # the padded copy of a group's input planes follows the GEMM scratch
        xpad_off = _round_up(gemm.pop("SCRATCH"), VEC)
        scratch = xpad_off + ((cin // g) * hp * wp if padded else 0)
        wino = winograd_blocking(cin, cout, oh, ow) if uses_winograd(layer) else {}
        if wino:
            scratch = max(scratch, wino["WG_SCRATCH"])
        gather = None if wino else pixel_gather(oh, ow, o["stride"][0], o["stride"][1], wp, gemm["NP"])
        if gather and gemm["NV"] == 1:
            # every gathered vector of pixels serves up to 16 channels (16 accumulators)
            gemm["MB"] = _largest_divisor(cout // g, 16)
        # the weight gradient from gathered pixel vectors too (no im2row), when the lane sums it
        # then needs (one per weight) are few next to its FMAs: at least 16 vectors of pixels
        dwg = {}
        if gather and gemm["NP"] >= 16 * VEC:
            k = (cin // g) * kh * kw
            mb = _largest_divisor(cout // g, 8)
            kb = max(1, min(8, k, (30 - mb) // mb))  # mb x kb accumulators, mb output-gradient vectors, 2 more
            dwg = dict(DWG_MB=mb, DWG_KB=kb, DWG_K_MAIN=k - k % kb, DWG_K_TAIL=k % kb,
                       DWG_TAPS=[(ic * hp + ky * o["dilation"][0]) * wp + kx * o["dilation"][1]
                                 for ic in range(cin // g) for ky in range(kh) for kx in range(kw)])
        tail = dot_tail(gemm, gather is not None)
        if tail:
            tail["TAIL_OFF"] = [tap0(p, ow, o["stride"][0], o["stride"][1], wp) for p in range(gemm["N_FULL"], oh * ow)]
        m, k, np_, kp = gemm["M"], gemm["K"], gemm["NP"], gemm["KP"]
        # the per-thread scratch regions this layer's paths use: name -> (offset, shape)
        regions = {}
        if wino:
            regions.update(
                V=(0, f"V [16][{wino['WG_VPS']}]"), YT=(0, f"yt [{2 * wino['WG_TH']}][{2 * wino['WG_TW']}][{wino['WG_COUTP']}]"),
                M=(wino["WG_M_OFF"], f"M [16][{wino['WG_MPS']}]"),
                XT=(wino["WG_XT_OFF"], f"xt [{wino['WG_HT']}][{wino['WG_WT']}][{wino['WG_CINP']}]"))
        elif tail:
            regions["TAIL"] = (0, f"tail rows of taps [{tail['TAIL_R']}][{tail['TAIL_KT']}]")
        elif not gather:
            regions["COL"] = (0, f"col [{kp}][{np_}]")
        if not dwg:
            regions["COLT"] = (0, f"colT [{gemm['N']}][{kp}]")
        needs_din = layer.index > 0  # a convolution is never fused; the first one reads the network input
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
            WINO=bool(wino), **wino, ROW_COL2IM=row_col2im, W_FULL=w - w % VEC,
            GATHER=gather is not None, GATHER_START=gather and gather[0], GATHER_LANES=gather and gather[1],
            GATHER_DW=bool(dwg), **dwg, DOT_TAIL=bool(tail), **tail,
            # a partial last block of pixels needs only this many of its vectors
            NV_TAIL=-(-(oh * ow - gemm["N_FULL"]) // VEC),
        )

    def scratch(self, layer: Layer) -> int:
        c = self.render_context(layer)
        return c["SCRATCH"]

    def applies_relu(self, layer: Layer) -> bool:
        return True

    def cache_shapes(self, layer: Layer) -> dict[str, Shape]:
        if not uses_winograd(layer):
            return {}
        cin, (cout, oh, ow) = layer.in_shape[0], layer.out_shape
        # the weights the transformed ones were made from, and the transformed weights
        return {"wino_src": (cout * cin * 9,), "wino_u": (16 * winograd_blocking(cin, cout, oh, ow)["WG_UPS"],)}

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


VEC = 16  # floats per AVX-512 register; blocks are multiples of it
GATHER_MAX_VECTORS = 1024  # pixel vectors of a gathered im2col (its tables: 17 ints each)
ACC_MAX = 24  # vector accumulators of a backward register tile (AVX-512 has 32 registers)


def _largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def uses_winograd(layer: Layer) -> bool:
    """The forward pass runs as Winograd F(2x2, 3x3) for 3x3 convolutions with stride 1, no
    dilation and one group, when both channel counts fill a vector and the 2x2 output tiles
    need at least a quarter fewer multiplies than the direct convolution."""
    o = layer.opts
    if (o["kernel_size"], o["stride"], o["dilation"], o["groups"]) != ((3, 3), (1, 1), (1, 1), 1):
        return False
    cout, oh, ow = layer.out_shape
    tiles = -(-oh // 2) * -(-ow // 2)
    return layer.in_shape[0] >= VEC and cout >= VEC and 16 * tiles <= 0.75 * 9 * oh * ow


def winograd_blocking(cin: int, cout: int, oh: int, ow: int) -> dict:
    """Sizes of the Winograd F(2x2, 3x3) forward of one sample.

    Tiles of 2x2 output pixels (TH x TW of them, T in all) read 4x4 input patches.  The
    input, the transformed input V[16][tile][ci] and the products M[16][tile][co] keep
    channels last, padded to vectors (CINP, COUTP), so every transform and the 16 GEMMs
    M[e] = V[e] U[e] run on vectors of channels.  U[16][ci][co] are the transformed
    weights.  The GEMM accumulates TB tiles x CB vectors of output channels.  Each of the
    16 planes is one vector longer than it needs to be, so the 16 values of one tile do not
    all land in the same cache set.
    """
    th, tw = -(-oh // 2), -(-ow // 2)
    t = th * tw
    cinp, coutp = _round_up(cin, VEC), _round_up(cout, VEC)
    cb = _largest_divisor(coutp // VEC, 4)
    tb_max = min(8, ACC_MAX // cb)
    # the fewest padded tiles among the wider blocks, then the widest block
    tb = min(range(max(1, tb_max // 2), tb_max + 1), key=lambda b: (_round_up(t, b), -b))
    tp = _round_up(t, tb)
    ht, wt = 2 * th + 2, 2 * tw + 2
    vps, mps, ups = tp * cinp + VEC, tp * coutp + VEC, cin * coutp + VEC
    # per-thread scratch: V, later the output tiles YT; then M, before it the input XT
    a = max(16 * vps, 2 * th * 2 * tw * coutp)
    b = max(16 * mps, ht * wt * cinp)
    return dict(WG_TH=th, WG_TW=tw, WG_T=t, WG_TP=tp, WG_TB=tb, WG_CB=cb, WG_CINP=cinp, WG_COUTP=coutp,
                WG_HT=ht, WG_WT=wt, WG_VPS=vps, WG_MPS=mps, WG_UPS=ups,
                WG_V_OFF=0, WG_YT_OFF=0, WG_M_OFF=a, WG_XT_OFF=a, WG_SCRATCH=a + b)


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
    below.  OB channels x R pixels accumulate together and one vsum16 reduces them.
    Taken when it costs under 70% of the vector it replaces (M x K FMAs), counting its FMAs,
    half a cycle per tap copied (lenet5's conv2: 600 taps in 0.09 us) and about 40 per
    vsum16 (15 adds, 30 shuffles): few tail pixels, many channels, K >= VEC."""
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
    - MB output channels x NB pixels are accumulated at once (<= 16 vector registers).
    The backward tiles use up to ACC_MAX accumulators:
    - weight gradient: MBW channels x NVW vectors of taps, over colT (im2row: rows of KP taps).
    - input gradient: KB2 taps x NB pixels, straight from the weights (K_MAIN taps in whole
      blocks, then a tail block of K_TAIL).
    """
    mb = _largest_divisor(m, 8)
    nv = 2 if mb <= 8 and _round_up(n, 2 * VEC) <= 1.10 * _round_up(n, VEC) else 1
    if mb * nv > 16:
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
