"""flatten: (C, H, W) -> (C*H*W,), as torch.nn.Flatten on a batch."""
from __future__ import annotations

import math

from .base import Layer, LayerKind, Shape


class Flatten(LayerKind):
    kind = "flatten"
    prefix = "flatten"
    doc = "reshape a (C, H, W) sample to C*H*W features (no copy)"
    template = "flatten.c.j2"

    def infer(self, layer: Layer, in_shape: Shape, error) -> Shape | None:
        return (math.prod(in_shape),)

    def aliases_input(self, layer: Layer) -> bool:
        return True

    def torch_module(self, layer: Layer):
        import torch.nn as nn

        return nn.Flatten()
