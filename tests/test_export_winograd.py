"""`netc export --target host`: stride-1 3x3 convolutions as Winograd F(2x2, 3x3).

The exported C of such a step holds U = G g G^T of every 3x3 kernel g as its weights
(computed at export time, so no transform of weights runs at inference).  The tests check
the numbers in the C text against numpy's G g G^T with G written out here, the choice of
the form (host only, where the cost estimate says it pays), the arena it needs, and the C
against the cffi build's `Net.forward`: gcc and clang under the strict warnings, the plain-C
fallback (-DNETC_NO_VECTORS), -O3 -march=native, and ASan + UBSan with an arena of exactly
NAME_ARENA_BYTES filled with NaN.
"""
from __future__ import annotations

import math
import re

import numpy as np
import pytest

from conftest import ROOT, assert_close, spec
from netcompiler.check import check_text, load
from netcompiler.export import export_c, load_state
from test_export import ATOL, COMPILERS, RTOL, _compile, _net_and_weights, _run, _state

# F(2x2, 3x3)'s kernel transform (Lavin and Gray 2016), written here rather than taken from lower.py
G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])

# every case of the Winograd step: padding, odd output sizes (tiles cut at the bottom and
# right: 9x11 and 7x9), no pool / a 2x2 max-pool that drops the last tile row and column
# (floor mode) / one that keeps them cut (ceil mode), a batch norm folded into a conv without
# bias, a ReLU before the pool (pre), a batch norm after it (per-channel post), 24 channels
# (vectors of 8), tiles in blocks with a tail
WINO = spec([3, 9, 11], [
    "conv2d: {out_channels: 16, kernel_size: 3, padding: 1}",  # 3 input channels: not Winograd
    "conv2d: {out_channels: 24, kernel_size: 3, padding: 1, bias: false}",
    "batchnorm2d",
    "relu",
    "conv2d: {out_channels: 16, kernel_size: 3}",
    "relu",
    "maxpool2d: {kernel_size: 2}",
    "batchnorm2d",
    "tanh",
    "conv2d: {out_channels: 16, kernel_size: 3, padding: 1}",
    "maxpool2d: {kernel_size: 2, ceil_mode: true}",
    "flatten",
    "linear: {out_features: 3}",
], name="odd_winograd")
FORCED = {"conv2": "winograd", "conv3": "winograd", "conv4": "winograd"}


def _c_array(source: str, name: str) -> np.ndarray:
    """The values of `static const float NAME[n] = {...};` in the C text."""
    m = re.search(rf"static const float {name}\[(\d+)\] = \{{(.*?)\}};", source, re.S)
    assert m, name
    values = np.array([float(v.strip().rstrip("f")) for v in m.group(2).replace("\n", " ").split(",")], np.float32)
    assert values.size == int(m.group(1))
    return values


def _u_reference(weight: np.ndarray) -> np.ndarray:
    """[co][ci][4][4]: G g G^T per kernel, in float64, rounded to float32 once."""
    w = np.asarray(weight, np.float32).astype(np.float64)
    u = np.empty((*w.shape[:2], 4, 4))
    for co in range(w.shape[0]):
        for ci in range(w.shape[1]):
            u[co, ci] = G @ w[co, ci] @ G.T
    return u.astype(np.float32)


