"""linear: y = x W^T + b, as torch.nn.Linear."""
from __future__ import annotations

import math

from ..target import current
from .base import Layer, Option, Shape, WeightLayer, fmt_shape


# outputs x samples per register tile of the forward, with 32 vector registers and with 16
FORWARD_TILE = {True: (6, 4), False: (4, 3)}


class Linear(WeightLayer):
    kind = "linear"
    prefix = "fc"
    doc = "fully connected layer, as torch.nn.Linear"
    template = "linear.c.j2"
    aliases = ("dense", "fc", "fully_connected")
    sample_range = True
    options = (
        Option("out_features", "int", doc="number of outputs"),
        Option("bias", "bool", True, "add a learnable bias"),
        Option("in_features", "int", None, "optional: checked against the input, never required"),
    )

    def infer(self, layer: Layer, in_shape: Shape, error) -> Shape | None:
        if len(in_shape) != 1:
            error(f"{layer.where()}: input is {fmt_shape(in_shape)} ({len(in_shape)}-D); a linear layer needs a "
                  f"1-D input: add '- flatten' before it (it would give {math.prod(in_shape)} features)", None)
            return None
        fin = layer.opts["in_features"]
        if fin is not None and fin != in_shape[0]:
            error(f"{layer.where()}: in_features is {fin} but the input has {in_shape[0]} features", "in_features")
            return None
        return (layer.opts["out_features"],)

    def param_shapes(self, layer: Layer) -> dict[str, Shape]:
        shapes = {"weight": (layer.opts["out_features"], layer.in_shape[0])}
        if layer.opts["bias"]:
            shapes["bias"] = (layer.opts["out_features"],)
        return shapes

    def macs(self, layer: Layer) -> int:
        return layer.in_shape[0] * layer.opts["out_features"]

    def render_context(self, layer: Layer) -> dict:
        tg = current()
        vec = tg.vec
        wide = tg.regs >= 32
        fin, fout = layer.in_shape[0], layer.out_shape[0]
        ob = max(d for d in range(1, 5) if fout % d == 0)  # outputs per block, dividing OUT
        in_v = fin - fin % vec  # inputs in whole vectors; the IN_TAIL rest one by one
        # vectors per block, dividing IN_V: OB x NVI accumulators of the weight gradient, SB x NVI
        # of the input gradient
        nvi = max(d for d in range(1, 6 if wide else 3) if (in_v // vec) % d == 0)
        nvo = max(d for d in range(1, 5) if -(-fout // vec) % d == 0)  # vectors of outputs, in blocks of up to 4
        # forward tiles: FR outputs x FQ samples, a vector accumulator each (24 of AVX-512's 32
        # registers, 12 of 16), the FQ input vectors beside them; the last OUT_REST outputs and the
        # last samples (tiles of FQ_TAIL) in smaller tiles
        fr, fq = FORWARD_TILE[wide]
        return dict(FR=fr, FQ=fq, FQ_TAIL=[q for q in (2, 1) if q < fq], OUT_FULL=fout - fout % fr, OUT_REST=fout % fr,
                    IN=fin, OUT=fout, bias=layer.opts["bias"], OB=ob, IN_V=in_v, IN_TAIL=fin % vec,
                    NVI=nvi, VEC=vec,
                    SB=4 if nvo > 2 or not wide else 8)  # SB: samples per register tile of the input gradient

    def applies_relu(self, layer: Layer) -> bool:
        return True

    def masks_relu_grad(self, layer: Layer) -> bool:
        return True

    def torch_module(self, layer: Layer):
        import torch.nn as nn

        return nn.Linear(layer.in_shape[0], layer.opts["out_features"], bias=layer.opts["bias"])

