"""int8 post-training static quantisation of the lowered steps (`netc export --quantize int8`).

Tensors between steps are int8 with per-tensor affine parameters, real = scale * (q - zero).
Calibration runs the float network (its PyTorch twin, evaluation mode) on the calibration
images and takes each layer output's min and max over all of them; the range is widened
to hold 0 (so zero padding is exact), scale = (max - min) / 255 and zero = round(-128 -
min / scale).

Inside a step, with x the step's int8 input (scale s_x, zero z_x):

* conv / linear: weights per output channel symmetric, w_q = round(w / s_w[c]) in
  [-127, 127], s_w[c] = max|w[c]| / 127; the accumulator is int32,
      acc = bias_q[c] + sum w_q * x_q,   bias_q[c] = round(b[c] / (s_x s_w[c])) - z_x sum w_q[c]
  (the zero point folded into the bias; padding is filled with z_x, the real 0).  It is
  requantised to the scale s_a of the layer's output by the integer multiplier m[c] and
  shift n[c] of M = s_x s_w[c] / s_a = m 2^-n (2^30 <= m < 2^31):
      q = clamp(floor((acc * m + 2^(n-1)) / 2^n) + z_a, lo, 127)
  in 64-bit arithmetic (rounding half up); lo is -128, or z_a when the only element-wise
  layer after the accumulator is a ReLU (the ReLU is then the clamp).
* any other chain of element-wise layers (activations, batch norm in evaluation mode) is
  one lookup table int8 -> int8 of 256 entries (per channel when a batch norm is in it),
  computed here in float64 from the calibrated scales at its two ends.
* max-pool: the max of int8 values (same scale); avg-pool (adaptive and global too): the
  integer mean of q - z_x over the window, rounded half away from zero, plus z_x (same
  scale); upsample copies.
* add: each input k rescaled to the output scale s_a by the integer multiplier and shift
  of M_k = s_k / s_a, q = clamp(z_a + sum_k round((q_k - z_k) M_k), lo, 127).
* concat: a part written in place inside the concat's output (memory.concat_views) is
  quantised to the concat's parameters by its producer (its last table, or its
  requantisation, targets them; a step that keeps its input's scale gets a table that only
  requantises); the parts the concat copies are rescaled as add's inputs when their
  parameters differ.

No float is used by the int8 kernels.  quant_ref.py runs the same integer arithmetic in
numpy; the C matches it bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..graph import consumers
from ..layers import INPUT, Layer
from ..layers.batchnorm import BatchNorm2d
from .lower import Step, lower

CALIBRATION_IMAGES = 1000


@dataclass(frozen=True)
class QParams:
    scale: float
    zero: int

    @staticmethod
    def from_range(lo: float, hi: float) -> "QParams":
        lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
        if hi - lo < 1e-8:
            hi = lo + 1e-8
        scale = (hi - lo) / 255.0
        return QParams(scale, int(np.clip(round(-128 - lo / scale), -128, 127)))


def multiplier(m: float) -> tuple[int, int]:
    """(m0, n) with m ~ m0 * 2^-n, 2^30 <= m0 < 2^31 and 1 <= n <= 62 (m0 = 0 for m = 0)."""
    if m <= 0:
        return 0, 1
    frac, e = math.frexp(m)
    m0, n = int(round(frac * 2 ** 31)), 31 - e
    if m0 == 2 ** 31:
        m0, n = m0 // 2, n - 1
    if n > 62:  # tiny multiplier: fewer significant bits
        m0, n = m0 >> (n - 62), 62
    if n < 1:
        raise ValueError(f"requantisation multiplier {m} too large for int8 export")
    return m0, n


@dataclass
class QStep:
    """The integer form of one lowered step."""

    step: Step
    x: QParams  # the step's input
    a: QParams  # after the accumulator (conv/linear) or = x
    out: QParams  # the step's output
    relu_clamp: bool = False  # lo = z_a
    weight: np.ndarray | None = None  # int8 [cout, k]
    bias: np.ndarray | None = None  # int32 [cout] (zero point folded in)
    mult: np.ndarray | None = None  # int32 [cout]
    shift: np.ndarray | None = None  # int [cout]
    pre_lut: np.ndarray | None = None  # int8 [channels or 1, 256]: before the max-pool
    post_lut: np.ndarray | None = None
    weight_scale: np.ndarray | None = None  # float64 [cout]: s_w per output channel
    mid: QParams | None = None  # between the pre table (or the accumulator) and the post table
    weight_dsp: np.ndarray | None = None  # int8 [cout, cin_g * words * 4]: the DSP layout (dsp_layout)
    pre_layers: list[Layer] = field(default_factory=list)
    post_layers: list[Layer] = field(default_factory=list)
    ins: list[QParams] = field(default_factory=list)  # every input's (add, concat)
    in_mult: list[int] = field(default_factory=list)  # add, concat: M_k = s_k / s_a = m 2^-n per input
    in_shift: list[int] = field(default_factory=list)
    forced: str = ""  # the concat whose scale this output takes (it is written inside that concat)


@dataclass
class QNet:
    steps: list[QStep]
    input: QParams
    output: QParams


def _chains(step: Step) -> tuple[list[Layer], list[Layer], Layer | None]:
    """The step's element-wise layers before and after its max-pool, and its accumulator's
    last layer (a batch norm folded into the conv) for conv/linear steps."""
    layers = list(step.layers)
    acc = None
    if step.op in ("conv", "linear"):
        acc = layers.pop(0)
        if step.folded is not None:
            acc = layers.pop(0)
    elif step.op != "elementwise":  # the step's own layer (a pool, add, concat, upsample)
        layers.pop(0)
    pre, post, seen_pool = [], [], False
    for layer in layers:
        if step.pool is not None and layer is step.pool:
            seen_pool = True
        elif layer.kind.kind not in ("flatten", "dropout"):
            (post if seen_pool or step.pool is None else pre).append(layer)
    assert len(pre) == len(step.pre) and len(post) == len(step.post), step.name
    return pre, post, acc


def calibrate(network, state: dict[str, np.ndarray], x: np.ndarray, batch: int = 250) -> dict[str, tuple[float, float]]:
    """min and max of the input ('' key) and of every layer's output over the images x."""
    import torch

    from ..torchref import torch_model

    model = torch_model(network, state, torch.float32).eval()
    ranges: dict[str, tuple[float, float]] = {}

    def note(key, t):
        lo, hi = float(t.min()), float(t.max())
        old = ranges.get(key)
        ranges[key] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))

    readers = consumers(network.layers)
    with torch.no_grad():
        for i in range(0, len(x), batch):
            t = torch.as_tensor(np.ascontiguousarray(x[i:i + batch], np.float32))
            note("", t)
            vals, left = {INPUT: t}, {k: len(v) for k, v in readers.items()}
            for layer in network.layers:  # the graph in schedule order; nested names for blocks
                vals[layer.output] = model.get_submodule(layer.name)(*[vals[n] for n in layer.inputs])
                note(layer.name, vals[layer.output])
                for n in layer.inputs:  # a tensor is dropped after its last reader
                    left[n] -= 1
                    if left[n] == 0:
                        del vals[n]
    return ranges


