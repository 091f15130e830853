"""The layer interface and the declarative option parser every layer kind shares.

A layer kind is one class (one module under `netcompiler/layers/`) that declares
- its options (name, type, PyTorch default, doc),
- its shape rule, parameter and buffer shapes, MACs and FLOPs,
- the template that renders its C, and the numbers that template needs,
- the equivalent PyTorch module (for tests and `netc verify`).
The registry in `netcompiler/layers/__init__.py` collects the kinds; nothing else in the
compiler switches on a kind's name.
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from ..errors import KernelError
from ..spec import Node
from ..target import current

Shape = tuple[int, ...]
REQUIRED = object()


def did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def fmt_shape(shape: Shape) -> str:
    return "x".join(str(d) for d in shape)


class OptionError(Exception):
    """Raised by an option parser; the checker turns it into a located diagnostic."""


def yaml11_hint(v: Any) -> str:
    """Why a string that YAML 1.1 read as a number or a boolean is text here."""
    if isinstance(v, str):
        if (re.fullmatch(r"[-+]?0[xXoObB][0-9a-fA-F_]+", v)
                or "_" in v and re.fullmatch(r"[-+]?[0-9][0-9_]*(\.[0-9_]*)?([eE][-+]?[0-9_]+)?", v)):
            return " (numbers are decimal, without '_': e.g. 16, 0.5, 1e-5)"
        if v.lower() in ("yes", "no", "on", "off", "y", "n"):
            return " (write true or false)"
    return ""


# The largest integer option (a size, stride, padding, dilation or group count): the C
# code computes with int, and no window, channel count or feature count of a network that
# fits in memory comes near it.  Tensor sizes are bounded separately (MAX_ELEMENTS).
MAX_OPTION_INT = 1 << 20
MAX_ELEMENTS = 2**31 - 1  # no tensor may hold more (C indexes within a sample with int)


def as_number(v: Any) -> float | None:
    """A YAML int or float as a float (an int too large for a float is inf); None for
    anything else (booleans, strings, lists)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        return float(v)
    except OverflowError:
        return math.inf if v > 0 else -math.inf


def _int(v: Any, what: str, minimum: int, maximum: float = MAX_OPTION_INT) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise OptionError(f"{what} must be an integer, got {_show(v)}{yaml11_hint(v)}")
    if v < minimum:
        raise OptionError(f"{what} must be >= {minimum}, got {v}")
    if v > maximum:
        raise OptionError(f"{what} must be at most {int(maximum):,}, got {_show(v)}")
    return v


def _show(v: Any) -> str:
    """A value as the user wrote it in YAML (true, null, [1, 2])."""
    if isinstance(v, str):
        return f"'{v}'"
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join("null" if x is None else _show(x) for x in v) + "]"
    if isinstance(v, int) and abs(v) >= 10**16:  # 10**30 as written would be 31 digits
        return f"about {'-' if v < 0 else ''}10^{len(str(abs(v))) - 1}"
    return repr(v)


