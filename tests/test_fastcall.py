"""Net.forward's fast path (netcompiler/fastcall.c): the same outputs as the cffi path, the
same checks, and a fallback to the general path for every array it does not take."""
from __future__ import annotations

import gc

import numpy as np
import pytest

import netcompiler as nc
from conftest import build, spec
from netcompiler.build import load_fastcall
from netcompiler.check import check_text

FLAT = spec([2, 7, 6], ["conv2d: {out_channels: 3, kernel_size: 3}", "relu", "flatten", "linear: {out_features: 5}"])
# outputs that stay 3-D: (n, 2, 5, 4)
MAPS = spec([2, 7, 6], ["conv2d: {out_channels: 2, kernel_size: 3}", "gelu"], loss="mse")


def cffi_forward(net, x):
    """Net.forward without the fast path (as on a machine where fastcall does not build)."""
    fast, net._fast_forward = net._fast_forward, None
    try:
        return net.forward(x)
    finally:
        net._fast_forward = fast


def test_fastcall_builds_here():
    """CI machines have the Python and numpy headers: the benchmark's numbers depend on it."""
    assert load_fastcall() is not None


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("text", [FLAT, MAPS], ids=["flat", "maps"])
def test_fast_path_matches_cffi_path(text, dtype):
    net = build(text, dtype)
    rng = np.random.default_rng(1)
    for n in (1, 3, 1, 8, 2):  # growing the activations rebinds the fast path
        x = rng.standard_normal((n, *net.network.input_shape)).astype(dtype)
        out = net.forward(x)
        assert net._fast_forward is not None  # the fast path is bound for these activations
        ref = cffi_forward(net, x)
        assert out.dtype == ref.dtype == np.dtype(dtype) and out.shape == ref.shape == (n, *net.network.output_shape)
        assert np.array_equal(out, ref)
        assert np.array_equal(net._fast_forward(x), ref)  # it took this array itself
        out[...] = 7  # a new array, not a view of the activations
        assert np.array_equal(net.forward(x), ref)


def test_fast_path_declines_what_it_does_not_take():
    """run() returns None (Python's path then converts or raises) for anything but an aligned,
    native-order, C-contiguous ndarray of the net's dtype and shape within the capacity."""
    net = build(FLAT, "float32")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 2, 7, 6)).astype(np.float32)
    ref = cffi_forward(net, x)
    run = net._fast_forward
    assert run is not None
    raw = np.zeros(x.nbytes + 4, np.uint8)
    misaligned = np.frombuffer(raw.data, np.float32, x.size, offset=2).reshape(x.shape)
    misaligned[...] = x

    class Sub(np.ndarray):
        pass

    declined = {
        "list": x.tolist(),
        "float64": x.astype(np.float64),
        "big-endian": x.astype(">f4"),
        "fortran order": np.asfortranarray(x),
        "misaligned": misaligned,
        "subclass": x.view(Sub),
        "over capacity": np.concatenate([x, np.repeat(x[:1], net._capacity, axis=0)]),
    }
    for what, arr in declined.items():
        assert run(arr) is None, what
        assert np.allclose(net.forward(arr)[:3], ref, rtol=1e-6, atol=1e-6), what  # the general path
    assert net._fast_forward is not run  # rebound for the activations over capacity grew
    for what, arr in {"empty": x[:0], "wrong shape": x[:, :, :6], "one sample, no batch axis": x[0]}.items():
        assert run(arr) is None, what
        with pytest.raises(ValueError):
            net.forward(arr)


def test_fast_path_keeps_what_it_points_into():
    """A bound fast path holds the library, the context and every array the context points
    into: it stays safe to call after the Net itself is gone."""
    net = nc.compile(check_text(MAPS, "maps.yaml"), dtype="float64", threads=1)  # not the tests' shared one
    x = np.random.default_rng(3).standard_normal((2, 2, 7, 6))
    ref = net.forward(x)
    run = net._fast_forward
    del net
    gc.collect()
    for _ in range(3):
        assert np.array_equal(run(x), ref)


def test_fastcall_opt_out_and_build_failure(monkeypatch, tmp_path):
    """NETC_NO_FASTCALL, or a compiler that fails, leaves Net.forward on the cffi path."""
    build_fastcall = load_fastcall.__wrapped__  # uncached
    monkeypatch.setenv("NETC_NO_FASTCALL", "1")
    assert build_fastcall() is None
    monkeypatch.delenv("NETC_NO_FASTCALL")
    monkeypatch.setenv("NETC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    assert build_fastcall() is None
    assert not list(tmp_path.rglob("*.so"))  # no half-written module left behind
