"""`netc verify` checks the float64 and the float32 build, each with its own tolerances."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

pytest.importorskip("torch")

from netcompiler import verify as v  # noqa: E402
from netcompiler.runtime import Net  # noqa: E402

LENET5 = str(ROOT / "specs/lenet5.yaml")


def netc(*args):
    return subprocess.run([sys.executable, "-m", "netcompiler", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT)


def _break(monkeypatch, dtype: str, factor: float, tensor: str = "conv2.weight"):
    """Scale one gradient of the build in dtype only, as a wrong template would."""
    real = Net.loss_and_grad

    def broken(self, x, y):
        loss, grads = real(self, x, y)
        if self.dtype == np.dtype(dtype):
            grads[tensor] = grads[tensor] * factor
        return loss, grads

    monkeypatch.setattr(Net, "loss_and_grad", broken)


def _bad(rows):
    return {(r.dtype, r.tensor, r.reference) for r in rows if not r.ok}


def test_both_builds_are_checked_by_default():
    rows, _ = v.verify(LENET5, per_tensor=2)
    assert {r.dtype for r in rows} == {"float32", "float64"}
    assert {r.reference for r in rows if r.dtype == "float32"} == {"torch"}
    assert {r.reference for r in rows if r.dtype == "float64"} == {"torch", "finite-diff"}
    assert not _bad(rows)


def test_a_wrong_float32_gradient_fails_only_the_float32_build(monkeypatch):
    _break(monkeypatch, "float32", 1.001)  # 0.1%: ten times the float32 tolerance
    bad = _bad(v.verify(LENET5, per_tensor=2)[0])
    assert bad == {("float32", "conv2.weight", "torch")}


def test_a_wrong_float64_gradient_fails_only_the_float64_build(monkeypatch):
    _break(monkeypatch, "float64", 1.01)
    bad = _bad(v.verify(LENET5, per_tensor=2)[0])
    assert bad == {("float64", "conv2.weight", "torch"), ("float64", "conv2.weight", "finite-diff")}


def test_float32_rounding_passes():
    """The float32 tolerance is not so tight that the build's own rounding fails it."""
    rows, _ = v.verify(str(ROOT / "specs/alphabet.yaml"), per_tensor=1, dtypes=("float32",))
    assert rows and not _bad(rows)
    assert max(r.max_rel for r in rows) < v.TORCH_RTOL["float32"] / 10


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cli_dtype_option_and_tolerance_headers(dtype):
    out = netc("verify", "specs/lenet5.yaml", "--samples", "2", "--dtype", dtype)
    assert out.returncode == 0, out.stdout + out.stderr
    other = {"float32": "float64", "float64": "float32"}[dtype]
    assert f"{dtype} build: torch (float64) max rel err <= {v.TORCH_RTOL[dtype]:g}" in out.stdout
    assert f"{other} build" not in out.stdout
    assert ("finite-diff" in out.stdout) == (dtype == "float64")


def test_cli_default_checks_both_builds_and_prints_each_tolerance():
    out = netc("verify", "specs/lenet5.yaml", "--samples", "2")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "float64 build: torch (float64) max rel err <= 1e-08; finite differences" in out.stdout
    assert "float32 build: torch (float64) max rel err <= 0.0001" in out.stdout


def test_dropout_network_passes_in_both_modes():
    """The torch twin replays the build's dropout masks in training mode only: evaluation
    mode has no dropout (the twin used to apply the masks there too and fail)."""
    from netcompiler.check import check_text

    spec = check_text("""
name: dropnet
input: [2, 6, 6]
layers:
  - conv2d: {out_channels: 4, kernel_size: 3}
  - relu
  - dropout: {p: 0.5}
  - flatten
  - linear: {out_features: 3}
loss: cross_entropy
""", "dropnet.yaml")
    rows, _ = v.verify(spec, per_tensor=2)
    assert not _bad(rows), _bad(rows)
    assert {r.dtype for r in rows if r.tensor == "outputs (eval)"} == {"float32", "float64"}


BIAS_BEFORE_BN = """
name: biasbn
input: [2, 6, 6]
layers:
  - conv2d: {out_channels: 4, kernel_size: 3}
  - batchnorm2d
  - relu
  - flatten
  - linear: {out_features: 3}
loss: cross_entropy
"""


def test_a_gradient_zero_in_exact_arithmetic_passes():
    """conv1.bias before batch norm has gradient 0 in exact arithmetic; both builds give
    rounding noise (1e-17 in float64), which must not count as a relative error of 2."""
    from netcompiler.check import check_text

    rows, _ = v.verify(check_text(BIAS_BEFORE_BN, "biasbn.yaml"), per_tensor=2)
    assert not _bad(rows), _bad(rows)


def test_a_wrong_gradient_where_the_true_one_is_zero_still_fails(monkeypatch):
    from netcompiler.check import check_text

    real = Net.loss_and_grad

    def broken(self, x, y):  # 1% of the network's largest gradient where the true one is zero
        loss, grads = real(self, x, y)
        grads["conv1.bias"] = grads["conv1.bias"] + 0.01 * max(float(np.abs(g).max()) for g in grads.values())
        return loss, grads

    monkeypatch.setattr(Net, "loss_and_grad", broken)
    bad = _bad(v.verify(check_text(BIAS_BEFORE_BN, "biasbn.yaml"), per_tensor=2)[0])
    assert ("float64", "conv1.bias", "torch") in bad and ("float32", "conv1.bias", "torch") in bad


@pytest.mark.parametrize("name", ["train", "block.forward"])
def test_a_name_no_pytorch_module_can_have_is_an_error_not_a_traceback(tmp_path, name):
    # netc's C does not care, but the PyTorch twin verify builds cannot hold such a submodule
    spec = tmp_path / "t.yaml"
    spec.write_text(f"name: t\ninput: [4]\nlayers:\n  - linear: {{out_features: 4, name: {name}}}\nloss: mse\n")
    r = netc("verify", spec)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"error: layer name '{name}': '{name.split('.')[-1]}' is an attribute of torch's nn.Module" in r.stderr


KINK = """
input: [2]
layers:
  - linear: {out_features: 1}
  - relu
  - linear: {out_features: 1}
loss: mse
"""


def _kinked_net():
    """fc1's output is 3e-7 for the one sample: a step of 1e-6 in fc1.bias crosses the ReLU's kink."""
    from conftest import build

    net = build(KINK)
    net.params["fc1.weight"][...] = [[1.0, 0.0]]
    net.params["fc1.bias"][...] = 0.0
    net.params["fc2.weight"][...] = 1.0
    net.params["fc2.bias"][...] = 0.0
    return net, np.array([[3e-7, 0.5]]), np.array([[5.0]])


def test_finite_differences_step_across_a_relu_kink_are_measured_again_closer():
    net, x, y = _kinked_net()
    rows = {r.tensor: r for r in v.finite_differences(net, x, y, per_tensor=1, seed=0)}
    assert all(r.ok for r in rows.values()), rows
    assert rows["fc1.bias"].max_abs < 1e-6  # 3.5 at h = 1e-6: (1.3e-6 - 0) / 2e-6 of the slope


def test_a_wrong_gradient_at_a_kink_still_fails(monkeypatch):
    _break(monkeypatch, "float64", 1.01, "fc1.bias")
    net, x, y = _kinked_net()
    rows = {r.tensor: r for r in v.finite_differences(net, x, y, per_tensor=1, seed=0)}
    assert not rows["fc1.bias"].ok and rows["fc2.weight"].ok
