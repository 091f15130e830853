"""The PyTorch twin of a checked network, for `netc verify` and the tests, and its Python
source for `netc export --format torch` (`torch_source`).

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

    def source_args(self) -> dict:
        return {"pads": ((self.pad_top, self.pad_bottom), (self.pad_left, self.pad_right))}


class PaddedMaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d after padding with -inf on each side ((top, bottom), (left, right))."""

    def __init__(self, *args, pads, **kw):
        super().__init__(*args, padding=0, **kw)
        self.pads = pads

    def forward(self, x):
        (t, b), (l, r) = self.pads
        return super().forward(F.pad(x, (l, r, t, b), value=-math.inf))

    def source_args(self) -> dict:
        return {"pads": self.pads}


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

    def source_args(self) -> dict:
        return {"pads": self.pads, "count_include_pad": self.include}


# the modules above, written into `torch_source` where a layer needs one (padding that
# differs between the sides)
PADDED = (PaddedConv2d, PaddedMaxPool2d, PaddedAvgPool2d)

TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


def _containers(layers) -> dict[str, list[str]]:
    """The dotted prefixes of the layers' names (the containers), each with its children in order."""
    children: dict[str, list[str]] = {}
    for l in layers:
        parts = l.name.split(".")
        for i in range(len(parts)):
            parent, child = ".".join(parts[:i]), parts[i]
            if child not in children.setdefault(parent, []):
                children[parent].append(child)
    return children


def check_module_names(layers, children: dict[str, list[str]] | None = None) -> None:
    """Refuse (NetcError) a layer name with a part named like an nn.Module attribute (train,
    forward): no submodule can have it."""
    from .errors import NetcError

    reserved = set(dir(nn.Module))
    for p, cs in (_containers(layers) if children is None else children).items():
        for c in cs:
            if c in reserved:
                full = f"{p}.{c}" if p else c
                raise NetcError(f"layer name '{full}': '{c}' is an attribute of torch's nn.Module (a method or "
                                f"field), which no submodule can be named; rename the layer")


class GraphModule(nn.Module):
    """Runs the network's layers in order on named tensors; each layer's module sits at its
    dotted name (layer1.0.conv1), so state_dict names are the spec's."""

    def __init__(self, net: Network):
        super().__init__()
        check_module_names(net.layers)
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


def _ctor_source(module: nn.Module) -> str:
    """`nn.Conv2d(1, 6, kernel_size=(5, 5), ...)` for a torch.nn module: every argument of its
    constructor that the module keeps under the same name (bias as true/false)."""
    import inspect

    cls = type(module)
    padded = cls in PADDED
    base = cls.__bases__[0] if padded else cls
    if getattr(nn, base.__name__, None) is not base:
        raise TypeError(f"{cls.__name__} is not a torch.nn module; no source for it")
    args = []
    for p in list(inspect.signature(base.__init__).parameters.values())[1:]:
        if p.name in ("device", "dtype") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if padded and p.name in ("padding", *module.source_args()):
            continue
        if not hasattr(module, p.name):
            continue
        v = getattr(module, p.name)
        if p.name == "bias":
            v = v is not None
        if p.default is not inspect.Parameter.empty and v == p.default:
            continue
        args.append(f"{p.name}={v!r}")
    if padded:
        args += [f"{k}={v!r}" for k, v in module.source_args().items()]
        return f"{cls.__name__}({', '.join(args)})"
    return f"nn.{cls.__name__}({', '.join(args)})"


# names the written forward uses itself (a layer's local variable takes a '_' after them)
_SOURCE_NAMES = {"x", "self", "torch", "nn", "F", "np", "math", "OrderedDict"}


def _class_name(net: Network) -> str:
    return "".join(p.capitalize() for p in net.name.split("_")) or "Net"


def _header(net: Network, cls: str) -> str:
    shape = ", ".join(map(str, net.input_shape))
    return (f'"""{net.name}: {"x".join(map(str, net.input_shape))} -> {"x".join(map(str, net.output_shape))}, '
            f'{net.total_params:,} parameters; written by netc export --format torch.\n\n'
            f'    model = {cls}()\n'
            f'    load_netc_weights(model, "weights.npz")     # the file netc train writes\n'
            f'    model.eval()\n'
            f'    logits = model(x)                           # x: [batch, {shape}]\n'
            f'"""\n')


LOAD_SOURCE = '''

def load_netc_weights(model: nn.Module, path) -> dict:
    """Load parameters and buffers by name (strict: none missing, none extra); returns the
    metadata netc train stored (input normalisation 'mean' and 'std': apply
    (x - mean) / std to inputs scaled to [0, 1] before calling the model)."""
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    state = {k: torch.from_numpy(v) for k, v in arrays.items() if not k.startswith("__")}
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    extra = [k for k in state if k not in own]
    if missing or extra:
        raise ValueError(f"{path}: missing {missing}, unexpected {extra}")
    model.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in state.items()}})
    return {k[len("__meta__/"):]: v for k, v in arrays.items() if k.startswith("__meta__/")}
'''


