"""`netc import`: an ONNX model -> a readable spec (NAME.yaml) and its weights (NAME.npz).

    imported = import_onnx("model.onnx")        # or netc import model.onnx -o DIR
    imported.write("out/")                      # out/NAME.yaml, out/NAME.npz

Stages, each a table (nothing here switches on an operator's name outside a table):
1. read: the file (regular, at most MAX_MODEL_BYTES) -> ModelProto; external data,
   other operator domains, several inputs or outputs are refused.
2. fold: nodes whose inputs are all constants (initializers, Constant nodes, the Shape of
   a tensor whose per-sample shape is static) are evaluated with numpy (`FOLD`), as
   onnx-simplifier does.  Shape arithmetic is evaluated for two batch sizes, so a value
   that depends on the batch (the target of `x.reshape(x.shape[0], -1)`) is told apart
   from one that does not.
3. convert: the nodes the output depends on, in order (a valid execution order), each
   matched by a row of `OPS` (one per ONNX operator) that turns it, and sometimes the
   nodes right after it (MatMul + Add, Pad + Conv), into layers; Add, Sum and Concat of
   several tensors are rows of `MULTI_INPUT` (add, concat).  A tensor may be read by any
   number of nodes: each layer records the layers it reads, and the spec names them in
   `inputs:` only where the graph is not a chain.  A run of element-wise nodes on scalars
   (PyTorch's Erf and Tanh decompositions of GELU) is identified by evaluating it on probe
   points against `COMPOSITES` (one row per activation).
   Layer names come from the nodes: ONNX node names, the weight's module path
   (layer1.0.conv1 of 'layer1.0.conv1.weight'), PyTorch's scope ('/layer1/layer1.0/relu/Relu'),
   so parameters are named as in the model's state_dict.
4. check: the spec text is checked by check.py, and each layer's output shape is compared
   with the shape ONNX's own shape inference gives the node: a difference (PyTorch's
   ceil_mode rule against ONNX's, say) is an error, never a silently different network.

Every problem is an `OnnxImportError` (a NetcError: one line, no traceback) that names
the node, its operator and attributes, and the nearest supported alternative.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import NetcError, SpecErrors, printable
from .fileio import Refused, read_bounded

MAX_MODEL_BYTES = 1 << 30  # 1 GiB: protobuf's own limit is 2 GiB; a model of 250M float32 weights
MAX_NODES = 100_000
MAX_ATTR_INT = 1 << 20  # as the spec's integer options (layers/base.py MAX_OPTION_INT)
MAX_CONST_ELEMENTS = 1 << 28  # a folded constant (ConstantOfShape): as a 1 GiB model's float32 weights
PROBE_BATCHES = (2, 3)  # shape arithmetic is folded for both: batch-dependent values differ


class OnnxImportError(NetcError):
    """An ONNX model that cannot be imported: its message names the file and the node."""


# ---- reading ------------------------------------------------------------------------------
def read_model(path: str | os.PathLike):
    """Parse an ONNX file: a regular file of at most MAX_MODEL_BYTES (checked on the open
    descriptor, before anything is read), without external data."""
    import onnx
    from google.protobuf.message import DecodeError

    where = str(path)
    try:
        data = read_bounded(path, MAX_MODEL_BYTES)
    except Refused as r:
        if r.why == "not_regular":
            raise OnnxImportError(f"{where}: not a regular file (an ONNX model must be a file, not a directory, "
                                  f"FIFO or device)") from None
        if r.why == "too_big" and r.size is not None:
            raise OnnxImportError(f"{where}: {r.size:,} bytes; models over {MAX_MODEL_BYTES:,} bytes are "
                                  f"refused") from None
        if r.why == "too_big":
            raise OnnxImportError(f"{where}: over {MAX_MODEL_BYTES:,} bytes; refused") from None
        raise OnnxImportError(f"{where}: cannot read model: {r.detail}") from None
    try:
        model = onnx.load_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise OnnxImportError(f"{where}: not an ONNX model ({exc or 'protobuf parse error'})") from None
    if not model.HasField("graph") or not model.graph.node:
        raise OnnxImportError(f"{where}: not an ONNX model (no graph nodes)")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001 - onnx raises ValidationError and others
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OnnxImportError(f"{where}: not a valid ONNX model: {printable(first)}") from None
    return model


# ---- attributes, validated ------------------------------------------------------------------
def _attr_value(a) -> Any:
    import onnx

    v = onnx.helper.get_attribute_value(a)
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else v


def _fmt_attr(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        items = [_fmt_attr(x) for x in v[:8]]
        return "[" + ", ".join(items) + (", ..." if len(v) > 8 else "") + "]"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, str):
        return repr(v[:40])
    if isinstance(v, (int, bool)):
        return str(v)
    return type(v).__name__


def describe(node) -> str:
    """'node '/0/Conv' (Conv, kernel_shape=[3, 3], pads=[0, 0, 1, 1])'."""
    attrs = ", ".join(f"{a.name}={_fmt_attr(_attr_value(a))}" for a in node.attribute)
    name = node.name or (node.output[0] if node.output else "?")
    return printable(f"node '{name}' ({node.op_type}{', ' + attrs if attrs else ''})")


class Attrs:
    """A node's attributes, read with their type and range checked; `done()` refuses any
    attribute the operator's row did not read (its meaning would be ignored)."""

    def __init__(self, node, fail: Callable[..., OnnxImportError]):
        self.node, self.fail = node, fail
        self.raw = {a.name: a for a in node.attribute}
        self.read: set[str] = set()

    def _get(self, name: str, types: tuple[int, ...]):
        self.read.add(name)
        a = self.raw.get(name)
        if a is None:
            return None
        if a.type not in types:
            raise self.fail(f"attribute '{name}' has the wrong type")
        return _attr_value(a)

    def int(self, name: str, default: int, lo: int = 0, hi: int = MAX_ATTR_INT) -> int:
        v = self._get(name, (2,))  # AttributeProto.INT
        if v is None:
            return default
        if not lo <= v <= hi:
            raise self.fail(f"attribute '{name}' must be in {lo}..{hi:,}, got {v}")
        return int(v)

    def ints(self, name: str, default: list[int] | None, n: int, lo: int = 0, hi: int = MAX_ATTR_INT
             ) -> list[int] | None:
        v = self._get(name, (7,))  # INTS
        if v is None:
            return default
        if len(v) != n:
            raise self.fail(f"attribute '{name}' must have {n} values (2-D only), got {len(v)}")
        if not all(lo <= x <= hi for x in v):
            raise self.fail(f"attribute '{name}' values must be in {lo}..{hi:,}, got {_fmt_attr(list(v))}")
        return [int(x) for x in v]

    def float(self, name: str, default: float, lo: float = -1e6, hi: float = 1e6) -> float:
        v = self._get(name, (1,))  # FLOAT
        if v is None:
            return default
        if not (math.isfinite(v) and lo <= v <= hi):
            raise self.fail(f"attribute '{name}' must be a finite number in [{lo:g}, {hi:g}], got {v!r}")
        # ONNX stores float attributes as float32: the shortest decimal of that float32 is the
        # value the exporter was given (0.01, not 0.009999999776)
        return float(str(np.float32(v)))

    def str(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        v = self._get(name, (3,))  # STRING
        if v is None:
            return default
        if v not in choices:
            raise self.fail(f"attribute '{name}' must be one of {', '.join(choices)}, got {_fmt_attr(v)}")
        return v

    def done(self) -> None:
        extra = sorted(set(self.raw) - self.read)
        if extra:
            raise self.fail(f"attribute{'s' if len(extra) > 1 else ''} {', '.join(extra)} not supported")


# ---- constant folding ---------------------------------------------------------------------
def _np_dtype(onnx_type: int):
    import onnx

    return onnx.helper.tensor_dtype_to_np_dtype(onnx_type)


def _fold_constant(a: Attrs):
    import onnx.numpy_helper as nh

    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in a.raw:
            a.read.add(key)
            attr = a.raw[key]
            if key == "value":
                return nh.to_array(attr.t)
            v = _attr_value(attr)
            return np.array(v, dtype=np.float32 if "float" in key else np.int64)
    raise a.fail("Constant without a value (sparse and string constants are not supported)")


def _axis(a: Attrs, name: str, rank: int, default: int = 0) -> int:
    ax = a.int(name, default, -max(rank, 1), max(rank - 1, 0))
    return ax % max(rank, 1)


def _axes_input(ins, a: Attrs, rank: int) -> list[int]:
    """Squeeze's axes: its second input (opset 13) or its attribute (before)."""
    if len(ins) > 1 and ins[1] is not None:
        axes = ins[1]
    else:
        a.read.add("axes")
        axes = _attr_value(a.raw["axes"]) if "axes" in a.raw else []
    return [int(x) % rank for x in np.asarray(axes).reshape(-1)]


def _unsqueeze(ins, a: Attrs) -> np.ndarray:
    """Unsqueeze: the axes are its second input (opset 13) or its attribute (before)."""
    axes = np.asarray(ins[1] if len(ins) > 1 and ins[1] is not None else a.ints(
        "axes", [], len(a.raw["axes"].ints) if "axes" in a.raw else 0, -64, 64)).reshape(-1)
    rank = ins[0].ndim + len(axes)
    return np.expand_dims(ins[0], tuple(int(x) % rank for x in axes))


def _constant_of_shape(ins, a: Attrs) -> np.ndarray:
    """ConstantOfShape: a tensor of the given shape filled with `value` (one element; 0.0 by
    default); at most MAX_CONST_ELEMENTS elements."""
    import onnx.numpy_helper as nh

    shape = [int(d) for d in np.asarray(ins[0]).reshape(-1)]
    if any(d < 0 for d in shape) or math.prod(shape) > MAX_CONST_ELEMENTS:
        raise ValueError(f"shape {shape}: at most {MAX_CONST_ELEMENTS:,} elements")
    a.read.add("value")
    value = nh.to_array(a.raw["value"].t).reshape(-1) if "value" in a.raw else np.zeros(1, np.float32)
    if value.size != 1:
        raise ValueError(f"value of {value.size} elements, expected 1")
    return np.full(shape, value[0], dtype=value.dtype)


def _slice(ins, a: Attrs):
    data, starts, ends = ins[0], ins[1], ins[2]
    axes = ins[3] if len(ins) > 3 and ins[3] is not None else np.arange(len(starts))
    steps = ins[4] if len(ins) > 4 and ins[4] is not None else np.ones(len(starts), dtype=np.int64)
    index = [slice(None)] * data.ndim
    for s, e, ax, st in zip(starts, ends, axes, steps):
        index[int(ax)] = slice(int(s), int(e), int(st))
    return data[tuple(index)]


def _reshape_target(data_shape: tuple[int, ...], target: np.ndarray, allowzero: int) -> tuple[int, ...] | None:
    """ONNX Reshape's output shape (0 copies the input's dimension unless allowzero, one -1
    is inferred), or None if the target does not fit."""
    out = [int(data_shape[i]) if (t == 0 and not allowzero and i < len(data_shape)) else int(t)
           for i, t in enumerate(np.asarray(target).reshape(-1))]
    total = math.prod(data_shape)
    if out.count(-1) > 1 or any(d < -1 for d in out):
        return None
    if -1 in out:
        known = math.prod(d for d in out if d != -1)
        if known == 0 or total % known:
            return None
        out[out.index(-1)] = total // known
    return tuple(out) if math.prod(out) == total else None


# op -> (numpy function of (inputs, attrs), attributes it reads are validated by Attrs)
FOLD: dict[str, Callable[[list, Attrs], np.ndarray]] = {
    "Constant": lambda ins, a: _fold_constant(a),
    "Identity": lambda ins, a: ins[0],
    "Cast": lambda ins, a: ins[0].astype(_np_dtype(a.int("to", 1, 1, 16))),
    "Gather": lambda ins, a: np.take(ins[0], ins[1].astype(np.int64), axis=_axis(a, "axis", ins[0].ndim)),
    "Concat": lambda ins, a: np.concatenate([np.atleast_1d(x) for x in ins], axis=_axis(a, "axis", ins[0].ndim)),
    "Unsqueeze": lambda ins, a: _unsqueeze(ins, a),
    "ConstantOfShape": lambda ins, a: _constant_of_shape(ins, a),
    "Squeeze": lambda ins, a: np.squeeze(ins[0], axis=tuple(_axes_input(ins, a, ins[0].ndim)) or None),
    "Slice": lambda ins, a: _slice(ins, a),
    "Transpose": lambda ins, a: np.transpose(ins[0], a.ints("perm", None, ins[0].ndim, 0, 64)),
    "Reshape": lambda ins, a: ins[0].reshape(_reshape_target(ins[0].shape, ins[1], a.int("allowzero", 0, 0, 1))),
    "Add": lambda ins, a: ins[0] + ins[1],
    "Sub": lambda ins, a: ins[0] - ins[1],
    "Mul": lambda ins, a: ins[0] * ins[1],
    "Div": lambda ins, a: (ins[0] // ins[1]) if ins[0].dtype.kind in "iu" else ins[0] / ins[1],
    "ReduceProd": lambda ins, a: np.prod(ins[0], keepdims=bool(a.int("keepdims", 1, 0, 1))),
    "Sqrt": lambda ins, a: np.sqrt(ins[0]),
}


# ---- the network being built --------------------------------------------------------------
@dataclass
class ImportedLayer:
    kind: str
    opts: dict[str, Any]
    node: Any  # the NodeProto it came from (for names and messages)
    params: dict[str, np.ndarray] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)  # candidate layer names, best first
    name: str | None = None  # the name written to the spec (None: the automatic name)
    reads: list["ImportedLayer | None"] = field(default_factory=list)  # the layers it reads (None: the input)
    final: str = ""  # its name in the spec, written or automatic (assign_names)


class _Importer:
    def __init__(self, model, path: str):
        import onnx

        self.model, self.path = model, path
        g = model.graph
        opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
        self.opset = opsets.get("ai.onnx", 0)
        if not self.opset:
            raise OnnxImportError(f"{path}: the model imports no default (ai.onnx) opset")
        if len(g.node) > MAX_NODES:
            raise OnnxImportError(f"{path}: {len(g.node):,} nodes; at most {MAX_NODES:,}")
        for t in g.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                raise OnnxImportError(f"{path}: initializer '{printable(t.name)}' is stored in an external file; "
                                      f"save the model with its weights inside (onnx.save(model, path, "
                                      f"save_as_external_data=False))")
        for n in g.node:
            if n.domain not in ("", "ai.onnx"):
                raise self.fail(n, f"operator domain '{n.domain}' is not supported (only standard ONNX operators)")
        init = {t.name: onnx.numpy_helper.to_array(t) for t in g.initializer}
        inputs = [i for i in g.input if i.name not in init]
        if len(inputs) != 1 or len(g.output) != 1:
            raise OnnxImportError(f"{path}: the graph has {len(inputs)} inputs and {len(g.output)} outputs; "
                                  f"netcompiler networks have one input and one output")
        self.input, self.output = inputs[0].name, g.output[0].name
        self.input_shape = self._sample_shape(inputs[0], "input")
        batch = inputs[0].type.tensor_type.shape.dim[0]
        self.fixed_batch = batch.dim_value if batch.HasField("dim_value") and batch.dim_value > 0 else None
        try:
            # data propagation evaluates shape arithmetic (Shape -> Gather -> Concat -> Reshape)
            inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        except Exception:  # noqa: BLE001 - a model ONNX cannot infer: fall back to the declared shapes
            inferred = model
        self.shapes: dict[str, tuple] = {}
        for vi in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]:
            dims = vi.type.tensor_type.shape.dim
            if vi.type.tensor_type.HasField("shape"):
                self.shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
        self.consts = [dict(init) for _ in PROBE_BATCHES]  # per probe batch size
        self.nodes = self._fold(list(g.node))
        self.notes: list[str] = []
        self.layers: list[ImportedLayer] = []
        # ONNX tensor -> the layer that computes it (None: the network input); an identity
        # (Dropout, a Flatten of a flat tensor) maps its output to its input's layer
        self.source: dict[str, ImportedLayer | None] = {self.input: None}

    # -- messages
    def fail(self, node, message: str, alternative: str = "") -> OnnxImportError:
        alt = f"; {alternative}" if alternative else ""
        return OnnxImportError(f"{self.path}: {describe(node)}: {printable(message)}{alt}")

    def _sample_shape(self, vi, what: str) -> tuple[int, ...]:
        tt = vi.type.tensor_type
        dims = list(tt.shape.dim)
        if tt.elem_type not in (1, 11, 10):  # float, double, float16
            raise OnnxImportError(f"{self.path}: {what} '{printable(vi.name)}' is not a real tensor (elem type "
                                  f"{tt.elem_type})")
        if len(dims) not in (2, 4) or not all(d.HasField("dim_value") and 0 < d.dim_value <= 2**31 - 1
                                                for d in dims[1:]):
            shown = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
            raise OnnxImportError(f"{self.path}: {what} '{printable(vi.name)}' has shape {shown}; netcompiler needs "
                                  f"[batch, channels, height, width] or [batch, features] with fixed sizes after "
                                  f"the batch")
        return tuple(d.dim_value for d in dims[1:])

    # -- folding
    def is_const(self, name: str) -> bool:
        return name == "" or name in self.consts[0]

    def const(self, node, name: str) -> np.ndarray:
        """A constant input, the same for every batch size."""
        vals = [c[name] for c in self.consts]
        if any(v.shape != vals[0].shape or not np.array_equal(v, vals[0]) for v in vals[1:]):
            raise self.fail(node, f"input '{printable(name)}' depends on the batch size")
        return vals[0]

    def _fold(self, nodes: list) -> list:
        rest = []
        for node in nodes:
            rule = FOLD.get(node.op_type)
            if node.op_type == "Shape" and len(node.input) == 1 and not self.is_const(node.input[0]):
                full = self.shapes.get(node.input[0])
                if full is None or any(d is None for d in full[1:]) or len(node.output) != 1:
                    rest.append(node)
                    continue
                a = Attrs(node, lambda m, alt="", n=node: self.fail(n, m, alt))
                start, end = a.int("start", 0, -64, 64), a.int("end", 64, -64, 64)
                a.done()
                for c, b in zip(self.consts, PROBE_BATCHES):
                    c[node.output[0]] = np.array((b, *full[1:]), dtype=np.int64)[start:end]
                continue
            if rule is None or not all(self.is_const(i) for i in node.input) or len(node.output) != 1:
                rest.append(node)
                continue
            a = Attrs(node, lambda m, alt="", n=node: self.fail(n, m, alt))
            for c in self.consts:
                ins = [c[i] if i else None for i in node.input]
                try:
                    c[node.output[0]] = np.asarray(rule(ins, a))
                except OnnxImportError:
                    raise
                except Exception as exc:  # noqa: BLE001 - numpy refuses the values
                    raise self.fail(node, f"cannot evaluate this constant expression ({exc})") from None
            a.done()
        return rest

    # -- shapes
    def sample_shape(self, node, name: str) -> tuple[int, ...]:
        """The per-sample shape of a tensor: from ONNX's shape inference, else (for a tensor
        the layers converted so far compute) by checking them."""
        full = self.shapes.get(name)
        if full is not None and None not in full[1:]:
            return tuple(full[1:])
        if name == self.input:
            return self.input_shape
        if name in self.source and self.source[name] is None:
            return self.input_shape
        if name in self.source and self.layers:
            src = self.source[name]
            from .check import check_text

            assign_names(self.layers, "net")
            text = spec_text("net", self.input_shape, self.layers, "mse", [])
            try:
                return check_text(text, "net.yaml").layers[self.layers.index(src)].out_shape
            except SpecErrors as exc:
                raise _located(exc, text, self.layers, self) from None
        raise self.fail(node, f"the shape of '{printable(name)}' is unknown (ONNX shape inference gave none)")

    # -- conversion
    def run(self) -> list[ImportedLayer]:
        self.nodes = self._live(self.nodes)
        consumers: dict[str, list[int]] = {}
        for i, n in enumerate(self.nodes):
            for t in n.input:
                consumers.setdefault(t, []).append(i)
        self.consumers = consumers
        self.cur, self.pos = self.input, 0
        self.layers = layers = []
        while self.pos < len(self.nodes):
            node = self.nodes[self.pos]
            data = [t for t in node.input if not self.is_const(t)]
            if not data:
                raise self.fail(node, "reads only constants, and is not an operator netcompiler evaluates at import",
                                "constant shape arithmetic: " + ", ".join(sorted(FOLD)))
            unknown = [t for t in data if t not in self.source]
            if unknown:
                raise self.fail(node, f"reads '{printable(unknown[0])}', which no node before it computes (the "
                                      f"nodes are not in execution order)")
            multi = MULTI_INPUT.get(node.op_type)
            if len(set(data)) > 1 and multi is None:
                raise self.fail(node, f"reads {len(set(data))} activation tensors ({', '.join(map(printable, data))})",
                                "netcompiler's layers read one tensor, except add (Add, Sum of tensors of one "
                                "shape) and concat (Concat along channels)")
            self.cur = data[0]
            users = consumers.get(self.cur, [])
            if multi is not None and (len(data) > 1 or node.op_type not in ELEMENTWISE):
                a = Attrs(node, lambda m, alt=multi.alternative, n=node: self.fail(n, m, alt))
                new = multi.convert(self, node, a)
                a.done()
                self.pos += 1
                self.source[node.output[0]] = new[-1] if new else self.source[data[0]]
                self.layers.extend(new)
                continue
            src = self.source[self.cur]
            if node.op_type in ELEMENTWISE and (node.op_type not in OPS or len(users) > 1):
                new = self.composite(node)
            else:
                new = None
            if new is None:
                rule = OPS.get(node.op_type)
                if rule is None:
                    raise self.fail(node, "operator not supported", UNSUPPORTED_OPS.get(
                        node.op_type, "supported operators: " + ", ".join(sorted({*OPS, *MULTI_INPUT}))))
                a = Attrs(node, lambda m, alt=rule.alternative, n=node: self.fail(n, m, alt))
                new = rule.convert(self, node, a)
                a.done()
                self.pos += 1
            if new:
                new[0].reads = [src]
                for before, l in zip(new, new[1:]):
                    l.reads = [before]
            self.source[self.cur] = new[-1] if new else src
            layers.extend(new)
        if self.output not in self.source:
            raise OnnxImportError(f"{self.path}: no node computes the graph output '{printable(self.output)}'")
        if layers and self.source[self.output] is not layers[-1]:
            raise OnnxImportError(f"{self.path}: the graph output '{printable(self.output)}' is not the last "
                                  f"layer's output")
        return layers

    def _live(self, nodes: list) -> list:
        """The nodes the graph output depends on (in their order); the others are noted."""
        need = {self.output}
        live = []
        for node in reversed(nodes):
            if any(o in need for o in node.output):
                live.append(node)
                need.update(t for t in node.input if t)
        dead = len(nodes) - len(live)
        if dead:
            self.notes.append(f"{dead} node{'s' if dead > 1 else ''} the output does not depend on: not imported")
        return live[::-1]

    def advance(self, node, out_index: int = 0) -> None:
        self.cur = node.output[out_index]

    def next_node(self, node):
        """The node after `node` when it is the only reader of node's output, else None."""
        users = self.consumers.get(node.output[0], [])
        if len(users) == 1 and users[0] == self.pos + 1 and node.output[0] != self.output:
            return self.nodes[self.pos + 1]
        return None

    # element-wise runs: identified by their values on probe points
    def composite(self, first) -> list[ImportedLayer] | None:
        """The activation a run of element-wise nodes from `first` computes; None when there
        is none and `first` has a row of its own."""
        x = self.cur
        run, known = [], {x}
        for node in self.nodes[self.pos:]:
            if node.op_type not in ELEMENTWISE or len(node.output) != 1:
                break
            data = [t for t in node.input if not self.is_const(t)]
            if not data or not set(data) <= known or not all(self.is_const(t) and self.const(node, t).size == 1
                                                             for t in node.input if t not in known):
                break
            run.append(node)
            known.add(node.output[0])
        for end in range(len(run), 0, -1):
            part = run[:end]
            inside = {n.output[0] for n in part}
            positions = set(range(self.pos, self.pos + end))
            # nothing outside the run reads its inner tensors (its input may have other readers)
            closed = all(set(self.consumers.get(t, [])) <= positions and t != self.output
                         for t in inside - {part[-1].output[0]})
            if not closed:
                continue
            values = self._evaluate(part, x)
            for kind, opts, fn in COMPOSITES:
                want = fn(PROBE)
                if np.all(np.abs(values - want) <= 1e-6 * (1 + np.abs(want))):
                    self.pos += end
                    self.cur = part[-1].output[0]
                    return [ImportedLayer(kind, dict(opts), part[-1], names=self.scope_names(part[-1]))]
        if first.op_type in OPS:
            return None  # a Sigmoid or Tanh on its own: its row converts it
        consts = [t for t in first.input if self.is_const(t) and t and self.const(first, t).size > 1]
        if consts:
            shape = list(self.const(first, consts[0]).shape)
            raise self.fail(first, f"combines the activations with a constant tensor of shape {shape}",
                            "element-wise layers with scalar constants are activations; per-channel scales and "
                            "shifts: batchnorm2d; a bias belongs to its conv2d or linear")
        ops = ", ".join(n.op_type for n in run) or first.op_type
        raise self.fail(first, f"starts an element-wise computation ({ops}) that is none of the activations "
                               f"netcompiler has", f"{ACTIVATIONS} (gelu exact or tanh); per-channel scales "
                                                   "and shifts: batchnorm2d")

    def _evaluate(self, part, x: str) -> np.ndarray:
        vals = {x: PROBE}
        for node in part:
            ins = [vals[t] if t in vals else self.const(node, t).astype(np.float64).reshape(()) for t in node.input]
            with np.errstate(all="ignore"):
                vals[node.output[0]] = ELEMENTWISE[node.op_type](ins)
        return vals[part[-1].output[0]]

    def scope_names(self, node, weight: str | None = None) -> list[str]:
        """Candidate layer names: the node's name, its weight's module path (conv1 of
        'conv1.weight'), PyTorch's scope in the node name ('/features/conv1/Conv')."""
        out = [node.name]
        if weight and weight.endswith(".weight"):
            out.append(weight[: -len(".weight")])
        m = re.fullmatch(r"/(.+)/[A-Za-z]+(_\d+)?", node.name or "")
        if m:
            out.append(m.group(1))
            # PyTorch's scope: each module qualified by its container ('/layer1/layer1.0/conv1'),
            # the dotted module path (layer1.0.conv1) is the state_dict's
            path: list[str] = []
            for part in m.group(1).split("/"):
                if path and part.startswith(path[-1] + "."):
                    path[-1] = part
                else:
                    path.append(part)
            out.append(".".join(path))
        out += [re.sub(r"[./]+", "_", n).strip("_") for n in out[1:]]
        return out


