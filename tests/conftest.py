"""Shared helpers of the code-generation tests.

- `build(spec_text, dtype, threads)`: check + compile once per (spec, dtype) and return
  the loaded `Net`, reset to a known state (init(0), seed(0), no gradients, fresh
  optimizer).  Builds go through the default cache (~/.cache/netcompiler), so reruns
  reuse them; `prebuild` compiles many specs concurrently (gcc runs in parallel).
- `reference_model(net)`: an *independent* PyTorch model built from the spec's raw YAML
  options (not from the layer kinds' own `torch_module`), so a wrong option mapping in
  the compiler cannot hide behind the same mistake in the reference.
- `assert_close`: compares arrays with a tolerance relative to the reference's scale and
  reports the max difference (llm.c's "maxdiff").
"""
from __future__ import annotations

import concurrent.futures
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

import netcompiler as nc
from netcompiler.check import check_text
from netcompiler.verify import random_batch  # noqa: F401 (used by the test modules)

ROOT = Path(__file__).resolve().parents[1]

# The generated C's vector width follows the build target (netcompiler/target.py: 16 reals with
# AVX-512, 8 with AVX2).  The tests expect the tiles of one width whatever the machine, 16 unless
# NETC_VEC says otherwise (the netc processes they start inherit it); test_vector_widths.py builds
# the other widths explicitly.
os.environ.setdefault("NETC_VEC", "16")

# A spec whose C takes long to compile: hundreds of layers or large maps (densenet_cifar,
# mobilenetv2_cifar, squeezenet1_1). Tests that compile every spec several times (both
# compilers, both dtypes, export targets) run it only with -m slow; the default run still
# builds each once (test_onnx_export: netc's forward against ONNX Runtime).
HEAVY_LAYERS = 100
HEAVY_MACS = 50_000_000


def heavy_spec(path: Path) -> bool:
    from netcompiler.check import load
    from netcompiler.report import build_report

    network = load(path)
    return len(network.layers) > HEAVY_LAYERS or build_report(network)["total_macs"] > HEAVY_MACS


def spec_params(paths, value=lambda p: p) -> list:
    """pytest params of spec files, id'd by stem; heavy specs marked slow."""
    return [pytest.param(value(p), id=p.stem, marks=[pytest.mark.slow] if heavy_spec(p) else []) for p in paths]


_BUILT: dict[tuple, Any] = {}


def spec(input_shape, layers, loss: str = "cross_entropy", name: str | None = None) -> str:
    """Spec text from a list of YAML layer entries ("relu", "conv2d: {...}")."""
    body = "".join(f"  - {l}\n" for l in layers)
    head = f"name: {name}\n" if name else ""
    return f"{head}input: {list(input_shape)}\nlayers:\n{body}loss: {loss}\n"


def compile_spec(spec_text: str, dtype: str = "float64", file: str = "case.yaml", kernels: dict | None = None,
                 vec: int | None = None):
    """The compiled net of `spec_text` (cached), its layers' kernel paths forced as `kernels` says,
    with vectors of `vec` reals (None: NETC_VEC's)."""
    key = (spec_text, dtype, file, tuple(sorted((kernels or {}).items())), vec)
    net = _BUILT.get(key)
    if net is None:
        net = _BUILT[key] = nc.compile(check_text(spec_text, file), dtype=dtype, threads=1, kernels=kernels,
                                       vec=vec)
    return net


def reset(net, threads: int = 1, seed: int = 0):
    net.threads = threads
    net.team = None  # one thread per chunk
    # every batch runs on all the threads, however small (by default a batch of fewer samples
    # than plan.parallel_min_* runs on one): the tests with 2 threads check the team code
    net._ctx.parallel_min_eval = net._ctx.parallel_min_train = 1
    net.init(seed)  # parameters, buffers, gradients, optimizer moments
    net.seed(0)
    net.set_optimizer("sgd", lr=0.01, momentum=0.0, weight_decay=0.0)
    return net


def build(spec_text: str, dtype: str = "float64", threads: int = 1, file: str = "case.yaml",
          kernels: dict | None = None, vec: int | None = None):
    """The compiled net of `spec_text` (cached per dtype, forced kernels and vector width), reset
    to init(0)/seed(0)."""
    return reset(compile_spec(spec_text, dtype, file, kernels, vec), threads)


