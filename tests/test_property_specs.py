"""Every spec that `check` accepts builds and runs: random small specs across every layer
kind and option go through check -> build -> forward -> backward (loss_and_grad) -> one
training step.  The only failure allowed is a located `SpecErrors` from check (the
generator tracks shapes, so most specs are valid; the few it gets wrong must be refused
with a line and column, never crash a later stage).

The default run is small and derandomized (the same examples each time, ~15 builds);
`pytest -m slow` runs many more random ones.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import netcompiler as nc
from netcompiler.check import check_text
from netcompiler.errors import SpecErrors
from netcompiler.layers import REGISTRY

# numbers as a user writes them (YAML 1.2 forms included)
EPS = ["1e-5", "0.001", "1E-3", ".1"]
MOMENTUM = ["0.1", "1e-2", ".5", "1"]
P = ["0", "0.25", ".5", "9e-1"]
SLOPE = ["0.01", "-0.5", "2e-1", "+3"]


def _pair(draw, lo: int, hi: int) -> tuple[str, tuple[int, int]]:
    """An int or [h, w] option: (YAML text, (h, w))."""
    if draw(st.booleans()):
        v = draw(st.integers(lo, hi))
        return str(v), (v, v)
    a, b = draw(st.integers(lo, hi)), draw(st.integers(lo, hi))
    return f"[{a}, {b}]", (a, b)


def _window(size: int, k: int, s: int, pad: int, d: int, ceil: bool = False, pad_end: int | None = None) -> int:
    """PyTorch's output size (written out here, independently of layers/base.py); `pad_end`:
    the padding after the input when it differs from `pad` before it."""
    span = size + pad + (pad if pad_end is None else pad_end) - d * (k - 1) - 1
    if span < 0:
        return 0
    out = (math.ceil(span / s) if ceil else span // s) + 1
    if ceil and (out - 1) * s >= size + pad:
        out -= 1
    return out


@st.composite
def conv2d(draw, shape):
    c, h, w = shape
    groups = draw(st.sampled_from([g for g in (1, 2, 3) if c % g == 0]))
    cout = groups * draw(st.integers(1, 2))
    opts = [f"out_channels: {cout}"]
    dil_text, (dh, dw) = _pair(draw, 1, 2)
    pad_kind = draw(st.sampled_from(["int", "same", "valid", "none", "four"]))
    stride_text, (sh, sw) = _pair(draw, 1, 3) if pad_kind != "same" else ("1", (1, 1))
    ph = pw = 0
    pb = pr = None  # bottom and right padding when they differ from top and left
    if pad_kind == "int":
        pad_text, (ph, pw) = _pair(draw, 0, 2)
        opts.append(f"padding: {pad_text}")
    elif pad_kind == "four":
        ph, pb, pw, pr = (draw(st.integers(0, 2)) for _ in range(4))
        opts.append(f"padding: [{ph}, {pb}, {pw}, {pr}]")
    elif pad_kind in ("same", "valid"):
        opts.append(f"padding: {pad_kind}")
    # the largest kernel that still gives an output (so most specs are valid)
    kh_max = max(1, (h + ph + (ph if pb is None else pb) - 1) // dh + 1) if pad_kind != "same" else 3
    kw_max = max(1, (w + pw + (pw if pr is None else pr) - 1) // dw + 1) if pad_kind != "same" else 3
    kh, kw = draw(st.integers(1, min(kh_max, 4))), draw(st.integers(1, min(kw_max, 4)))
    opts.append(f"kernel_size: {kh}" if kh == kw and draw(st.booleans()) else f"kernel_size: [{kh}, {kw}]")
    if (sh, sw) != (1, 1) or draw(st.booleans()):
        opts.append(f"stride: {stride_text}")
    if (dh, dw) != (1, 1):
        opts.append(f"dilation: {dil_text}")
    if groups > 1:
        opts.append(f"groups: {groups}")
    if draw(st.booleans()):
        opts.append(f"in_channels: {c}")
    if draw(st.booleans()):
        opts.append(f"bias: {draw(st.sampled_from(['true', 'false']))}")
    if pad_kind == "same":
        oh, ow = h, w
    else:
        oh, ow = _window(h, kh, sh, ph, dh, pad_end=pb), _window(w, kw, sw, pw, dw, pad_end=pr)
    return "conv2d: {" + ", ".join(opts) + "}", (cout, oh, ow)


@st.composite
def pool2d(draw, shape, kind):
    c, h, w = shape
    k = draw(st.integers(1, max(1, min(h, w, 3))))
    opts = [f"kernel_size: {k}"]
    s = k
    if draw(st.booleans()):
        s = draw(st.integers(1, 3))
        opts.append(f"stride: {s}")
    four = draw(st.integers(0, 3)) == 0  # padding [top, bottom, left, right] (no ceil_mode)
    if four:
        pt, pb, pl, pr = (draw(st.integers(0, k // 2)) for _ in range(4))
        opts.append(f"padding: [{pt}, {pb}, {pl}, {pr}]")
    else:
        pt = pb = pl = pr = draw(st.integers(0, k // 2))
        if pt:
            opts.append(f"padding: {pt}")
    d = 1
    if kind == "maxpool2d" and draw(st.booleans()):
        d = draw(st.integers(1, 2))
        opts.append(f"dilation: {d}")
    ceil = not four and draw(st.booleans())
    if ceil:
        opts.append("ceil_mode: true")
    if kind == "avgpool2d" and draw(st.booleans()):
        opts.append(f"count_include_pad: {draw(st.sampled_from(['true', 'false']))}")
    out = (c, _window(h, k, s, pt, d, ceil, pb), _window(w, k, s, pl, d, ceil, pr))
    return f"{kind}: {{" + ", ".join(opts) + "}", out


@st.composite
def layer(draw, shape):
    """(YAML layer entry, output shape) for a layer that fits `shape` (or, rarely, not)."""
    if len(shape) == 3:
        kind = draw(st.sampled_from(["conv2d", "conv2d", "maxpool2d", "avgpool2d", "batchnorm2d", "flatten", "relu",
                                     "leaky_relu", "gelu", "tanh", "sigmoid", "dropout", "relu6", "hardswish", "silu",
                                     "adaptive_avgpool2d", "global_avgpool2d", "upsample"]))
    else:
        kind = draw(st.sampled_from(["linear", "linear", "flatten", "relu", "leaky_relu", "gelu", "tanh", "sigmoid",
                                     "dropout", "relu6", "hardswish", "silu", "batchnorm1d"]))
    if kind == "conv2d":
        return draw(conv2d(shape))
    if kind in ("maxpool2d", "avgpool2d"):
        return draw(pool2d(shape, kind))
    if kind == "linear":
        n = draw(st.integers(1, 5))
        bias = draw(st.sampled_from(["", ", bias: false", ", bias: true"]))
        fin = draw(st.sampled_from(["", f", in_features: {shape[0]}"]))
        return f"linear: {{out_features: {n}{bias}{fin}}}", (n,)
    if kind == "flatten":
        return "flatten", (math.prod(shape),)
    if kind == "batchnorm2d":
        return (f"batchnorm2d: {{eps: {draw(st.sampled_from(EPS))}, momentum: {draw(st.sampled_from(MOMENTUM))}}}",
                shape)
    if kind == "dropout":
        return f"dropout: {{p: {draw(st.sampled_from(P))}}}", shape
    if kind == "batchnorm1d":
        return (f"batchnorm1d: {{eps: {draw(st.sampled_from(EPS))}, momentum: {draw(st.sampled_from(MOMENTUM))}}}",
                shape)
    if kind == "adaptive_avgpool2d":
        text, (oh, ow) = _pair(draw, 1, 4)
        return f"adaptive_avgpool2d: {{output_size: {text}}}", (shape[0], oh, ow)
    if kind == "global_avgpool2d":
        return "global_avgpool2d", (shape[0], 1, 1)
    if kind == "upsample":
        text, (sh, sw) = _pair(draw, 1, 2)
        mode = draw(st.sampled_from(["", ", mode: nearest"]))
        return f"upsample: {{scale_factor: {text}{mode}}}", (shape[0], shape[1] * sh, shape[2] * sw)
    if kind == "gelu":
        return draw(st.sampled_from(["gelu", "gelu: {approximate: tanh}", "gelu: {approximate: none}"])), shape
    if kind == "leaky_relu":
        return f"leaky_relu: {{negative_slope: {draw(st.sampled_from(SLOPE))}}}", shape
    return kind, shape


@st.composite
def spec_texts(draw) -> str:
    """A spec: an input shape, 1-4 layers that fit it, and a loss the output fits."""
    if draw(st.booleans()):
        input_shape = (draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    else:
        input_shape = (draw(st.integers(1, 6)),)
    shape, entries = input_shape, []
    for _ in range(draw(st.integers(1, 4))):
        entry, shape = draw(layer(shape))
        if ":" in entry and draw(st.integers(0, 3)) == 0:  # the output shape this file computed
            entry = f"{entry[:-1]}, expect: {list(shape)}}}"
        entries.append(entry)
        if 0 in shape:
            break  # an empty output: check must refuse it
    loss = draw(st.sampled_from(["cross_entropy", "mse", "binary_cross_entropy"]))
    if loss == "cross_entropy" and not (len(shape) == 1 and shape[0] >= 2):
        if len(shape) == 3:
            entries.append("flatten")
        entries.append(f"linear: {{out_features: {draw(st.integers(2, 4))}}}")
    if draw(st.integers(0, 2)) == 0:  # a graph: sums and a concat of earlier tensors
        entries = draw(_with_merges(input_shape, entries))
    elif draw(st.booleans()):  # explicit layer names, some equal to identifiers of the templates
        names = draw(st.permutations(["count", "forward", "OFF", "x1", "real", "Layer_2", "window", "EOF"]))
        entries = [f"{e}: {{name: {n}}}" if ":" not in e else f"{e[:-1]}, name: {n}}}"
                   for e, n in zip(entries, names + ["more"] * len(entries))]
    body = "".join(f"  - {e}\n" for e in entries)
    return f"input: {list(input_shape)}\nlayers:\n{body}loss: {loss}\n"


def _named(entry: str, name: str) -> str:
    return f"{entry}: {{name: {name}}}" if ":" not in entry else f"{entry[:-1]}, name: {name}}}"


@st.composite
def _with_merges(draw, input_shape, entries):
    """The chain's entries named t0, t1, ...; after some of them an add of the output and one or
    two earlier tensors of its shape (the next entry reads the sum), and at the end maybe a
    concat of the output with an earlier tensor of its rank and spatial size.  The shapes are
    check's, which the chain passed."""
    try:
        net = check_text(f"input: {list(input_shape)}\nlayers:\n" + "".join(f"  - {e}\n" for e in entries)
                         + "loss: mse\n")
    except SpecErrors:
        return entries  # refused already: nothing to add
    seen, out = [("input", tuple(input_shape))], []
    for i, (entry, layer) in enumerate(zip(entries, net.layers)):
        out.append(_named(entry, f"t{i}"))
        same = [t for t, shape in seen if shape == layer.out_shape]
        seen.append((f"t{i}", layer.out_shape))
        if same and draw(st.booleans()):
            others = draw(st.lists(st.sampled_from(same), min_size=1, max_size=2))
            out.append(f"add: {{name: m{i}, inputs: [{', '.join([f't{i}', *others])}]}}")
    last = net.layers[-1].out_shape
    joinable = [t for t, shape in seen[:-1] if len(shape) == len(last) and shape[1:] == last[1:]]
    if joinable and draw(st.booleans()):
        parts = draw(st.permutations([out[-1].split("name: ")[1].split(",")[0].split("}")[0],
                                      draw(st.sampled_from(joinable))]))
        out.append(f"concat: {{inputs: [{', '.join(parts)}]}}")
    return out


