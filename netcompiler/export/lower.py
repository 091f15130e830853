"""Lowering for export: the checked layers -> inference steps, one C function each.

Evaluation mode only.  Dropout is the identity and flatten a reshape of a flat buffer, so
neither becomes a step.  Every other layer starts a step or is absorbed into the step
before it, when it reads only that step's output and nothing else reads that (a tensor
with several readers - fan-out - is kept; add and concat read several steps, `Step.inputs`):

* a batchnorm2d right after a conv2d (batchnorm1d after a linear layer) is folded into its
  weights and bias;
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
from typing import Any, Callable

import numpy as np

from ..errors import NetcError
from ..graph import consumers
from ..layers import INPUT, Layer
from ..layers.activations import MATH_MACROS, Activation, _idents
from ..layers.batchnorm import BatchNorm2d
from ..render import items

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
    output: bool = False  # writes the network output (the caller's buffer)
    in_place: bool = False  # may write its output over one of its inputs (when that input dies here)
    inputs: list["Step | None"] = field(default_factory=list)  # the steps it reads (None: the network input)
    chan_rank: int = 3  # the rank of the shape whose first index the epilogues' channel c is
    folded: Layer | None = None  # the batch norm folded into the conv's or linear layer's weights
    form: str = ""  # conv: the row of CONV_FORMS that computes it (choose_conv_forms)
    # filled by the memory plan
    in_ref: str = ""  # the first input's
    in_refs: list[str] = field(default_factory=list)
    out_ref: str = ""
    scratch_ref: str = ""
    copies: list[tuple[int, int, int]] = field(default_factory=list)  # concat: (input, offset, size) it copies

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
    def macro(self) -> str:
        """The template macro that renders it (templates/export/steps.c.j2)."""
        return f"{self.op}_{self.form}" if self.form else self.op

    @property
    def math(self) -> frozenset:
        return frozenset().union(*(e.math for e in self.pre + self.post))

    def absorb(self, layer: Layer, state: dict[str, np.ndarray]) -> bool:
        """Take `layer` into this step if it can; False: it starts a new step."""
        kind = layer.kind.kind
        if (isinstance(layer.kind, BatchNorm2d) and self.op in ("conv", "linear") and not self.pre and not self.post
                and self.pool is None and self.chan_rank == len(layer.in_shape)):
            _fold_batchnorm(self, layer, state)
            self.layers.append(layer)
            return True
        if kind == "maxpool2d" and self.op == "conv" and self.pool is None and _tiles(layer):
            _fuse_pool(self, layer)
            self.layers.append(layer)
            return True
        if self.op == "concat":  # its parts may be views: no loop to apply an epilogue in
            return False
        epi = epilogue(layer, state, self.arrays)
        if epi is None or (epi.scale and len(layer.in_shape) != self.chan_rank):
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
    if isinstance(layer.kind, BatchNorm2d):  # and batchnorm1d (features are its channels)
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
    step.folded = bn


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
                _weights(layer, state, layer.cname), chan_rank=1)


def pool_step(layer: Layer, state, target: str) -> Step:
    c = layer.kind.render_context(layer)
    # where the padded input ends: after the bottom and right padding (PB, PR)
    ends = dict(H_END=c["H"] + c["PB"], W_END=c["W"] + c["PR"])
    c = {k: c[k] for k in ("C", "H", "W", "OH", "OW", "KH", "KW", "SH", "SW", "PH", "PW", "DH", "DW",
                           "count_include_pad")}
    c.update(ends)
    return Step(layer.cname, layer.kind.kind[:-2], [layer], layer.in_shape, layer.out_shape, c)


def adaptive_pool_step(layer: Layer, state, target: str) -> Step:
    """adaptive_avgpool2d and global_avgpool2d: PyTorch's bins, computed in the C with
    integer division (row oy: floor(oy H / OH) to ceil((oy + 1) H / OH))."""
    c = layer.kind.render_context(layer)
    c = {k: c[k] for k in ("C", "H", "W", "OH", "OW", "HW", "GLOBAL")}
    return Step(layer.cname, "adaptive_avgpool", [layer], layer.in_shape, layer.out_shape, c)


def upsample_step(layer: Layer, state, target: str) -> Step:
    return Step(layer.cname, "upsample", [layer], layer.in_shape, layer.out_shape, layer.kind.render_context(layer))


def elementwise_step(layer: Layer, state, target: str) -> Step:
    """An element-wise layer with no step before it to take it in (it reads the network
    input, or a tensor other layers read too): a step of its own, which later element-wise
    layers join.  On a 1-D tensor every feature is a channel (batchnorm1d's scale[c])."""
    c = dict(C=layer.in_shape[0] if layer.in_shape else 1)  # the channels an epilogue sees
    step = Step(layer.cname, "elementwise", [], layer.in_shape, layer.in_shape, c, chan_rank=len(layer.in_shape))
    step.in_place = True
    taken = step.absorb(layer, state)
    assert taken, layer.where()
    return step


def add_step(layer: Layer, state, target: str) -> Step:
    """The element-wise sum of the inputs; it may run in place in an input that dies here."""
    shape = layer.out_shape
    c = dict(C=shape[0] if shape else 1, K=len(layer.inputs), SUM=" + ".join(f"in{k}[j]" for k in range(len(layer.inputs))))
    return Step(layer.cname, "add", [layer], shape, shape, c, in_place=True, chan_rank=len(shape))


def concat_step(layer: Layer, state, target: str) -> Step:
    """The parts one after the other (channels or features: contiguous in C order).  The
    memory plan places what it can of them inside the output (views): the concat then
    copies only the rest (Step.copies)."""
    sizes = [math.prod(shape) for shape in layer.in_shapes]
    offsets = [sum(sizes[:k]) for k in range(len(sizes))]
    return Step(layer.cname, "concat", [layer], layer.out_shape, layer.out_shape, dict(SIZES=sizes, OFFSETS=offsets))


def copy_step(in_shape: tuple[int, ...]) -> Step:
    """The whole network is reshapes (flatten, dropout): the output is a copy of the input."""
    step = Step("copy", "elementwise", [], in_shape, in_shape, {}, inputs=[None], chan_rank=len(in_shape))
    return step


STARTS = {"conv2d": conv_step, "linear": linear_step, "maxpool2d": pool_step, "avgpool2d": pool_step,
          "batchnorm2d": elementwise_step, "batchnorm1d": elementwise_step, "add": add_step,
          "concat": concat_step, "adaptive_avgpool2d": adaptive_pool_step, "global_avgpool2d": adaptive_pool_step,
          "upsample": upsample_step}
IDENTITY = {"flatten", "dropout"}  # no computation in evaluation mode


def lower(layers: list[Layer], state: dict[str, np.ndarray], target: str) -> list[Step]:
    """The steps in the spec's order (a valid schedule); each step's `inputs` are the steps
    whose outputs it reads.  A layer joins the last step when it reads only that step's
    output and nothing else reads it (a tensor with several readers stays a tensor)."""
    readers = consumers(layers)
    value: dict[str, Step | None] = {INPUT: None}  # tensor -> the step whose output holds it
    holds: dict[int, set[str]] = {}  # step -> the tensors its output holds (identities alias it)
    steps: list[Step] = []

    def only_reader(step: Step, layer: Layer) -> bool:
        names = holds[id(step)]
        rs = [r for t in names for r in readers[t] if not (r.kind.kind in IDENTITY and r.output in names)]
        return rs == [layer]

    for layer in layers:
        kind = layer.kind.kind
        srcs = [value[t] for t in layer.inputs]
        if kind in IDENTITY:
            src = value[layer.output] = srcs[0]
            if src is not None:
                if src is steps[-1] and only_reader(src, layer):  # listed in the step's comment
                    src.out_shape = layer.out_shape
                    src.layers.append(layer)
                holds[id(src)].add(layer.output)
            continue
        last = steps[-1] if steps else None
        if len(srcs) == 1 and last is not None and srcs[0] is last and only_reader(last, layer) \
                and last.absorb(layer, state):
            value[layer.output] = last
            holds[id(last)] = {layer.output}
            continue
        start = STARTS.get(kind, elementwise_step if isinstance(layer.kind, Activation) else None)
        if start is None:
            raise NetcError(f"{layer.where()}: netc export has no C for layer kind '{kind}'")
        step = start(layer, state, target)
        step.inputs = srcs
        steps.append(step)
        value[layer.output] = step
        holds[id(step)] = {layer.output}
    final = value[layers[-1].output] if layers else None
    if final is None:  # the output is the input, reshaped
        final = copy_step(layers[0].in_shape if layers else ())
        steps.append(final)
    final.output = True
    for s in steps:
        s.c.setdefault("C", 1)
        s.c["PLANE"] = s.out_size // s.c["C"]  # element-wise steps: values per channel
    return steps


# ---- conv forms: the ways a conv step can be computed (a row each; the cheapest that applies) ----
PIXEL_BLOCK = 8  # host, channels at a time: pixels of a row whose sums stay in registers together
PIXEL_ROW_MAX = 12  # a row this short is one block (12 sums + a weight vector: within 32 AVX-512 registers)
PIXEL_CHAINS = 6  # independent sums that keep two multiply-add units busy (latency 4: about 8; 6 with the loads)
ROW_WEIGHT_REGS = 26  # host rows: a kernel's broadcast weights in registers (of 32: 4 sums, the input, a spare)
# host rows: a block's outputs stored one at a time, in multiply-adds' time; 2 matches the forms'
# measured order on 1-channel 28x28 inputs (rows faster for 6 output channels, channels for 8)
ROW_BLOCK_STORES = 2


def _pixel_block(ow: int) -> int:
    """Pixels per block of a row of OW: the whole row up to PIXEL_ROW_MAX (its sums fit the
    registers), else the block of 6 to PIXEL_BLOCK whose blocks cost least, a block of n
    counting as max(n, PIXEL_CHAINS): fewer independent sums wait on the multiply-add latency."""
    if ow <= PIXEL_ROW_MAX:
        return ow
    return min(range(6, PIXEL_BLOCK + 1), key=lambda pb: (ow // pb * max(pb, PIXEL_CHAINS)
                                                          + (max(ow % pb, PIXEL_CHAINS) if ow % pb else 0)) / ow - pb * 1e-3)


@dataclass(frozen=True)
class ConvForm:
    """One way to compute a conv step in the float export.  `cost` estimates the vector
    instructions of one call (multiply-adds and loads; one unit for every form); `prepare`
    reorders or transforms the weights at export time and sets Step.c and the scratch.  The
    step's template macro is conv_<name> (templates/export/steps.c.j2)."""

    name: str
    targets: tuple[str, ...]
    applies: Callable[[Step], bool]
    cost: Callable[[Step], float]
    prepare: Callable[[Step], None]
    doc: str


def _macs(c: dict) -> int:
    return c["COUT"] * c["OH"] * c["OW"] * c["CIN_G"] * c["KH"] * c["KW"]


def _rows_cost(s: Step) -> float:
    """Row blocks (VEC): per tap, a vector of BLOCK outputs is one multiply-add with its input
    read from memory, and a weight broadcast unless the output channel's CIN_G x KH x KW weights
    fit in ROW_WEIGHT_REGS registers (then the compiler broadcasts them once per channel, as
    GCC does for lenet5's 5x5 conv1); the row's tail block costs a whole block, and each
    block's outputs leave one at a time (ROW_BLOCK_STORES).  In plain C a multiply-add and
    about one load per output."""
    c = s.c
    if not c["VEC"]:
        return _macs(c) * 2
    blocks = c["COUT"] * c["OH"] * -(-c["OW"] // c["BLOCK"])
    per_tap = 1 if c["CIN_G"] * c["KH"] * c["KW"] <= ROW_WEIGHT_REGS else 2
    return blocks * (c["CIN_G"] * c["KH"] * c["KW"] * per_tap + ROW_BLOCK_STORES)


def _channels_applies(s: Step) -> bool:
    c = s.c
    # one group whose channels round up to 8 with at most a quarter more: zero channels pad it
    padded = c["GROUPS"] == 1 and c["COUT"] % 8 and 3 * -(-c["COUT"] // 8) * 8 <= 4 * c["COUT"]
    return c["COUT_G"] % 8 == 0 or bool(padded)


def _channels_vl(c: dict) -> int:
    return 16 if c["COUT_G"] % 16 == 0 else 8


def _channels_cost(s: Step) -> float:
    """Per tap and block of PB pixels: one weight vector (VL output channels, with the zero
    channels that pad COUT), and PB multiply-adds with the pixel broadcast from memory."""
    c = s.c
    vl = _channels_vl(c)
    padded = -(-c["COUT"] // vl) * vl
    return _macs(c) * padded / c["COUT"] / vl * (1 + 1 / _pixel_block(c["OW"]))


def _channels_prepare(s: Step) -> None:
    """host, float32: a conv whose groups have a multiple of 8 output channels computes VL =
    16 (when they divide) or 8 output channels at once (one GCC vector), for blocks of
    PIXEL_BLOCK neighbouring pixels of a row (each weight vector loaded once for them, their
    sums independent), its weights reordered to [COUT/VL][CIN_G][KH][KW][VL]; with a fused
    max-pool, its scratch holds the VL channels' conv output row pixel-major [OW][VL], so that
    the max over a window runs over the channels side by side."""
    c = s.c
    cout = c["COUT"]
    vl = _channels_vl(c)
    cb = -(-cout // vl)
    w = s.arrays[0]
    k = c["CIN_G"] * c["KH"] * c["KW"]
    wp = np.zeros((cb * vl, k), np.float32)
    wp[:cout] = w.values.reshape(cout, k)
    w.values = np.ascontiguousarray(wp.reshape(cb, vl, k).transpose(0, 2, 1)).ravel()
    w.what += (f", reordered [{cb}][{c['CIN_G']}][{c['KH']}][{c['KW']}][{vl}] ({vl} output channels at once"
               + (f"; channels {cout} to {cb * vl - 1} are zeros" if cb * vl != cout else "") + ")")
    if cb * vl != cout and c["bias"]:
        b = s.arrays[1]
        b.values = np.concatenate([b.values, np.zeros(cb * vl - cout, np.float32)])
        b.what += f", then {items(cb * vl - cout, 'zero')} (the padding channels)"
    pb = _pixel_block(c["OW"])
    c.update(VECC=True, VEC=False, VEC_TAIL=False, VL=vl, CB=cb, WB=k * vl, PB=pb, CHAINS=PIXEL_CHAINS,
             PB_FULL=c["OW"] - c["OW"] % pb, PB_TAIL=c["OW"] % pb,
             # the channels a block stores (a number, or a C expression): the last one only the real ones
             QN=vl if cb * vl == cout else cout if cb == 1 else f"(cb < {cb - 1} ? {vl} : {cout - (cb - 1) * vl})")
    if c["POOL"]:
        s.scratch += _round4(vl * c["OW"]) - _round4(c["OW"])
        s.scratch_doc = s.scratch_doc.replace(f"one conv output row [{c['OW']}]",
                                              f"{vl} channels' conv output row, pixel-major [{c['OW']}][{vl}]")
        # ... and the window maxima of one pooled row, pixel-major too, written to the channels'
        # planes once per pooled row; windows in runs (px0, count, columns): the full ones, a cut last one
        c["PROW_OFF"] = s.scratch
        s.scratch_doc += f", their pooled row [{c['POW']}][{vl}] at +{s.scratch}"
        s.scratch += _round4(vl * c["POW"])
        c["POOL_RUNS"] = [run for run in ((0, c["POOL_FULL_W"], c["PKW"]), (c["POOL_FULL_W"], 1, c["POOL_EDGE_W"]))
                          if run[1] and run[2]]


# Winograd F(2x2, 3x3): each 2x2 tile of output pixels is Y = A^T [(G g G^T) . (B^T d B)] A of
# its 4x4 input patch d: 16 multiplies per tile and channel pair instead of 36.
WINOGRAD_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
WINOGRAD_ACC = 24  # tiles x channel vectors of sums in registers (of 32 AVX-512 registers; the rest: weights)
WINOGRAD_CHAINS = 8  # independent sums that keep two multiply-add units of latency 4 busy


def winograd_weights(weight: np.ndarray) -> np.ndarray:
    """U[co][ci][e] = (G g G^T)[i][j], e = 4 i + j, of each 3x3 kernel g = weight[co][ci]
    (computed in float64)."""
    g = np.asarray(weight, np.float64)
    u = np.einsum("ik,oakl,jl->oaij", WINOGRAD_G, g, WINOGRAD_G)
    return u.reshape(*g.shape[:2], 16)


def _winograd_applies(s: Step) -> bool:
    """3x3, stride 1, no dilation, one group; channels in and out a multiple of 8 (vectors of
    channels, no tails) and at least 16; no pool, or a fused 2x2 max-pool (its windows are
    the 2x2 tiles)."""
    c = s.c
    return ((c["KH"], c["KW"], c["SH"], c["SW"], c["DH"], c["DW"], c["GROUPS"]) == (3, 3, 1, 1, 1, 1, 1)
            and c["CIN"] % 8 == 0 and c["COUT"] % 8 == 0 and min(c["CIN"], c["COUT"]) >= 16
            and (not c["POOL"] or (c["PKH"], c["PKW"]) == (2, 2)))


def _winograd_blocking(c: dict) -> dict:
    """Tiles TH x TW; output channels in vectors of VL, CB vectors at a time (the largest
    divisor of COUT / VL up to 4); TB tiles at a time, TB x CB sums in registers, TB chosen
    for the least cost over the tiles: a block of n tiles as max(n CB, WINOGRAD_CHAINS)
    multiply-adds plus CB weight loads per input channel."""
    th, tw = -(-c["OH"] // 2), -(-c["OW"] // 2)
    t = th * tw
    vl = 16 if c["COUT"] % 16 == 0 else 8
    nv = c["COUT"] // vl
    cb = max(d for d in range(1, 5) if nv % d == 0)

    def cost(tb: int) -> float:
        blocks = [tb] * (t // tb) + ([t % tb] if t % tb else [])
        return sum(max(n * cb, WINOGRAD_CHAINS) + cb for n in blocks) - tb * 1e-3

    tb = min(range(1, min(t, WINOGRAD_ACC // cb) + 1), key=cost)
    return dict(WG_TH=th, WG_TW=tw, WG_T=t, WG_VL=vl, WG_VLI=16 if c["CIN"] % 16 == 0 else 8, WG_CB=cb,
                WG_CBW=cb * vl, WG_NCB=nv // cb, WG_TB=tb, WG_TB_FULL=t - t % tb, WG_TB_TAIL=t % tb,
                WG_HT=2 * th + 2, WG_WT=2 * tw + 2)


def _winograd_cost(s: Step) -> float:
    """The 16 products per tile as multiply-adds over vectors of VL output channels, with a
    weight load per CB x TB of them; the input's copy to channels last (a load and a store
    per value), its transform (64 vector operations per tile and vector of input channels)
    and the output transform (about 44 per tile and vector of output channels)."""
    c = s.c
    b = _winograd_blocking(c)
    gemm = b["WG_T"] * 16 * c["CIN"] * c["COUT"] / b["WG_VL"] * (1 + 1 / b["WG_TB"])
    return (gemm + 2 * b["WG_HT"] * b["WG_WT"] * c["CIN"] + 64 * b["WG_T"] * c["CIN"] / b["WG_VLI"]
            + 44 * b["WG_T"] * c["COUT"] / b["WG_VL"])


def _winograd_prepare(s: Step) -> None:
    """The weights as U = G g G^T, rounded to float32 once, here, laid out
    [COUT / (CB VL)][16][CIN][CB VL] (the GEMM of one block of output channels and one e
    reads CIN x CB VL contiguous values).  Scratch: the input channels last with its zero
    border XT [HT][WT][CIN], the transformed inputs of TB tiles V [16][TB][CIN] and their
    products M [16][TB][CB VL] (each rounded to 16 floats).  The output transform writes a
    tile's 2x2 outputs over its first 4 products, channels last; a last pass writes them to
    the output planes one channel at a time (contiguous stores: channel planes 4 KB apart
    alias in the L1 cache, which made storing each tile's 4 x VL values straight to them 38%
    of a 16-channel 32x32 step)."""
    c = s.c
    c.update(_winograd_blocking(c), VEC=False, VEC_TAIL=False)
    cin, cout, cbw = c["CIN"], c["COUT"], c["WG_CBW"]
    w = s.arrays[0]
    u = winograd_weights(w.values.reshape(cout, cin, 3, 3))  # [co][ci][e]
    u = u.reshape(c["WG_NCB"], cbw, cin, 16).transpose(0, 3, 2, 1)  # [block][e][ci][q]
    w.values = np.ascontiguousarray(u).astype(np.float32).ravel()
    w.dims = f"[{c['WG_NCB']}][16][{cin}][{cbw}]"
    w.what += f" as Winograd weights G g G^T (computed at export), in blocks of {cbw} output channels"
    r16 = lambda n: -(-n // 16) * 16  # noqa: E731
    xt, v, m = c["WG_HT"] * c["WG_WT"] * cin, 16 * c["WG_TB"] * cin, 16 * c["WG_TB"] * cbw
    c.update(WG_XT_OFF=0, WG_V_OFF=r16(xt), WG_M_OFF=r16(xt) + r16(v),
             WG_PLANE=c["POH"] * c["POW"] if c["POOL"] else c["OH"] * c["OW"])  # an output channel's values
    s.scratch = r16(xt) + r16(v) + r16(m)
    s.scratch_doc = (f"the input channels last with a zero border [{c['WG_HT']}][{c['WG_WT']}][{cin}] at +0, "
                     f"{c['WG_TB']} tiles' transformed inputs [16][{c['WG_TB']}][{cin}] at +{c['WG_V_OFF']}, "
                     f"their products, then outputs [16][{c['WG_TB']}][{cbw}] at +{c['WG_M_OFF']}")


def _no_prepare(s: Step) -> None:
    pass


CONV_FORMS = (
    ConvForm("winograd", ("host",), _winograd_applies, _winograd_cost, _winograd_prepare,
             "Winograd F(2x2, 3x3) over vectors of channels, weights transformed at export"),
    ConvForm("channels", ("host",), _channels_applies, _channels_cost, _channels_prepare,
             "8 or 16 output channels at a time, over blocks of pixels of a row"),
    ConvForm("rows", ("generic", "host", "cortex-m4", "cortex-m7"), lambda s: True, _rows_cost, _no_prepare,
             "blocks of neighbouring outputs of a row, one output channel at a time"),
)
FORMS = {f.name: f for f in CONV_FORMS}


def choose_conv_forms(steps: list[Step], target: str, force: dict[str, str] | None = None) -> None:
    """Each conv step's form: the cheapest of CONV_FORMS for the target that applies, or the
    one `force` names for the step (tests run every form on the shapes it applies to)."""
    for s in steps:
        if s.op != "conv":
            continue
        name = (force or {}).get(s.name)
        if name is not None:
            form = FORMS[name]
            if target not in form.targets or not form.applies(s):
                raise ValueError(f"conv form {name!r} does not apply to {s.name} on {target}")
        else:
            form = min((f for f in CONV_FORMS if target in f.targets and f.applies(s)), key=lambda f: f.cost(s))
        s.form = form.name
        form.prepare(s)


def _round4(n: int) -> int:
    """Floats rounded up to 16 bytes."""
    return -(-n // 4) * 4