@dataclass(frozen=True)
class Option:
    """One option of a layer kind: its parser, PyTorch default and documentation."""

    name: str
    kind: str  # int | pair | bool | float | choice | padding | pads | shape
    default: Any = REQUIRED
    doc: str = ""
    minimum: float = 1
    maximum: float = math.inf
    choices: tuple[str, ...] = ()

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def parse(self, v: Any) -> Any:
        what = f"'{self.name}'"
        top = min(self.maximum, MAX_OPTION_INT)
        if self.kind == "int":
            return _int(v, what, int(self.minimum), top)
        if self.kind == "pair":
            if isinstance(v, list):
                if len(v) != 2:
                    raise OptionError(f"{what} must be an integer or a pair [h, w], got a list of {len(v)}")
                return (_int(v[0], what, int(self.minimum), top), _int(v[1], what, int(self.minimum), top))
            n = _int(v, what, int(self.minimum), top)
            return (n, n)
        if self.kind in ("padding", "pads"):
            # conv padding: int, pair, [top, bottom, left, right], 'same' or 'valid'; pooling
            # padding ("pads"): the numeric forms
            words = ("same", "valid") if self.kind == "padding" else ()
            forms = ("an integer, a pair, [top, bottom, left, right], 'same' or 'valid'" if words
                     else "an integer, a pair [h, w] or [top, bottom, left, right]")
            if isinstance(v, str):
                if v in words:
                    return v
                hint = did_you_mean(v, list(words)) if words else ""
                raise OptionError(f"{what} must be {forms}, got '{v}'{hint}")
            if isinstance(v, list) and len(v) == 4:
                return tuple(_int(x, what, 0) for x in v)
            if isinstance(v, list) and len(v) != 2:
                raise OptionError(f"{what} must be {forms}, got a list of {len(v)}")
            return Option(self.name, "pair", minimum=0).parse(v)
        if self.kind == "bool":
            if not isinstance(v, bool):
                raise OptionError(f"{what} must be true or false, got {_show(v)}{yaml11_hint(v)}")
            return v
        if self.kind == "float":
            x = as_number(v)
            if x is None:
                raise OptionError(f"{what} must be a number, got {_show(v)}{yaml11_hint(v)}")
            if isinstance(v, float) and not math.isfinite(x):
                raise OptionError(f"{what} must be a finite number, got {_show(v)}")
            if not (self.minimum <= x <= self.maximum):
                raise OptionError(f"{what} must be in [{self.minimum:g}, {self.maximum:g}], got {_show(v)}")
            return x
        if self.kind == "choice":
            if v not in self.choices:
                hint = did_you_mean(v, list(self.choices)) if isinstance(v, str) else ""
                raise OptionError(f"{what} must be one of {', '.join(self.choices)}; got {_show(v)}{hint}")
            return v
        if self.kind == "names":  # tensor names; the checker resolves them
            if not isinstance(v, list) or not v or not all(isinstance(x, str) for x in v):
                raise OptionError(f"{what} must be a list of layer names, e.g. [conv1, input], got {_show(v)}")
            return tuple(v)
        if self.kind == "shape":
            if not isinstance(v, list) or not v:
                raise OptionError(f"{what} must be a list of sizes, e.g. [16, 10, 10], got {_show(v)}")
            return tuple(_int(x, what, 1, MAX_ELEMENTS) for x in v)
        raise AssertionError(self.kind)


# Options every layer accepts.
COMMON_OPTIONS = (
    Option("name", "choice", None, "layer name: a C identifier, unique in the network"),
    Option("expect", "shape", None, "expected output shape; a mismatch is an error"),
    Option("inputs", "names", None, "tensors the layer reads: earlier layers' names or 'input' (default: the "
                                    "layer before)"),
)
INPUT = "input"  # the reserved name of the network input (of a block's input, inside a block)


@dataclass
class Layer:
    """One checked layer: resolved options and derived shapes."""

    index: int
    kind: "LayerKind"
    name: str
    opts: dict[str, Any]
    node: Node  # where the layer stands in the spec
    option_nodes: dict[str, Node] = field(default_factory=dict)
    in_shape: Shape | None = None
    out_shape: Shape | None = None
    derived: dict[str, Any] = field(default_factory=dict)  # kind-specific numbers (padding...)
    # the graph: names of the tensors read (a tensor is named after the layer producing it,
    # or INPUT), their shapes, and where a layer expanded from a block was used
    inputs: list[str] = field(default_factory=list)
    in_shapes: list[Shape] = field(default_factory=list)
    context: str = ""  # "in block 'basic' used as 'layer1.0' at line 40"
    blocks: tuple[tuple[str, str], ...] = ()  # the block uses it is in, outermost first: (name, block)
    # backward computes the gradient of the first input (graph.mark_input_grads: something
    # upstream is trainable)
    grad_input: bool = True
    kernel: str | None = None  # a forced kernel path (force_kernels); None: the cheapest that applies

    @property
    def output(self) -> str:
        """The name of the tensor this layer writes (its own name)."""
        return self.name

    @property
    def cname(self) -> str:
        """The name in C: PyTorch's dotted module path with '_' for '.' (layer1_0_conv1)."""
        return self.name.replace(".", "_")

    @property
    def line(self) -> int:
        return self.node.line

    def param_shapes(self) -> dict[str, Shape]:
        return self.kind.param_shapes(self) if self.out_shape is not None else {}

    def buffer_shapes(self) -> dict[str, Shape]:
        return self.kind.buffer_shapes(self) if self.out_shape is not None else {}

    @property
    def params(self) -> int:
        return sum(math.prod(s) for s in self.param_shapes().values())

    @property
    def in_size(self) -> int:
        return math.prod(self.in_shape)

    @property
    def out_size(self) -> int:
        return math.prod(self.out_shape)

    def where(self) -> str:
        return f"{self.kind.kind} '{self.name}'"


ErrorFn = Callable[[str, "str | None"], None]