def _lut(chain: list[Layer], modules, src: QParams, dst: QParams, channels: int | None) -> np.ndarray:
    """int8 -> int8 table of the element-wise layers `chain`: [channels or 1, 256]."""
    import torch

    q = np.arange(-128, 128)
    v = (q - src.zero) * src.scale
    bns = [l for l in chain if isinstance(l.kind, BatchNorm2d)]
    per_channel = channels is not None and bool(bns)
    c = channels if per_channel else 1
    if per_channel:  # the 256 values as a batch, each channel holding all of them: (256, C[, 1, 1])
        t = torch.as_tensor(np.tile(v[:, None], (1, c)).reshape((256, c) + (1,) * (len(bns[0].in_shape) - 1)),
                            dtype=torch.float64)
    else:
        t = torch.as_tensor(v[None, :], dtype=torch.float64)
    with torch.no_grad():
        for layer in chain:
            t = modules[layer.name](t)
    y = t.numpy().reshape(256, c).T if per_channel else t.numpy().reshape(1, 256)
    return np.clip(np.round(y / dst.scale) + dst.zero, -128, 127).astype(np.int8)


def _qweights(qs: QStep, step: Step) -> None:
    cout = step.out_shape[0] if step.op == "linear" else step.c["COUT"]
    w = np.float64(step.arrays[0].values).reshape(cout, -1)
    b = np.float64(step.arrays[1].values) if len(step.arrays) > 1 else np.zeros(cout)
    sw = np.abs(w).max(axis=1) / 127.0
    sw[sw == 0] = 1.0
    wq = np.clip(np.round(w / sw[:, None]), -127, 127).astype(np.int64)
    bq = np.round(b / (qs.x.scale * sw)).astype(np.int64) - qs.x.zero * wq.sum(axis=1)
    qs.weight = wq.astype(np.int8)
    qs.weight_scale = sw
    qs.bias = np.clip(bq, -2 ** 31 + 1, 2 ** 31 - 1).astype(np.int32)
    mn = [multiplier(qs.x.scale * s / qs.a.scale) for s in sw]
    qs.mult = np.array([m for m, _ in mn], np.int32)
    qs.shift = np.array([n for _, n in mn], np.int32)


