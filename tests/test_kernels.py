"""conv2d's kernel paths as data (layers/conv2d.py CONV_PATHS): the default choice per shape,
forcing a path and the errors for one that does not apply, the report's listing, and the
input gradient taken from the graph.  Every path against PyTorch and finite differences:
the `kpath_*` cases of tests/test_gradients.py."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import spec
from netcompiler.check import check_text, force_kernels, load
from netcompiler.errors import KernelError
from netcompiler.plan import make_plan
from netcompiler.render import render
from netcompiler.report import build_report, format_report

ROOT = Path(__file__).resolve().parents[1]


def _net(layer: str, input_shape=(4, 8, 8)):
    """`layer` after a 1x1 convolution to as many channels as the input has"""
    return check_text(spec(input_shape, [f"conv2d: {{out_channels: {input_shape[0]}, kernel_size: 1}}", layer,
                                         "flatten", "linear: {out_features: 3}"]))


def _path(net, name: str = "conv2") -> str:
    return next(lp.kernel.path.name for lp in make_plan(net).layers if lp.layer.name == name)


@pytest.mark.parametrize("layer, input_shape, path", [
    ("conv2d: {out_channels: 8, kernel_size: 1}", (4, 8, 8), "pointwise"),
    ("conv2d: {out_channels: 4, kernel_size: 3, padding: 1, groups: 4}", (4, 16, 16), "depthwise"),
    ("conv2d: {out_channels: 4, kernel_size: 3, stride: 2, padding: 1, groups: 4}", (4, 32, 32), "depthwise"),
    # many groups on small planes: each group costs the GEMM paths a set-up (GROUP_COST); measured
    # on this shape (mobilenetv2_cifar's layers.13.conv2), im2col took 75.8 us forward, depthwise 25.1
    ("conv2d: {out_channels: 576, kernel_size: 3, stride: 2, padding: 1, groups: 576}", (576, 8, 8), "depthwise"),
    ("conv2d: {out_channels: 960, kernel_size: 3, padding: 1, groups: 960}", (960, 4, 4), "depthwise"),
    ("conv2d: {out_channels: 16, kernel_size: 3, padding: 1}", (4, 16, 16), "gather"),
    ("conv2d: {out_channels: 4, kernel_size: 1, stride: 2}", (4, 8, 8), "im2col"),  # a stride: not pointwise
    ("conv2d: {out_channels: 8, kernel_size: 1}", (4, 3, 3), "im2col"),  # under 16 pixels
])
def test_default_kernel_paths(layer, input_shape, path):
    """The cheapest path that applies is the default: pointwise for 1x1 convolutions, depthwise
    for 3x3 per-channel ones (stride 1 and 2), the GEMMs otherwise."""
    assert _path(_net(layer, input_shape)) == path


def test_specs_keep_their_paths():
    """lenet5 runs the paths it ran before the table; alphabet's 3x3 convolutions (no padding)
    have the Winograd weight gradient and the GEMM input gradient; resnet20's 3x3 stride-1 convolutions (padding 1) take both Winograd
    gradients; the first conv of each reads the network input: no input gradient."""
    def paths(name):
        return [(lp.layer.name, lp.kernel.path.name) for lp in make_plan(load(ROOT / f"specs/{name}.yaml")).layers
                if lp.kernel]

    assert paths("lenet5") == [("conv1", "gather"), ("conv2", "gather")]
    assert paths("alphabet") == [("conv1", "gather"), ("conv2", "winograd_dw"), ("conv3", "winograd_dw")]
    r20 = dict(paths("resnet20"))
    assert r20["layer1.0.conv1"] == "winograd_dw_dx" and r20["layer3.0.downsample.0"] == "im2col"
    assert r20["layer3.2.conv2"] == "winograd_dw_dx" and r20["layer3.0.conv1"] == "im2col"  # stride 2
    assert [l.grad_input for l in load(ROOT / "specs/lenet5.yaml").layers if l.kind.kind == "conv2d"] == [False, True]


def test_forcing_a_path_changes_the_plan_and_the_c():
    net = _net("conv2d: {out_channels: 8, kernel_size: 1}")
    forced = force_kernels(net, {"conv2": "im2col"})
    assert _path(forced) == "im2col" and _path(net) == "pointwise"  # the original is left as it was
    assert "conv2_im2col(" in render(forced).source and "conv2_im2col(" not in render(net).source
    lp = next(lp for lp in make_plan(forced).layers if lp.layer.name == "conv2")
    assert lp.kernel.forced and lp.kernel.why == "forced"


def test_forcing_a_path_that_does_not_apply_is_refused():
    net = _net("conv2d: {out_channels: 8, kernel_size: 3, padding: 1}")
    with pytest.raises(KernelError) as exc:
        force_kernels(net, {"conv2": "depthwise"})
    assert str(exc.value) == ("kernels: conv2d 'conv2': kernel path 'depthwise' does not apply (groups = "
                              "in_channels = out_channels, 3x3, stride 1 or 2, padding 1, no dilation); paths "
                              "that apply: gather, im2col")
    with pytest.raises(KernelError, match=r"unknown kernel path 'im2cool' \(did you mean 'im2col'\?\); paths "
                                          r"that apply: gather, im2col"):
        force_kernels(net, {"conv2": "im2cool"})
    with pytest.raises(KernelError, match=r"no layer 'conv3' in 'net' \(did you mean 'conv2'\?\); layers with "
                                          r"kernel paths: conv1, conv2"):
        force_kernels(check_text("name: net\n" + spec((4, 8, 8), ["conv2d: {out_channels: 4, kernel_size: 1}",
                                                                  "conv2d: {out_channels: 4, kernel_size: 1}",
                                                                  "flatten", "linear: {out_features: 3}"])),
                      {"conv3": "im2col"})
    with pytest.raises(KernelError, match=r"linear 'fc1' has one implementation"):
        force_kernels(net, {"fc1": "im2col"})


@pytest.mark.parametrize("layer, input_shape, pre, why", [
    ("conv2d: {out_channels: 16, kernel_size: 3}", (16, 8, 8), True, "no padding"),
    ("conv2d: {out_channels: 16, kernel_size: 3, padding: [1, 1, 1, 0]}", (16, 8, 8), True, "padding 0 on one side"),
    ("conv2d: {out_channels: 16, kernel_size: 3, padding: 2}", (16, 8, 8), True, "padding 2"),
    ("conv2d: {out_channels: 16, kernel_size: 3, padding: 1}", (16, 8, 8), False, "no input gradient"),
    ("conv2d: {out_channels: 16, kernel_size: 3, padding: 1}", (1, 8, 8), True, "1 channel in"),
    ("conv2d: {out_channels: 1, kernel_size: 3, padding: 1}", (16, 8, 8), True, "1 channel out"),
])
def test_winograd_dx_needs_padding_1_and_an_input_gradient(layer, input_shape, pre, why):
    """winograd_dx's input gradient is a 3x3 convolution with padding 1 of the output gradient:
    other paddings, a layer without an input gradient and the shapes Winograd's forward refuses
    keep the other paths; forcing it there is refused with what it needs."""
    layers = ([f"conv2d: {{out_channels: {input_shape[0]}, kernel_size: 1}}"] if pre else []) + [
        layer, "flatten", "linear: {out_features: 3}"]
    net = check_text(spec(input_shape, layers))
    name = "conv2" if pre else "conv1"
    assert _path(net, name) != "winograd_dx", why
    with pytest.raises(KernelError, match=r"kernel path 'winograd_dx' does not apply \(3x3, stride 1, padding 1, "
                                          r"no dilation, one group, at least 16 channels in and out, an input "
                                          r"gradient\)"):
        force_kernels(net, {name: "winograd_dx"})


def test_winograd_gradients_are_the_default_with_padding_1():
    """With an input gradient and padding 1 both Winograd gradients are the cheapest; the same
    convolution as the first layer (no input gradient) takes the Winograd weight gradient alone."""
    net = check_text(spec((16, 8, 8), ["conv2d: {out_channels: 16, kernel_size: 1}",
                                       "conv2d: {out_channels: 16, kernel_size: 3, padding: 1}",
                                       "flatten", "linear: {out_features: 3}"]))
    assert _path(net) == "winograd_dw_dx"
    lp = next(lp for lp in make_plan(net).layers if lp.layer.name == "conv2")
    assert "winograd_dx " in lp.kernel.why and set(lp.kernel.costs) == {
        "winograd_dw_dx", "winograd_dw", "winograd_dx", "winograd", "gather", "im2col"}
    assert "wino_ut" in lp.cache and lp.c["WINO_DX"] and lp.c["WINO_DW"] and not lp.c["GEMM_DIN"]
    assert "DCOL" not in lp.c["SCR"] and "COLT" not in lp.c["SCR"]  # no dcol, no im2row
    first = check_text(spec((16, 8, 8), ["conv2d: {out_channels: 16, kernel_size: 3, padding: 1}",
                                         "flatten", "linear: {out_features: 3}"]))
    assert _path(first, "conv1") == "winograd_dw"
    lp = next(lp for lp in make_plan(first).layers if lp.layer.name == "conv1")
    assert "wino_ut" not in lp.cache and lp.c["WINO_DW"] and not lp.c["WINO_DX"] and "COLT" not in lp.c["SCR"]
    assert "wino_ut" not in next(lp for lp in make_plan(first).layers if lp.layer.name == "conv1").cache


def test_compile_takes_kernels():
    import netcompiler as nc

    with pytest.raises(KernelError, match="paths that apply: gather, im2col"):
        nc.compile(_net("conv2d: {out_channels: 8, kernel_size: 3, padding: 1}"), kernels={"conv2": "pointwise"})


def test_report_names_each_convs_path_and_why():
    path = ROOT / "tests/specs/mobilenet_tiny.yaml"
    rep = build_report(load(path), kernels=True)
    rows = {r["name"]: r for r in rep["kernels"]}
    assert rows["block1.conv1"]["path"] == "pointwise" and rows["block1.conv2"]["path"] == "depthwise"
    assert rows["conv1"]["backward"].endswith("(no input gradient)")
    assert rows["block1.conv2"]["why"].startswith("cost ") and "gather" in rows["block1.conv2"]["why"]
    assert "kernels" not in build_report(load(path))  # only when asked
    out = subprocess.run([sys.executable, "-m", "netcompiler", "report", str(path), "--kernels"],
                         capture_output=True, text=True, check=True).stdout
    line = next(l for l in out.splitlines() if l.startswith("block1.conv2 "))
    assert line.split()[1] == "depthwise" and "cost" in line
    # NETC_VEC (conftest) sets the width the paths are chosen for
    assert "kernel paths for vectors of 16 reals (cost: estimated vector operations per sample" in out
    assert "kernel paths" not in format_report(build_report(load(path)))
    md = format_report(build_report(load(path), kernels=True), "markdown")
    assert "| block1.conv2 | depthwise | direct 3x3 per channel" in md


def test_input_gradient_comes_from_the_graph():
    """A conv that is not first but has nothing trainable upstream computes no input gradient
    (and reserves no scratch for one); the first conv of a chain after a trainable layer does."""
    net = check_text(spec((2, 8, 8), ["maxpool2d: {kernel_size: 2}", "conv2d: {out_channels: 4, kernel_size: 3}",
                                      "flatten", "linear: {out_features: 3}"]))
    conv = net.layers[1]
    assert conv.index > 0 and not conv.grad_input
    c = conv.kind.render_context(conv)
    assert "DCOL" not in c["SCR"]
    lp = make_plan(net).layers[1]
    assert not lp.need_din