def _helpers(modules) -> tuple[str, str, str]:
    """(source of the Padded* classes used, the imports they need, the F import)."""
    import inspect

    used = [c for c in PADDED if any(type(m) is c for m in modules)]
    helpers = "".join("\n\n" + inspect.getsource(c) for c in used)
    return helpers, ("import math\n" if used else ""), ("import torch.nn.functional as F\n" if used else "")


def torch_source(net: Network) -> str:
    """Python source of an nn.Module for `net`, with modules named like the layers so that
    state_dict names match, and `load_netc_weights` for a weights file written by netc train:
    an nn.Sequential for a chain with plain names; for a graph or nested names (blocks), a
    module whose forward follows the graph (each tensor a local variable, add and concat as
    expressions) and whose submodules nest as the names do (layer1.0.conv1 is
    self.layer1[0].conv1), as torchvision's models are built."""
    from .report import is_graph

    if is_graph(net.layers) or any("." in l.name for l in net.layers):
        return _graph_source(net)
    model = torch_model(net)
    cls = _class_name(net)
    body = "\n".join(f"            ({name!r}, {_ctor_source(m)}),  # {layer.where()}"
                     for (name, m), layer in zip(model.named_children(), net.layers))
    helpers, imports, f_import = _helpers(model.children())
    return _header(net, cls) + f"""{imports}from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn
{f_import}

class {cls}(nn.Sequential):
    def __init__(self):
        super().__init__(OrderedDict([
{body}
        ]))
{helpers}
""" + LOAD_SOURCE


def _graph_source(net: Network) -> str:
    import keyword

    from .errors import NetcError

    from .layers import INPUT, fmt_shape

    module_layers = [l for l in net.layers if l.kind.torch_expression([]) is None]
    children = _containers(module_layers)
    leaves = {l.name for l in module_layers}
    for l in module_layers:
        if l.name in children:
            raise NetcError(f"{l.where()}: its name is also the start of other layers' names "
                            f"({l.name}.{children[l.name][0]}); a written module cannot be both")
    check_module_names(module_layers, children)
    # a container whose children are 0, 1, ... in order is an nn.Sequential, indexable as
    # torchvision's layer1[0] and downsample[1]; any other is an nn.Module
    sequential = {p for p, cs in children.items() if p and cs == [str(i) for i in range(len(cs))]}
    # of plain modules when each child is one (no layer, no Sequential): made whole
    whole = {p for p in sequential if not any(f"{p}.{c}" in leaves | sequential for c in children[p])}

    def access(path: str) -> str:
        expr, parent = "self", ""
        for part in path.split("."):
            if parent in sequential:
                expr = f"{expr}[{part}]"
            elif part.isidentifier() and not keyword.iskeyword(part):
                expr = f"{expr}.{part}"
            else:
                expr = f"getattr({expr}, {part!r})"
            parent = f"{parent}.{part}" if parent else part
        return expr

    def assign(path: str, value: str) -> str:
        parent, _, part = path.rpartition(".")
        target = access(parent) if parent else "self"
        if parent in sequential:
            return f"{target}.append({value})"
        if part.isidentifier() and not keyword.iskeyword(part):
            return f"{target}.{part} = {value}"
        return f"{target}.add_module({part!r}, {value})"

    model = torch_model(net)
    init: list[str] = []
    made: set[str] = set()
    for l in module_layers:
        parts = l.name.split(".")
        for i in range(1, len(parts)):
            path = ".".join(parts[:i])
            parent = ".".join(parts[:i - 1])
            if path in made or parent in whole:  # made, or made with its parent
                made.add(path)
                continue
            made.add(path)
            n = len(children[path])
            value = (f"nn.Sequential(*(nn.Module() for _ in range({n})))" if path in whole else
                     "nn.Sequential()" if path in sequential else "nn.Module()")
            init.append(f"        {assign(path, value)}" + (f"  # {path}" if parent in sequential else ""))
        init.append(f"        {assign(l.name, _ctor_source(model.get_submodule(l.name)))}  # {l.where()}")

    local = {INPUT: "x"}
    used = set(_SOURCE_NAMES)
    for l in net.layers:
        name = l.name.replace(".", "_")
        while name in used or keyword.iskeyword(name):
            name += "_"
        used.add(name)
        local[l.output] = name
    forward = []
    for l in net.layers:
        ins = [local[t] for t in l.inputs]
        expr = l.kind.torch_expression(ins) or f"{access(l.name)}({', '.join(ins)})"
        forward.append(f"        {local[l.output]} = {expr}  # {fmt_shape(l.out_shape)}")
    forward.append(f"        return {local[net.layers[-1].output]}")
    cls = _class_name(net)
    helpers, imports, f_import = _helpers(model.modules())
    init_text, forward_text = "\n".join(init), "\n".join(forward)
    return _header(net, cls) + f"""{imports}import numpy as np
import torch
import torch.nn as nn
{f_import}

class {cls}(nn.Module):
    def __init__(self):
        super().__init__()
{init_text}

    def forward(self, x):  # x: [batch, {", ".join(map(str, net.input_shape))}]
{forward_text}
{helpers}
""" + LOAD_SOURCE
