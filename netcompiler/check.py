"""Stage 2, check: a parsed spec -> a `Network` whose every size is derived and checked.

All problems are collected (not only the first) and raised together as `SpecErrors`,
each pointing at the line and column of the offending layer or option.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import Diagnostic, KernelError, SpecErrors
from .graph import mark_input_grads
from .layers import COMMON_OPTIONS, INPUT, REGISTRY, Layer, Shape, did_you_mean, fmt_shape, unknown_kind
from .layers.base import MAX_ELEMENTS, as_number, yaml11_hint
from .recipe import augment_problem
from .spec import Node, parse_text, read_spec_text

IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
MAX_NAME = 48
# With stages of at most plan.MAX_STAGE_LAYERS layers, gcc's time grows with the number of
# layers; measured (CPU, gcc 12 -O3) at 256: relu chain 9.3 s, tanh 5.1 s, conv2d/
# batchnorm2d/relu/maxpool2d blocks 10.5 s; relu at 512: 19.9 s; densenet_cifar (424 layers,
# float64) 35 s.  512 admits DenseNet-121-style networks.
MAX_LAYERS = 512
DEFAULT_MEMORY_BUDGET = 16 * 2**30  # bytes of training memory at batch size 1
LOSSES = ("cross_entropy", "mse", "binary_cross_entropy")
TOP_KEYS = ("name", "input", "blocks", "layers", "loss", "train")
# a layer's name: a C identifier, or PyTorch's nested module path (layer1.0.conv1; C sees
# layer1_0_conv1)
DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.([A-Za-z_][A-Za-z0-9_]*|[0-9]+))*\Z")
BLOCK_KEYS = ("params", "layers")
USE_KEYS = ("name", "repeat", "start", "inputs")  # what a block's use sets besides its parameters
# Defaults for `netc train`; the spec's optional `train:` section may override them.
TRAIN_KEYS: dict[str, tuple[str, Any]] = {
    "epochs": ("int", 10),
    "batch_size": ("int", 64),
    "optimizer": ("choice", "adam"),
    "lr": ("float", 1e-3),
    "momentum": ("float", 0.9),
    "weight_decay": ("float", 0.0),
    "seed": ("int", 0),
    "val_split": ("float", 0.0),
    "mean": ("float", None),
    "std": ("float", None),
    "normalize": ("choice", "global"),  # global: one mean/std; channel: one per input channel
    # recipes (netcompiler/recipe.py): torch's names and defaults
    "lr_schedule": ("choice", "none"),
    "step_size": ("int", None),
    "gamma": ("float", 0.1),
    "milestones": ("ints", None),
    "min_lr": ("float", 0.0),
    "max_lr": ("float", None),
    "pct_start": ("float", 0.3),
    "div_factor": ("float", 25.0),
    "final_div_factor": ("float", 1e4),
    "warmup_epochs": ("count", 0),
    "nesterov": ("bool", False),
    "label_smoothing": ("float", 0.0),
    "clip_grad_norm": ("float", 0.0),
    "patience": ("int", None),
    "augment": ("augment", None),
}
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")  # adam and adamw: one optimizer (see runtime.Net.set_optimizer)
SCHEDULES = ("none", "step", "multistep", "cosine", "onecycle")
NORMALIZE_MODES = ("global", "channel")
CHOICES = {"optimizer": OPTIMIZERS, "lr_schedule": SCHEDULES, "normalize": NORMALIZE_MODES}
MAX_TRAIN_INT = 1 << 20  # epochs and batch_size: far beyond any run, and within the C int
# (lowest, highest) of the train: options that are not 1..MAX_TRAIN_INT; val_split < 1 and
# std > 0 are checked on their own
TRAIN_RANGE = {"seed": (0, 2**63 - 1), "lr": (0, 1e3), "momentum": (0, 1), "weight_decay": (0, 1e3),
               "val_split": (0, 1), "mean": (0, 1e6), "std": (0, 1e6),
               "gamma": (0, 1e3), "min_lr": (0, 1e3), "max_lr": (0, 1e3), "pct_start": (0, 1),
               "div_factor": (0, 1e9), "final_div_factor": (0, 1e9), "warmup_epochs": (0, MAX_TRAIN_INT),
               "label_smoothing": (0, 1), "clip_grad_norm": (0, 1e9)}

def train_value(key: str, value: Any) -> Any:
    """The one rule for a training setting, wherever it comes from (the spec's train:
    section, netc train's flags, a checkpoint's settings, Net.set_optimizer and Net.lr):
    the value (int, float or optimizer name), or ValueError saying what it must be."""
    kind = TRAIN_KEYS[key][0]
    if kind == "choice":
        if value not in CHOICES[key]:
            hint = did_you_mean(value, list(CHOICES[key])) if isinstance(value, str) else ""
            raise ValueError(f"must be one of {', '.join(CHOICES[key])}, got {_show(value)}{hint}")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, got {_show(value)}")
        return value
    if kind == "ints":
        vals = [i.value if isinstance(i, Node) else i for i in value] if isinstance(value, list) else None
        if not (vals and all(isinstance(i, int) and not isinstance(i, bool) and 1 <= i <= MAX_TRAIN_INT
                             for i in vals) and vals == sorted(set(vals))):
            raise ValueError(f"must be a list of increasing positive integers, got {_show(value)}")
        return vals
    if kind == "augment":
        problem = augment_problem(value)
        if problem:
            raise ValueError(f"is wrong: {problem}")
        return value
    low, high = TRAIN_RANGE.get(key, (1, MAX_TRAIN_INT))
    if kind in ("int", "count"):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            what = "a positive integer" if low == 1 else "an integer >= 0"
            raise ValueError(f"must be {what} (at most {high:,}), got {_show(value)}")
        return value
    num = as_number(value)
    if num is None or not low <= num <= high:
        raise ValueError(f"must be a number in [{low:g}, {high:g}], got {_show(value)}")
    if key == "std" and not num > 0:
        raise ValueError(f"must be positive, got {_show(value)}")
    if key == "val_split" and not num < 1:
        raise ValueError(f"must be below 1, got {_show(value)}")
    return num


C_RESERVED = set(
    """auto break case char const continue default do double else enum extern float for goto if
    inline int long register restrict return short signed sizeof static struct switch typedef union
    unsigned void volatile while asm typeof typeof_unqual bool true false alignas alignof constexpr
    nullptr static_assert thread_local main real_t size_t int32_t int64_t uint32_t uint64_t float_t
    double_t errno""".split()
)


@dataclass
class Network:
    """A checked network: everything later stages need, nothing they must recompute."""

    name: str
    file: str
    source: str  # the spec text, for the hash
    input_shape: Shape
    layers: list[Layer]
    loss: str
    train: dict[str, Any] = field(default_factory=dict)

    @property
    def output_shape(self) -> Shape:
        return self.layers[-1].out_shape

    @property
    def num_classes(self) -> int:
        return math.prod(self.output_shape)

    @property
    def spec_hash(self) -> str:
        return hashlib.sha256(self.source.encode()).hexdigest()[:16]

    def param_shapes(self) -> dict[str, Shape]:
        """`layer.param` -> shape, in layer order (PyTorch names and layouts)."""
        return {f"{l.name}.{k}": s for l in self.layers for k, s in l.param_shapes().items()}

    def buffer_shapes(self) -> dict[str, Shape]:
        return {f"{l.name}.{k}": s for l in self.layers for k, s in l.buffer_shapes().items()}

    @property
    def total_params(self) -> int:
        return sum(l.params for l in self.layers)


def force_kernels(net: Network, kernels: dict[str, str]) -> Network:
    """A copy of `net` whose layers named in `kernels` run the kernel path given there
    (layer name -> path name, see LayerKind.kernel_paths) instead of the cheapest.  A name
    that is no layer, a layer with one implementation, an unknown path or one that does not
    apply to the layer is a KernelError naming the layer and the paths that apply."""
    by_name = {l.name: l for l in net.layers}
    forced = {}
    for name, path in kernels.items():
        layer = by_name.get(name)
        if layer is None:
            with_paths = [l.name for l in net.layers if l.kind.kernel_paths()]
            raise KernelError(f"kernels: no layer '{name}' in '{net.name}'{did_you_mean(name, list(by_name))}; "
                              f"layers with kernel paths: {', '.join(with_paths) or 'none'}")
        paths = layer.kind.kernel_paths()
        if not paths:
            raise KernelError(f"kernels: {layer.where()} has one implementation, no kernel paths")
        ok = [p.name for p in paths if p.applies(layer)]
        known = next((p for p in paths if p.name == path), None)
        if known is None:
            raise KernelError(f"kernels: {layer.where()}: unknown kernel path '{path}'"
                              f"{did_you_mean(str(path), [p.name for p in paths])}; paths that apply: {', '.join(ok)}")
        if path not in ok:
            raise KernelError(f"kernels: {layer.where()}: kernel path '{path}' does not apply ({known.needs_text()}); "
                              f"paths that apply: {', '.join(ok)}")
        forced[name] = path
    layers = [dataclasses.replace(l, kernel=forced.get(l.name, l.kernel)) for l in net.layers]
    return dataclasses.replace(net, layers=layers)


class _Checker:
    def __init__(self, file: str):
        self.file = file
        self.diags: list[Diagnostic] = []
        self.context = ""  # where the layer being checked was expanded from a block
        self.blocks: dict[str, _Block] = {}
        self.bad_params: set[tuple[int, int]] = set()  # where an unknown '$param' stands
        self.uses: list[tuple[str, str]] = []  # the block uses being expanded: (name, block)

    # ---- top level --------------------------------------------------------------------
    def run(self, root: Node, source: str, memory_budget: int) -> Network:
        if not isinstance(root.value, dict):
            self.error(root, "a spec is a mapping with 'input', 'layers' and 'loss'")
            raise SpecErrors(self.diags)
        top = root.value
        self.misspelt: set[str] = set()  # required keys an unknown key was probably meant as
        for key, node in top.items():
            if key not in TOP_KEYS:
                self.misspelt.update(_close(key, list(TOP_KEYS)))
                self.error(node, f"unknown key '{key}'{did_you_mean(key, list(TOP_KEYS))}; "
                                 f"expected one of {', '.join(TOP_KEYS)}", at_key=True)
        name = self.net_name(top.get("name"))
        input_shape = self.input_shape(root, top.get("input"))
        loss = self.loss(root, top.get("loss"))
        train = self.train_section(top.get("train"))
        self.blocks = self.blocks_section(top.get("blocks"))
        layers = self.layers(root, top.get("layers"), input_shape, name)
        if layers and all(l.out_shape is not None for l in layers):
            mark_input_grads(layers)
            self.check_loss_output(top.get("loss") or root, loss, layers[-1])
            self.check_budget(root, name, layers, memory_budget)
        if self.diags:
            raise SpecErrors(sorted(self.diags, key=lambda d: (d.line, d.col)))
        return Network(name, self.file, source, input_shape, layers, loss, train)

    def net_name(self, node: Node | None) -> str:
        if node is None:
            return name_from_path(self.file)
        if not isinstance(node.value, str) or not IDENT.match(node.value):
            self.error(node, f"name {_show(node.value)} is not a C identifier ([A-Za-z_][A-Za-z0-9_]*)")
        elif _bad_ident(node.value):
            self.error(node, f"name '{node.value}' {_bad_ident(node.value)}")
        return node.value if isinstance(node.value, str) else "net"

    def input_shape(self, root: Node, node: Node | None) -> Shape | None:
        if node is None:
            if "input" not in self.misspelt:  # else the unknown key already says "did you mean"
                self.error(root, "missing 'input': the shape of one sample, e.g. input: [1, 28, 28] (channels, "
                                 "height, width) or input: [784]")
            return None
        dims = node.value
        if not isinstance(dims, list) or len(dims) not in (1, 3):
            self.error(node, f"'input' must be [channels, height, width] or [features], got {_show(node.plain())}")
            return None
        out = []
        for d in dims:
            if isinstance(d.value, bool) or not isinstance(d.value, int):
                self.error(d, f"input size must be an integer, got {_show(d.value)}{yaml11_hint(d.value)}")
                return None
            if d.value <= 0:
                self.error(d, f"input size must be positive, got {d.value}")
                return None
            out.append(d.value)
        if math.prod(out) > MAX_ELEMENTS:
            self.error(node, f"input {fmt_shape(tuple(out))} has {math.prod(out):,} elements; at most "
                             f"{MAX_ELEMENTS:,} per tensor")
            return None
        return tuple(out)

    def loss(self, root: Node, node: Node | None) -> str:
        if node is None:
            if "loss" not in self.misspelt:
                self.error(root, f"missing 'loss': one of {', '.join(LOSSES)}")
            return "cross_entropy"
        if node.value not in LOSSES:
            hint = did_you_mean(node.value, list(LOSSES)) if isinstance(node.value, str) else ""
            self.error(node, f"unknown loss {_show(node.value)}{hint}; expected one of {', '.join(LOSSES)}")
            return "cross_entropy"
        return node.value

    def check_loss_output(self, node: Node, loss: str, last: Layer) -> None:
        if loss == "cross_entropy" and len(last.out_shape) != 1:
            self.error(node, f"loss cross_entropy needs 1-D logits, but the last layer {last.where()} outputs "
                             f"{fmt_shape(last.out_shape)}: add flatten and/or linear layers")
        elif loss == "cross_entropy" and last.out_shape[0] < 2:
            self.error(node, "loss cross_entropy needs at least 2 classes, the last layer outputs 1")

    def train_section(self, node: Node | None) -> dict[str, Any]:
        if node is None:
            return {}
        if not isinstance(node.value, dict):
            self.error(node, "'train' must be a mapping, e.g. train: {epochs: 10, lr: 0.001}")
            return {}
        out: dict[str, Any] = {}
        for key, v in node.value.items():
            if key not in TRAIN_KEYS:
                self.error(v, f"unknown train option '{key}'{did_you_mean(key, list(TRAIN_KEYS))}; expected one of "
                              f"{', '.join(TRAIN_KEYS)}", at_key=True)
                continue
            val = v.value
            try:
                out[key] = train_value(key, val)
            except ValueError as exc:
                self.error(v, f"train option '{key}' {exc}{yaml11_hint(val)}")
        return out

    # ---- layers -----------------------------------------------------------------------
    def error(self, node: Node, message: str, at_key: bool = False) -> None:
        line, col = (node.key_line, node.key_col) if at_key and node.key_line else (node.line, node.col)
        if (line, col) in self.bad_params and not message.startswith("block "):
            return  # an unknown '$param': said once, its value is not checked
        if self.context:
            message += f" ({self.context})"
        self.diags.append(Diagnostic(self.file, line, col, message))

    def layers(self, root: Node, node: Node | None, input_shape: Shape | None, net_name: str) -> list[Layer]:
        if node is None:
            if "layers" not in self.misspelt:
                self.error(root, "missing 'layers': a list of layers, e.g. - conv2d: {out_channels: 6, "
                                 "kernel_size: 5}")
            return []
        if not isinstance(node.value, list) or not node.value:
            self.error(node, "'layers' must be a non-empty list")
            return []
        if len(node.value) > MAX_LAYERS:
            self.error(node.value[MAX_LAYERS], f"layer {MAX_LAYERS + 1:,} of {len(node.value):,}: a network has at "
                                               f"most {MAX_LAYERS} layers (the C compiler's time grows faster than "
                                               f"the number of layers)")
            return []
        self.out: list[Layer] = []
        self.broken = False  # a malformed entry: shapes after it would be guesses
        scope = _Scope(None, "", {INPUT: INPUT})
        self.expand(node.value, scope, INPUT, "", [])
        layers = self.out
        if self.broken or not layers:
            return layers
        if len(layers) > MAX_LAYERS:  # blocks expanded
            extra = layers[MAX_LAYERS]
            self.context = extra.context
            self.error(extra.node, f"layer {MAX_LAYERS + 1:,} of {len(layers):,} (blocks expanded): a network has at "
                                   f"most {MAX_LAYERS} layers (the C compiler's time grows faster than the number "
                                   f"of layers)")
            self.context = ""
            return layers
        self.names(layers, net_name)
        shapes: dict[str, Shape | None] = {INPUT: input_shape}
        for layer in layers:
            self.context = layer.context
            ins = [shapes.get(t) for t in layer.inputs]
            shapes[layer.output] = None
            if input_shape is None or any(s is None for s in ins):
                continue
            layer.in_shapes, layer.in_shape = ins, ins[0]
            shapes[layer.output] = self.infer(layer)
        self.context = ""
        self.unread(layers)
        return layers

    # a list of layer entries (the spec's, or a block's) into self.out; returns the tensor the
    # last one writes
    def expand(self, entries: list[Node], scope: "_Scope", prev: str, prefix: str, stack: list[str]) -> str:
        declared = {}  # local names of the entries, to tell "defined later" from "unknown"
        for entry in entries:
            if isinstance(entry.value, dict) and len(entry.value) == 1:
                opts = next(iter(entry.value.values())).value
                if isinstance(opts, dict) and isinstance(opts.get("name", Node(None, 0, 0)).value, str):
                    declared.setdefault(opts["name"].value, opts["name"].line)
        counts: dict[str, int] = {}
        for entry in entries:
            split = self.split_entry(entry)
            if split is None:
                self.broken = True
                continue
            kind_name, opts_node = split
            if kind_name in self.blocks:
                prev = self.use_block(entry, self.blocks[kind_name], opts_node, scope, prev, prefix, counts,
                                      declared, stack)
                continue
            layer = self.layer(len(self.out), entry, kind_name, opts_node, counts, prefix)
            if layer is None:
                self.broken = True
                name = opts_node.value.get("name")
                if name is not None and isinstance(name.value, str):  # later layers may read it
                    scope.define(name.value, prefix + name.value)
                continue
            layer.context, layer.blocks = self.context, tuple(self.uses)
            local = layer.name[len(prefix):]
            layer.inputs = self.resolve(layer.option_nodes.get("inputs"), layer.opts.get("inputs"), scope, prev,
                                        local, declared, layer.where())
            if layer.inputs is None:
                self.broken = True
                layer.inputs = []
            elif layer.option_nodes.get("inputs") is None and layer.kind.min_inputs > 1:
                layer.inputs = []  # not a default: add and concat name what they read
                self.error(layer.node, f"{layer.where()} needs inputs: the names of the {layer.kind.min_inputs} "
                                       f"or more tensors it reads, e.g. inputs: [conv2, input]")
                self.broken = True
            n = len(layer.inputs)
            if layer.inputs and not layer.kind.min_inputs <= n <= layer.kind.max_inputs:
                need = layer.kind.min_inputs
                self.error(layer.option_nodes.get("inputs", layer.node),
                           f"{layer.where()} reads {n} tensor{'s' if n != 1 else ''}; it needs "
                           + (f"at least {need}, e.g. inputs: [a, b]" if n < need else
                              f"at most {layer.kind.max_inputs}"))
                self.broken = True
            scope.define(local, layer.output)
            self.out.append(layer)
            prev = layer.output
        return prev

    def split_entry(self, entry: Node) -> tuple[str, Node] | None:
        if isinstance(entry.value, str):
            return entry.value, Node({}, entry.line, entry.col)
        if isinstance(entry.value, dict) and len(entry.value) == 1:
            kind_name, opts_node = next(iter(entry.value.items()))
            if opts_node.value is None:
                opts_node = Node({}, opts_node.line, opts_node.col)
            elif not isinstance(opts_node.value, dict):
                self.error(opts_node, f"options of '{kind_name}' must be a mapping, e.g. "
                                      f"{kind_name}: {{...}}, got {_show(opts_node.plain())}")
                return None
            return kind_name, opts_node
        self.error(entry, "a layer is a kind (e.g. '- relu') or a one-key mapping "
                          "(e.g. '- conv2d: {out_channels: 6, kernel_size: 5}')")
        return None

    def resolve(self, node: Node | None, refs, scope: "_Scope", prev: str, local: str, declared: dict[str, int],
                where: str) -> list[str] | None:
        """Tensor names of a layer's `inputs` (default: the tensor before it), or None."""
        if node is None or refs is None:
            return [prev]
        out: list[str] = []
        ok = True
        for ref, rnode in zip(refs, node.value):
            full = scope.names.get(ref)
            if full is not None:
                out.append(full)
                continue
            ok = False
            if ref == local:
                self.error(rnode, f"{where}: a layer cannot read its own output '{ref}'")
            elif ref in declared:
                self.error(rnode, f"{where}: input '{ref}' is defined later (line {declared[ref]}); a layer "
                                  f"reads only the network input and layers before it")
            else:
                known = list(scope.names)
                self.error(rnode, f"{where}: unknown input '{ref}'{did_you_mean(ref, known)}; it reads "
                                  f"'{INPUT}' or an earlier layer's name")
        return out if ok else None

    def layer(self, index: int, entry: Node, kind_name: str, opts_node: Node, counts: dict[str, int],
              prefix: str = "") -> Layer | None:
        kind = REGISTRY.get(kind_name)
        if kind is None:
            close = did_you_mean(kind_name, list(self.blocks)) if isinstance(kind_name, str) else ""
            if close and not did_you_mean(kind_name, list(REGISTRY)):
                self.error(entry, f"unknown layer kind '{kind_name}'{close}")
            else:
                self.error(entry, unknown_kind(kind_name) if isinstance(kind_name, str) else
                           f"unknown layer kind {_show(kind_name)}; kinds are {', '.join(REGISTRY)}")
            return None
        counts[kind.prefix] = counts.get(kind.prefix, 0) + 1
        known = [o.name for o in kind.options] + [o.name for o in COMMON_OPTIONS]
        opts: dict[str, Any] = {}
        ok = True
        misspelt: set[str] = set()
        for key, vnode in opts_node.value.items():
            if key not in known:
                misspelt.update(_close(key, known))
                self.error(vnode, f"{kind_name}: unknown option '{key}'{did_you_mean(key, known)}; "
                                  f"options are {', '.join(known)}", at_key=True)
                ok = False
        for opt in kind.options:
            vnode = opts_node.value.get(opt.name)
            if vnode is None:
                if opt.required:
                    if opt.name not in misspelt:  # else the unknown key already says "did you mean"
                        self.error(entry, f"{kind_name}: missing required option '{opt.name}' ({opt.doc})")
                    ok = False
                opts[opt.name] = None if opt.required or opt.default is None else opt.parse(opt.default)
                continue
            try:
                opts[opt.name] = opt.parse(vnode.plain())
            except Exception as exc:  # OptionError
                self.error(vnode, f"{kind_name}: {exc}")
                ok = False
        name_node = opts_node.value.get("name")
        name = f"{kind.prefix}{counts[kind.prefix]}"
        if name_node is not None:
            name = name_node.value
            ok = self.check_name(name_node, f"{kind_name}: layer name", prefix) and ok
        layer = Layer(index, kind, prefix + str(name), opts, entry, dict(opts_node.value))
        for opt in COMMON_OPTIONS[1:]:
            vnode = opts_node.value.get(opt.name)
            if vnode is not None:
                try:
                    value = opt.parse(vnode.plain())
                except Exception as exc:
                    self.error(vnode, f"{kind_name}: {exc}")
                    ok = False
                    continue
                if opt.name == "expect":
                    layer.derived["expect"] = value
                else:
                    layer.opts[opt.name] = value
        return layer if ok else None

    def check_name(self, node: Node, what: str, prefix: str) -> bool:
        name = node.value
        if not isinstance(name, str) or not DOTTED.match(name):
            nested = "; a nested name joins them with dots, as layer1.0.conv1" if isinstance(name, str) and "." in name else ""
            self.error(node, f"{what} {_show(name)} is not a C identifier ([A-Za-z_][A-Za-z0-9_]*{nested})")
            return False
        if name == INPUT:
            self.error(node, f"{what} '{INPUT}' is reserved for the network input (in a block: the block's input)")
            return False
        cname = (prefix + name).replace(".", "_")
        why = _bad_ident(cname)
        if why:
            self.error(node, f"{what} '{prefix + name}' {why}" + (f" (in C: {cname})" if cname != prefix + name else ""))
            return False
        return True

    # ---- blocks -------------------------------------------------------------------------
    def blocks_section(self, node: Node | None) -> dict[str, "_Block"]:
        if node is None:
            return {}
        if not isinstance(node.value, dict):
            self.error(node, "'blocks' must be a mapping of block names to {params: [...], layers: [...]}")
            return {}
        out = {}
        for bname, bnode in node.value.items():
            if not IDENT.match(bname) or _bad_ident(bname) or bname == INPUT:
                self.error(bnode, f"block name '{bname}' is not a C identifier or is reserved", at_key=True)
                continue
            if bname in REGISTRY:
                self.error(bnode, f"block name '{bname}' is a layer kind; choose another", at_key=True)
                continue
            if not isinstance(bnode.value, dict):
                self.error(bnode, f"block '{bname}' must be a mapping: {{params: [...], layers: [...]}}")
                continue
            for key, v in bnode.value.items():
                if key not in BLOCK_KEYS:
                    self.error(v, f"block '{bname}': unknown key '{key}'{did_you_mean(key, list(BLOCK_KEYS))}; "
                                  f"expected {' or '.join(BLOCK_KEYS)}", at_key=True)
            params_node = bnode.value.get("params", Node([], bnode.line, bnode.col))
            params = []
            if not isinstance(params_node.value, list):
                self.error(params_node, f"block '{bname}': params must be a list of names, e.g. [channels, stride]")
                continue
            for p in params_node.value:
                if not isinstance(p.value, str) or not IDENT.match(p.value) or p.value in USE_KEYS:
                    self.error(p, f"block '{bname}': parameter {_show(p.value)} must be a name other than "
                                  f"{', '.join(USE_KEYS)}")
                else:
                    params.append(p.value)
            layers = bnode.value.get("layers")
            if layers is None or not isinstance(layers.value, list) or not layers.value:
                self.error(layers or bnode, f"block '{bname}' needs 'layers': a non-empty list")
                continue
            out[bname] = _Block(bname, bnode, params, layers)
        return out

    def use_block(self, entry: Node, block: "_Block", opts_node: Node, scope: "_Scope", prev: str, prefix: str,
                  counts: dict[str, int], declared: dict[str, int], stack: list[str]) -> str:
        opts = opts_node.value
        known = list(USE_KEYS) + block.params
        ok = True
        misspelt: set[str] = set()
        for key, v in opts.items():
            if key not in known:
                misspelt.update(_close(key, known))
                self.error(v, f"block '{block.name}': unknown key '{key}'{did_you_mean(key, known)}; "
                              f"expected {', '.join(known)}", at_key=True)
                ok = False
        for p in block.params:
            if p not in opts and p not in misspelt:
                self.error(entry, f"block '{block.name}': missing parameter '{p}' (its parameters: "
                                  f"{', '.join(block.params)})")
                ok = False
        if block.name in stack:
            self.error(entry, f"block '{block.name}' uses itself ({' -> '.join(stack + [block.name])})")
            ok = False
        counts[block.name] = counts.get(block.name, 0) + 1
        name = f"{block.name}{counts[block.name]}"
        if "name" in opts:
            ok = self.check_name(opts["name"], f"block '{block.name}': name", prefix) and ok
            name = str(opts["name"].value)
        numbers = {}
        for key, low in (("repeat", 1), ("start", 0)):
            v = opts.get(key)
            if v is not None and (isinstance(v.value, bool) or not isinstance(v.value, int) or v.value < low):
                self.error(v, f"block '{block.name}': '{key}' must be an integer >= {low}, got {_show(v.value)}")
                ok = False
            numbers[key] = v.value if v is not None and ok else None
        if not ok:
            self.broken = True
            return prev
        if "inputs" in opts:
            refs = opts["inputs"].plain()
            if not isinstance(refs, list) or len(refs) != 1 or not isinstance(refs[0], str):
                self.error(opts["inputs"], f"block '{block.name}': inputs must name one tensor, e.g. inputs: [conv1]")
                self.broken = True
                return prev
            got = self.resolve(opts["inputs"], refs, scope, prev, name, declared, f"block '{block.name}'")
            if got is None:
                self.broken = True
                return prev
            prev = got[0]
        values = {p: opts[p] for p in block.params}
        layers = [self.substitute(n, values, block) for n in block.layers.value]
        if numbers["repeat"] is None:
            instances = [name]
        else:
            first = numbers["start"] or 0
            instances = [f"{name}.{first + r}" for r in range(numbers["repeat"])]
        outer = self.context
        for inst in instances:
            self.context = (f"in block '{block.name}' used as '{prefix + inst}' at line {entry.line}"
                            + (f", {outer}" if outer else ""))
            child = _Scope(scope, inst, {INPUT: prev})
            self.uses.append((prefix + inst, block.name))
            prev = self.expand(layers, child, prev, prefix + inst + ".", stack + [block.name])
            self.uses.pop()
            self.context = outer
            scope.define(inst, prev)
        if len(instances) > 1 or numbers["repeat"] is not None:
            scope.define(name, prev)
        return prev

    def substitute(self, node: Node, values: dict[str, Node], block: "_Block") -> Node:
        """A block's layer entry with every '$param' replaced by the use's value (located there)."""
        v = node.value
        if isinstance(v, str) and v.startswith("$"):
            got = values.get(v[1:])
            if got is None:
                if (node.line, node.col) not in self.bad_params:  # once, not once per use
                    self.bad_params.add((node.line, node.col))
                    context, self.context = self.context, ""
                    self.error(node, f"block '{block.name}': unknown parameter '{v}'"
                                     f"{did_you_mean(v[1:], block.params)}; its parameters: "
                                     f"{', '.join(block.params) or '(none)'}")
                    self.context = context
                self.broken = True
                return node
            return Node(got.value, got.line, got.col, node.key_line, node.key_col)
        if isinstance(v, list):
            return Node([self.substitute(n, values, block) for n in v], node.line, node.col, node.key_line, node.key_col)
        if isinstance(v, dict):
            return Node({k: self.substitute(n, values, block) for k, n in v.items()}, node.line, node.col,
                        node.key_line, node.key_col)
        return node

    def names(self, layers: list[Layer], net_name: str) -> None:
        seen: dict[str, Layer] = {}
        for layer in layers:
            self.context = layer.context
            node = layer.option_nodes.get("name", layer.node)
            if layer.cname in seen:
                first = seen[layer.cname]
                also = "" if first.name == layer.name else f" '{first.name}', the same in C"
                self.error(node, f"duplicate layer name '{layer.name}' (also layer {first.index + 1}{also}, "
                                 f"line {first.line})")
            elif layer.cname == net_name:
                self.error(node, f"layer name '{layer.name}' is the network's name; choose another")
            seen.setdefault(layer.cname, layer)
        self.context = ""

    def unread(self, layers: list[Layer]) -> None:
        """Every output but the last is read by a later layer (else its gradient is undefined)."""
        read = {t for l in layers for t in l.inputs}
        for layer in layers[:-1]:
            if layer.output not in read and layer.out_shape is not None:
                self.context = layer.context
                self.error(layer.node, f"{layer.where()}: its output is never read (only the last layer's output "
                                       f"is the network's); name it in a later layer's inputs or remove it")
        self.context = ""

    def infer(self, layer: Layer) -> Shape | None:
        failed = False

        def error(message: str, option: str | None) -> None:
            nonlocal failed
            failed = True
            self.error(layer.option_nodes.get(option, layer.node) if option else layer.node, message)

        out = layer.kind.infer_inputs(layer, layer.in_shapes, error)
        if failed or out is None:
            return None
        layer.out_shape = out
        expect = layer.derived.get("expect")
        if expect is not None and tuple(expect) != out:
            self.error(layer.option_nodes["expect"], f"{layer.where()}: expected output {fmt_shape(expect)}, "
                                                     f"but it is {fmt_shape(out)} ({_explain(layer)})")
        for what, size in [("output", math.prod(out))] + [(f"parameter '{k}'", math.prod(s))
                                                           for k, s in layer.param_shapes().items()]:
            if size > MAX_ELEMENTS:
                self.error(layer.node, f"{layer.where()}: {what} has {size:,} elements; at most "
                                       f"{MAX_ELEMENTS:,} per tensor")
                layer.out_shape = None
                return None
        return out

    def check_budget(self, root: Node, name: str, layers: list[Layer], budget: int) -> None:
        from .report import human_bytes, training_memory

        need = training_memory(layers, batch_size=1)["total_bytes"]
        if need > budget:
            need_s, budget_s = human_bytes(need), human_bytes(budget)
            if need_s == budget_s:  # rounded alike: the exact numbers show which is larger
                need_s, budget_s = f"{need_s} ({need:,} bytes)", f"{budget_s} ({budget:,} bytes)"
            self.error(root, f"network '{name}' needs {need_s} to train one sample, over the "
                             f"memory budget of {budget_s} (--memory-budget)")


