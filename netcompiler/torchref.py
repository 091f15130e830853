"""The PyTorch twin of a checked network, for `netc verify` and the tests.

torch is optional: importing this module without torch raises ImportError.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .check import Network

class PaddedConv2d(nn.Conv2d):
    """nn.Conv2d after F.pad: explicit padding ((top, bottom), (left, right)), which PyTorch's
    own padding (the same on both sides) cannot express (TensorFlow's 'SAME' with stride 2)."""

    def __init__(self, *args, pads, **kw):
        super().__init__(*args, padding=0, **kw)
        (self.pad_top, self.pad_bottom), (self.pad_left, self.pad_right) = pads

    def forward(self, x):
        return super().forward(F.pad(x, (self.pad_left, self.pad_right, self.pad_top, self.pad_bottom)))


class PaddedMaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d after padding with -inf on each side ((top, bottom), (left, right))."""

    def __init__(self, *args, pads, **kw):
        super().__init__(*args, padding=0, **kw)
        self.pads = pads

    def forward(self, x):
        (t, b), (l, r) = self.pads
        return super().forward(F.pad(x, (l, r, t, b), value=-math.inf))


class PaddedAvgPool2d(nn.AvgPool2d):
    """nn.AvgPool2d after zero padding on each side ((top, bottom), (left, right)).

    count_include_pad=True divides by the whole window (padding zeros included);
    count_include_pad=False by the input elements in the window only, as TensorFlow's 'SAME'
    average pooling (the mean of the padded input over the mean of a padded mask of ones)."""

    def __init__(self, *args, pads, count_include_pad=True, **kw):
        super().__init__(*args, padding=0, **kw)
        self.pads, self.include = pads, count_include_pad

    def forward(self, x):
        (t, b), (l, r) = self.pads
        mean = super().forward(F.pad(x, (l, r, t, b)))
        if self.include:
            return mean
        return mean / super().forward(F.pad(torch.ones_like(x[:1, :1]), (l, r, t, b)))


TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


def torch_model(net: Network, state: dict[str, np.ndarray] | None = None, dtype=torch.float64) -> nn.Sequential:
    """nn.Sequential with modules named like our layers, so state_dict names match."""
    model = nn.Sequential()
    for layer in net.layers:
        model.add_module(layer.name, layer.kind.torch_module(layer))
    model = model.to(dtype)
    if state is not None:
        sd = model.state_dict()
        for k, v in state.items():
            sd[k] = torch.as_tensor(np.asarray(v), dtype=sd[k].dtype)
        model.load_state_dict(sd)
    return model


def torch_loss(net: Network, out: torch.Tensor, y) -> torch.Tensor:
    if net.loss == "cross_entropy":
        return F.cross_entropy(out, torch.as_tensor(np.asarray(y), dtype=torch.long))
    if net.loss == "binary_cross_entropy":
        return F.binary_cross_entropy_with_logits(out, torch.as_tensor(np.asarray(y), dtype=out.dtype))
    return F.mse_loss(out, torch.as_tensor(np.asarray(y), dtype=out.dtype))


def torch_loss_and_grad(net: Network, state, x, y, dtype=torch.float64, train: bool = True):
    """Loss and parameter gradients of the torch twin (train mode by default)."""
    model = torch_model(net, state, dtype)
    model.train(train)
    out = model(torch.as_tensor(np.asarray(x), dtype=dtype))
    loss = torch_loss(net, out, y)
    loss.backward()
    grads = {k: p.grad.detach().numpy().copy() for k, p in model.named_parameters()}
    return float(loss), grads, out.detach().numpy(), model