class LayerKind:
    """Base class of a layer kind.  Subclasses set the class attributes and override
    the methods that apply to them; the defaults describe a parameter-free layer that
    keeps its input shape."""

    kind: ClassVar[str]
    prefix: ClassVar[str]  # auto-name prefix: conv -> conv1, conv2, ...
    doc: ClassVar[str] = ""
    options: ClassVar[tuple[Option, ...]] = ()
    template: ClassVar[str]  # file under templates/layers/
    # what Keras or PyTorch call this kind, beyond case and '_' (matched case-insensitively,
    # ignoring '_'): an unknown kind that is one of these gets "did you mean" this kind
    aliases: ClassVar[tuple[str, ...]] = ()
    # C code runs a layer once per sample (inside each thread's loop over its share of the
    # batch), once on each thread's range of samples (sample_range: linear layers reuse each
    # weight across samples; their weight gradients are summed over the whole batch after
    # backward, threads owning rows; templates define param_grad_call), or once over the whole
    # batch in training, between barriers (batch norm needs batch statistics).
    batch_level_in_training: ClassVar[bool] = False
    sample_range: ClassVar[bool] = False
    # how many tensors the layer reads (add and concat: two or more)
    min_inputs: ClassVar[int] = 1
    max_inputs: ClassVar[float] = 1

    # ---- shapes --------------------------------------------------------------------
    def infer(self, layer: Layer, in_shape: Shape, error: ErrorFn) -> Shape | None:
        """Return the output shape, or call error(message, option) and return None."""
        return in_shape

    def infer_inputs(self, layer: Layer, in_shapes: list[Shape], error: ErrorFn) -> Shape | None:
        """The output shape from every input's shape; one-input kinds: `infer`."""
        return self.infer(layer, in_shapes[0], error)

    def param_shapes(self, layer: Layer) -> dict[str, Shape]:
        return {}

    def buffer_shapes(self, layer: Layer) -> dict[str, Shape]:
        return {}

    # ---- costs (per sample) ---------------------------------------------------------
    def macs(self, layer: Layer) -> int:
        return 0

    def flops(self, layer: Layer) -> tuple[int, int]:
        """(forward FLOPs in evaluation mode, backward FLOPs) per sample."""
        return (0, 0)

    def input_grad_flops(self, layer: Layer) -> int:
        """The part of the backward FLOPs that computes the input gradient (skipped for a
        layer that reads the network input).  Parameter-free layers: all of backward."""
        return self.flops(layer)[1]

    def train_forward_extra_flops(self, layer: Layer) -> int:
        """FLOPs that only the training-mode forward does (batch statistics, masks)."""
        return 0

    def saved_slots(self, layer: Layer) -> dict[str, tuple[str, int]]:
        """Extra per-sample buffers forward saves for backward: name -> (ctype, count)."""
        return {}

    def scratch(self, layer: Layer) -> int:
        """Per-thread scratch floats a call needs (im2col buffers); not kept between calls."""
        return 0

    def chunk_accum(self, layer: Layer) -> int:
        """Per-thread floats the backward keeps across the samples of a chunk (the Winograd weight
        gradient's sums, transformed into the weight gradient once a chunk); 0: none.  A kind
        with some defines the template macros backward_begin (zero them) and backward_end."""
        return 0

    def cache_shapes(self, layer: Layer) -> dict[str, Shape]:
        """Arrays derived from the parameters and kept between calls (Winograd-transformed
        weights): name -> shape.  Remade when the parameters they came from change."""
        return {}

    def batch_stats(self, layer: Layer, split: bool = False) -> int:
        """Per-batch (not per-sample) scratch floats forward saves for backward (`split`: for the
        split form, see split_sums)."""
        return 0

    def split_sums(self, layer: Layer) -> int:
        """A batch-level kind that can run split in training (plan.py, split_layers): reals
        per sample of the partial sums its per-sample passes leave for its batch-level step; 0:
        it cannot.  Split, its per-sample passes run inside the per-sample stages around it:
        forward_sums_call at the end of the stage before (its input just made), the batch-level
        forward_call combines them, forward_apply_call at the start of the stage after; in
        backward, backward_sums_call at the end of the stage after, backward_call combines,
        backward_apply_call at the start of the stage before.  So each sample's tensors are
        read while they are in cache instead of in passes over the whole batch."""
        return 0

    def aliases_input(self, layer: Layer) -> bool:
        """True when the output is the input reinterpreted (flatten): no copy, no slot."""
        return False

    def concat_parts(self, layer: Layer) -> bool:
        """The inputs are adjacent slices of the output (concat): the plan may let their
        producers write them in place (plan.py, concat_views)."""
        return False

    def accumulates_din(self, layer: Layer) -> bool:
        """The template can add its input gradients into the tensor's gradient (L.ins[i].add)
        instead of storing them; other kinds store into a separate slot that the plan adds
        (plan.py, grad_sums) when another reader wrote that gradient first."""
        return False

    # ---- fusion of a ReLU between two layers (plan.py, fused_relus) -------------------
    def applies_relu(self, layer: Layer) -> bool:
        """The forward can store max(0, y) in place of its output y (a ReLU after it)."""
        return False

    def masks_relu_grad(self, layer: Layer) -> bool:
        """The backward can zero its input gradient where its input is not positive (the
        derivative of a ReLU before it), as it writes that gradient."""
        return False

    def masks_relu_dout(self, layer: Layer) -> bool:
        """The backward can zero its own output gradient where its (rectified) output is not
        positive (the derivative of a ReLU after it that it applies), before it uses it: the
        ReLU then fuses whatever reads it, several readers included."""
        return False

    # ---- folding of an evaluation batch norm (plan.py, eval_folds) ---------------------
    def folds_eval_affine(self, layer: Layer) -> bool:
        """In evaluation mode the forward can store y * scale + shift per output channel (a
        batch norm after it, with its running statistics), then max(0, .) (a ReLU after that)."""
        return False

    def eval_affine(self, layer: Layer) -> bool:
        """In evaluation mode the layer is y = x * scale[c] + shift[c] per channel, made from its
        parameters and buffers by its template's eval_affine macro (batchnorm2d)."""
        return False

    # ---- implementations (kernel paths) ------------------------------------------------
    def kernel_paths(self) -> tuple[KernelPath, ...]:
        """The kind's implementations, when it has several (conv2d); the plan picks one per layer."""
        return ()

    def kernel_choice(self, layer: Layer) -> KernelChoice | None:
        """The path a layer runs: the forced one, or the cheapest that applies (the first of
        equal costs); None for kinds with one implementation."""
        paths = self.kernel_paths()
        if not paths:
            return None
        # made once per layer (and forced path, and input gradient): the plan, the scratch size,
        # the cache and the render context all ask
        # the vector width too: costs and where a path applies depend on it
        key = f"kernel_choice:{layer.kernel}:{layer.grad_input}:{current().vec}"
        if key not in layer.derived:
            costs = {p.name: p.cost(layer) for p in paths if p.applies(layer)}
            if layer.kernel is not None:
                path = next(p for p in paths if p.name == layer.kernel)
                if path.name not in costs:
                    raise KernelError(f"kernels: {layer.where()}: kernel path '{path.name}' does not apply "
                                      f"with vectors of {current().vec} reals ({path.needs_text()}); paths that "
                                      f"apply: {', '.join(costs)}")
            else:
                path = min((p for p in paths if p.name in costs), key=lambda p: costs[p.name])
            first = [p for p in paths if p.eval_first and p.name in costs and p is not path]
            eval_path = first[0] if first and layer.kernel is None else None
            layer.derived[key] = KernelChoice(path, layer.kernel is not None, costs, eval_path)
        return layer.derived[key]

    # ---- rendering --------------------------------------------------------------------
    def render_context(self, layer: Layer) -> dict[str, Any]:
        """Numbers the template needs, computed here (templates hold no shape arithmetic)."""
        return {}

    def eval_render_context(self, layer: Layer) -> dict[str, Any] | None:
        """The context of the evaluation forward when it runs another kernel path than training
        (KernelChoice.eval_path), else None."""
        return None

    # ---- reference -------------------------------------------------------------------
    def torch_expression(self, inputs: list[str]) -> str | None:
        """For `netc export --format torch`: the Python expression of a parameterless layer that
        reads several tensors (the local variables `inputs`), written into the module's forward
        instead of a submodule; None for a layer that is a submodule."""
        return None

    def torch_module(self, layer: Layer):  # pragma: no cover - overridden
        raise NotImplementedError

    def init_params(self, layer: Layer, rng) -> dict[str, Any]:
        """PyTorch's default initialisation for this layer's parameters and buffers."""
        return {}

    def describe_options(self, layer: Layer) -> str:
        """Non-default options, for the report."""
        parts = []
        for opt in self.options:
            v = layer.opts.get(opt.name)
            default = None if opt.required or opt.default is None else opt.parse(opt.default)
            if opt.required or (v != default and not (opt.name == "stride" and v == layer.opts.get("kernel_size"))):
                if isinstance(v, tuple) and len(set(v)) == 1:
                    v = v[0]
                parts.append(f"{opt.name}={_fmt_opt(v)}")
        return ", ".join(parts)


