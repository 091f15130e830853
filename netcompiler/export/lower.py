"""Lowering for export: the checked layers -> inference steps, one C function each.

Evaluation mode only.  Dropout is the identity and flatten a reshape of a flat buffer, so
neither becomes a step.  Every other layer starts a step or is absorbed into the step
before it:

* a batchnorm2d right after a conv2d is folded into its weights and bias;
* element-wise layers (activations, a batchnorm2d in evaluation mode: y = x * scale[c] +
  shift[c]) become an *epilogue*, applied to each value before the step stores it;
* a max-pool whose windows tile the conv output (stride = kernel, no padding, no
  dilation; ceil_mode allowed) is fused into the conv before it: the conv computes one
  output row at a time into a row of scratch and pools it, so the full-size conv output
  never exists.  Element-wise layers between the conv and the pool are applied to every
  conv output before the max (`pre`), those after the pool to the pooled value (`post`).

The table `STARTS` names the step each layer kind starts; `Step.absorb` says what a step
can take in.  Numbers the templates need are computed here (`Step.c`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import NetcError
from ..layers import INPUT, Layer
from ..layers.activations import MATH_MACROS, Activation, _idents

# floats per register block: output pixels of a conv row, outputs of a linear layer
BLOCK = {"generic": 4, "host": 8, "cortex-m4": 4, "cortex-m7": 4}
# a conv's kernel row is written out tap by tap (the loads of neighbouring outputs shared)
# when it has at most this many multiply-adds per block; longer rows stay a loop
UNROLL_MAX = 64


@dataclass
class Epilogue:
    """One element-wise stage on a value x (of channel c) before it is stored."""

    source: str  # for the comment: "relu1 (relu, line 6)"
    expr: str = ""  # C expression in x (activations)
    scale: str = ""  # per-channel arrays (batch norm in evaluation mode)
    shift: str = ""
    math: frozenset = frozenset()  # EXP / ERF / TANH


@dataclass
class Array:
    """A `static const float` array of weights."""

    name: str
    values: np.ndarray  # float32, flat
    dims: str  # "[6][1][5][5]"
    what: str  # "conv1.weight" or "conv1.weight with bn1 folded in"


@dataclass
class Step:
    name: str  # C function name prefix: the first layer's name
    op: str  # conv | linear | maxpool | avgpool | elementwise (template macro)
    layers: list[Layer]  # every layer this step computes, in order
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    c: dict[str, Any] = field(default_factory=dict)
    arrays: list[Array] = field(default_factory=list)
    pre: list[Epilogue] = field(default_factory=list)  # conv + pool: before the max
    post: list[Epilogue] = field(default_factory=list)
    pool: Layer | None = None  # the fused max-pool
    scratch: int = 0  # floats of arena scratch the step needs while it runs
    scratch_doc: str = ""  # what the scratch holds, for the comment
    in_place: bool = False  # may write its output over its input
    # filled by the memory plan
    in_ref: str = ""
    out_ref: str = ""
    scratch_ref: str = ""

    @property
    def in_size(self) -> int:
        return math.prod(self.in_shape)

    @property
    def out_size(self) -> int:
        return math.prod(self.out_shape)

    @property
    def channels(self) -> int:
        return self.out_shape[0]

    @property
    def math(self) -> frozenset:
        return frozenset().union(*(e.math for e in self.pre + self.post))

    def absorb(self, layer: Layer, state: dict[str, np.ndarray]) -> bool:
        """Take `layer` into this step if it can; False: it starts a new step."""
        kind = layer.kind.kind
        if kind == "batchnorm2d" and self.op == "conv" and not self.pre and not self.post and self.pool is None:
            _fold_batchnorm(self, layer, state)
            self.layers.append(layer)
            return True
        if kind == "maxpool2d" and self.op == "conv" and self.pool is None and _tiles(layer):
            _fuse_pool(self, layer)
            self.layers.append(layer)
            return True
        epi = epilogue(layer, state, self.arrays)
        if epi is None or (epi.scale and len(self.out_shape) != 3):
            return False
        self.post.append(epi)
        self.layers.append(layer)
        self.out_shape = layer.out_shape
        return True


def where(layer: Layer) -> str:
    return f"{layer.name} ({layer.kind.kind}, line {layer.line})"


def epilogue(layer: Layer, state: dict[str, np.ndarray], arrays: list[Array]) -> Epilogue | None:
    """The element-wise stage of an activation or an evaluation-mode batch norm, else None."""
    if isinstance(layer.kind, Activation):
        f = layer.kind.formula(layer)
        return Epilogue(where(layer), expr=f.forward, math=frozenset(_idents(f.forward) & MATH_MACROS))
    if layer.kind.kind == "batchnorm2d":
        scale, shift = _bn_affine(layer, state)
        c = len(scale)
        arrays.append(Array(f"{layer.cname}_scale", scale.astype(np.float32), f"[{c}]",
                            f"{layer.name}: weight / sqrt(running_var + eps)"))
        arrays.append(Array(f"{layer.cname}_shift", shift.astype(np.float32), f"[{c}]",
                            f"{layer.name}: bias - running_mean * scale"))
        return Epilogue(where(layer), scale=f"{layer.cname}_scale", shift=f"{layer.cname}_shift")
    return None


def _bn_affine(layer: Layer, state: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Evaluation-mode batch norm as y = x * scale + shift per channel (float64)."""
    n = layer.name
    g, b = np.float64(state[f"{n}.weight"]), np.float64(state[f"{n}.bias"])
    mean, var = np.float64(state[f"{n}.running_mean"]), np.float64(state[f"{n}.running_var"])
    scale = g / np.sqrt(var + layer.opts["eps"])
    return scale, b - mean * scale


