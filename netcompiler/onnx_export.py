"""`netc export --format onnx`: a checked network and its weights -> an ONNX model.

    model = onnx_model(network, state)          # onnx.ModelProto, checked by onnx.checker
    write_onnx(network, state, "net.onnx")

The model is for inference (evaluation semantics): batch norm uses its running
statistics, dropout is left out.  Opset 17; the input is `input` of shape
[batch, *sample] with a symbolic batch dimension, the output `output`.  Nodes are named
after the layers, initializers after the parameters (`conv1.weight`), so
`netc import` gives the same spec and weights back.  Each layer kind is one row of
`EMIT`; the input normalisation stored with the weights (mean, std) is not part of the
graph and is kept as metadata (`netc.mean`, `netc.std`: a number each, or a JSON list of one
per input channel).
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable

import numpy as np

from .errors import NetcError
from .layers.base import window_out

OPSET = 17
INPUT, OUTPUT = "input", "output"


class OnnxExportError(NetcError):
    """A network that cannot be written as ONNX with the same results."""


class _Graph:
    def __init__(self, dtype):
        self.nodes: list = []
        self.inits: list = []
        self.dtype = dtype

    def init(self, name: str, value) -> str:
        import onnx.numpy_helper as nh

        self.inits.append(nh.from_array(np.ascontiguousarray(value), name))
        return name

    def const(self, name: str, value: float) -> str:
        return self.init(name, np.array(value, dtype=self.dtype))

    def node(self, op: str, inputs: list[str], output: str, name: str, **attrs) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [output], name=name, **attrs))
        return output


Emit = Callable[[_Graph, Any, str, str, dict], None]


def _pads(layer) -> list[int]:
    """ONNX pads [top, left, bottom, right] of the layer's derived pads ((top, bottom),
    (left, right)), else of its symmetric `padding` option."""
    if "pads" in layer.derived:
        (pt, pb), (pl, pr) = layer.derived["pads"]
        return [pt, pl, pb, pr]
    ph, pw = layer.opts["padding"]
    return [ph, pw, ph, pw]


def _conv(g: _Graph, layer, x: str, y: str, state: dict) -> None:
    o = layer.opts
    ins = [x, g.init(f"{layer.name}.weight", state[f"{layer.name}.weight"])]
    if o["bias"]:
        ins.append(g.init(f"{layer.name}.bias", state[f"{layer.name}.bias"]))
    g.node("Conv", ins, y, layer.name, kernel_shape=list(o["kernel_size"]), strides=list(o["stride"]),
           dilations=list(o["dilation"]), group=o["groups"], pads=_pads(layer))


def _check_ceil(layer) -> None:
    """ONNX's ceil_mode rounds the output size up without PyTorch's rule that the last window
    starts inside the input or the left padding: refuse where the two differ."""
    o = layer.opts
    dil = o.get("dilation", (1, 1))
    pads = _pads(layer)
    for i, n in enumerate(layer.in_shape[1:]):
        onnx_out = window_out(n, o["kernel_size"][i], o["stride"][i], pads[i] + pads[i + 2], dil[i], True, 10**9)
        if o["ceil_mode"] and onnx_out != layer.out_shape[1 + i]:
            raise OnnxExportError(f"{layer.where()}: with ceil_mode ONNX gives {onnx_out} outputs where PyTorch and "
                                  f"netcompiler give {layer.out_shape[1 + i]}; not exportable")


def _pool(op: str):
    def emit(g: _Graph, layer, x: str, y: str, state: dict) -> None:
        o = layer.opts
        _check_ceil(layer)
        attrs = dict(kernel_shape=list(o["kernel_size"]), strides=list(o["stride"]),
                     pads=_pads(layer), ceil_mode=int(o["ceil_mode"]))
        if "dilation" in o:
            attrs["dilations"] = list(o["dilation"])
        if "count_include_pad" in o:
            attrs["count_include_pad"] = int(o["count_include_pad"])
        g.node(op, [x], y, layer.name, **attrs)

    return emit


def _linear(g: _Graph, layer, x: str, y: str, state: dict) -> None:
    ins = [x, g.init(f"{layer.name}.weight", state[f"{layer.name}.weight"])]
    if layer.opts["bias"]:
        ins.append(g.init(f"{layer.name}.bias", state[f"{layer.name}.bias"]))
    g.node("Gemm", ins, y, layer.name, transB=1)


def _batchnorm(g: _Graph, layer, x: str, y: str, state: dict) -> None:
    ins = [x] + [g.init(f"{layer.name}.{k}", state[f"{layer.name}.{k}"])
                 for k in ("weight", "bias", "running_mean", "running_var")]
    g.node("BatchNormalization", ins, y, layer.name, epsilon=layer.opts["eps"],
           momentum=1 - layer.opts["momentum"])


def _simple(op: str, attrs: Callable[[Any], dict] = lambda layer: {}) -> Emit:
    def emit(g: _Graph, layer, x: str, y: str, state: dict) -> None:
        g.node(op, [x], y, layer.name, **attrs(layer))

    return emit


def _gelu(g: _Graph, layer, x: str, y: str, state: dict) -> None:
    """GELU before opset 20 has no operator: x * (1 + erf(x / sqrt 2)) / 2, or the tanh form,
    as PyTorch writes them (netc import recognises both)."""
    n = layer.name
    if layer.opts["approximate"] == "none":
        t = g.node("Div", [x, g.const(f"{n}.sqrt2", math.sqrt(2))], f"{n}.scaled", f"{n}.div")
        t = g.node("Erf", [t], f"{n}.erf_out", f"{n}.erf")
        t = g.node("Add", [t, g.const(f"{n}.one", 1.0)], f"{n}.one_plus", f"{n}.add")
    else:
        c = g.node("Mul", [x, x], f"{n}.x2", f"{n}.square")
        c = g.node("Mul", [c, x], f"{n}.x3", f"{n}.cube")
        c = g.node("Mul", [c, g.const(f"{n}.k", 0.044715)], f"{n}.kx3", f"{n}.scale_cube")
        c = g.node("Add", [x, c], f"{n}.inner", f"{n}.add_inner")
        c = g.node("Mul", [c, g.const(f"{n}.s", math.sqrt(2 / math.pi))], f"{n}.u", f"{n}.scale_inner")
        c = g.node("Tanh", [c], f"{n}.tanh_out", f"{n}.tanh")
        t = g.node("Add", [c, g.const(f"{n}.one", 1.0)], f"{n}.one_plus", f"{n}.add")
    t = g.node("Mul", [x, t], f"{n}.x_times", f"{n}.mul")
    g.node("Mul", [t, g.const(f"{n}.half", 0.5)], y, n)


def _adaptive_avgpool(g: _Graph, layer, x: str, y: str, state: dict) -> None:
    """GlobalAveragePool for a 1x1 output; AveragePool where every bin has the same size
    (the input a multiple of the output); PyTorch's uneven bins have no ONNX operator."""
    _, h, w = layer.in_shape
    _, oh, ow = layer.out_shape
    if (oh, ow) == (1, 1):
        g.node("GlobalAveragePool", [x], y, layer.name)
        return
    if h % oh or w % ow:
        raise OnnxExportError(f"{layer.where()}: output {oh}x{ow} of input {h}x{w} has bins of unequal sizes, "
                              f"which no ONNX operator computes; use an output size that divides the input")
    k = [h // oh, w // ow]
    g.node("AveragePool", [x], y, layer.name, kernel_shape=k, strides=k)


def _relu6(g: _Graph, layer, x: str, y: str, state: dict) -> None:
    n = layer.name
    g.node("Clip", [x, g.const(f"{n}.min", 0.0), g.const(f"{n}.max", 6.0)], y, n)


def _silu(g: _Graph, layer, x: str, y: str, state: dict) -> None:
    """x * sigmoid(x), as PyTorch writes it (netc import recognises the pair)."""
    n = layer.name
    s = g.node("Sigmoid", [x], f"{n}.sigmoid_out", f"{n}.sigmoid")
    g.node("Mul", [x, s], y, n)


def _upsample(g: _Graph, layer, x: str, y: str, state: dict) -> None:
    """Resize, nearest: input pixel floor(out / scale) (asymmetric coordinates, floor), as
    PyTorch's nn.Upsample(mode='nearest') exports."""
    n = layer.name
    sh, sw = layer.opts["scale_factor"]
    scales = g.init(f"{n}.scales", np.array([1, 1, sh, sw], dtype=np.float32))
    g.node("Resize", [x, "", scales], y, n, mode="nearest", coordinate_transformation_mode="asymmetric",
           nearest_mode="floor")


# layer kind -> how it is written (evaluation semantics); None: the identity (no node)
EMIT: dict[str, Emit | None] = {
    "conv2d": _conv,
    "maxpool2d": _pool("MaxPool"),
    "avgpool2d": _pool("AveragePool"),
    "linear": _linear,
    "flatten": _simple("Flatten", lambda layer: {"axis": 1}),
    "relu": _simple("Relu"),
    "leaky_relu": _simple("LeakyRelu", lambda layer: {"alpha": layer.opts["negative_slope"]}),
    "sigmoid": _simple("Sigmoid"),
    "tanh": _simple("Tanh"),
    "gelu": _gelu,
    "relu6": _relu6,
    "hardswish": _simple("HardSwish"),
    "silu": _silu,
    "batchnorm2d": _batchnorm,
    "batchnorm1d": _batchnorm,
    "global_avgpool2d": _simple("GlobalAveragePool"),
    "adaptive_avgpool2d": _adaptive_avgpool,
    "upsample": _upsample,
    "dropout": None,
    # several inputs: x is the list of their names
    "add": lambda g, layer, xs, y, state: g.node("Sum", list(xs), y, layer.name),
    "concat": lambda g, layer, xs, y, state: g.node("Concat", list(xs), y, layer.name, axis=1),
}


def _norm_text(v) -> str:
    """A mean or std as metadata text: a number (0.286), or a JSON list of one per channel."""
    if isinstance(v, (list, tuple, np.ndarray)):
        return "[" + ", ".join(repr(float(x)) for x in v) + "]"
    return repr(float(v))


def onnx_model(network, state: dict[str, np.ndarray], normalisation: tuple | None = None,
               dtype=np.float32):
    """The ONNX model of `network` with weights `state` (by PyTorch name), in `dtype`."""
    import onnx
    from onnx import TensorProto, helper

    from . import __version__

    g = _Graph(np.dtype(dtype))
    state = {k: np.asarray(v, dtype=dtype) for k, v in state.items()}
    emits = [(l, EMIT[l.kind.kind]) if l.kind.kind in EMIT else (l, False) for l in network.layers]
    for l, e in emits:
        if e is False:
            raise OnnxExportError(f"{l.where()}: layer kind {l.kind.kind} has no ONNX form yet")
    names = {INPUT: INPUT}  # tensor (a layer's output) -> its ONNX value name
    written = [l for l, e in emits if e is not None]
    for l, e in emits:
        xs = [names[t] for t in l.inputs]
        if e is None:  # the identity: its output is its input
            names[l.output] = xs[0]
            continue
        y = names[l.output] = OUTPUT if l is written[-1] else f"{l.name}.out"
        e(g, l, xs[0] if l.kind.max_inputs == 1 else xs, y, state)
    if not written:
        g.node("Identity", [INPUT], OUTPUT, "identity")
    elem = TensorProto.DOUBLE if g.dtype == np.float64 else TensorProto.FLOAT
    graph = helper.make_graph(
        g.nodes, network.name,
        [helper.make_tensor_value_info(INPUT, elem, ["batch", *network.input_shape])],
        [helper.make_tensor_value_info(OUTPUT, elem, ["batch", *network.output_shape])], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="netcompiler", producer_version=__version__)
    model.ir_version = 8  # opset 17's IR version: readable by ONNX Runtime 1.13 and later
    props = {"netc.spec_hash": network.spec_hash}
    if normalisation is not None:
        props.update({f"netc.{k}": _norm_text(v) for k, v in zip(("mean", "std"), normalisation)})
    helper.set_model_props(model, props)
    onnx.checker.check_model(model, full_check=True)
    return model


def write_onnx(network, state: dict[str, np.ndarray], path: str | os.PathLike,
               normalisation: tuple | None = None) -> None:
    from .fileio import atomic_write

    model = onnx_model(network, state, normalisation)
    atomic_write(path, lambda f: f.write(model.SerializeToString()))
