"""The layer registry: every layer kind the compiler knows, by its spec name."""
from __future__ import annotations

from .activations import GELU, Hardswish, LeakyReLU, ReLU, ReLU6, Sigmoid, SiLU, Tanh
from .adaptive_pool import AdaptiveAvgPool2d, GlobalAvgPool2d
from .base import COMMON_OPTIONS, Layer, LayerKind, Option, Shape, did_you_mean, fmt_shape
from .batchnorm import BatchNorm1d, BatchNorm2d
from .conv2d import Conv2d
from .dropout import Dropout
from .flatten import Flatten
from .linear import Linear
from .pool import AvgPool2d, MaxPool2d
from .upsample import Upsample

REGISTRY: dict[str, LayerKind] = {
    k.kind: k
    for k in (Conv2d(), MaxPool2d(), AvgPool2d(), AdaptiveAvgPool2d(), GlobalAvgPool2d(), Linear(), Flatten(), ReLU(), LeakyReLU(), GELU(),
              Tanh(), Sigmoid(), ReLU6(), Hardswish(), SiLU(), BatchNorm2d(), BatchNorm1d(), Dropout(), Upsample())
}

__all__ = ["REGISTRY", "COMMON_OPTIONS", "Layer", "LayerKind", "Option", "Shape", "did_you_mean", "fmt_shape"]