def _fold_batchnorm(step: Step, bn: Layer, state) -> None:
    scale, shift = _bn_affine(bn, state)
    w, b = step.arrays[0], step.arrays[1] if len(step.arrays) > 1 else None
    cout = len(scale)
    w64 = np.float64(w.values).reshape(cout, -1) * scale[:, None]
    b64 = (np.float64(b.values) if b is not None else np.zeros(cout)) * scale + shift
    w.values, w.what = w64.astype(np.float32).ravel(), w.what + f" times {bn.name}'s scale"
    bias = Array(f"{step.name}_bias", b64.astype(np.float32), f"[{cout}]",
                 (b.what if b is not None else "0") + f" with {bn.name} folded in")
    step.arrays[1:] = [bias]
    step.c["bias"] = True


def _tiles(pool: Layer) -> bool:
    o = pool.opts
    return o["stride"] == o["kernel_size"] and o["padding"] == (0, 0) and o["dilation"] == (1, 1)


# ---- steps per layer kind -------------------------------------------------------------------
def _weights(layer: Layer, state, step_name: str) -> list[Array]:
    out = []
    for k, shape in layer.param_shapes().items():
        v = np.asarray(state[f"{layer.name}.{k}"], np.float32).ravel()
        out.append(Array(f"{step_name}_{k}", v, "".join(f"[{d}]" for d in shape), f"{layer.name}.{k}"))
    return out


def _row_blocks(n: int, block: int) -> tuple[int, int]:
    """(outputs in whole blocks, size of the tail block)."""
    return n - n % block, n % block


