"""Stage 3, plan: where every tensor lives, and in which order layers run.

- Parameters: one flat array, tensors in layer order with PyTorch layouts; gradients and
  optimizer state use the same layout.  Buffers (batch-norm running statistics): another.
- Activations: one block per sample holding every layer's output (flatten aliases its
  input, and so does a ReLU fused into its neighbours, see fused_relus), plus per-sample
  saved slots (dropout masks); max-pool argmax indices live in an int32 block per sample.
  Gradients of activations use the activation layout.
- Cache: arrays derived from parameters and kept between calls (Winograd-transformed conv
  weights), each next to a copy of the parameters it was made from.
- Stages: consecutive layers that work sample by sample run inside one parallel loop over
  the batch; a layer that needs the whole batch (batch norm in training) is its own stage.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

from .check import Network
from .ctext import comment
from .layers import Layer, fmt_shape


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
    need_din: bool  # False for layers that read the network input (its gradient is unused)
    params: dict[str, Tensor] = field(default_factory=dict)  # "weight" -> Tensor
    buffers: dict[str, Tensor] = field(default_factory=dict)
    slots: dict[str, Tensor] = field(default_factory=dict)  # per-sample saved (reals or ints)
    slot_types: dict[str, str] = field(default_factory=dict)
    cache: dict[str, Tensor] = field(default_factory=dict)  # derived from params, kept between calls
    stats: Tensor | None = None  # per-batch saved statistics
    batch_level_in_training: bool = False
    aliases: bool = False
    relu_out: bool = False  # forward stores max(0, output): the ReLU after it is fused
    relu_din: bool = False  # backward zeroes din where the input is not positive (a fused ReLU before it)
    fused_into: tuple[str, str] | None = None  # a fused ReLU: (the layer doing its forward, its backward)


@dataclass
class Stage:
    batch_level: bool
    layers: list[LayerPlan]
    param_lo: int = 0  # range of parameter offsets the stage's layers write gradients to
    param_hi: int = 0

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
    scratch_per_thread: int  # floats of per-thread scratch (im2col buffers)
    in_size: int
    out_size: int
    train_stages: list[Stage]
    eval_stages: list[Stage]

    @property
    def last(self) -> LayerPlan:
        return self.layers[-1]

    @functools.cached_property
    def out_offset(self) -> int:
        """Offset of the network output (logits) in a sample's activation block."""
        return next(t.offset for t in self.activations if t.macro == self.last.out_macro)


class _Allocator:
    def __init__(self, prefix: str = "OFF_"):
        self.tensors: list[Tensor] = []
        self.size = 0
        self.prefix = prefix

    def add(self, name: str, shape: tuple[int, ...]) -> Tensor:
        t = Tensor(name, self.prefix + name.replace(".", "_"), tuple(shape), self.size)
        self.size += t.size
        self.tensors.append(t)
        return t


def fused_relus(layers: list[Layer]) -> dict[int, tuple[Layer, Layer]]:
    """ReLUs computed inside their neighbours: index -> (the layer before, the layer after).

    A ReLU between a layer that can store max(0, y) (conv2d, linear) and one whose backward
    can zero its input gradient where its input is not positive (maxpool2d, linear) costs
    no pass of its own: the first applies it as it stores its output, the second applies its
    derivative (input > 0, the same as the ReLU's own input > 0) as it writes its input
    gradient.  The ReLU's output is then its input, like flatten's: no slot, no call."""
    return {
        i: (layers[i - 1], layers[i + 1]) for i in range(1, len(layers) - 1)
        if layers[i].kind.kind == "relu" and layers[i - 1].kind.applies_relu(layers[i - 1])
        and layers[i + 1].kind.masks_relu_grad(layers[i + 1])
    }