# ---- element-wise functions: ops of composite runs, and the activations they may form ----------
def _erf(x):
    return np.vectorize(math.erf, otypes=[np.float64])(x)


ELEMENTWISE: dict[str, Callable[[list], np.ndarray]] = {
    "Add": lambda i: i[0] + i[1], "Sub": lambda i: i[0] - i[1], "Mul": lambda i: i[0] * i[1],
    "Div": lambda i: i[0] / i[1], "Pow": lambda i: np.power(i[0], i[1]), "Neg": lambda i: -i[0],
    "Sqrt": lambda i: np.sqrt(i[0]), "Exp": lambda i: np.exp(i[0]), "Erf": lambda i: _erf(i[0]),
    "Tanh": lambda i: np.tanh(i[0]), "Sigmoid": lambda i: 1 / (1 + np.exp(-i[0])),
    "Reciprocal": lambda i: 1 / i[0],
}
PROBE = np.concatenate([np.linspace(-8, 8, 321), [-1e3, -40.0, -1e-3, 0.0, 1e-3, 40.0, 1e3]])
# (kind, options, reference function): element-wise runs identified by their values on PROBE
COMPOSITES: list[tuple[str, dict, Callable[[np.ndarray], np.ndarray]]] = [
    ("gelu", {}, lambda x: x * (1 + _erf(x / math.sqrt(2))) / 2),
    ("gelu", {"approximate": "tanh"},
     lambda x: x / 2 * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))),
    ("silu", {}, lambda x: x / (1 + np.exp(-x))),
]