def conv_step(layer: Layer, state, target: str) -> Step:
    o, d = layer.opts, layer.derived
    cin, h, w = layer.in_shape
    cout, oh, ow = layer.out_shape
    (kh, kw), (sh, sw), (dh, dw), g = o["kernel_size"], o["stride"], o["dilation"], o["groups"]
    (pt, pb), (pl, pr) = d["pads"]
    hp, wp = h + pt + pb, w + pl + pr
    padded = (pt, pb, pl, pr) != (0, 0, 0, 0)
    block = BLOCK[target]
    full, tail = _row_blocks(ow, block)
    cin_g = cin // g
    unroll = kw * block <= UNROLL_MAX

    def taps(n: int) -> list[tuple[int, list[int]]]:
        # (kx, offset in the kernel row's input of each of the n outputs)
        return [(kx, [kx * dw + j * sw for j in range(n)]) for kx in range(kw)]

    c = dict(CIN=cin, H=h, W=w, COUT=cout, OH=oh, OW=ow, KH=kh, KW=kw, SH=sh, SW=sw, DH=dh, DW=dw,
             GROUPS=g, CIN_G=cin_g, COUT_G=cout // g, bias=o["bias"],
             PADDED=padded, PT=pt, PL=pl, HP=hp, WP=wp, XPAD_SIZE=cin * hp * wp,
             W_STRIDE=cin_g * kh * kw, X_GROUP=cin_g * hp * wp, X_ROW=sh * wp,
             BLOCK=block, FULL=full, TAIL=tail, UNROLL=unroll,
             TAPS_BLOCK=taps(block), TAPS_TAIL=taps(tail), XPAD_OFF=0, ROW_OFF=0, POOL=False,
             # host: a block of 8 neighbouring outputs as one GCC vector (stride 1: one load per tap)
             VEC=target == "host" and sw == 1 and ow >= block, VECC=False)
    # ... and the row's tail as the block of 8 ending at the row's end (its first outputs are
    # computed twice, with the same arithmetic)
    c["VEC_TAIL"] = c["VEC"] and tail > 0 and ow >= block
    step = Step(layer.cname, "conv", [layer], layer.in_shape, layer.out_shape, c, _weights(layer, state, layer.cname))
    if padded:
        step.scratch = _round4(c["XPAD_SIZE"])
        step.scratch_doc = f"the padded input [{cin}][{hp}][{wp}] at +0"
    return step


def _fuse_pool(step: Step, pool: Layer) -> None:
    c = step.c
    (pkh, pkw), (poh, pow_) = pool.opts["kernel_size"], pool.out_shape[1:]
    c.update(POOL=True, PKH=pkh, PKW=pkw, POH=poh, POW=pow_,
             # ceil_mode: the last row (column) of windows may be cut
             POOL_FULL_W=c["OW"] // pkw, POOL_EDGE_W=c["OW"] % pkw if pow_ > c["OW"] // pkw else 0, POOL_EDGE_X=(c["OW"] // pkw) * pkw,
             POOL_EDGE_H=poh * pkh > c["OH"], ROW_OFF=step.scratch)
    step.pre, step.post = step.post, []
    step.pool = pool
    step.scratch_doc += (", " if step.scratch_doc else "") + f"one conv output row [{c['OW']}] at +{step.scratch}"
    step.scratch += _round4(c["OW"])
    step.out_shape = pool.out_shape


def linear_step(layer: Layer, state, target: str) -> Step:
    fin, fout = layer.in_shape[0], layer.out_shape[0]
    block = BLOCK[target]
    full, tail = _row_blocks(fout, block)
    c = dict(IN=fin, OUT=fout, bias=layer.opts["bias"], BLOCK=block, FULL=full, TAIL=tail,
             # host: each output's dot product in GCC vectors of 8 inputs, then summed across
             VEC=target == "host" and fin >= 8, VEC_IN=fin - fin % 8)
    return Step(layer.cname, "linear", [layer], layer.in_shape, layer.out_shape, c,
                _weights(layer, state, layer.cname))


def pool_step(layer: Layer, state, target: str) -> Step:
    c = layer.kind.render_context(layer)
    # where the padded input ends: after the bottom and right padding (PB, PR)
    ends = dict(H_END=c["H"] + c["PB"], W_END=c["W"] + c["PR"])
    c = {k: c[k] for k in ("C", "H", "W", "OH", "OW", "KH", "KW", "SH", "SW", "PH", "PW", "DH", "DW",
                           "count_include_pad")}
    c.update(ends)
    return Step(layer.cname, layer.kind.kind[:-2], [layer], layer.in_shape, layer.out_shape, c)