@dataclass
class _Block:
    """A block defined once under `blocks:` and used like a layer kind."""

    name: str
    node: Node
    params: list[str]
    layers: Node  # the list of layer entries, '$param' values still in place


@dataclass
class _Scope:
    """Names a layer may read: inside a block use, its own layers (relative) and INPUT;
    each name is also visible in the enclosing scope with the use's name before it."""

    parent: "_Scope | None"
    rel: str  # this scope's name in its parent ("layer1.0")
    names: dict[str, str]  # visible name -> tensor name

    def define(self, name: str, tensor: str) -> None:
        self.names.setdefault(name, tensor)
        if self.parent is not None:
            self.parent.define(f"{self.rel}.{name}", tensor)


def _explain(layer: Layer) -> str:
    return f"from input {fmt_shape(layer.in_shape)}"


def _bad_ident(name: str) -> str:
    """Why a C identifier cannot name a network or a layer ('' if it can).

    Names become prefixes of C identifiers and macros (NAME_forward, NAME_H, OFF_NAME_out):
    C reserves identifiers that start with '_' and a capital or with '__' for the compiler
    and the system headers (`_` gives `__real`, a GCC keyword; `_stdint` the header guard
    `_STDINT_H` of <stdint.h>), so a name starts with a letter and has no '__'.  That no
    name can make a generated identifier equal another (the templates' or a system
    header's) is tested over every identifier the templates make (test_spec_values.py)."""
    if name in C_RESERVED:
        return "is reserved in C (a keyword or a name the generated code uses)"
    if name.startswith("_"):
        return ("starts with '_': C reserves such identifiers for the compiler and the system headers "
                f"(the generated {name}_... and {name.upper()}_... could clash with theirs); start it with a letter")
    if "__" in name:
        return "contains '__', which C reserves for the compiler and the system headers; use a single '_'"
    if len(name) > MAX_NAME:
        return f"is {len(name)} characters long; at most {MAX_NAME}"
    return ""


