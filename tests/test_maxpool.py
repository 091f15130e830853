"""max-pooling's two code paths (netcompiler/layers/pool.py, templates/layers/maxpool2d.c.j2).

- Which path a layer gets: the tiled path (stride = kernel, no padding, dilation 1:
  windows that tile the input, vectorised, a backward that writes each input gradient
  once) or the general one, and how the tiled path vectorises.
- Both paths against PyTorch *exactly*: the pooled values, the saved argmax (PyTorch's
  `return_indices`, the same index iy * W + ix in the channel plane) and the input
  gradient, on inputs full of ties, -inf and NaN, in float64 and float32.  The gradient
  cases in test_gradients.py check the same layers against finite differences.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import ROOT, build, spec
from netcompiler.check import check_text, load
from netcompiler.render import render

torch = pytest.importorskip("torch")


def pool_context(option_text: str, input_shape) -> dict:
    net = check_text(spec(input_shape, [f"maxpool2d: {option_text}"], "mse"))
    layer = net.layers[0]
    return layer.kind.render_context(layer)


# ---- which path ------------------------------------------------------------------------------
def test_lenet5_pools_take_the_tiled_path():
    net = load(ROOT / "specs" / "lenet5.yaml")
    pools = [l for l in net.layers if l.kind.kind == "maxpool2d"]
    assert [p.name for p in pools] == ["pool1", "pool2"]
    for p in pools:
        tiles = p.kind.render_context(p)["tiles"]
        assert tiles is not None, p.name
        assert tiles["SIMD"] == "columns" and tiles["SCALAR_COLUMNS"] == [], (p.name, tiles)
    source = render(net).source
    for name in ("pool1_forward", "pool1_backward", "pool2_forward", "pool2_backward"):
        body = source[source.index(f"static void {name}("):]
        body = body[:body.index("\n}\n")]
        comment = source[:source.index(f"static void {name}(")].rsplit("/* Tiled path", 1)[1]
        assert "*/" in comment and "static void" not in comment, f"{name} has no tiled-path comment"
        assert "OMP(omp simd)" in body and "memset" not in body and "window_lo" not in body, name


def test_alphabet_pools_take_the_tiled_path_with_ceil_edges():
    net = load(ROOT / "specs" / "alphabet.yaml")
    tiles = {l.name: l.kind.render_context(l)["tiles"] for l in net.layers if l.kind.kind == "maxpool2d"}
    assert tiles["pool1"]["SIMD"] == "columns" and not tiles["pool1"]["EDGE_KW"]  # 26x26 -> 13x13
    assert (tiles["pool2"]["EDGE_KH"], tiles["pool2"]["EDGE_KW"]) == (1, 1)  # ceil_mode: 11x11 -> 6x6
    assert tiles["pool3"]["SIMD"] == "channels"  # 4x4 -> 2x2: too few windows per row for a vector


@pytest.mark.parametrize("options, input_shape, simd", [
    ("{kernel_size: 2}", (6, 28, 28), "columns"),
    ("{kernel_size: 2, stride: 2}", (3, 9, 11), "columns"),  # floor: a row and a column in no window
    ("{kernel_size: 2, ceil_mode: true}", (3, 9, 11), "columns"),  # ceil: cut last row and column
    ("{kernel_size: 3}", (2, 12, 12), "columns"),
    ("{kernel_size: [2, 3]}", (2, 8, 13), "columns"),
    ("{kernel_size: [1, 2], dilation: 1, padding: 0}", (2, 3, 20), "columns"),
    ("{kernel_size: 2, ceil_mode: true}", (1, 40, 3), "columns"),  # one whole window per row
    ("{kernel_size: 3, ceil_mode: true}", (2, 7, 5), "columns"),  # in scalar code: rows of 1 and a cut window
    ("{kernel_size: 2}", (128, 4, 4), "channels"),
    ("{kernel_size: 3, ceil_mode: true}", (6, 4, 4), "channels"),
    ("{kernel_size: 2}", (3, 4, 4), "columns"),  # too few channels for a vector
    ("{kernel_size: [2, 3]}", (5, 2, 8), "columns"),  # columns in no window
    # not tiled: overlapping windows, gaps between windows, padding, dilation
    ("{kernel_size: 2, stride: 1}", (5, 15, 15), None),
    ("{kernel_size: 2, stride: 3}", (2, 9, 9), None),
    ("{kernel_size: 2, padding: 1}", (2, 8, 8), None),
    ("{kernel_size: 2, dilation: 2}", (2, 8, 8), None),
    ("{kernel_size: [2, 3], stride: [2, 2]}", (2, 8, 9), None),
])
def test_path_choice(options, input_shape, simd):
    tiles = pool_context(options, input_shape)["tiles"]
    assert (tiles and tiles["SIMD"]) == simd, tiles


# ---- exact agreement with PyTorch ------------------------------------------------------------
EXACT = {
    # tiled, vectorised over output columns: blocks of 8 (14 = 8 + an overlapping 8), of 4
    "tiled_k2": ("{kernel_size: 2}", (3, 6, 28)),
    "tiled_k2_floor_odd": ("{kernel_size: 2}", (2, 9, 11)),
    "tiled_k2_ceil_odd": ("{kernel_size: 2, ceil_mode: true}", (2, 9, 11)),
    "tiled_k3": ("{kernel_size: 3, stride: 3}", (2, 12, 14)),
    "tiled_k3_ceil": ("{kernel_size: 3, ceil_mode: true}", (2, 13, 20)),
    "tiled_nonsquare_ceil": ("{kernel_size: [2, 3], ceil_mode: true}", (2, 7, 13)),
    "tiled_k1x2": ("{kernel_size: [1, 2]}", (2, 3, 17)),
    "tiled_k2x1_ceil": ("{kernel_size: [2, 1], ceil_mode: true}", (2, 5, 9)),
    "tiled_one_window_per_row": ("{kernel_size: 2, ceil_mode: true}", (1, 40, 3)),
    "tiled_cut_only": ("{kernel_size: 3, ceil_mode: true}", (3, 2, 2)),
    "tiled_scalar_rows": ("{kernel_size: 3, ceil_mode: true}", (2, 7, 5)),
    # tiled, vectorised over channels: blocks of 16 (the last overlapping), of 4
    "tiled_channels": ("{kernel_size: 2}", (20, 4, 4)),
    "tiled_channels_ceil": ("{kernel_size: 3, ceil_mode: true}", (6, 4, 4)),
    "tiled_channels_rows": ("{kernel_size: [1, 2]}", (5, 4, 4)),
    # general path
    "general_overlap": ("{kernel_size: 3, stride: 1, padding: 1}", (2, 6, 7)),
    "general_gaps_ceil": ("{kernel_size: 2, stride: 3, ceil_mode: true}", (2, 8, 7)),
    "general_dilation": ("{kernel_size: 2, stride: 2, dilation: 2, padding: 1}", (2, 7, 8)),
}


def torch_pool(options: dict):
    k = options["kernel_size"]
    return lambda x: torch.nn.functional.max_pool2d(
        x, k, options.get("stride", k), options.get("padding", 0), options.get("dilation", 1),
        ceil_mode=options.get("ceil_mode", False), return_indices=True)


def pool_input(shape, rng, nan: bool) -> np.ndarray:
    """Small integers (many ties, whole windows of equal values), some -inf, optionally NaNs."""
    x = rng.integers(-2, 3, size=shape).astype(np.float64)
    x[rng.random(shape) < 0.1] = -np.inf
    x[..., :2, :2] = 1.0  # at least one window of ties
    if nan:
        x[rng.random(shape) < 0.08] = np.nan
    return x


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("nan", [False, True], ids=["ties", "nan"])
@pytest.mark.parametrize("case", list(EXACT))
def test_maxpool_matches_torch_exactly(case, nan, dtype):
    import yaml

    options_text, shape = EXACT[case]
    c = shape[0]
    # a depthwise 1x1 convolution set to the identity in front, so that the pooling layer
    # computes its input gradient; mean squared error on the pooled values
    text = spec(shape, [f"conv2d: {{out_channels: {c}, kernel_size: 1, groups: {c}}}",
                        f"maxpool2d: {options_text}"], "mse")
    net = build(text, dtype)
    net.params["conv1.weight"][...] = 1
    net.params["conv1.bias"][...] = 0
    rng = np.random.default_rng(sum(map(ord, case)) + nan)
    n = 3
    x = pool_input((n, *shape), rng, nan).astype(dtype)
    y = rng.normal(size=(n, *net.network.output_shape)).astype(dtype)
    net.loss_and_grad(x, y)

    acts = {t.name: t for t in net.plan.activations}
    ints = {t.name: t for t in net.plan.int_slots}

    def slot(arr, t, shape=None):
        return arr[:n, t.offset:t.offset + t.size].reshape(n, *(shape or t.shape))

    out, pin = acts["pool1.out"], acts["conv1.out"]
    got_out, got_argmax = slot(net._acts, out), slot(net._ints, ints["pool1.argmax"], out.shape)
    dout, got_din = slot(net._dacts, out), slot(net._dacts, pin)

    xt = torch.as_tensor(slot(net._acts, pin).copy()).requires_grad_(True)
    ref_out, ref_argmax = torch_pool(yaml.safe_load(options_text))(xt)
    ref_out.backward(torch.as_tensor(dout))
    np.testing.assert_array_equal(slot(net._acts, pin), x, err_msg="the identity convolution changed the input")
    np.testing.assert_array_equal(got_out, ref_out.detach().numpy(), err_msg=f"{case}: pooled values")
    np.testing.assert_array_equal(got_argmax, ref_argmax.numpy(), err_msg=f"{case}: argmax")
    np.testing.assert_array_equal(got_din, xt.grad.numpy(), err_msg=f"{case}: input gradient")
    # -0 gradients come out +0, as from PyTorch's zero-then-accumulate
    assert not np.any(np.signbit(got_din) & (got_din == 0)), f"{case}: a -0 input gradient"