def test_host_alphabet_uses_winograd_with_weights_g_g_gt():
    network = load(ROOT / "specs" / "alphabet.yaml")
    state = _state(network)
    e = export_c(network, state, "host")
    assert {s.name: s.form for s in e.steps if s.op == "conv"} == {"conv1": "channels", "conv2": "winograd",
                                                                   "conv3": "winograd"}
    for name, cin, cout in (("conv2", 32, 64), ("conv3", 64, 128)):
        step = next(s for s in e.steps if s.name == name)
        u = _c_array(e.source, f"{name}_weight")
        assert u.size == 16 * cin * cout  # 16 values per kernel instead of 9
        blk = step.c["WG_CBW"]  # the C's layout: [cout / blk][16][cin][blk]
        in_c = u.reshape(cout // blk, 4, 4, cin, blk).transpose(0, 4, 3, 1, 2).reshape(cout, cin, 4, 4)
        np.testing.assert_allclose(in_c, _u_reference(state[f"{name}.weight"]), rtol=1e-6, atol=1e-12)
        body = e.source[e.source.index(f"static void {name}_forward"):]
        assert f"{name}_weight + cb * {16 * cin * blk}" in body[:body.index("\n}\n")]
    # the scratch is in the arena: conv2's input 32x13x13 and output 64x6x6, and its scratch: the
    # input channels last 14x14x32, 6 tiles' transformed inputs 16x6x32 and products 16x6x64
    assert e.arena_bytes == 4 * (32 * 13 * 13 + 64 * 6 * 6 + 14 * 14 * 32 + 16 * 6 * 32 + 16 * 6 * 64)
    assert f"#define ALPHABET_ARENA_BYTES {e.arena_bytes} " in e.header
    assert "conv2's scratch: the input channels last with a zero border [14][14][32]" in e.source


@pytest.mark.parametrize("target", ["generic", "cortex-m4", "cortex-m7"])
def test_other_targets_keep_the_direct_conv(target):
    """Winograd's weights are 16/9 as large: flash-bound targets keep the direct code."""
    network = load(ROOT / "specs" / "alphabet.yaml")
    state = _state(network)
    e = export_c(network, state, target)
    assert {s.form for s in e.steps if s.op == "conv"} == {"rows"}
    assert e.weights_bytes == 4 * network.total_params
    with pytest.raises(ValueError, match="does not apply"):
        export_c(network, state, target, forms={"conv2": "winograd"})


def test_winograd_is_chosen_only_where_it_is_cheaper():
    """The cost estimate keeps the direct form on small maps (conv3: 16x3x4 after a 7x9 conv,
    conv4: 3x4) and takes Winograd on conv2 (24x9x11); it never applies to 3 input channels."""
    network = check_text(WINO, "odd_winograd.yaml")
    state = _state(network)
    assert {s.name: s.form for s in export_c(network, state, "host").steps if s.op == "conv"} == {
        "conv1": "channels", "conv2": "winograd", "conv3": "channels", "conv4": "channels"}
    with pytest.raises(ValueError, match="conv form 'winograd' does not apply to conv1 on host"):
        export_c(network, state, "host", forms={"conv1": "winograd"})


def _forced(tmp_path):
    path = tmp_path / "odd_winograd.yaml"
    path.write_text(WINO)
    network, net, weights = _net_and_weights(path, tmp_path)
    e = export_c(network, load_state(network, weights)[0], "host", forms=FORCED)
    assert {s.name: s.form for s in e.steps if s.op == "conv"} == {"conv1": "channels", **FORCED}
    out = tmp_path / "out"
    e.write(out)
    x = np.random.default_rng(5).standard_normal((3, *network.input_shape)).astype(np.float32)
    return network, out, x, net.forward(x).reshape(3, -1)


def test_winograd_matches_forward(tmp_path):
    network, out, x, ref = _forced(tmp_path)
    builds = [(cc, []) for cc in COMPILERS] + [("gcc", ["-DNETC_NO_VECTORS"]), ("gcc", ["-O3", "-march=native"])]
    for cc, extra in builds:
        y = _run(_compile(cc, out, network.name, extra), x, math.prod(network.output_shape), tmp_path)
        assert_close(y, ref, RTOL, f"odd_winograd ({cc} {' '.join(extra)})", atol=ATOL)


def test_winograd_under_sanitizers(tmp_path):
    network, out, x, ref = _forced(tmp_path)
    exe = _compile("gcc", out, network.name, ["-O2", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"])
    assert_close(_run(exe, x, ref.shape[1], tmp_path), ref, RTOL, "odd_winograd (sanitizers)", atol=ATOL)


def test_report_counts_the_winograd_weights_and_scratch():
    """netc report's host row is the host export's: its flash holds the 16-value kernels of
    conv2 and conv3 (7 more values per kernel), its RAM their scratch."""
    from netcompiler.export import estimates

    network = load(ROOT / "specs" / "alphabet.yaml")
    e = export_c(network, _state(network), "host")
    assert e.weights_bytes == 4 * (network.total_params + 7 * (32 * 64 + 64 * 128))
    rows = {(t, b): (f, r) for t, b, f, r in estimates(network)}
    assert rows["host", "float32"] == (e.weights_bytes + e.code_bytes_estimate, e.arena_bytes + e.stack_bytes_estimate)
