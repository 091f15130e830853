"""The PyTorch twin of a checked network, for `netc verify` and the tests.

torch is optional: importing this module without torch raises ImportError.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .check import Network

TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


class GraphModule(nn.Module):
    """Runs the network's layers in order on named tensors; each layer's module sits at its
    dotted name (layer1.0.conv1), so state_dict names are the spec's."""

    def __init__(self, net: Network):
        super().__init__()
        self._steps = [(l.name, list(l.inputs)) for l in net.layers]
        for layer in net.layers:
            *path, leaf = layer.name.split(".")
            parent = self
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            parent.add_module(leaf, layer.kind.torch_module(layer))

    def forward(self, x):
        env = {"input": x}
        for name, inputs in self._steps:
            env[name] = self.get_submodule(name)(*[env[t] for t in inputs])
        return env[self._steps[-1][0]]


def torch_model(net: Network, state: dict[str, np.ndarray] | None = None, dtype=torch.float64) -> nn.Module:
    """An nn.Module running the graph, with modules named like our layers, so state_dict
    names match (nested modules for dotted names, as PyTorch's own)."""
    model = GraphModule(net)
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