def run_spec(text: str, dtype: str) -> None:
    try:
        net = check_text(text, "prop.yaml")
    except SpecErrors as exc:
        for d in exc.diagnostics:  # refused: fine, if every diagnostic is located
            assert d.file == "prop.yaml" and d.line >= 1 and d.col >= 1, str(exc)
        return
    built = nc.compile(net, dtype=dtype, threads=1)
    rng = np.random.default_rng(0)
    n = 3
    x = rng.standard_normal((n, *net.input_shape)).astype(dtype)
    if net.loss == "cross_entropy":
        y = rng.integers(0, net.num_classes, n).astype(np.int32)
    elif net.loss == "binary_cross_entropy":
        y = rng.uniform(0, 1, (n, *net.output_shape)).astype(dtype)
    else:
        y = rng.standard_normal((n, *net.output_shape)).astype(dtype)
    out = built.forward(x)
    assert out.shape == (n, *net.output_shape) and np.isfinite(out).all()
    loss, grads = built.loss_and_grad(x, y)
    assert np.isfinite(loss)
    assert {k: g.shape for k, g in grads.items()} == net.param_shapes()
    assert all(np.isfinite(g).all() for g in grads.values())
    assert np.isfinite(built.train_step(x, y))


def test_generator_covers_every_kind_and_option():
    """The strategy draws every kind and every option (so the property covers them)."""
    seen: set = set()

    @settings(max_examples=1000, derandomize=True, database=None)
    @given(text=spec_texts())
    def collect(text):
        seen.update(_kinds_and_options(text))

    collect()
    wanted = ({(k, None) for k in REGISTRY} | {(k, o.name) for k, kind in REGISTRY.items() for o in kind.options}
              | {("conv2d", "expect"), ("linear", "expect"), ("maxpool2d", "expect")})
    assert wanted - seen == set()


def _kinds_and_options(text: str) -> set:
    import yaml

    out = set()
    for entry in yaml.safe_load(text)["layers"]:
        kind, opts = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
        out.add((kind, None))
        out.update((kind, o) for o in (opts or {}) if o != "name")
    return out


@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(text=spec_texts(), dtype=st.sampled_from(["float32", "float64"]))
def test_every_checked_spec_builds_and_trains(text, dtype):
    run_spec(text, dtype)


@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(text=spec_texts().filter(lambda t: "add:" in t or "concat:" in t), dtype=st.sampled_from(["float32", "float64"]))
def test_every_checked_graph_spec_builds_and_trains(text, dtype):
    run_spec(text, dtype)


@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(text=spec_texts(), dtype=st.sampled_from(["float32", "float64"]))
def test_every_checked_spec_builds_and_trains_many(text, dtype):
    run_spec(text, dtype)