def elementwise_step(layer: Layer, state, target: str) -> Step:
    """An element-wise layer with no step before it to take it in (it reads the network
    input): a step of its own, which later element-wise layers join."""
    c = dict(C=layer.in_shape[0] if len(layer.in_shape) == 3 else 1)  # the channels an epilogue sees
    step = Step(layer.cname, "elementwise", [], layer.in_shape, layer.in_shape, c)
    step.in_place = True
    taken = step.absorb(layer, state)
    assert taken, layer.where()
    return step


def copy_step(in_shape: tuple[int, ...]) -> Step:
    """The whole network is reshapes (flatten, dropout): the output is a copy of the input."""
    step = Step("copy", "elementwise", [], in_shape, in_shape, {})
    return step


STARTS = {"conv2d": conv_step, "linear": linear_step, "maxpool2d": pool_step, "avgpool2d": pool_step,
          "batchnorm2d": elementwise_step}
IDENTITY = {"flatten", "dropout"}  # no computation in evaluation mode


def lower(layers: list[Layer], state: dict[str, np.ndarray], target: str) -> list[Step]:
    steps: list[Step] = []
    for i, layer in enumerate(layers):
        before = INPUT if i == 0 else layers[i - 1].output
        if layer.inputs != [before]:
            raise NetcError(f"{layer.where()} reads {', '.join(layer.inputs)}: netc export handles chains of "
                            f"layers only (each reading the one before)")
    for layer in layers:
        kind = layer.kind.kind
        if kind in IDENTITY:
            if steps:  # listed in the step's comment; the flat buffer is already the reshape
                steps[-1].out_shape = layer.out_shape
                steps[-1].layers.append(layer)
            continue
        if steps and steps[-1].absorb(layer, state):
            continue
        start = STARTS.get(kind, elementwise_step if isinstance(layer.kind, Activation) else None)
        if start is None:
            raise NetcError(f"{layer.where()}: netc export has no C for layer kind '{kind}'")
        steps.append(start(layer, state, target))
    if not steps:
        steps.append(copy_step(layers[0].in_shape if layers else ()))
    for s in steps:
        s.c.setdefault("C", 1)
        s.c["PLANE"] = s.out_size // s.c["C"]  # element-wise steps: values per channel
    return steps


def vectorise_channels(steps: list[Step]) -> None:
    """host, float32: a conv whose rows are too short for vectors of 8 outputs (or strided)
    computes 8 output channels at once instead, its weights reordered to
    [COUT/8][CIN_G][KH][KW][8]; with a fused max-pool, its scratch row holds the 8 channels'
    rows [8][OW]."""
    for s in steps:
        c = s.c
        if s.op != "conv" or c.get("VEC") or c["COUT_G"] % 8:
            continue
        w = s.arrays[0]
        k = c["CIN_G"] * c["KH"] * c["KW"]
        w.values = np.ascontiguousarray(w.values.reshape(c["COUT"] // 8, 8, k).transpose(0, 2, 1)).ravel()
        w.what += f", reordered [{c['COUT'] // 8}][{c['CIN_G']}][{c['KH']}][{c['KW']}][8] (8 output channels at once)"
        c.update(VECC=True, CB=c["COUT"] // 8, WB=k * 8)
        if c["POOL"]:
            s.scratch += _round4(8 * c["OW"]) - _round4(c["OW"])
            s.scratch_doc = s.scratch_doc.replace(f"one conv output row [{c['OW']}]",
                                                  f"8 channels' conv output rows [8][{c['OW']}]")


def _round4(n: int) -> int:
    """Floats rounded up to 16 bytes."""
    return -(-n // 4) * 4