INT8_OPS = ("conv", "linear", "maxpool", "avgpool", "elementwise", "add", "concat", "adaptive_avgpool", "upsample")  # the steps with an integer kernel


def refuse(steps: list[Step]) -> None:
    """What the int8 build does not do, as one-line errors: steps without an integer kernel."""
    from ..errors import NetcError

    for s in steps:
        first = s.layers[0] if s.layers else None
        if s.op not in INT8_OPS:
            raise NetcError(f"{first.where()}: netc export --quantize int8 has no integer kernel for layer kind "
                            f"'{first.kind.kind}' (the float32 export has)")


def quantize(network, state: dict[str, np.ndarray], ranges: dict[str, tuple[float, float]],
             target: str = "generic") -> QNet:
    """The lowered steps of `network` with their int8 parameters, from calibrated `ranges`."""
    import torch

    from ..torchref import torch_model

    model = torch_model(network, state, torch.float64).eval()
    modules = {l.name: model.get_submodule(l.name) for l in network.layers}
    steps = lower(network.layers, state, target)
    refuse(steps)
    from .memory import concat_views

    first = QParams.from_range(*ranges[""])
    views = concat_views(steps)
    done: dict[int, QStep] = {}
    own: dict[int, QParams] = {}  # a concat's own parameters, or those of the concat it sits in

    def target_of(step: Step) -> QParams | None:
        """The parameters a step's output must have: those of the concat it is written in."""
        if id(step) not in views:
            return None
        outer = views[id(step)][0]
        return target_of(outer) or QParams.from_range(*ranges[outer.layers[-1].name])

    for step in steps:
        ins = [first if src is None else done[id(src)].out for src in step.inputs]
        qs = _qstep(step, ins, ranges, modules)
        forced = target_of(step)
        if forced is not None and forced != qs.out:
            _force(qs, forced, modules)
            qs.forced = views[id(step)][0].name
        done[id(step)] = qs
    out = [done[id(s)] for s in steps]
    final = next(qs for qs in out if qs.step.output)
    return QNet(out, first, final.out)


def _qstep(step: Step, ins: list[QParams], ranges, modules) -> QStep:
    x_q = ins[0]
    pre, post, acc = _chains(step)
    last = step.layers[-1].name if step.layers else ""
    qs = QStep(step, x_q, x_q, QParams.from_range(*ranges[last]) if last else x_q,
               pre_layers=pre, post_layers=post, ins=ins)
    channels = _channels(step)
    if acc is not None or step.op in ("add", "concat"):
        first_chain = pre if step.pool is not None else post
        if len(first_chain) == 1 and first_chain[0].kind.kind == "relu":
            qs.relu_clamp = True
            qs.a = QParams.from_range(*ranges[first_chain[0].name])
            first_chain.clear()
        else:
            qs.a = QParams.from_range(*ranges[(acc or step.layers[0]).name])
        if acc is not None:
            _qweights(qs, step)
        else:
            _qinputs(qs)
    b = qs.a
    if pre:
        b = QParams.from_range(*ranges[pre[-1].name])
        qs.pre_lut = _lut(pre, modules, qs.a, b, channels)
    qs.mid = b
    if post:
        qs.post_lut = _lut(post, modules, b, qs.out, channels)
    else:
        qs.out = b  # the pool and reshapes keep the scale
    return qs


def _channels(step: Step) -> int:
    """The channel count of a step's tables (batch norm: one table per channel or feature)."""
    return step.c["OUT"] if step.op == "linear" else step.c.get("COUT", step.c.get("C"))