def prebuild(jobs) -> None:
    """Compile (spec_text, dtype[, kernels[, vec]]) jobs concurrently into the cache of `build`."""
    jobs = [(j[0], j[1], j[2] if len(j) > 2 else None, j[3] if len(j) > 3 else None) for j in jobs]

    def key(t, d, k, v):
        return t, d, "case.yaml", tuple(sorted((k or {}).items())), v

    todo = [j for j in {key(*j): j for j in jobs}.values() if key(*j) not in _BUILT]
    if not todo:
        return
    workers = max(1, min(len(todo), len(os.sched_getaffinity(0))))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for f in [pool.submit(compile_spec, text, dtype, "case.yaml", kernels, vec)
                  for text, dtype, kernels, vec in todo]:
            f.result()


# ---- comparisons ---------------------------------------------------------------------------
def check_snapshot(text: str, path: Path, label: str, test_file: str) -> None:
    """`text` must equal the snapshot at `path` (shown as a diff when not); with
    NETC_UPDATE_SNAPSHOTS=1 the snapshot is rewritten instead."""
    import difflib

    if os.environ.get("NETC_UPDATE_SNAPSHOTS") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    assert path.exists(), f"{path} is missing: run NETC_UPDATE_SNAPSHOTS=1 python -m pytest {test_file}"
    expected = path.read_text()
    if text != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True),
                                            f"snapshot/{path.name}", f"{label}/{path.name}", n=2))
        lines = diff.splitlines()
        shown = "\n".join(lines[:120]) + (f"\n... {len(lines) - 120} more diff lines" if len(lines) > 120 else "")
        pytest.fail(f"{label} {path.name} differs from {path} (NETC_UPDATE_SNAPSHOTS=1 to accept):\n{shown}")


def maxdiff(actual, expected) -> float:
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(a - e))) if a.size else 0.0


def assert_close(actual, expected, rtol: float, what: str, atol: float = 0.0) -> None:
    """max|actual - expected| <= rtol * max|expected| + atol, shapes equal."""
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape}, expected {e.shape}"
    assert np.all(np.isfinite(a)), f"{what}: non-finite values"
    scale = float(np.max(np.abs(e))) if e.size else 0.0
    d = maxdiff(a, e)
    assert d <= rtol * scale + atol, f"{what}: maxdiff {d:.3e} > {rtol:g} * {scale:.3e} + {atol:.1e}"


# ---- an independent PyTorch reference ------------------------------------------------------
def _pair(v):
    return tuple(v) if isinstance(v, list) else (v, v)


def raw_layers(spec_text: str) -> list[tuple[str, dict]]:
    """(kind, options) of every layer, straight from the YAML (no netcompiler code)."""
    out = []
    for entry in yaml.safe_load(spec_text)["layers"]:
        if isinstance(entry, str):
            out.append((entry, {}))
        else:
            (kind, opts), = entry.items()
            out.append((kind, dict(opts or {})))
    return out


def _torch():
    import torch

    return torch