# ---- operator rows --------------------------------------------------------------------------
@dataclass(frozen=True)
class OpRule:
    convert: Callable[[_Importer, Any, Attrs], list[ImportedLayer]]
    alternative: str = ""


def _window_pads(imp: _Importer, node, a: Attrs, kind: str, kernel: list[int], strides: list[int],
                 dilations: list[int], extra: list[int] | None = None) -> Any:
    """The spec's `padding` of a conv or pool from pads / auto_pad (+ a folded Pad): an int
    or [h, w] when symmetric; 'same' for PyTorch's asymmetric 'same' (conv2d); else
    [top, bottom, left, right] if the kind's padding option takes that, else an error."""
    auto = a.str("auto_pad", "NOTSET", ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"))
    pads = a.ints("pads", None, 4)
    if auto != "NOTSET" and pads is not None and any(pads):
        raise a.fail(f"auto_pad {auto} together with pads")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        h, w = imp.sample_shape(node, imp.cur)[1:]
        pads = [0] * 4
        for i, (n, k, s, d) in enumerate(zip((h, w), kernel, strides, dilations)):
            total = max((-(-n // s) - 1) * s + d * (k - 1) + 1 - n, 0)
            small, big = total // 2, total - total // 2
            pads[i], pads[i + 2] = (small, big) if auto == "SAME_UPPER" else (big, small)
    pads = pads or [0] * 4
    if extra:
        pads = [p + e for p, e in zip(pads, extra)]
    if pads[0] == pads[2] and pads[1] == pads[3]:
        return _pair(pads[:2])
    option = _option(kind, "padding")
    same = [d * (k - 1) for k, d in zip(kernel, dilations)]
    if strides == [1, 1] and pads == [same[0] // 2, same[1] // 2, same[0] - same[0] // 2, same[1] - same[1] // 2] \
            and _parses(option, "same"):
        return "same"  # PyTorch's padding='same': the odd pixel at the bottom and right
    four = [pads[0], pads[2], pads[1], pads[3]]  # ONNX: begins then ends; the spec: top, bottom, left, right
    if _parses(option, four):
        return four
    raise a.fail(f"asymmetric padding (top {pads[0]}, left {pads[1]}, bottom {pads[2]}, right {pads[3]}) is "
                 f"not supported yet", "use symmetric padding (PyTorch's padding=k//2 for odd kernels)")


def _option(kind: str, name: str):
    from .layers import REGISTRY

    return next(o for o in REGISTRY[kind].options if o.name == name)


def _parses(option, value) -> bool:
    """Whether the layer kind's own option parser accepts `value` (what the spec can say)."""
    from .layers.base import OptionError

    try:
        option.parse(value)
    except OptionError:
        return False
    return True


def _pair(v: list[int]) -> Any:
    return v[0] if v[0] == v[1] else list(v)


def _take_pad(imp: _Importer, node, value_ok: Callable[[float], bool]) -> list[int] | None:
    """Pad node + conv/pool: the 2-D pads [top, left, bottom, right] it adds (consumed)."""
    if node.op_type != "Pad":
        return None
    a = Attrs(node, lambda m, alt="": imp.fail(node, m, alt))
    mode = a.str("mode", "constant", ("constant", "reflect", "edge", "wrap"))
    a.done()
    if mode != "constant":
        raise imp.fail(node, f"Pad mode '{mode}' is not supported", "zero padding folded into conv2d")
    if len(node.input) < 2 or not imp.is_const(node.input[1]):
        raise imp.fail(node, "pads must be a constant")
    pads = imp.const(node, node.input[1]).astype(np.int64).reshape(-1)
    value = imp.const(node, node.input[2]).reshape(-1) if len(node.input) > 2 and node.input[2] else np.zeros(1)
    if len(node.input) > 3 and node.input[3]:
        raise imp.fail(node, "Pad with axes is not supported")
    if pads.size != 8 or pads[[0, 1, 4, 5]].any() or (pads < 0).any() or pads.max() > MAX_ATTR_INT:
        raise imp.fail(node, f"only zero-or-more padding of height and width is supported, got pads "
                             f"{pads.tolist()}")
    if value.size != 1 or not value_ok(float(value[0])):
        raise imp.fail(node, f"padding value {float(value[0])!r} does not match the next layer's padding",
                       "conv2d and avgpool2d pad with zeros, maxpool2d with -inf")
    return [int(pads[2]), int(pads[3]), int(pads[6]), int(pads[7])]


def _pad(imp: _Importer, node, a: Attrs) -> list[ImportedLayer]:
    nxt = imp.next_node(node)
    rule = PAD_FOLDS.get(nxt.op_type) if nxt is not None else None
    if rule is None:
        raise imp.fail(node, "a Pad is supported only right before a Conv, AveragePool or MaxPool that it is "
                             "folded into")
    a.read.update(a.raw)  # checked by _take_pad
    extra = _take_pad(imp, node, rule[0])
    imp.cur = node.output[0]
    imp.pos += 1
    na = Attrs(nxt, lambda m, alt=OPS[nxt.op_type].alternative: imp.fail(nxt, m, alt))
    out = rule[1](imp, nxt, na, extra)
    na.done()
    return out


def _conv(imp: _Importer, node, a: Attrs, extra: list[int] | None = None) -> list[ImportedLayer]:
    if len(node.input) < 2 or not imp.is_const(node.input[1]) or (len(node.input) > 2 and node.input[2]
                                                                  and not imp.is_const(node.input[2])):
        raise imp.fail(node, "weights must be constants (initializers)")
    w = imp.const(node, node.input[1])
    if w.ndim != 4:
        raise imp.fail(node, f"weight of rank {w.ndim}: only 2-D convolution", "conv2d")
    kernel = a.ints("kernel_shape", list(w.shape[2:]), 2, 1)
    if kernel != list(w.shape[2:]):
        raise imp.fail(node, f"kernel_shape {kernel} differs from the weight's {list(w.shape[2:])}")
    strides, dil = a.ints("strides", [1, 1], 2, 1), a.ints("dilations", [1, 1], 2, 1)
    group = a.int("group", 1, 1)
    pads = _window_pads(imp, node, a, "conv2d", kernel, strides, dil, extra)
    opts = dict(out_channels=int(w.shape[0]), kernel_size=_pair(kernel), stride=_pair(strides),
                padding=pads, dilation=_pair(dil), groups=group,
                bias=len(node.input) > 2 and bool(node.input[2]))
    params = {"weight": w}
    if opts["bias"]:
        params["bias"] = imp.const(node, node.input[2])
    imp.advance(node)
    return [ImportedLayer("conv2d", opts, node, params, imp.scope_names(node, node.input[1]))]


def _pool(kind: str):
    def convert(imp: _Importer, node, a: Attrs, extra: list[int] | None = None) -> list[ImportedLayer]:
        kernel = a.ints("kernel_shape", None, 2, 1)
        if kernel is None:
            raise imp.fail(node, "kernel_shape is required")
        strides = a.ints("strides", [1, 1], 2, 1)
        dil = a.ints("dilations", [1, 1], 2, 1)
        ceil = a.int("ceil_mode", 0, 0, 1)
        opts: dict[str, Any] = dict(kernel_size=_pair(kernel), stride=_pair(strides))
        if kind == "maxpool2d":
            a.int("storage_order", 0, 0, 0)
            if len(node.output) > 1 and node.output[1]:
                raise imp.fail(node, "the Indices output is not supported")
        elif dil != [1, 1]:
            raise imp.fail(node, "dilated average pooling is not supported", "avgpool2d without dilations")
        include = a.int("count_include_pad", 0, 0, 1) if kind == "avgpool2d" else 1
        if extra and kind == "avgpool2d" and not include and a.ints("pads", [0] * 4, 4) != [0] * 4:
            raise imp.fail(node, "a Pad before an AveragePool that pads itself without counting the padding")
        opts["padding"] = _window_pads(imp, node, a, kind, kernel, strides, dil, extra)
        if kind == "maxpool2d":
            opts["dilation"] = _pair(dil)
        opts["ceil_mode"] = bool(ceil)
        if kind == "avgpool2d":
            opts["count_include_pad"] = bool(include or extra)
        imp.advance(node)
        return [ImportedLayer(kind, opts, node, names=imp.scope_names(node))]

    return convert


def _global_avgpool(imp: _Importer, node, a: Attrs) -> list[ImportedLayer]:
    shape = imp.sample_shape(node, imp.cur)
    if len(shape) != 3:
        raise imp.fail(node, f"input of shape {list(shape)}: needs (channels, height, width)")
    imp.advance(node)
    return [ImportedLayer("global_avgpool2d", {}, node, names=imp.scope_names(node))]


def _clip(imp: _Importer, node, a: Attrs) -> list[ImportedLayer]:
    """Clip(0, 6): relu6; the bounds are inputs (opset 11) or attributes (before)."""
    lo, hi = a.float("min", -math.inf, -math.inf, math.inf), a.float("max", math.inf, -math.inf, math.inf)
    for i, name in ((1, "min"), (2, "max")):
        if len(node.input) > i and node.input[i]:
            if not imp.is_const(node.input[i]):
                raise imp.fail(node, f"its {name} is not a constant")
            v = imp.const(node, node.input[i]).reshape(-1)
            if v.size != 1:
                raise imp.fail(node, f"its {name} has {v.size} values, expected one")
            lo, hi = (float(v[0]), hi) if i == 1 else (lo, float(v[0]))
    if (lo, hi) != (0.0, 6.0):
        raise imp.fail(node, f"Clip to [{lo:g}, {hi:g}] is not supported", "Clip(0, 6) is relu6")
    imp.advance(node)
    return [ImportedLayer("relu6", {}, node, names=imp.scope_names(node))]


def _nearest_sources(mode: str, rounding: str, size: int, scale: int) -> list[int] | None:
    """The input index each output index of a nearest Resize reads, or None for a
    coordinate mode that is not defined here."""
    out = size * scale
    coord = {"asymmetric": lambda o: o / scale, "half_pixel": lambda o: (o + 0.5) / scale - 0.5,
             "pytorch_half_pixel": lambda o: (o + 0.5) / scale - 0.5 if out > 1 else 0.0,
             "align_corners": lambda o: o * (size - 1) / (out - 1) if out > 1 else 0.0,
             "tf_half_pixel_for_nn": lambda o: (o + 0.5) / scale}.get(mode)
    near = {"round_prefer_floor": lambda v: math.ceil(v - 0.5), "round_prefer_ceil": lambda v: math.floor(v + 0.5),
            "floor": math.floor, "ceil": math.ceil}[rounding]
    if coord is None:
        return None
    return [min(max(near(coord(o)), 0), size - 1) for o in range(out)]


def _resize(imp: _Importer, node, a: Attrs) -> list[ImportedLayer]:
    """Resize / Upsample, nearest, integer scales of height and width: upsample, when each
    output pixel reads input pixel floor(out / scale) under the node's coordinate mode."""
    shape = imp.sample_shape(node, imp.cur)
    mode = a.str("mode", "nearest", ("nearest", "linear", "cubic", "bilinear", "trilinear"))
    coord = "asymmetric"
    rounding = "floor"
    if node.op_type == "Resize":
        coord = a.str("coordinate_transformation_mode", "half_pixel", (
            "half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners", "asymmetric",
            "tf_half_pixel_for_nn", "tf_crop_and_resize"))
        rounding = a.str("nearest_mode", "round_prefer_floor", ("round_prefer_floor", "round_prefer_ceil", "floor",
                                                                "ceil"))
        a.float("cubic_coeff_a", -0.75)
        a.int("exclude_outside", 0, 0, 1)
        a.float("extrapolation_value", 0.0)
        a.int("antialias", 0, 0, 1)
        if "axes" in a.raw or "keep_aspect_ratio_policy" in a.raw:
            a.read.update(("axes", "keep_aspect_ratio_policy"))
            raise imp.fail(node, "axes and keep_aspect_ratio_policy are not supported", "scales for all 4 axes")
        ins = list(node.input) + [""] * 4
        if ins[3]:
            raise imp.fail(node, "output sizes are not supported", "scales [1, 1, h, w] with integer h and w")
        scales_name = ins[2] if imp.opset >= 11 else ins[1]
    else:
        scales_name = node.input[1] if len(node.input) > 1 else ""
        attr = a._get("scales", (6,))  # FLOATS (opset 7)
        if attr is not None:
            scales = np.asarray(attr, dtype=np.float64)
    if mode != "nearest":
        raise imp.fail(node, f"mode '{mode}' is not supported", "upsample is nearest-neighbour")
    if scales_name:
        if not imp.is_const(scales_name):
            raise imp.fail(node, "the scales are not a constant")
        scales = imp.const(node, scales_name).astype(np.float64).reshape(-1)
    elif node.op_type == "Resize" or attr is None:
        raise imp.fail(node, "no scales given")
    if len(shape) != 3 or scales.size != 4 or list(scales[:2]) != [1, 1] or not all(
            s == int(s) and 1 <= s <= MAX_ATTR_INT for s in scales[2:]):
        raise imp.fail(node, f"scales {[float(s) for s in scales]} of an input of shape {list(shape)}",
                       "upsample by integer factors: scales [1, 1, h, w] of (channels, height, width)")
    factors = [int(s) for s in scales[2:]]
    for n, f in zip(shape[1:], factors):
        if _nearest_sources(coord, rounding, n, f) != [o // f for o in range(n * f)]:
            raise imp.fail(node, f"coordinate_transformation_mode '{coord}' with nearest_mode '{rounding}' does not "
                                 f"copy each input pixel to a block of {f} (what upsample does)",
                           "coordinate_transformation_mode 'asymmetric' with nearest_mode 'floor'")
    imp.advance(node)
    return [ImportedLayer("upsample", dict(scale_factor=_pair(factors)), node, names=imp.scope_names(node))]


def _flatten_to(imp: _Importer, node, out_shape: tuple[int, ...] | None) -> list[ImportedLayer]:
    in_shape = imp.sample_shape(node, imp.cur)
    if out_shape is not None and out_shape != (math.prod(in_shape),):
        raise imp.fail(node, f"reshapes a sample of {list(in_shape)} to {list(out_shape)}",
                       "flatten (to one dimension of all features) is the only reshape")
    imp.advance(node)
    if len(in_shape) == 1:
        return []  # already flat
    return [ImportedLayer("flatten", {}, node, names=imp.scope_names(node))]


def _flatten(imp: _Importer, node, a: Attrs) -> list[ImportedLayer]:
    axis = a.int("axis", 1, -4, 4)
    if axis != 1:
        raise imp.fail(node, f"Flatten with axis {axis} mixes the batch with the features", "Flatten with axis 1")
    return _flatten_to(imp, node, None)


def _reshape(imp: _Importer, node, a: Attrs) -> list[ImportedLayer]:
    allowzero = a.int("allowzero", 0, 0, 1)
    if not imp.is_const(node.input[1]):
        raise imp.fail(node, "the target shape is not a constant (it depends on values, not only on shapes)")
    in_shape = imp.sample_shape(node, imp.cur)
    target = imp.consts[0][node.input[1]]
    if imp.fixed_batch and all(np.array_equal(c[node.input[1]], target) for c in imp.consts[1:]):
        # a model exported for one batch size (Caffe2's, batch 1): a constant [1, C*H*W] is
        # that batch's flatten
        out = _reshape_target((imp.fixed_batch, *in_shape), target, allowzero)
        if out is not None and out[0] == imp.fixed_batch:
            imp.notes.append(f"{describe(node)}: the model's batch size is fixed at {imp.fixed_batch}; its reshape to "
                             f"{target.tolist()} is that batch's flatten, imported as flatten for any batch")
            return _flatten_to(imp, node, out[1:])
    for b, consts in zip(PROBE_BATCHES, imp.consts):
        out = _reshape_target((b, *in_shape), consts[node.input[1]], allowzero)
        if out is None or out[0] != b:
            raise imp.fail(node, f"reshapes a batch of {b} samples of {list(in_shape)} to "
                                 f"{consts[node.input[1]].tolist()}, which does not keep the batch dimension",
                           "reshape to [batch, -1] (flatten)")
    return _flatten_to(imp, node, out[1:])


def _gemm(imp: _Importer, node, a: Attrs) -> list[ImportedLayer]:
    alpha, beta = a.float("alpha", 1.0), a.float("beta", 1.0)
    if a.int("transA", 0, 0, 1):
        raise imp.fail(node, "transA=1 transposes the batch with the features")
    trans_b = a.int("transB", 0, 0, 1)
    if not imp.is_const(node.input[1]) or (len(node.input) > 2 and node.input[2] and not imp.is_const(node.input[2])):
        raise imp.fail(node, "B and C must be constants (weights)")
    b = imp.const(node, node.input[1])
    if b.ndim != 2:
        raise imp.fail(node, f"B has rank {b.ndim}, expected 2")
    w = (b if trans_b else b.T) * alpha if alpha != 1 else (b if trans_b else b.T)
    bias = None
    if len(node.input) > 2 and node.input[2]:
        c = imp.const(node, node.input[2])
        if c.size not in (1, w.shape[0]) or (c.ndim == 2 and c.shape[0] != 1) or c.ndim > 2:
            raise imp.fail(node, f"C of shape {list(c.shape)}: a bias must have one value per output")
        bias = np.broadcast_to(c.reshape(-1), (w.shape[0],)) * beta if beta != 1 else np.broadcast_to(
            c.reshape(-1), (w.shape[0],))
    return _linear(imp, node, np.ascontiguousarray(w), bias, node.input[1])


def _linear(imp: _Importer, node, w: np.ndarray, bias, weight_name: str, last=None) -> list[ImportedLayer]:
    shape = imp.sample_shape(node, imp.cur)
    if len(shape) != 1 or shape[0] != w.shape[1]:
        raise imp.fail(node, f"input of shape {list(shape)} for a weight of {list(w.shape)}",
                       "a linear layer reads a 1-D sample: Flatten before it")
    params = {"weight": w}
    if bias is not None:
        params["bias"] = np.ascontiguousarray(bias)
    imp.advance(last or node)
    return [ImportedLayer("linear", dict(out_features=int(w.shape[0]), bias=bias is not None), node, params,
                          imp.scope_names(node, weight_name))]


def _matmul(imp: _Importer, node, a: Attrs) -> list[ImportedLayer]:
    if node.input[0] != imp.cur or not imp.is_const(node.input[1]):
        raise imp.fail(node, "only activations times a constant weight matrix", "Gemm or MatMul(x, W)")
    w = imp.const(node, node.input[1])
    if w.ndim != 2:
        raise imp.fail(node, f"weight of rank {w.ndim}, expected 2")
    bias, last = None, None
    nxt = imp.next_node(node)
    if nxt is not None and nxt.op_type == "Add" and not nxt.attribute:
        other = [t for t in nxt.input if t != node.output[0]]
        if len(other) == 1 and imp.is_const(other[0]):
            b = imp.const(nxt, other[0])
            if b.size == w.shape[1] and b.ndim <= 2:
                bias, last = b.reshape(-1), nxt
                imp.pos += 1
    return _linear(imp, node, np.ascontiguousarray(w.T), bias, node.input[1], last)


def _batchnorm(imp: _Importer, node, a: Attrs) -> list[ImportedLayer]:
    eps = a.float("epsilon", 1e-5, 0, 1)
    momentum = a.float("momentum", 0.9, 0, 1)
    if a.int("training_mode", 0, 0, 1) or any(o for o in node.output[1:]):
        raise imp.fail(node, "training-mode batch normalization (batch statistics as outputs)",
                       "export the model in evaluation mode (model.eval())")
    if len(node.input) != 5 or not all(imp.is_const(t) for t in node.input[1:]):
        raise imp.fail(node, "scale, bias, mean and var must be constants")
    shape = imp.sample_shape(node, imp.cur)
    kind = {3: "batchnorm2d", 1: "batchnorm1d"}.get(len(shape))
    if kind is None:
        raise imp.fail(node, f"input of shape {list(shape)}", "batchnorm2d normalises (channels, height, width) "
                                                              "samples, batchnorm1d (features)")
    weight, bias, mean, var = (imp.const(node, t).reshape(-1) for t in node.input[1:])
    if not all(v.shape == (shape[0],) for v in (weight, bias, mean, var)):
        raise imp.fail(node, "scale, bias, mean and var must have one value per channel")
    # ONNX: running = running * momentum + batch * (1 - momentum); PyTorch's momentum is the other share
    opts = dict(eps=eps, momentum=round(1 - momentum, 6))
    imp.advance(node)
    return [ImportedLayer(kind, opts, node, dict(weight=weight, bias=bias, running_mean=mean,
                                                          running_var=var), imp.scope_names(node, node.input[1]))]


def _activation(kind: str, read: Callable[[Attrs], dict] = lambda a: {}):
    def convert(imp: _Importer, node, a: Attrs) -> list[ImportedLayer]:
        opts = read(a)
        imp.advance(node)
        return [ImportedLayer(kind, opts, node, names=imp.scope_names(node))]

    return convert


def _dropout(imp: _Importer, node, a: Attrs) -> list[ImportedLayer]:
    a.float("ratio", 0.5, 0, 1)
    a.int("seed", 0, -(2**63), 2**63 - 1)
    if len(node.input) > 2 and node.input[2]:
        if not imp.is_const(node.input[2]) or bool(imp.const(node, node.input[2]).reshape(-1)[0]):
            raise imp.fail(node, "dropout in training mode", "export the model in evaluation mode")
    if len(node.output) > 1 and node.output[1] and imp.consumers.get(node.output[1]):
        raise imp.fail(node, "its mask output is used")
    imp.advance(node)
    imp.notes.append(f"{describe(node)}: dropout is the identity in evaluation; not imported")
    return []


def _identity(imp: _Importer, node, a: Attrs) -> list[ImportedLayer]:
    imp.advance(node)
    return []


def _softmax(imp: _Importer, node, a: Attrs) -> list[ImportedLayer]:
    shape = imp.sample_shape(node, imp.cur)
    rank = len(shape) + 1
    axis = a.int("axis", -1 if imp.opset >= 13 else 1, -rank, rank - 1) % rank
    # over the features, or over the channels of (C, 1, 1) (a classifier ending in a global
    # pool, as SqueezeNet): every value but the batch in both readings of axis 1
    over_all = rank == 2 or (rank == 4 and shape[1:] == (1, 1))
    if node.output[0] != imp.output or not over_all or axis != 1:
        raise imp.fail(node, "only a final Softmax/LogSoftmax over the features is supported (it is dropped)",
                       "netcompiler's cross_entropy applies log-softmax to the logits")
    imp.advance(node)
    imp.notes.append(f"{describe(node)}: dropped; the spec outputs logits (cross_entropy applies log-softmax, "
                     f"netc predict prints probabilities)")
    return []


def _gelu(a: Attrs) -> dict:
    approx = a.str("approximate", "none", ("none", "tanh"))
    return {"approximate": approx} if approx != "none" else {}


OPS: dict[str, OpRule] = {
    "Conv": OpRule(_conv, "conv2d (2-D, symmetric padding)"),
    "MaxPool": OpRule(_pool("maxpool2d"), "maxpool2d"),
    "AveragePool": OpRule(_pool("avgpool2d"), "avgpool2d"),
    "GlobalAveragePool": OpRule(_global_avgpool, "global_avgpool2d"),
    "Resize": OpRule(_resize, "upsample (nearest, integer scales)"),
    "Upsample": OpRule(_resize, "upsample (nearest, integer scales)"),
    "Gemm": OpRule(_gemm, "linear"),
    "MatMul": OpRule(_matmul, "linear"),
    "Flatten": OpRule(_flatten, "flatten"),
    "Reshape": OpRule(_reshape, "flatten"),
    "Relu": OpRule(_activation("relu")),
    "LeakyRelu": OpRule(_activation("leaky_relu", lambda a: {"negative_slope": a.float("alpha", 0.01)})),
    "Sigmoid": OpRule(_activation("sigmoid")),
    "Tanh": OpRule(_activation("tanh")),
    "Clip": OpRule(_clip, "relu6 (Clip to [0, 6])"),
    "HardSwish": OpRule(_activation("hardswish")),
    "Gelu": OpRule(_activation("gelu", _gelu)),
    "BatchNormalization": OpRule(_batchnorm, "batchnorm2d or batchnorm1d in evaluation mode"),
    "Dropout": OpRule(_dropout),
    "Identity": OpRule(_identity),
    "Pad": OpRule(_pad, "zero padding right before a Conv or AveragePool"),
    "Softmax": OpRule(_softmax),
    "LogSoftmax": OpRule(_softmax),
}


def _merge_inputs(imp: _Importer, node, what: str) -> list[tuple[str, tuple]]:
    """The tensors an Add, Sum or Concat reads, with their sample shapes; constants refused."""
    ins = [t for t in node.input if t]
    consts = [t for t in ins if imp.is_const(t)]
    if consts:
        raise imp.fail(node, f"{what} a constant ('{printable(consts[0])}') with activations",
                       "add and concat read only tensors computed from the input; a bias belongs to its conv2d "
                       "or linear")
    out = []
    for t in ins:
        full = imp.shapes.get(t)
        shape = imp.sample_shape(node, t)
        out.append((t, (None, *shape) if full is None else tuple(full)))
    return out


def _add(imp: _Importer, node, a: Attrs) -> list[ImportedLayer]:
    """Add / Sum of tensors of one shape: add (a residual connection); broadcasting is refused."""
    ins = _merge_inputs(imp, node, "adds")
    shapes = [s for _, s in ins]
    if any(len(s) != len(shapes[0]) or any(x is not None and y is not None and x != y for x, y in zip(s, shapes[0]))
           for s in shapes[1:]):
        shown = " and ".join("[" + ", ".join("N" if d is None else str(d) for d in s) + "]" for s in shapes)
        raise imp.fail(node, f"broadcasts: it adds tensors of shapes {shown}",
                       "add sums tensors of one shape (a residual connection); expand the smaller one in the "
                       "model")
    imp.advance(node)
    if len(ins) == 1:  # Sum of one tensor: the identity
        return []
    return [ImportedLayer("add", {}, node, names=imp.scope_names(node),
                          reads=[imp.source[t] for t, _ in ins])]


AXIS_NAMES = {4: ("the batch", "channels", "height", "width"), 2: ("the batch", "features")}


def _concat(imp: _Importer, node, a: Attrs) -> list[ImportedLayer]:
    """Concat along channels (N, C, H, W) or features (N, F): concat, as torch.cat(dim=1)."""
    ins = _merge_inputs(imp, node, "concatenates")
    rank = len(ins[0][1])
    if rank not in AXIS_NAMES:
        raise imp.fail(node, f"concatenates tensors of rank {rank}", "concat joins (batch, channels, height, width) "
                                                                     "or (batch, features) tensors")
    axis = a.int("axis", 1, -rank, rank - 1) % rank
    if axis != 1:
        raise imp.fail(node, f"concatenates along axis {axis} ({AXIS_NAMES[rank][axis]})",
                       "concat joins channels (3-D samples) or features (1-D): axis 1, as torch.cat(dim=1)")
    imp.advance(node)
    if len(ins) == 1:
        return []
    return [ImportedLayer("concat", {}, node, names=imp.scope_names(node),
                          reads=[imp.source[t] for t, _ in ins])]


# operators that read several activation tensors (rows as OPS; they set the layers they read)
MULTI_INPUT: dict[str, OpRule] = {
    "Add": OpRule(_add, "add (tensors of one shape)"),
    "Sum": OpRule(_add, "add (tensors of one shape)"),
    "Concat": OpRule(_concat, "concat (along channels or features)"),
}
# Pad + next node: (does the padding value fit, converter of the next node with the extra pads)
PAD_FOLDS: dict[str, tuple[Callable[[float], bool], Callable]] = {
    "Conv": (lambda v: v == 0, _conv),
    "AveragePool": (lambda v: v == 0, _pool("avgpool2d")),
    "MaxPool": (lambda v: v == -math.inf, _pool("maxpool2d")),
}
ACTIVATIONS = "activations are relu, relu6, leaky_relu, sigmoid, tanh, gelu, hardswish, silu"
# operators with no row, and the nearest thing netcompiler has
UNSUPPORTED_OPS: dict[str, str] = {
    "HardSigmoid": ACTIVATIONS,
    "ConvTranspose": "only conv2d (no transposed convolution)",
    "GlobalMaxPool": "maxpool2d with kernel_size equal to the input's height and width",
    "LSTM": "recurrent layers are not available", "GRU": "recurrent layers are not available",
    "RNN": "recurrent layers are not available",
    "LayerNormalization": "only batchnorm2d", "InstanceNormalization": "only batchnorm2d",
    "PRelu": "leaky_relu has one fixed slope",
    "Transpose": "a Transpose of activations (a channels-last layout, as Keras/tf2onnx models have before their "
                 "Flatten) is not supported: netcompiler flattens channels-first and would need the next "
                 "layer's weights reordered; export the model channels-first",
    "LRN": "local response normalization is not available; the nearest layer is batchnorm2d",
    "Elu": ACTIVATIONS,
    "Selu": ACTIVATIONS,
}


# ---- naming, writing --------------------------------------------------------------------------
YAML_WORDS = {"true", "false", "null"}  # YAML 1.2 core values an unquoted name would be (any case)


def _name_ok(name: str) -> bool:
    """A layer name the spec takes: an identifier, or dotted ones as PyTorch's nested modules
    (layer1.0.conv1), whose C form (dots as '_') is not reserved."""
    from .check import DOTTED, _bad_ident
    from .layers import INPUT

    return (bool(name) and bool(DOTTED.match(name)) and not _bad_ident(name.replace(".", "_"))
            and name != INPUT and name.lower() not in YAML_WORDS)


def assign_names(layers: list[ImportedLayer], net_name: str) -> list[str]:
    """Each layer's spec name: the first valid candidate that no other layer takes, None
    (the automatic name, not written) when that is what it would be called anyway."""
    from .layers import REGISTRY

    counts: dict[str, int] = {}
    auto = []
    for l in layers:
        prefix = REGISTRY[l.kind].prefix
        counts[prefix] = counts.get(prefix, 0) + 1
        auto.append(f"{prefix}{counts[prefix]}")
    chosen: list[str | None] = []
    for l, a in zip(layers, auto):
        pick = next((n for n in l.names if _name_ok(n) and n.replace(".", "_") != net_name), None)
        chosen.append(pick)
    # a layer named after a module that holds other layers (PyTorch's scope of an add written
    # in a block's forward: layer1.0) is named inside it (layer1.0.add), as modules nest
    picked = {c for c in chosen if c}
    chosen = [f"{c}.{REGISTRY[l.kind].prefix}" if c and any(p.startswith(c + ".") for p in picked) else c
              for c, l in zip(chosen, layers)]
    chosen = [c if c is None or _name_ok(c) else None for c in chosen]
    # a name is kept only if it is unique in C (dots as '_') and does not take another
    # layer's automatic name
    final = [c if c is not None else a for c, a in zip(chosen, auto)]
    for _ in range(len(layers)):
        cnames = [n.replace(".", "_") for n in final]
        clash = {n for n in cnames if cnames.count(n) > 1}
        if not clash:
            break
        final = [a if (n in clash and c is not None) else f for f, n, c, a in zip(final, cnames, chosen, auto)]
        chosen = [None if n == a else c for n, c, a in zip(final, chosen, auto)]
    if len({n.replace(".", "_") for n in final}) != len(final):  # cannot happen (automatic names differ)
        final = auto
    for l, n, a in zip(layers, final, auto):
        l.name = None if n == a else n
        l.final = n
    return final


def _yaml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_yaml_value(x) for x in v) + "]"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def spec_text(name: str, input_shape: tuple[int, ...], layers: list[ImportedLayer], loss: str,
              header: list[str]) -> str:
    from .layers import REGISTRY

    from .layers import INPUT

    lines = [f"# {printable(h)}" for h in header] + [f"name: {name}", f"input: {list(input_shape)}", "layers:"]
    for i, l in enumerate(layers):
        kind = REGISTRY[l.kind]
        opts: dict[str, Any] = {}
        if l.name:
            opts["name"] = l.name
        before = layers[i - 1] if i else None
        if kind.min_inputs > 1 or len(l.reads) != 1 or l.reads[0] is not before:  # not a chain here
            opts["inputs"] = [INPUT if r is None else r.final for r in l.reads]
        for opt in kind.options:
            if opt.name not in l.opts:
                continue
            v = l.opts[opt.name]
            default = None if opt.required or opt.default is None else opt.parse(opt.default)
            parsed = opt.parse(v)
            if opt.default is None and opt.name == "stride" and parsed == opt.parse(l.opts.get("kernel_size")):
                continue
            if opt.required or parsed != default:
                opts[opt.name] = v
        if opts:
            body = ", ".join(f"{k}: {_yaml_value(v)}" for k, v in opts.items())
            lines.append(f"  - {l.kind}: {{{body}}}")
        else:
            lines.append(f"  - {l.kind}")
    lines.append(f"loss: {loss}")
    return "\n".join(lines) + "\n"


@dataclass
class Imported:
    name: str
    spec: str  # the YAML text
    network: Any  # check.Network of `spec`
    state: dict[str, np.ndarray]  # by PyTorch name
    meta: dict[str, np.ndarray]
    notes: list[str]

    def write(self, out_dir: str | os.PathLike) -> tuple[Path, Path]:
        from .fileio import atomic_write_text
        from .weights import save_npz, with_meta

        out = Path(out_dir)
        yaml_path, npz_path = out / f"{self.name}.yaml", out / f"{self.name}.npz"
        atomic_write_text(yaml_path, self.spec)
        save_npz(npz_path, with_meta(self.state, self.meta))
        return yaml_path, npz_path

    def summary(self) -> str:
        from .layers import fmt_shape

        n = self.network
        return (f"{n.name}: {fmt_shape(n.input_shape)} -> {fmt_shape(n.output_shape)}, "
                f"{n.total_params:,} parameters")


def import_onnx(path: str | os.PathLike, name: str | None = None) -> Imported:
    """Read an ONNX model and return its spec and weights (`Imported.write` saves them)."""
    from .check import check_text, name_from_path

    path = str(path)
    model = read_model(path)
    try:
        return _import(model, path, name)
    except NetcError:
        raise
    except (TypeError, ValueError, IndexError, KeyError, AttributeError, OverflowError, UnicodeError) as exc:
        # values onnx.checker lets through but that cannot be read (a tensor whose data does
        # not fill its dimensions, a name that is not text)
        raise OnnxImportError(f"{path}: malformed model ({type(exc).__name__}: {printable(str(exc))[:200]})") \
            from None


def _import(model, path: str, name: str | None) -> Imported:
    from .check import check_text, name_from_path

    imp = _Importer(model, path)
    layers = imp.run()
    if not layers:
        raise OnnxImportError(f"{path}: the model has no layers netcompiler would compute")
    net_name = name or name_from_path(path)
    if not _name_ok(net_name):
        raise OnnxImportError(f"{path}: network name '{printable(net_name)}' is not a valid name")
    if net_name in assign_names(layers, net_name):  # a file named fc1.onnx: its first linear layer is fc1
        if name:
            raise OnnxImportError(f"{path}: network name '{net_name}' is also a layer's name; choose another")
        net_name += "_net"
    out = imp.shapes.get(imp.output)
    loss = "cross_entropy" if out is not None and len(out) == 2 and (out[1] or 0) >= 2 else "mse"
    header = [f"imported by netc import from {Path(path).name}"
              + (f" ({model.producer_name} {model.producer_version})".rstrip() if model.producer_name else "")]
    text = spec_text(net_name, imp.input_shape, layers, loss, header)
    try:
        network = check_text(text, f"{net_name}.yaml")
    except SpecErrors as exc:
        raise _located(exc, text, layers, imp) from None
    state: dict[str, np.ndarray] = {}
    for l, checked in zip(layers, network.layers):
        onnx_shape = imp.shapes.get(l.node.output[0])  # the node the layer ends with
        if onnx_shape is not None and None not in onnx_shape[1:] and tuple(onnx_shape[1:]) != checked.out_shape:
            raise imp.fail(l.node, f"netcompiler's {l.kind} gives {list(checked.out_shape)} where ONNX gives "
                                   f"{list(onnx_shape[1:])} (PyTorch's and ONNX's rules differ here)")
        for k, v in l.params.items():
            state[f"{checked.name}.{k}"] = np.ascontiguousarray(v, dtype=np.float64 if v.dtype == np.float64
                                                                else np.float32)
    expected = network.param_shapes() | network.buffer_shapes()
    from .weights import state_problems

    problems = state_problems(expected, state, np.float64)
    if problems:
        raise OnnxImportError(f"{path}: the weights do not fit the imported spec: {'; '.join(problems)}")
    meta = {"spec_hash": np.array(network.spec_hash)}
    props = {p.key: p.value for p in model.metadata_props}
    for key in ("mean", "std"):
        try:
            v = float(props.get(f"netc.{key}", "nan"))
        except ValueError:
            v = math.nan
        if math.isfinite(v) and (key == "mean" or v > 0):
            meta[key] = np.float64(v)
    return Imported(net_name, text, network, state, meta, imp.notes)


def _located(exc: SpecErrors, text: str, layers: list[ImportedLayer], imp: _Importer) -> OnnxImportError:
    """A check error of the generated spec, told as the ONNX node it came from."""
    first = text.splitlines().index("layers:") + 2  # line of the first layer
    d = exc.diagnostics[0]
    i = d.line - first
    if 0 <= i < len(layers):
        return imp.fail(layers[i].node, d.message.split(": ", 1)[-1])
    return OnnxImportError(f"{imp.path}: the imported network does not check: {d.message}")
