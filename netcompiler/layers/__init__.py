"""The layer registry: every layer kind the compiler knows, by its spec name."""
from __future__ import annotations

from .activations import Activation, GELU, Hardswish, LeakyReLU, ReLU, ReLU6, Sigmoid, SiLU, Tanh
from .adaptive_pool import AdaptiveAvgPool2d, GlobalAvgPool2d
from .base import COMMON_OPTIONS, INPUT, Layer, LayerKind, Option, Shape, did_you_mean, fmt_shape
from .batchnorm import BatchNorm1d, BatchNorm2d
from .conv2d import Conv2d
from .dropout import Dropout
from .flatten import Flatten
from .linear import Linear
from .merge import Add, Concat
from .pool import AvgPool2d, MaxPool2d
from .upsample import Upsample

REGISTRY: dict[str, LayerKind] = {
    k.kind: k
    for k in (Conv2d(), MaxPool2d(), AvgPool2d(), AdaptiveAvgPool2d(), GlobalAvgPool2d(), Linear(), Flatten(),
              ReLU(), LeakyReLU(), GELU(), Tanh(), Sigmoid(), ReLU6(), Hardswish(), SiLU(), BatchNorm2d(),
              BatchNorm1d(), Dropout(), Upsample(), Add(), Concat())
}

_SOFTMAX = "not needed: cross_entropy applies log-softmax to the logits; forward returns logits"
_ACTIVATIONS = "not supported; the activations are " + ", ".join(
    k for k, v in REGISTRY.items() if isinstance(v, Activation))
# Kinds people bring from Keras and PyTorch that have no counterpart here, and why (keys are
# matched case-insensitively, ignoring '_'); a close spelling of a supported kind must not
# be offered for them as if they were a typo (conv1d is not a misspelt conv2d).
UNSUPPORTED: dict[str, str] = {
    **dict.fromkeys(("softmax", "log_softmax", "softmax2d"), _SOFTMAX),
    "conv1d": "not supported: only 2-D convolution (conv2d); 1-D data fits it as input [channels, 1, width] "
              "with kernel_size [1, k]",
    **dict.fromkeys(("conv3d", "conv_transpose2d", "conv2d_transpose", "deconv2d"), "not supported: only conv2d"),
    **dict.fromkeys(("separable_conv2d", "depthwise_conv2d"),
                    "not supported as a kind: conv2d with groups equal to in_channels is a depthwise convolution"),
    **dict.fromkeys(("maxpool1d", "maxpool3d", "avgpool1d", "avgpool3d", "max_pooling1d", "max_pooling3d",
                     "average_pooling1d", "average_pooling3d"),
                    "not supported: only 2-D pooling (maxpool2d, avgpool2d)"),
    **dict.fromkeys(("adaptive_maxpool2d", "global_max_pooling2d", "global_maxpool2d"),
                    "not supported: use maxpool2d with kernel_size equal to the input's height and width (average "
                    "pooling: adaptive_avgpool2d, global_avgpool2d)"),
    **dict.fromkeys(("batchnorm3d", "layernorm", "layer_normalization", "groupnorm",
                     "instancenorm2d"), "not supported: only batchnorm2d and batchnorm1d"),
    **dict.fromkeys(("lstm", "gru", "rnn", "simple_rnn", "embedding", "attention", "multihead_attention",
                     "transformer"), "not supported: recurrent, embedding and attention layers are not available"),
    **dict.fromkeys(("multiply", "residual", "skip", "shortcut"),
                    "not supported as a kind: a layer reads earlier tensors by name (inputs: [a, b]); add sums "
                    "them, concat joins them"),
    **dict.fromkeys(("elu", "selu", "softplus", "mish", "hardtanh", "prelu", "softsign"), _ACTIVATIONS),
    **dict.fromkeys(("reshape", "view", "unflatten"), "not supported: flatten is the only reshape"),
}


def _fold(name: str) -> str:
    return name.lower().replace("_", "")


_ALIASES = {_fold(a): k.kind for k in REGISTRY.values() for a in (k.kind, *k.aliases)}
_UNSUPPORTED = {_fold(k): v for k, v in UNSUPPORTED.items()}


def unknown_kind(name: str) -> str:
    """The message for a layer kind not in REGISTRY: the kind it stands for (a Keras or
    PyTorch name, another case, a typo), why it has none, or the list of kinds."""
    listing = "; kinds are " + ", ".join(REGISTRY)
    ours = _ALIASES.get(_fold(name))
    if ours is not None:
        return f"unknown layer kind '{name}' (did you mean '{ours}'?)"
    why = _UNSUPPORTED.get(_fold(name))
    if why is not None:
        return f"layer kind '{name}' is {why}" if why.startswith("not supported") else \
            f"unknown layer kind '{name}': {why}"
    hint = did_you_mean(name, list(REGISTRY))
    return f"unknown layer kind '{name}'{hint}" if hint else f"unknown layer kind '{name}'{listing}"


__all__ = ["REGISTRY", "UNSUPPORTED", "unknown_kind", "COMMON_OPTIONS", "INPUT", "Layer", "LayerKind", "Option", "Shape",
           "did_you_mean", "fmt_shape"]