def _qinputs(qs: QStep) -> None:
    """add and concat: each input k rescaled to the output's scale by M_k = s_k / s_a."""
    mn = [multiplier(x.scale / qs.a.scale) for x in qs.ins]
    qs.in_mult, qs.in_shift = [m for m, _ in mn], [n for _, n in mn]


def _force(qs: QStep, p: QParams, modules) -> None:
    """Make the step's output have the parameters p (a concat's part written inside it):
    the last table maps to p, or the accumulator is requantised to p, or (steps that keep
    their input's scale) a table that only requantises is added."""
    step = qs.step
    channels = _channels(step)
    if qs.post_lut is not None:
        qs.post_lut = _lut(qs.post_layers, modules, qs.mid, p, channels)
    elif qs.pre_lut is None and (qs.weight is not None or step.op in ("add", "concat")):
        qs.a = p
        if qs.weight is not None:
            mn = [multiplier(qs.x.scale * s / p.scale) for s in qs.weight_scale]
            qs.mult = np.array([m for m, _ in mn], np.int32)
            qs.shift = np.array([n for _, n in mn], np.int32)
        else:
            _qinputs(qs)
    else:
        qs.post_lut = _lut([], modules, qs.out, p, None)
    qs.out = p


def dsp_layout(qs: QStep) -> None:
    """The weights of a conv in the order the DSP kernel reads them.

    The kernel multiplies pairs of input channels (2p, 2p+1) at once (SMLAD, dual 16-bit
    multiply-accumulate) from an int16 copy of the input with the channels interleaved in
    pairs, [GROUPS * CPG][HP][WP][2] (CPG = ceil(CIN_G / 2); an odd group's last pair is
    completed by a channel of zero weights).  For each channel pair, the KH * KW taps (in
    ky, kx order; padded to an even count with a zero tap) are packed two per 32-bit word as
    bytes [A.lo, B.lo, A.hi, B.hi], so that SXTB16 of the word gives tap A's two weights
    and SXTB16 of it rotated by 8 bits tap B's.  c["WORDS"] lists per word the offsets of
    taps A and B in the interleaved copy (in int16 values; None for a padding tap).
    """
    s = qs.step
    c = s.c
    if s.op != "conv":
        return
    kh, kw, cin_g, cout = c["KH"], c["KW"], c["CIN_G"], c["COUT"]
    cpg = -(-cin_g // 2)
    taps = [(ky, kx) for ky in range(kh) for kx in range(kw)]
    if len(taps) % 2:
        taps.append(None)
    w = np.zeros((cout, 2 * cpg, kh, kw), np.int8)
    w[:, :cin_g] = qs.weight.reshape(cout, cin_g, kh, kw)
    out = np.zeros((cout, cpg, len(taps) // 2, 4), np.int8)
    words = []
    for k in range(len(taps) // 2):
        offs = []
        for half, tap in enumerate(taps[2 * k:2 * k + 2]):
            if tap is None:
                offs.append(None)
                continue
            ky, kx = tap
            out[:, :, k, half] = w[:, 0::2, ky, kx]
            out[:, :, k, 2 + half] = w[:, 1::2, ky, kx]
            offs.append(2 * (ky * c["DH"] * c["WP"] + kx * c["DW"]))
        words.append(tuple(offs))
    qs.weight_dsp = out.reshape(cout, -1)
    c.update(DSP=True, WORDS=words, CPG=cpg, W_STRIDE_DSP=cpg * len(words) * 4, PLANE2=2 * c["HP"] * c["WP"],
             X16_SIZE=c["GROUPS"] * cpg * 2 * c["HP"] * c["WP"])


def quantize_input(x: np.ndarray, q: QParams) -> np.ndarray:
    """float32 -> int8 as the exported NAME_infer does: x / scale + zero in float32, rounded
    half away from zero, clamped."""
    v = np.float32(x) / np.float32(q.scale) + np.float32(q.zero)
    v = np.clip(v, np.float32(-128), np.float32(127))
    return np.trunc(v + np.where(v >= 0, np.float32(0.5), np.float32(-0.5)).astype(np.float32)).astype(np.int8)


def dequantize(q: np.ndarray, p: QParams) -> np.ndarray:
    return (np.float32(q.astype(np.int32) - p.zero) * np.float32(p.scale)).astype(np.float32)


__all__ = ["CALIBRATION_IMAGES", "QNet", "QParams", "QStep", "calibrate", "dequantize", "dsp_layout", "multiplier",
           "quantize", "quantize_input"]
