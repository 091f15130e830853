"""The integer arithmetic of the int8 export in numpy, for a batch: the C's reference.

    y_q = run(qnet, x_q)          # int8 (N, *input) -> int8 (N, outputs)

Each function mirrors one kernel of templates/export/steps_int8.c.j2 (see quant.py for the
arithmetic).  Sums of int8 products are computed with float64 matrix products, exact
while they stay below 2^53.
"""
from __future__ import annotations

import numpy as np

from .quant import QNet, QStep


def requant(acc: np.ndarray, mult: np.ndarray, shift: np.ndarray, zero: int, lo: int) -> np.ndarray:
    """clamp(floor((acc * m + 2^(n-1)) / 2^n) + zero, lo, 127); m, n per channel (axis 1)."""
    shape = (1, -1) + (1,) * (acc.ndim - 2)
    m = mult.astype(np.int64).reshape(shape)
    n = shift.astype(np.int64).reshape(shape)
    p = acc.astype(np.int64) * m + (np.int64(1) << (n - 1))
    return np.clip((p >> n) + zero, lo, 127)


def _lut(v: np.ndarray, lut: np.ndarray | None) -> np.ndarray:
    if lut is None:
        return v
    idx = v.astype(np.int64) + 128
    if lut.shape[0] == 1:
        return lut[0][idx].astype(np.int64)
    c = np.arange(lut.shape[0]).reshape((1, -1) + (1,) * (v.ndim - 2))
    return lut[c, idx].astype(np.int64)


def _conv(qs: QStep, x: np.ndarray) -> np.ndarray:
    c = qs.step.c
    n = len(x)
    xp = np.full((n, c["CIN"], c["HP"], c["WP"]), qs.x.zero, np.float64)
    xp[:, :, c["PT"]:c["PT"] + c["H"], c["PL"]:c["PL"] + c["W"]] = x
    w = qs.weight.astype(np.float64).reshape(c["COUT"], c["CIN_G"], c["KH"], c["KW"])
    acc = np.zeros((n, c["COUT"], c["OH"], c["OW"]), np.float64)
    cig, cog = c["CIN_G"], c["COUT_G"]
    for g in range(c["GROUPS"]):
        for ky in range(c["KH"]):
            for kx in range(c["KW"]):
                y0, x0 = ky * c["DH"], kx * c["DW"]
                xs = xp[:, g * cig:(g + 1) * cig, y0:y0 + c["SH"] * (c["OH"] - 1) + 1:c["SH"],
                        x0:x0 + c["SW"] * (c["OW"] - 1) + 1:c["SW"]]
                acc[:, g * cog:(g + 1) * cog] += np.einsum("nchw,oc->nohw", xs, w[g * cog:(g + 1) * cog, :, ky, kx])
    acc = acc.astype(np.int64) + qs.bias.astype(np.int64).reshape(1, -1, 1, 1)
    v = requant(acc, qs.mult, qs.shift, qs.a.zero, qs.a.zero if qs.relu_clamp else -128)
    if not c["POOL"]:
        return _lut(v, qs.post_lut)
    v = _lut(v, qs.pre_lut)
    ph, pw = c["PKH"], c["PKW"]
    poh, pow_ = c["POH"], c["POW"]
    full = np.full((n, c["COUT"], poh * ph, pow_ * pw), -128, np.int64)  # cut windows: -128 never wins
    full[:, :, :c["OH"], :c["OW"]] = v
    pooled = full.reshape(n, c["COUT"], poh, ph, pow_, pw).max(axis=(3, 5))
    return _lut(pooled, qs.post_lut)


def _linear(qs: QStep, x: np.ndarray) -> np.ndarray:
    acc = (x.reshape(len(x), -1).astype(np.float64) @ qs.weight.astype(np.float64).T).astype(np.int64)
    acc += qs.bias.astype(np.int64)
    v = requant(acc, qs.mult, qs.shift, qs.a.zero, qs.a.zero if qs.relu_clamp else -128)
    return _lut(v, qs.post_lut)


def _windows(c: dict, n: int, x: np.ndarray, fill: int):
    """x padded with `fill` far enough for every window, and the (ky, kx) slices of it."""
    ph, pw = c["PH"], c["PW"]
    need_h = (c["OH"] - 1) * c["SH"] + (c["KH"] - 1) * c.get("DH", 1) + 1
    need_w = (c["OW"] - 1) * c["SW"] + (c["KW"] - 1) * c.get("DW", 1) + 1
    hp, wp = max(need_h, ph + c["H"]), max(need_w, pw + c["W"])
    xp = np.full((n, c["C"], hp, wp), fill, np.int64)
    xp[:, :, ph:ph + c["H"], pw:pw + c["W"]] = x
    for ky in range(c["KH"]):
        for kx in range(c["KW"]):
            y0, x0 = ky * c.get("DH", 1), kx * c.get("DW", 1)
            yield ky, kx, xp[:, :, y0:y0 + c["SH"] * (c["OH"] - 1) + 1:c["SH"], x0:x0 + c["SW"] * (c["OW"] - 1) + 1:c["SW"]]


def _maxpool(qs: QStep, x: np.ndarray) -> np.ndarray:
    c = qs.step.c
    m = np.full((len(x), c["C"], c["OH"], c["OW"]), -128, np.int64)  # padding never wins
    for _, _, xs in _windows(c, len(x), x.astype(np.int64), -128):
        m = np.maximum(m, xs)
    return _lut(m, qs.post_lut)


