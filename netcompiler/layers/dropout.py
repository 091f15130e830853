"""dropout: zero each element with probability p in training, scale the rest by 1/(1-p).

The mask comes from a counter-based generator seeded per call, so a run is reproducible
whatever the thread count; forward saves it for backward."""
from __future__ import annotations

from .base import Layer, LayerKind, Option


class Dropout(LayerKind):
    kind = "dropout"
    prefix = "dropout"
    doc = "inverted dropout (training only), as torch.nn.Dropout"
    template = "dropout.c.j2"
    options = (Option("p", "float", 0.5, "probability of zeroing an element", minimum=0, maximum=1),)

    def infer(self, layer, in_shape, error):
        if layer.opts["p"] >= 1:
            error(f"{layer.where()}: p must be below 1 (p=1 zeroes everything)", "p")
            return None
        return in_shape

    def flops(self, layer: Layer) -> tuple[int, int]:
        return (0, layer.out_size)  # evaluation forward is the identity

    def train_forward_extra_flops(self, layer: Layer) -> int:
        return layer.out_size

    def saved_slots(self, layer: Layer) -> dict:
        return {"mask": ("real_t", layer.out_size)}

    def render_context(self, layer: Layer) -> dict:
        p = layer.opts["p"]
        return dict(N=layer.out_size, p=repr(p), scale=repr(1.0 / (1.0 - p)),
                    # keep an element when its 24-bit uniform draw is >= p * 2^24
                    threshold=int(round(p * (1 << 24))))

    def torch_module(self, layer: Layer):
        import torch.nn as nn

        return nn.Dropout(layer.opts["p"])