def name_from_path(file: str) -> str:
    """The network name of a spec without `name:`: its file name as an identifier
    ('my-net.v2.yaml' -> my_net_v2), prefixed with 'net_' when it would not be one."""
    stem = re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9]", "_", Path(file).stem)).strip("_")
    stem = stem[:MAX_NAME].rstrip("_")
    if not stem or not stem[0].isalpha() or _bad_ident(stem):
        stem = ("net_" + stem)[:MAX_NAME].rstrip("_")
    return stem


def _close(word: Any, choices: list[str]) -> list[str]:
    return difflib.get_close_matches(word, choices, n=1, cutoff=0.6) if isinstance(word, str) else []


def _show(v: Any) -> str:
    if isinstance(v, Node):
        v = v.plain()
    if isinstance(v, list):
        v = [x.plain() if isinstance(x, Node) else x for x in v]
    if isinstance(v, dict):
        v = {k: x.plain() if isinstance(x, Node) else x for k, x in v.items()}
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f"'{v}'"
    if v is None:
        return "nothing"
    if isinstance(v, int) and abs(v) >= 10**16:
        return f"about {'-' if v < 0 else ''}10^{len(str(abs(v))) - 1}"
    return repr(v)


def check_text(text: str, file: str = "<spec>", memory_budget: int = DEFAULT_MEMORY_BUDGET) -> Network:
    """Parse and check spec text; raise `SpecErrors` listing every problem."""
    root = parse_text(text, file)
    return _Checker(file).run(root, text, memory_budget)


def load(path: str | Path, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> Network:
    """Parse and check a spec file; raise `SpecErrors` listing every problem."""
    return check_text(read_spec_text(path), str(path), memory_budget)
