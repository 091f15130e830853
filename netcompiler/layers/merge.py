"""add and concat: the layers that read two or more tensors (residual sums, channel concat).

Their forward and backward work on `L.ins`, the plan's list of input edges (plan.py,
`Edge`): where each input lives, where its gradient goes, and whether the gradient is
stored or added (another reader of that tensor wrote it first).  A concat part the plan
placed inside the concat's output (a view, `Edge.view`) costs nothing: its producer wrote
it there, and the concat's readers' gradients are its gradient.
"""
from __future__ import annotations

from .base import Layer, LayerKind, Shape, fmt_shape


class Add(LayerKind):
    kind = "add"
    prefix = "add"
    doc = "element-wise sum of two or more tensors of one shape (a residual connection)"
    template = "add.c.j2"
    min_inputs = 2
    max_inputs = 64

    def infer_inputs(self, layer: Layer, in_shapes: list[Shape], error) -> Shape | None:
        first = in_shapes[0]
        for name, shape in zip(layer.inputs[1:], in_shapes[1:]):
            if shape != first:
                error(f"{layer.where()}: cannot add '{name}' ({fmt_shape(shape)}) to '{layer.inputs[0]}' "
                      f"({fmt_shape(first)}): the shapes differ", "inputs")
                return None
        return first

    def flops(self, layer: Layer) -> tuple[int, int]:
        return ((len(layer.inputs) - 1) * layer.out_size, 0)  # backward passes the gradient on

    def accumulates_din(self, layer: Layer) -> bool:
        return True

    def applies_relu(self, layer: Layer) -> bool:
        return True

    def masks_relu_dout(self, layer: Layer) -> bool:
        return True

    def render_context(self, layer: Layer) -> dict:
        return dict(N=layer.out_size, SUM=" + ".join(f"in{i}[i]" for i in range(len(layer.inputs))))

    def torch_expression(self, inputs: list[str]) -> str:
        return " + ".join(inputs)  # as torchvision writes `out + identity`

    def torch_module(self, layer: Layer):
        import torch.nn as nn

        class Add(nn.Module):
            def forward(self, *xs):
                out = xs[0]
                for x in xs[1:]:
                    out = out + x
                return out

        return Add()


class Concat(LayerKind):
    kind = "concat"
    prefix = "concat"
    doc = "join tensors along channels (3-D) or features (1-D), as torch.cat(dim=1)"
    aliases = ("concatenate", "cat")  # Keras, torch
    template = "concat.c.j2"
    min_inputs = 2
    max_inputs = 64

    def infer_inputs(self, layer: Layer, in_shapes: list[Shape], error) -> Shape | None:
        first = in_shapes[0]
        for name, shape in zip(layer.inputs[1:], in_shapes[1:]):
            if len(shape) != len(first) or shape[1:] != first[1:]:
                what = "sizes" if len(shape) == len(first) else "ranks"
                error(f"{layer.where()}: cannot concatenate '{name}' ({fmt_shape(shape)}) with "
                      f"'{layer.inputs[0]}' ({fmt_shape(first)}): "
                      + ("the spatial sizes must agree" if what == "sizes" else
                         "both must be 3-D (channels) or both 1-D (features)"), "inputs")
                return None
        return (sum(s[0] for s in in_shapes), *first[1:])

    def accumulates_din(self, layer: Layer) -> bool:
        return True

    def concat_parts(self, layer: Layer) -> bool:
        return True

    def render_context(self, layer: Layer) -> dict:
        return dict(N=layer.out_size)

    def torch_expression(self, inputs: list[str]) -> str:
        return f"torch.cat([{', '.join(inputs)}], 1)"

    def torch_module(self, layer: Layer):
        import torch
        import torch.nn as nn

        class Concat(nn.Module):
            def forward(self, *xs):
                return torch.cat(xs, dim=1)

        return Concat()