def masked_dropout():
    """A module that multiplies by a given `.mask` in training and is the identity in
    evaluation: dropout with the mask the C code drew (PyTorch's generator differs)."""
    torch = _torch()

    class MaskedDropout(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mask = None

        def forward(self, x):
            if not self.training:
                return x
            assert self.mask is not None, "the training-mode reference needs the dropout mask"
            return x * self.mask

    return MaskedDropout()


def _after_pad(cls, pad: list, value: float = 0.0):
    """A subclass of the torch module `cls` that pads its input first: padding
    [top, bottom, left, right] as F.pad(x, (left, right, top, bottom), value=value)."""
    F = _torch().nn.functional
    top, bottom, left, right = pad

    class AfterPad(cls):
        def forward(self, x):
            return super().forward(F.pad(x, (left, right, top, bottom), value=value))

    return AfterPad


def _avg_excluding_pad(kernel, stride, pad: list):
    """Average pooling over zero padding [top, bottom, left, right] that divides by the input
    elements of each window only: window sums of the padded input over window sums of a
    padded mask of ones."""
    torch = _torch()
    F = torch.nn.functional
    top, bottom, left, right = pad

    class AvgExcludingPad(torch.nn.Module):
        def forward(self, x):
            sums = F.avg_pool2d(F.pad(x, (left, right, top, bottom)), kernel, stride, divisor_override=1)
            ones = F.pad(torch.ones_like(x), (left, right, top, bottom))
            return sums / F.avg_pool2d(ones, kernel, stride, divisor_override=1)

    return AvgExcludingPad()


def _module(kind: str, o: dict, in_shape: tuple[int, ...]):
    nn = _torch().nn
    pad4 = o.get("padding") if isinstance(o.get("padding"), list) and len(o["padding"]) == 4 else None
    if kind == "conv2d":
        pad = o.get("padding", 0)
        pad = pad if isinstance(pad, str) else _pair(pad)
        cls = _after_pad(nn.Conv2d, pad4) if pad4 else nn.Conv2d
        return cls(in_shape[0], o["out_channels"], _pair(o["kernel_size"]), stride=_pair(o.get("stride", 1)),
                   padding=0 if pad4 else pad, dilation=_pair(o.get("dilation", 1)), groups=o.get("groups", 1),
                   bias=o.get("bias", True))
    if kind == "maxpool2d":
        cls = _after_pad(nn.MaxPool2d, pad4, float("-inf")) if pad4 else nn.MaxPool2d
        return cls(_pair(o["kernel_size"]), _pair(o["stride"]) if "stride" in o else None,
                   0 if pad4 else _pair(o.get("padding", 0)), _pair(o.get("dilation", 1)),
                   ceil_mode=o.get("ceil_mode", False))
    if kind == "avgpool2d":
        stride = _pair(o["stride"]) if "stride" in o else _pair(o["kernel_size"])
        if pad4 and not o.get("count_include_pad", True):
            return _avg_excluding_pad(_pair(o["kernel_size"]), stride, pad4)
        cls = _after_pad(nn.AvgPool2d, pad4) if pad4 else nn.AvgPool2d
        return cls(_pair(o["kernel_size"]), stride, 0 if pad4 else _pair(o.get("padding", 0)),
                   ceil_mode=o.get("ceil_mode", False), count_include_pad=o.get("count_include_pad", True))
    if kind == "adaptive_avgpool2d":
        return nn.AdaptiveAvgPool2d(_pair(o["output_size"]))
    if kind == "global_avgpool2d":
        return nn.AdaptiveAvgPool2d(1)
    if kind == "linear":
        return nn.Linear(in_shape[0], o["out_features"], bias=o.get("bias", True))
    if kind == "flatten":
        return nn.Flatten()
    if kind == "relu":
        return nn.ReLU()
    if kind == "leaky_relu":
        return nn.LeakyReLU(o.get("negative_slope", 0.01))
    if kind == "gelu":
        return nn.GELU(approximate=o.get("approximate", "none"))
    if kind == "tanh":
        return nn.Tanh()
    if kind == "sigmoid":
        return nn.Sigmoid()
    if kind == "relu6":
        return nn.ReLU6()
    if kind == "hardswish":
        return nn.Hardswish()
    if kind == "silu":
        return nn.SiLU()
    if kind == "batchnorm2d":
        return nn.BatchNorm2d(in_shape[0], eps=o.get("eps", 1e-5), momentum=o.get("momentum", 0.1))
    if kind == "batchnorm1d":
        return nn.BatchNorm1d(in_shape[0], eps=o.get("eps", 1e-5), momentum=o.get("momentum", 0.1))
    if kind == "dropout":
        return masked_dropout()
    if kind == "upsample":
        return nn.Upsample(scale_factor=tuple(float(f) for f in _pair(o["scale_factor"])),
                           mode=o.get("mode", "nearest"))
    raise KeyError(f"the reference does not know layer kind '{kind}': add it to tests/conftest.py")


class _Sum:
    """add: the element-wise sum of its inputs (built here, not from netcompiler's twin)."""

    def __new__(cls):
        class Sum(_torch().nn.Module):
            def forward(self, *xs):
                return sum(xs[1:], xs[0])

        return Sum()


class _Cat:
    def __new__(cls):
        class Cat(_torch().nn.Module):
            def forward(self, *xs):
                return _torch().cat(xs, dim=1)

        return Cat()


def _graph_module(steps):
    """Runs (name, input names) in order on named tensors ('input' is the network input)."""
    torch = _torch()

    class Graph(torch.nn.Module):
        def forward(self, x):
            env = {"input": x}
            for name, inputs in steps:
                env[name] = getattr(self, name)(*[env[t] for t in inputs])
            return env[steps[-1][0]]

    return Graph()


def reference_model(net, spec_text: str, state: dict | None = None, dtype=None):
    """A PyTorch model for `spec_text` from its raw options (each layer reads the one before
    it, or the names in its `inputs`), its modules named like `net`'s layers, loaded with
    `state` (default: net.state_dict())."""
    torch = _torch()
    dtype = dtype or torch.float64
    shapes = {"input": tuple(yaml.safe_load(spec_text)["input"])}
    names = [l.name for l in net.network.layers]
    steps, modules, prev = [], {}, "input"
    for name, (kind, o) in zip(names, raw_layers(spec_text), strict=True):
        o = dict(o)
        inputs = o.pop("inputs", None) or [prev]
        if kind == "add":
            m = _Sum()
        elif kind == "concat":
            m = _Cat()
        else:
            m = _module(kind, o, shapes[inputs[0]]).to(dtype)
        with torch.no_grad():
            shapes[name] = tuple(m.eval()(*[torch.zeros((1, *shapes[t]), dtype=dtype) for t in inputs]).shape[1:])
        steps.append((name, inputs))
        modules[name] = m
        prev = name
    model = _graph_module(steps)
    for name, m in modules.items():
        model.add_module(name, m)
    model = model.to(dtype)
    state = net.state_dict() if state is None else state
    sd = model.state_dict()
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    assert set(sd) == set(state), f"parameter names differ from PyTorch's: {sorted(set(sd) ^ set(state))}"
    for k, v in sd.items():
        assert tuple(v.shape) == tuple(np.shape(state[k])), f"{k}: shape {np.shape(state[k])}, PyTorch {tuple(v.shape)}"
    model.load_state_dict({k: torch.as_tensor(np.asarray(v, np.float64), dtype=dtype) for k, v in state.items()},
                          strict=False)
    return model


def dropout_masks(net, n: int) -> dict[str, np.ndarray]:
    """The masks the last training forward saved, per dropout layer: (n, *out_shape)."""
    layers = {l.name: l for l in net.network.layers}
    out = {}
    for t in net.plan.activations:
        if t.name.endswith(".mask"):
            lname = t.name[: -len(".mask")]
            out[lname] = net._acts[:n, t.offset:t.offset + t.size].reshape(n, *layers[lname].out_shape).copy()
    return out


def reference_loss_and_grad(net, spec_text: str, x, y, masks: dict | None = None, state=None):
    """Training-mode loss, gradients and outputs of the independent reference (float64)."""
    torch = _torch()
    F = torch.nn.functional
    model = reference_model(net, spec_text, state)
    model.train()
    for lname, m in (masks or {}).items():
        getattr(model, lname).mask = torch.as_tensor(np.asarray(m, np.float64))
    out = model(torch.as_tensor(np.asarray(x, np.float64)))
    if net.network.loss == "cross_entropy":
        loss = F.cross_entropy(out, torch.as_tensor(np.asarray(y), dtype=torch.long))
    elif net.network.loss == "binary_cross_entropy":
        loss = torch.nn.BCEWithLogitsLoss()(out, torch.as_tensor(np.asarray(y, np.float64)))
    else:
        loss = F.mse_loss(out, torch.as_tensor(np.asarray(y, np.float64)))
    loss.backward()
    grads = {k: p.grad.detach().numpy().copy() for k, p in model.named_parameters()}
    return loss.item(), grads, out.detach().numpy(), model


def randomize_batchnorm(net, rng) -> None:
    """Give batch-norm layers non-trivial gamma/beta and running statistics."""
    bn = ("batchnorm2d", "batchnorm1d")
    for k, v in net.params.items():
        if any(k == f"{l.name}.weight" and l.kind.kind in bn for l in net.network.layers):
            v[...] = rng.uniform(0.5, 1.5, v.shape)
        elif any(k == f"{l.name}.bias" and l.kind.kind in bn for l in net.network.layers):
            v[...] = rng.uniform(-0.5, 0.5, v.shape)
    for k, v in net.buffers.items():
        v[...] = rng.uniform(0.5, 2.0, v.shape) if k.endswith("running_var") else rng.normal(0, 0.3, v.shape)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


__all__ = ["ROOT", "assert_close", "build", "dropout_masks", "maxdiff", "prebuild", "random_batch",
           "randomize_batchnorm", "raw_layers", "reference_loss_and_grad", "reference_model", "reset", "spec"]


def assert_twin_computes(net, ref, input_shape, rtol: float = 1e-12, atol: float = 1e-12, samples: int = 2) -> None:
    """The spec's torch twin (torchref.torch_model) loaded with the weights and buffers of `ref`, a
    PyTorch model written by hand from the published source, computes ref's eval-mode outputs
    in float64: the graph is wired as the source's forward."""
    import torch

    from netcompiler.torchref import torch_model

    ref = ref.double().eval()
    state = {k: v.numpy() for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    twin = torch_model(net, state).eval()
    x = torch.randn(samples, *input_shape, dtype=torch.float64)
    with torch.no_grad():
        want, got = ref(x), twin(x)
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=rtol, atol=atol), float((got - want).abs().max())