def make_plan(net: Network) -> Plan:
    params, buffers, acts, ints, stats = (_Allocator() for _ in range(5))
    cache = _Allocator("CACHE_")
    plans: list[LayerPlan] = []
    # The network input is copied into the first slot of each sample's activation block,
    # so every layer reads its input the same way.
    prev_macro = acts.add("input", net.input_shape).macro
    fused = fused_relus(net.layers)
    for layer in net.layers:
        kind = layer.kind
        aliases = kind.aliases_input(layer) or layer.index in fused
        out = None if aliases else acts.add(f"{layer.name}.out", layer.out_shape)
        lp = LayerPlan(
            layer=layer, name=layer.name, kind=kind.kind, template=kind.template,
            c=kind.render_context(layer),
            comment=comment(f"{kind.kind} '{layer.name}', {net.file}:{layer.line}"
                            + (f": {kind.describe_options(layer)}" if kind.describe_options(layer) else "")),
            in_dims="".join(f"[{d}]" for d in layer.in_shape),
            out_dims="".join(f"[{d}]" for d in layer.out_shape),
            out=out, out_macro=prev_macro if aliases else out.macro, in_macro=prev_macro,
            need_din=prev_macro != "OFF_input",
            batch_level_in_training=kind.batch_level_in_training, aliases=aliases,
            relu_out=layer.index + 1 in fused, relu_din=layer.index - 1 in fused,
            fused_into=(fused[layer.index][0].name, fused[layer.index][1].name) if layer.index in fused else None,
        )
        for pname, shape in layer.param_shapes().items():
            lp.params[pname] = params.add(f"{layer.name}.{pname}", shape)
        for bname, shape in layer.buffer_shapes().items():
            lp.buffers[bname] = buffers.add(f"{layer.name}.{bname}", shape)
        for sname, (ctype, count) in kind.saved_slots(layer).items():
            alloc = ints if ctype == "int32_t" else acts
            lp.slots[sname] = alloc.add(f"{layer.name}.{sname}", (count,))
            lp.slot_types[sname] = ctype
        for cname, shape in kind.cache_shapes(layer).items():
            lp.cache[cname] = cache.add(f"{layer.name}.{cname}", shape)
        if kind.batch_stats(layer):
            lp.stats = stats.add(f"{layer.name}.stats", (kind.batch_stats(layer),))
        plans.append(lp)
        prev_macro = lp.out_macro
    return Plan(
        net=net, layers=plans, params=params.tensors, buffers=buffers.tensors, activations=acts.tensors,
        int_slots=ints.tensors, stats=stats.tensors, cache=cache.tensors, num_params=params.size,
        num_buffers=buffers.size, acts_per_sample=acts.size, ints_per_sample=ints.size, stats_size=stats.size,
        cache_size=cache.size,
        scratch_per_thread=max([l.kind.scratch(l) for l in net.layers] + [0]),
        in_size=math.prod(net.input_shape), out_size=math.prod(net.output_shape),
        train_stages=_stages(plans, training=True), eval_stages=_stages(plans, training=False),
    )


# The most layers one per-sample stage runs.  gcc inlines a stage's layers into its
# parallel loop, and its vectorizer's time grows far faster than their number (a chain of
# 100 relu layers in one stage: 34 s of CPU; 200: 246 s); in stages of 16 it grows with the
# number of layers (100: 6.6 s, 256: 9.3 s, 512: 19.9 s).  No spec in specs/ has a longer
# stage, so their C is the same.
MAX_STAGE_LAYERS = 16


def _stages(plans: list[LayerPlan], training: bool) -> list[Stage]:
    stages: list[Stage] = []
    for lp in plans:
        if lp.aliases:
            continue  # nothing runs
        batch = training and lp.batch_level_in_training
        if batch or not stages or stages[-1].batch_level or len(stages[-1].layers) == MAX_STAGE_LAYERS:
            stages.append(Stage(batch, []))
        stages[-1].layers.append(lp)
    if not stages:  # only reinterpreting layers (flatten): one stage that copies the input in
        stages.append(Stage(False, []))
    for st in stages:
        offs = [(t.offset, t.offset + t.size) for lp in st.layers for t in lp.params.values()]
        if offs:
            st.param_lo, st.param_hi = min(o[0] for o in offs), max(o[1] for o in offs)
    return stages


def shape_str(shape) -> str:
    return fmt_shape(tuple(shape))