@dataclass(frozen=True)
class KernelPath:
    """One implementation of a layer kind: a row of the kind's table of paths.

    `applies(layer)` says whether it can run the layer, `cost(layer)` estimates its work per
    sample, forward and backward, in one unit for every path of the kind (vector operations),
    `context(layer)` gives the numbers its template (under templates/layers/) lays out."""

    name: str
    forward: str  # how its forward runs, for the report
    backward: str
    template: str
    applies: Callable[[Layer], bool]
    cost: Callable[[Layer], float]
    context: Callable[[Layer], dict]
    needs: str = ""  # what `applies` asks for, for the error when it is forced where it does not apply
    # ({vec}, {vec2}: the reals of one vector and of two at the target's width)
    folds_bn: bool = False  # its evaluation forward can apply a batch norm and a ReLU after it (eval_folds)
    # evaluation runs it wherever it applies, whichever path training runs (unless one is forced): its
    # forward is never the slower one and it uses no scratch (pointwise: the GEMM with no copies)
    eval_first: bool = False

    def needs_text(self) -> str:
        """`needs` at the width plans are made for now."""
        vec = current().vec
        return self.needs.format(vec=vec, vec2=2 * vec)


@dataclass(frozen=True)
class KernelChoice:
    path: KernelPath
    forced: bool
    costs: dict[str, float]  # the cost of every path that applies, by name
    eval_path: KernelPath | None = None  # the evaluation forward's path when not `path`

    @property
    def evaluates(self) -> KernelPath:
        """The path of the evaluation forward."""
        return self.eval_path or self.path

    @property
    def why(self) -> str:
        if self.forced:
            return "forced"
        others = [f"{n} {c:,.0f}" for n, c in self.costs.items() if n != self.path.name]
        return f"cost {self.costs[self.path.name]:,.0f}" + (f" (vs {', '.join(others)})" if others else
                                                            " (the only path that applies)")


