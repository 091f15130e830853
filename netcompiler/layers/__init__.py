"""The layer registry: every layer kind the compiler knows, by its spec name."""
from __future__ import annotations

from .activations import GELU, LeakyReLU, ReLU, Sigmoid, Tanh
from .base import COMMON_OPTIONS, INPUT, Layer, LayerKind, Option, Shape, did_you_mean, fmt_shape
from .batchnorm import BatchNorm2d
from .conv2d import Conv2d
from .dropout import Dropout
from .flatten import Flatten
from .linear import Linear
from .merge import Add, Concat
from .pool import AvgPool2d, MaxPool2d

REGISTRY: dict[str, LayerKind] = {
    k.kind: k
    for k in (Conv2d(), MaxPool2d(), AvgPool2d(), Linear(), Flatten(), ReLU(), LeakyReLU(), GELU(),
              Tanh(), Sigmoid(), BatchNorm2d(), Dropout(), Add(), Concat())
}

__all__ = ["REGISTRY", "COMMON_OPTIONS", "INPUT", "Layer", "LayerKind", "Option", "Shape", "did_you_mean", "fmt_shape"]