def _avgpool(qs: QStep, x: np.ndarray) -> np.ndarray:
    c = qs.step.c
    s = np.zeros((len(x), c["C"], c["OH"], c["OW"]), np.int64)
    for _, _, xs in _windows(c, len(x), x.astype(np.int64) - qs.x.zero, 0):
        s += xs
    # the divisor, as PyTorch (and the float C) count it
    oy, ox = np.arange(c["OH"]), np.arange(c["OW"])
    y0, x0 = oy * c["SH"] - c["PH"], ox * c["SW"] - c["PW"]
    y1, x1 = np.minimum(y0 + c["KH"], c["H_END"]), np.minimum(x0 + c["KW"], c["W_END"])
    if c["count_include_pad"]:
        count = np.outer(y1 - y0, x1 - x0)
    else:
        count = np.outer(np.minimum(y1, c["H"]) - np.maximum(y0, 0), np.minimum(x1, c["W"]) - np.maximum(x0, 0))
    return _lut(np.clip(_mean(s, count) + qs.x.zero, -128, 127), qs.post_lut)


def _elementwise(qs: QStep, x: np.ndarray) -> np.ndarray:
    shape = (len(x), *qs.step.in_shape)
    v = x.reshape(shape).astype(np.int64)
    if len(shape) != 4:  # features as channels (batchnorm1d's table per feature)
        v = v.reshape(len(x), qs.step.c["C"], -1)
    return _lut(v, qs.post_lut)


def rescale(v: np.ndarray, m: int, n: int) -> np.ndarray:
    """floor((v * m + 2^(n-1)) / 2^n): v times m 2^-n, rounded half up, not clamped."""
    return (v.astype(np.int64) * np.int64(m) + (np.int64(1) << np.int64(n - 1))) >> np.int64(n)


def _add(qs: QStep, *xs: np.ndarray) -> np.ndarray:
    acc = np.full(xs[0].shape, qs.a.zero, np.int64)
    for x, p, m, n in zip(xs, qs.ins, qs.in_mult, qs.in_shift):
        acc += rescale(x.astype(np.int64) - p.zero, m, n)
    v = np.clip(acc, qs.a.zero if qs.relu_clamp else -128, 127)
    if v.ndim == 2:
        v = v.reshape(len(v), -1, 1)
    return _lut(v, qs.post_lut)


def _concat(qs: QStep, *xs: np.ndarray) -> np.ndarray:
    parts = []
    for x, p, m, n in zip(xs, qs.ins, qs.in_mult, qs.in_shift):
        x = x.reshape(len(x), -1).astype(np.int64)
        parts.append(x if p == qs.out else np.clip(rescale(x - p.zero, m, n) + qs.out.zero, -128, 127))
    return np.concatenate(parts, axis=1)


def _mean(s: np.ndarray, count) -> np.ndarray:
    """s / count rounded half away from zero, as C99's truncating division does it."""
    half = count // 2
    return np.where(s >= 0, (s + half) // count, -((-s + half) // count))


def _adaptive_avgpool(qs: QStep, x: np.ndarray) -> np.ndarray:
    from ..layers.adaptive_pool import adaptive_bins

    c = qs.step.c
    v = x.astype(np.int64) - qs.x.zero
    out = np.zeros((len(x), c["C"], c["OH"], c["OW"]), np.int64)
    for i, (y0, y1) in enumerate(adaptive_bins(c["H"], c["OH"])):
        for j, (x0, x1) in enumerate(adaptive_bins(c["W"], c["OW"])):
            out[:, :, i, j] = _mean(v[:, :, y0:y1, x0:x1].sum(axis=(2, 3)), (y1 - y0) * (x1 - x0))
    return _lut(np.clip(out + qs.x.zero, -128, 127), qs.post_lut)


def _upsample(qs: QStep, x: np.ndarray) -> np.ndarray:
    c = qs.step.c
    v = x.astype(np.int64).repeat(c["SH"], axis=2).repeat(c["SW"], axis=3)
    return _lut(v, qs.post_lut)


KERNELS = {"conv": _conv, "linear": _linear, "maxpool": _maxpool, "avgpool": _avgpool, "elementwise": _elementwise,
           "add": _add, "concat": _concat, "adaptive_avgpool": _adaptive_avgpool, "upsample": _upsample}


def run(qnet: QNet, x: np.ndarray) -> np.ndarray:
    """int8 inputs (N, *input shape) -> int8 outputs (N, output size)."""
    x = np.asarray(x).astype(np.int64)
    vals: dict[int, np.ndarray] = {}
    final = None
    for qs in qnet.steps:
        s = qs.step
        ins = [x if src is None else vals[id(src)] for src in s.inputs]
        shapes = [s.in_shape] * len(ins) if s.op != "concat" else [(v.size // len(v),) for v in ins]
        vals[id(s)] = v = KERNELS[s.op](qs, *[i.reshape(len(i), *sh) for i, sh in zip(ins, shapes)])
        if s.output:
            final = v
    return final.reshape(len(final), -1).astype(np.int8)


__all__ = ["KERNELS", "requant", "rescale", "run"]


def infer_float(qnet: QNet, x: np.ndarray, batch: int = 500) -> np.ndarray:
    """float32 inputs -> float32 outputs through the int8 network, as the exported NAME_infer:
    quantise the input, run the integer steps, dequantise the output."""
    from .quant import dequantize, quantize_input

    out = [dequantize(run(qnet, quantize_input(x[i:i + batch], qnet.input)), qnet.output)
           for i in range(0, len(x), batch)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


__all__ += ["infer_float"]
