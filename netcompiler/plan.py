"""Stage 3, plan: where every tensor lives, and in which order layers run.

- Parameters: one flat array, tensors in layer order with PyTorch layouts; gradients and
  optimizer state use the same layout.  Buffers (batch-norm running statistics): another.
- Activations: one block per sample holding every layer's output (flatten aliases its
  input, and so does a ReLU fused into its neighbours, see fused_relus), plus per-sample
  saved slots (dropout masks); max-pool argmax indices live in an int32 block per sample.
  Gradients of activations use the activation layout.
- Cache: arrays derived from parameters and kept between calls (Winograd-transformed conv
  weights), each next to a copy of the parameters it was made from.
- Graphs: every tensor between layers is named (graph.py).  A concat part is written in
  place into its slice of the concat's output when the concat is its last reader (a view:
  storage + offset, no copy).  Gradients: backward walks the layers in reverse; a tensor's
  first gradient writer in that walk stores, every later one adds (`Edge.add`, for kinds
  whose template can add), or stores into a slot of its own that is then added
  (`LayerPlan.grad_sums`).  Tensors with no trainable parameter upstream get no gradient.
- Stages: a call runs as one team of threads (one OpenMP parallel region), each thread on
  its own share of the batch (the split of schedule(static)).  Consecutive layers that work
  sample by sample form one stage, a loop over the thread's samples; a layer that runs on a
  range of samples at once (linear: one GEMM over the thread's samples) is a stage of its
  own, and so is a layer that needs the whole batch (batch norm in training), which runs
  between barriers; one between two per-sample stages that can (batch norm) runs split: its
  per-sample passes run in those stages' loops, and between the barriers it only combines each
  sample's partial sums (split_layers).  The weight gradients of range layers are
  summed over the whole batch after backward, threads owning rows (the sums do not depend on
  the thread count).
- Small calls run on one thread (no parallel region): below `parallel_min_eval` samples in
  evaluation and `parallel_min_train` in training, computed from the FLOPs per sample.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Any

from .check import Network
from .ctext import comment
from .graph import consumers, needs_grad, tensors
from .layers import INPUT, Layer, fmt_shape
from .target import current


@dataclass
class Tensor:
    name: str  # "conv1.weight"
    macro: str  # "OFF_conv1_weight"
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def dims(self) -> str:
        return "".join(f"[{d}]" for d in self.shape)


@dataclass
class Edge:
    """One input of a layer: where it is read and where its gradient goes."""

    index: int  # position in the layer's inputs
    tensor: str
    macro: str  # offset macro of the input in a sample's activations
    size: int
    din: str | None  # offset macro its gradient is written at; None: no gradient wanted
    add: bool = False  # din += (another reader of the tensor wrote its gradient first), else din =
    view: bool = False  # a concat part already in place in the output (no copy, no gradient code)
    at: int = 0  # a concat part: where it starts in the output


@dataclass
class LayerPlan:
    layer: Layer
    name: str
    kind: str
    template: str
    c: dict[str, Any]  # the kind's render context (numbers)
    comment: str  # "conv2d, specs/lenet5.yaml:5: out_channels=6, kernel_size=5, padding=2"
    in_dims: str
    out_dims: str
    out: Tensor | None  # None when aliasing
    out_macro: str  # offset macro of the output (the input's, for flatten)
    in_macro: str
    need_din: bool  # the first input's gradient is wanted (something upstream is trainable)
    din_macro: str = ""  # where backward writes the first input's gradient (its slot, or a slot to add)
    ins: list[Edge] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)  # names of the tensors read (dotted)
    # after backward: (tensor slot, slot written, size): add the second into the first
    grad_sums: list[tuple[str, str, int]] = field(default_factory=list)
    params: dict[str, Tensor] = field(default_factory=dict)  # "weight" -> Tensor
    buffers: dict[str, Tensor] = field(default_factory=dict)
    slots: dict[str, Tensor] = field(default_factory=dict)  # per-sample saved (reals or ints)
    slot_types: dict[str, str] = field(default_factory=dict)
    cache: dict[str, Tensor] = field(default_factory=dict)  # derived from params, kept between calls
    stats: Tensor | None = None  # per-batch saved statistics
    batch_level_in_training: bool = False
    split: bool = False  # a batch-level layer whose per-sample passes run in the stages around it (split_layers)
    sample_range: bool = False  # forward and input gradient on a range of samples; weight gradient after backward
    aliases: bool = False
    relu_out: bool = False  # forward stores max(0, output): the ReLU after it is fused
    relu_din: bool = False  # backward zeroes din where the input is not positive (a fused ReLU before it)
    relu_dout: bool = False  # backward zeroes dout where the output is not positive (its own fused ReLU)
    fused_into: tuple[str, str] | None = None  # a fused ReLU: (the layer doing its forward, its backward)
    # evaluation mode (plan.py, eval_folds): the batch norm this layer applies, whether it applies the
    # ReLU after that (or, for a batch norm, after itself), and where it then stores; or the layer that
    # computes this one
    fold_bn: LayerPlan | None = None
    fold_relu: bool = False
    fold_out_macro: str = ""
    eval_folded_into: str | None = None
    # the evaluation forward on another kernel path than training's: this layer with that path's context
    eval_lp: LayerPlan | None = None
    eval_alone: bool = False  # this is such an evaluation forward (it renders NAME_forward_eval)
    kernel: Any = None  # layers.KernelChoice: the kernel path of a kind with several (conv2d), else None
    # where the backward's sums over a chunk's samples start in the per-thread scratch (after what
    # every layer shares), and how many floats (Kind.chunk_accum); 0: none
    accum: int = 0
    accum_size: int = 0


@dataclass
class Stage:
    batch_level: bool
    layers: list[LayerPlan]
    ranged: bool = False  # one layer called on the thread's range of samples (sample_range kinds)
    param_lo: int = 0  # range of parameter offsets the stage's layers write gradients to
    param_hi: int = 0
    # evaluation, a per-sample stage run in the thread's work block (eval_work): the pieces of a
    # sample's activations it reads from the sample's block, and those it writes that a later
    # stage reads (or the network output), copied back; each (slot macro, offset in it, size)
    copy_in: list[tuple[str, int, int]] = field(default_factory=list)
    copy_out: list[tuple[str, int, int]] = field(default_factory=list)
    # training, a per-sample stage next to split batch-level layers (split_layers): those
    # whose input side it runs (forward: the partial sums at the end of a sample; backward: the
    # input gradient first), and those whose output side it runs (forward: the output first;
    # backward: the partial sums at the end)
    split_in: list[LayerPlan] = field(default_factory=list)
    split_out: list[LayerPlan] = field(default_factory=list)

    @property
    def param_count(self) -> int:
        return self.param_hi - self.param_lo

    @property
    def uses_ints(self) -> bool:
        return any("int32_t" in lp.slot_types.values() for lp in self.layers)

    @property
    def uses_scratch(self) -> bool:
        return any(lp.layer.kind.scratch(lp.layer) for lp in self.layers)

    @property
    def uses_dropout(self) -> bool:
        return any(lp.kind == "dropout" for lp in self.layers)


@dataclass
class Plan:
    net: Network
    layers: list[LayerPlan]
    params: list[Tensor]
    buffers: list[Tensor]
    activations: list[Tensor]  # per-sample real slots (input, outputs and saved reals)
    int_slots: list[Tensor]
    stats: list[Tensor]
    cache: list[Tensor]
    num_params: int
    num_buffers: int
    acts_per_sample: int
    ints_per_sample: int
    stats_size: int
    cache_size: int
    scratch_per_thread: int  # floats of per-thread scratch (im2col buffers, then the work block)
    in_size: int
    out_size: int
    train_stages: list[Stage]
    eval_stages: list[Stage]
    views: list[Tensor] = field(default_factory=list)  # tensors inside another's slot (concat parts)
    tensors: dict[str, Any] = field(default_factory=dict)  # graph.Tensor by name, with storage and offset
    parallel_min_eval: int = 1  # fewer samples than this: an evaluation forward runs on one thread
    parallel_min_train: int = 1  # the same for training calls (forward, backward, steps)
    vec: int = 16  # reals per vreal of the target the plan was made for (target.current())
    # where each thread's evaluation work block (acts_per_sample reals) starts in its scratch
    eval_work: int = 0

    @property
    def range_grads(self) -> list[LayerPlan]:
        """Layers whose weight gradients are summed over the whole batch after backward."""
        return [lp for lp in self.layers if lp.sample_range and lp.params]

    @property
    def tls_ranges(self) -> list[tuple[int, int]]:
        """Parameter ranges [lo, hi) of the per-sample stages: with several threads, each sums
        its samples' gradients there privately (grads_tls), then the sums are added in thread order."""
        return [(st.param_lo, st.param_hi) for st in self.train_stages
                if not st.batch_level and not st.ranged and st.param_hi > st.param_lo]

    @property
    def last(self) -> LayerPlan:
        return self.layers[-1]

    @functools.cached_property
    def out_offset(self) -> int:
        """Offset of the network output (logits) in a sample's activation block."""
        return next(t.offset for t in self.activations + self.views if t.macro == self.last.out_macro)


