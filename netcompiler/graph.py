"""The network as a graph: named tensors between the checked layers (the nodes).

A layer (`layers.Layer`: name, kind, opts, inputs, output, node = where) reads the tensors
named in `inputs` and writes the tensor named after itself; the network input is the
tensor `INPUT`.  The list order of the layers is a valid execution order (a layer reads
only earlier tensors) and stays the schedule: forward runs it, backward runs it reversed.
The plan (plan.py) gives every tensor its storage: a buffer of its own, or a view into
another tensor's (flatten and a fused ReLU alias their input; a concat part lives inside
the concat's output).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .layers import INPUT, Layer, Shape


@dataclass
class Tensor:
    name: str  # the producing layer's name, or INPUT
    shape: Shape
    producer: Layer | None  # None for the network input
    consumers: list[Layer] = field(default_factory=list)  # in execution order; a layer reading twice is twice
    storage: str = ""  # the tensor whose buffer holds it (itself when it has its own); set by the plan
    offset: int = 0  # elements from the start of that buffer


def tensors(layers: list[Layer], input_shape: Shape) -> dict[str, Tensor]:
    """Every tensor of the graph by name, in execution order (the input first)."""
    out = {INPUT: Tensor(INPUT, tuple(input_shape), None)}
    for layer in layers:
        for name in layer.inputs:
            out[name].consumers.append(layer)
        out[layer.output] = Tensor(layer.output, layer.out_shape, layer)
    return out


def needs_grad(layers: list[Layer]) -> set[str]:
    """Names of the tensors whose gradient backward computes: those with a trainable
    parameter upstream (the network input and what is computed from it alone need none)."""
    need: set[str] = set()
    for layer in layers:
        if layer.params or any(t in need for t in layer.inputs):
            need.add(layer.output)
    return need


def mark_input_grads(layers: list[Layer]) -> None:
    """Set each layer's `grad_input`: whether its backward computes its first input's gradient."""
    need = needs_grad(layers)
    for layer in layers:
        layer.grad_input = bool(layer.inputs) and layer.inputs[0] in need


def consumers(layers: list[Layer]) -> dict[str, list[Layer]]:
    """Tensor name -> the layers reading it, in execution order."""
    out: dict[str, list[Layer]] = {INPUT: []}
    for layer in layers:
        out.setdefault(layer.output, [])
        for name in layer.inputs:
            out.setdefault(name, []).append(layer)
    return out