def _fmt_opt(v: Any) -> str:
    if isinstance(v, tuple) and len(v) == 4:  # padding [top, bottom, left, right]
        return "[" + ", ".join(map(str, v)) + "]"
    if isinstance(v, tuple):
        return "x".join(str(x) for x in v)
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def window_out(size: int, k: int, stride: int, pad_total: int, dilation: int, ceil: bool = False,
               pad_left: int = 0) -> int:
    """PyTorch's output size of a sliding window (conv and pooling).

    `pad_total` is the padding added on both sides together; with ceil_mode the last
    window must start inside the input or the left padding (PyTorch's rule)."""
    span = size + pad_total - dilation * (k - 1) - 1
    if ceil:
        out = -(-span // stride) + 1  # rounded up, also when the window is larger than the input
        if (out - 1) * stride >= size + pad_left:
            out -= 1
        return out
    return span // stride + 1


def side_pads(padding: Any) -> tuple[tuple[int, int], tuple[int, int]]:
    """((top, bottom), (left, right)) of a parsed numeric padding: n, (h, w) or (t, b, l, r)."""
    if len(padding) == 4:
        return (padding[0], padding[1]), (padding[2], padding[3])
    return (padding[0], padding[0]), (padding[1], padding[1])


class WeightLayer(LayerKind):
    """A layer computed as multiply-accumulates with a `weight` and an optional `bias`
    (conv2d, linear): shared FLOP rules and PyTorch's default initialisation."""

    def flops(self, layer: Layer) -> tuple[int, int]:
        bias = layer.out_size if layer.opts["bias"] else 0
        # forward: one multiply and one add per MAC, plus the bias add;
        # backward: input gradient and weight gradient (2 FLOPs per MAC each) + bias gradient.
        return (2 * self.macs(layer) + bias, 4 * self.macs(layer) + bias)

    def input_grad_flops(self, layer: Layer) -> int:
        return 2 * self.macs(layer)

    def init_params(self, layer: Layer, rng) -> dict[str, Any]:
        """kaiming_uniform_(a=sqrt(5)) on the weight, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
        and the same bound for the bias."""
        shapes = layer.param_shapes()
        bound = 1.0 / math.sqrt(math.prod(shapes["weight"][1:]))
        return {k: rng.uniform(-bound, bound, size=s) for k, s in shapes.items()}