class _Allocator:
    def __init__(self, prefix: str = "OFF_", align: int = 1):
        self.tensors: list[Tensor] = []
        self.size = 0
        self.prefix = prefix
        self.align = align

    def add(self, name: str, shape: tuple[int, ...]) -> Tensor:
        t = Tensor(name, self.prefix + name.replace(".", "_"), tuple(shape), self.size)
        self.size = -(-(self.size + t.size) // self.align) * self.align
        self.tensors.append(t)
        return t


def fused_relus(layers: list[Layer]) -> dict[int, tuple[Layer, Layer]]:
    """ReLUs computed inside their neighbours: index -> (the layer whose forward applies it,
    the layer whose backward applies its derivative).

    A ReLU that is the only reader of a tensor written by a layer that can store max(0, y)
    (conv2d, linear, add, batch norm) costs no pass of its own: that layer applies it as it
    stores its output, and the derivative (output > 0) is applied either
    - by the ReLU's one reader, when its backward can zero its input gradient where its input
      is not positive (maxpool2d, linear) as it writes that gradient: (before, after);
    - or else by the layer before itself, when its backward can zero its own output gradient
      where its output is not positive before using it (add, batch norm): (before, before);
      the ReLU may then have any readers, whose gradients meet in its output's gradient.
    The ReLU's output is then its input, like flatten's: no slot, no call."""
    readers = consumers(layers)
    by_name = {l.name: l for l in layers}
    out = {}
    for l in layers:
        before = by_name.get(l.inputs[0]) if l.kind.kind == "relu" else None
        if before is None or readers[before.output] != [l] or not before.kind.applies_relu(before):
            continue
        after = readers[l.output]
        if len(after) == 1 and after[0].inputs == [l.output] and after[0].kind.masks_relu_grad(after[0]):
            out[l.index] = (before, after[0])
        elif after and before.kind.masks_relu_dout(before):
            out[l.index] = (before, before)
    return out


def eval_folds(layers: list[Layer], fused: dict[int, tuple[Layer, Layer]]) -> dict[int, tuple[Layer, Layer | None]]:
    """Batch norms (and a ReLU after one) computed, in evaluation mode, by the layer before
    them: that layer's index -> (the batch norm, the ReLU or None); a batch norm that no layer
    before it takes, with the ReLU it applies itself: its index -> (itself, the ReLU).

    A batch norm with running statistics is y = x * scale + shift per channel; when it is the
    only reader of a layer whose evaluation forward can apply that as it stores (conv2d's
    pointwise and depthwise paths), the layer stores the batch norm's output itself, and the
    ReLU's when a ReLU is the batch norm's only reader: two passes over the tensor fewer.  The
    slots in between are then not written in evaluation mode (training runs every layer)."""
    readers = consumers(layers)
    out = {}
    for l in layers:
        after = readers[l.output]
        if len(after) != 1 or not l.kind.folds_eval_affine(l):
            continue
        bn = after[0]
        if bn.inputs != [l.output] or not bn.kind.eval_affine(bn):
            continue
        out[l.index] = (bn, _relu_after(bn, readers, fused))
    taken = {bn.index for bn, _ in out.values()}
    for l in layers:
        relu = _relu_after(l, readers, fused) if l.kind.eval_affine(l) and l.index not in taken else None
        if relu is not None:
            out[l.index] = (l, relu)
    return out


def _relu_after(layer: Layer, readers, fused) -> Layer | None:
    """The ReLU that is the only reader of layer's output, unless it is fused into other
    neighbours (one that layer's own forward applies is its ReLU in evaluation mode too)."""
    relu = readers[layer.output][0] if len(readers[layer.output]) == 1 else None
    if relu is None or relu.kind.kind != "relu":
        return None
    return relu if relu.index not in fused or fused[relu.index][0] is layer else None


def concat_views(layers: list[Layer], aliased: dict[str, str]) -> dict[str, tuple[str, int]]:
    """Concat parts written in place: part -> (the concat's output, offset of the part in it).

    A part can live in the concat's output when it has a producer of its own (not the network
    input, not an alias) and the concat is its last reader, aliases of it included: every
    other reader then runs earlier, and in backward later, adding to the gradient the concat's
    readers stored."""
    readers = consumers(layers)

    def last_use(t: str) -> int:
        return max([c.index for c in readers[t]] + [last_use(c.output) for c in readers[t]
                                                     if aliased.get(c.output) == t])

    out: dict[str, tuple[str, int]] = {}
    for layer in layers:
        if not layer.kind.concat_parts(layer):
            continue
        at = 0
        for t, shape in zip(layer.inputs, layer.in_shapes):
            if (t != INPUT and t not in aliased and t not in out and layer.inputs.count(t) == 1
                    and last_use(t) == layer.index):
                out[t] = (layer.output, at)
            at += math.prod(shape)
    return out


def aliased_outputs(layers: list[Layer], fused: dict[int, tuple[Layer, Layer]]) -> dict[str, str]:
    """Outputs that are their input's memory (flatten, a fused ReLU): output -> input."""
    return {l.output: l.inputs[0] for l in layers if l.kind.aliases_input(l) or l.index in fused}


def without_slot(layers: list[Layer]) -> set[str]:
    """Outputs with no slot of their own: aliases of their input, and concat parts in place."""
    aliased = aliased_outputs(layers, fused_relus(layers))
    return set(aliased) | set(concat_views(layers, aliased))


def _slot_macro(name: str) -> str:
    return "OFF_" + name.replace(".", "_")


def gradient_edges(layers: list[Layer], aliased: dict[str, str], views: dict[str, tuple[str, int]],
                   macro: dict[str, str]):
    """Backward in reverse order: for every input edge, whether it gets a gradient and whether it
    stores it, adds it (kinds that accumulate), or stores it into the tensor's '.dsum' slot that
    is then added.  Returns (layer index -> edges, layer index -> [(dst, src, size)] to add after
    its backward, tensor -> shape of the '.dsum' slots needed)."""
    need = needs_grad(layers)

    def grad_key(t: str) -> str:  # tensors sharing one gradient slot (aliases)
        return grad_key(aliased[t]) if t in aliased else t

    written = {grad_key(layers[-1].output)}  # the loss stores the output's gradient
    edges: dict[int, list[Edge]] = {}
    sums: dict[int, list[tuple[str, str, int]]] = {}
    partial: dict[str, tuple[int, ...]] = {}
    for layer in reversed(layers):
        if layer.output in aliased:
            edges[layer.index] = [Edge(0, layer.inputs[0], macro[layer.inputs[0]], math.prod(layer.in_shape),
                                       None)]
            continue
        es, at = [], 0
        for i, (t, shape) in enumerate(zip(layer.inputs, layer.in_shapes)):
            size = math.prod(shape)
            e = Edge(i, t, macro[t], size, None, at=at)
            at += size
            key = grad_key(t)
            if t in views and views[t][0] == layer.output:
                e.view = True
                written.add(key)
            elif t in need:
                if key not in written:
                    e.din = macro[t]
                    written.add(key)
                elif layer.kind.accumulates_din(layer):
                    e.din, e.add = macro[t], True
                else:
                    partial.setdefault(t, tuple(shape))
                    e.din = _slot_macro(f"{t}.dsum")
                    sums.setdefault(layer.index, []).append((macro[t], e.din, size))
            es.append(e)
        edges[layer.index] = es
    return edges, sums, partial


def _edges_of(layers: list[Layer]):
    aliased = aliased_outputs(layers, fused_relus(layers))
    views = concat_views(layers, aliased)
    return gradient_edges(layers, aliased, views, {t: t for t in consumers(layers)})


def gradient_sum_slots(layers: list[Layer]) -> dict[str, tuple[int, ...]]:
    """The '.dsum' slots of a network (the report counts them in training memory)."""
    return _edges_of(layers)[2]


def gradient_add_flops(layers: list[Layer]) -> dict[int, int]:
    """Layer index -> the adds its backward does into gradients other readers wrote first
    (an add edge's +=, or a '.dsum' slot added afterwards): one FLOP per element."""
    edges, sums, _ = _edges_of(layers)
    return {i: sum(e.size for e in es if e.add) + sum(size for _, _, size in sums.get(i, []))
            for i, es in edges.items()}


def make_plan(net: Network) -> Plan:
    vec = current().vec  # the width the layers' kernels are planned for
    params, buffers, acts, stats = (_Allocator(align=vec) for _ in range(4))
    ints = _Allocator()
    cache = _Allocator("CACHE_", align=vec)
    layers = net.layers
    fused = fused_relus(layers)
    # tensors that are another's memory: flatten's output and a fused ReLU's are their input
    aliased = aliased_outputs(layers, fused)
    views = concat_views(layers, aliased)
    # The network input is copied into the first slot of each sample's activation block,
    # so every layer reads its input the same way.
    own: dict[str, Tensor] = {INPUT: acts.add(INPUT, net.input_shape)}
    slots_of: dict[int, dict[str, tuple[str, Tensor]]] = {}
    for layer in layers:
        if layer.output not in aliased and layer.output not in views:
            own[layer.output] = acts.add(f"{layer.name}.out", layer.out_shape)
        slots_of[layer.index] = {}
        for sname, (ctype, count) in layer.kind.saved_slots(layer).items():
            alloc = ints if ctype == "int32_t" else acts
            slots_of[layer.index][sname] = (ctype, alloc.add(f"{layer.name}.{sname}", (count,)))
    graph = tensors(layers, net.input_shape)
    view_tensors: list[Tensor] = []

    def place(t: str) -> tuple[str, int]:
        """(tensor owning the slot, element offset in it)"""
        if t in aliased:
            return place(aliased[t])
        if t in views:
            storage, off = place(views[t][0])
            return storage, off + views[t][1]
        return t, 0

    macro: dict[str, str] = {}
    for name, gt in graph.items():
        gt.storage, gt.offset = place(name)
        if name in own:
            macro[name] = own[name].macro
        elif name in views:
            base = own[gt.storage]
            v = Tensor(f"{name}.out", "OFF_" + f"{name}.out".replace(".", "_"), gt.shape, base.offset + gt.offset)
            view_tensors.append(v)
            macro[name] = v.macro
    for name in graph:  # aliases: their source's macro
        if name not in macro:
            src = name
            while src in aliased:
                src = aliased[src]
            macro[name] = macro[src]

    edges, sums, partial = gradient_edges(layers, aliased, views, macro)
    for t, shape in partial.items():
        acts.add(f"{t}.dsum", shape)

    plans: list[LayerPlan] = []
    for layer in layers:
        kind = layer.kind
        ins = edges[layer.index]
        aliases = _runs_nothing(layer, aliased, ins)
        lp = LayerPlan(
            layer=layer, name=layer.cname, kind=kind.kind, template=kind.template,
            c=kind.render_context(layer), kernel=kind.kernel_choice(layer),
            comment=comment(f"{kind.kind} '{layer.name}', {net.file}:{layer.line}"
                            + (f": {kind.describe_options(layer)}" if kind.describe_options(layer) else "")
                            + (f"; reads {', '.join(layer.inputs)}" if layer.inputs != [_default_input(layers, layer)]
                               else "")),
            in_dims="".join(f"[{d}]" for d in layer.in_shape),
            out_dims="".join(f"[{d}]" for d in layer.out_shape),
            out=own.get(layer.output), out_macro=macro[layer.output], in_macro=ins[0].macro,
            need_din=ins[0].din is not None, din_macro=ins[0].din or ins[0].macro, ins=ins,
            inputs=list(layer.inputs), grad_sums=sums.get(layer.index, []),
            batch_level_in_training=kind.batch_level_in_training, sample_range=kind.sample_range,
            aliases=aliases,
            relu_out=any(b is layer for b, _ in fused.values()),
            relu_din=any(a is layer and b is not layer for b, a in fused.values()),
            relu_dout=any(a is layer and b is layer for b, a in fused.values()),
            fused_into=(fused[layer.index][0].cname, fused[layer.index][1].cname) if layer.index in fused else None,
        )
        for pname, shape in layer.param_shapes().items():
            lp.params[pname] = params.add(f"{layer.name}.{pname}", shape)
        for bname, shape in layer.buffer_shapes().items():
            lp.buffers[bname] = buffers.add(f"{layer.name}.{bname}", shape)
        for sname, (ctype, t) in slots_of[layer.index].items():
            lp.slots[sname] = t
            lp.slot_types[sname] = ctype
        for cname, shape in kind.cache_shapes(layer).items():
            lp.cache[cname] = cache.add(f"{layer.name}.{cname}", shape)
        plans.append(lp)
    train_stages = _stages(plans, training=True)
    for lp in _wire_split(train_stages, split_layers(layers, aliased, edges)):
        lp.slots["sums"] = acts.add(f"{lp.layer.name}.sums", (lp.layer.kind.split_sums(lp.layer),))
        lp.slot_types["sums"] = "real_t"
    for lp in plans:
        if lp.layer.kind.batch_stats(lp.layer, lp.split):
            lp.stats = stats.add(f"{lp.layer.name}.stats", (lp.layer.kind.batch_stats(lp.layer, lp.split),))
    for i, (bn, relu) in eval_folds(layers, fused).items():
        last = relu or bn
        plans[i].fold_relu, plans[i].fold_out_macro = relu is not None, macro[last.output]
        if bn.index != i:  # a batch norm folded into the layer before it (else one applying its ReLU)
            plans[i].fold_bn = plans[bn.index]
        for l in (bn, relu) if relu else (bn,):
            if l.index != i:
                plans[l.index].eval_folded_into = plans[i].name
    # per-thread scratch: what any layer's call uses (shared, not kept), then the chunk sums
    scratch = max([l.kind.scratch(l) for l in net.layers] + [0])
    for lp in plans:
        size = lp.layer.kind.chunk_accum(lp.layer)
        if size:
            lp.accum = -(-scratch // vec) * vec  # the chunk sums start at whole vectors
            lp.accum_size = size
            scratch = lp.accum + size
    for lp in plans:
        ctx = lp.layer.kind.eval_render_context(lp.layer)
        if ctx is not None:
            lp.eval_lp = dataclasses.replace(lp, c=ctx, eval_alone=True)
    eval_stages = _stages(plans, training=False)
    out_slot = next(t for t in acts.tensors + view_tensors if t.macro == plans[-1].out_macro)
    _eval_copies(eval_stages, acts.tensors, view_tensors, own[INPUT], (out_slot.offset, out_slot.offset + out_slot.size))
    eval_work = -(-scratch // vec) * vec
    scratch = eval_work + acts.size
    return Plan(
        net=net, layers=plans, params=params.tensors, buffers=buffers.tensors, activations=acts.tensors,
        int_slots=ints.tensors, stats=stats.tensors, cache=cache.tensors, num_params=params.size,
        num_buffers=buffers.size, acts_per_sample=acts.size, ints_per_sample=ints.size, stats_size=stats.size,
        cache_size=cache.size,
        scratch_per_thread=-(-scratch // vec) * vec,  # each thread's scratch starts at whole vectors
        vec=vec,
        in_size=math.prod(net.input_shape), out_size=math.prod(net.output_shape),
        train_stages=train_stages, eval_stages=eval_stages, eval_work=eval_work,
        views=view_tensors, tensors=graph,
        parallel_min_eval=parallel_min(sum(l.kind.flops(l)[0] for l in layers)),
        parallel_min_train=parallel_min(sum(sum(l.kind.flops(l)) + l.kind.train_forward_extra_flops(l)
                                            for l in layers)),
    )


# Below this much work (FLOPs of a call), one thread does it all: a parallel region wakes
# the other threads (with the short OpenMP spin set by netcompiler/__init__.py they sleep).
# About 60 us of one core's lenet5 work; on a loaded 2-core machine a team of 2 cost 20-30 us
# more per evaluation call, and lenet5's evaluation broke even between 12 and 16 samples
# (README, "Threads").
PARALLEL_MIN_FLOPS = 8_000_000


def parallel_min(flops_per_sample: int) -> int:
    """The fewest samples a call needs to run on several threads."""
    return max(1, -(-PARALLEL_MIN_FLOPS // max(flops_per_sample, 1)))


def _default_input(layers: list[Layer], layer: Layer) -> str:
    """The tensor a layer reads when its spec entry has no `inputs`: the layer before it."""
    return INPUT if layer.index == 0 else layers[layer.index - 1].output


# The most layers one per-sample stage runs.  gcc inlines a stage's layers into its
# parallel loop, and its vectorizer's time grows far faster than their number (a chain of
# 100 relu layers in one stage: 34 s of CPU; 200: 246 s); in stages of 16 it grows with the
# number of layers (100: 6.6 s, 256: 9.3 s, 512: 19.9 s).  No spec in specs/ has a longer
# stage, so their C is the same.
MAX_STAGE_LAYERS = 16


def _stages(plans: list[LayerPlan], training: bool) -> list[Stage]:
    stages: list[Stage] = []
    for lp in plans:
        if lp.aliases or not training and lp.eval_folded_into:
            continue  # nothing runs
        batch = training and lp.batch_level_in_training
        alone = batch or lp.sample_range
        if (alone or not stages or stages[-1].batch_level or stages[-1].ranged
                or len(stages[-1].layers) == MAX_STAGE_LAYERS):
            stages.append(Stage(batch, [], ranged=lp.sample_range and not batch))
        stages[-1].layers.append(lp)
    if not stages:  # only reinterpreting layers (flatten): one stage that copies the input in
        stages.append(Stage(False, []))
    for st in stages:
        offs = [(t.offset, t.offset + t.size) for lp in st.layers for t in lp.params.values()]
        if offs:
            st.param_lo, st.param_hi = min(o[0] for o in offs), max(o[1] for o in offs)
    return stages


def _runs_nothing(layer: Layer, aliased: dict[str, str], ins: list[Edge]) -> bool:
    """An alias of its input (flatten, a fused ReLU), or a concat of parts all in place."""
    return layer.output in aliased or bool(ins) and all(e.view for e in ins)


def split_layers(layers: list[Layer], aliased: dict[str, str], edges: dict[int, list[Edge]]) -> set[int]:
    """The batch-level training layers that run split: those that can (Kind.split_sums) and
    sit between two per-sample stages, that is, whose nearest running layers on both sides
    work sample by sample (neither batch-level nor on a range of samples).  Their per-sample
    passes move into those stages' loops (Stage.split_in of the stage before, split_out of the
    one after), and their batch-level step only combines each sample's partial sums.  A batch
    norm then reads a sample's input right after the layer before made it, and writes its
    output right before the layer after reads it, instead of in three passes over the whole
    batch's tensors, which at batch 64 do not fit in cache.  The order of every write is kept:
    a per-sample pass runs for each sample after the stage's layers (before them in backward)
    that ran before it."""
    running = [l for l in layers if not _runs_nothing(l, aliased, edges[l.index])]

    def per_sample(l: Layer) -> bool:
        return not l.kind.batch_level_in_training and not l.kind.sample_range

    return {l.index for before, l, after in zip(running, running[1:], running[2:])
            if l.kind.batch_level_in_training and l.kind.split_sums(l) and per_sample(before) and per_sample(after)}


def split_sums_per_sample(layers: list[Layer]) -> int:
    """The reals per sample of the split layers' partial sums (the report counts them)."""
    aliased = aliased_outputs(layers, fused_relus(layers))
    return sum(layers[i].kind.split_sums(layers[i]) for i in split_layers(layers, aliased, _edges_of(layers)[0]))


def _wire_split(stages: list[Stage], split: set[int]) -> list[LayerPlan]:
    """Marks the split layers' plans and hands their per-sample passes to the stages on either
    side (each a batch-level stage of its own between two per-sample ones); returns them."""
    out = []
    for k, st in enumerate(stages):
        if st.batch_level and st.layers[0].layer.index in split:
            lp = st.layers[0]
            before, after = stages[k - 1], stages[k + 1]
            assert len(st.layers) == 1 and not (before.batch_level or before.ranged or after.batch_level
                                                or after.ranged), f"{lp.name}: split between per-sample stages only"
            lp.split = True
            before.split_in.append(lp)
            after.split_out.append(lp)
            out.append(lp)
    return out


# Evaluation keeps nothing for a backward, so a per-sample stage runs each of a chunk's samples
# in one block of the thread's scratch, which stays in cache, instead of in the sample's own
# block of acts (a fresh ACTS_PER_SAMPLE reals per sample, which at batch 64 go out to memory and
# back).  It copies in what it reads that an earlier stage wrote, and copies out what a later
# stage reads.  Sets of offsets are sorted lists of disjoint [lo, hi) intervals.
Intervals = list[tuple[int, int]]


def _union(a: Intervals, b: Intervals) -> Intervals:
    out: Intervals = []
    for lo, hi in sorted(a + b):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _subtract(a: Intervals, b: Intervals) -> Intervals:
    out: Intervals = []
    for lo, hi in a:
        for blo, bhi in b:
            if bhi <= lo or blo >= hi:
                continue
            if blo > lo:
                out.append((lo, blo))
            lo = max(lo, bhi)
            if lo >= hi:
                break
        if lo < hi:
            out.append((lo, hi))
    return out


def _intersect(a: Intervals, b: Intervals) -> Intervals:
    return _subtract(a, _subtract(a, b))


def _eval_copies(stages: list[Stage], slots: list[Tensor], views: list[Tensor], input_slot: Tensor,
                 output: tuple[int, int]) -> None:
    """Stage.copy_in and copy_out of the evaluation stages that run sample by sample; `slots`
    are the disjoint slots of a sample's activations, `views` tensors inside them."""
    at = {t.macro: t.offset for t in slots + views}

    def reads(lp: LayerPlan) -> Intervals:
        return _union([], [(at[e.macro], at[e.macro] + e.size) for e in lp.ins if not e.view])

    def writes(lp: LayerPlan) -> Intervals:
        lo = at[lp.fold_out_macro or lp.out_macro]
        full = [(lo, lo + math.prod(lp.layer.out_shape))]
        return _subtract(full, _union([], [(lo + e.at, lo + e.at + e.size) for e in lp.ins if e.view]))

    later_reads: list[Intervals] = [[output]] * len(stages)  # what stages after k (or the caller) read
    for k in range(len(stages) - 2, -1, -1):
        later_reads[k] = later_reads[k + 1]
        for lp in stages[k + 1].layers:
            later_reads[k] = _union(later_reads[k], reads(lp))
    for k, st in enumerate(stages):
        if st.ranged or st.batch_level:
            continue
        written: Intervals = [(input_slot.offset, input_slot.offset + input_slot.size)] if k == 0 else []
        needed: Intervals = []
        for lp in st.layers:
            needed = _union(needed, _subtract(reads(lp), written))
            written = _union(written, writes(lp))
        st.copy_in = _pieces(needed, slots)
        st.copy_out = _pieces(_intersect(written, later_reads[k]), slots)


def _pieces(intervals: Intervals, slots: list[Tensor]) -> list[tuple[str, int, int]]:
    """Intervals cut at slot boundaries, each named by its slot: (macro, offset in it, size)."""
    return [(t.macro, lo - t.offset, hi - lo) for t in sorted(slots, key=lambda t: t.offset)
            for lo, hi in _intersect(intervals, [(t.offset, t.offset + t.size)])]


def shape_str(shape) -> str:
    return fmt_shape(tuple(shape))
