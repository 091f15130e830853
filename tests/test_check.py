"""The checker's shape rules, sizes, names and parameter counts (expected values by hand)."""
from __future__ import annotations

from pathlib import Path

import pytest

from netcompiler.check import check_text, load
from netcompiler.errors import SpecErrors

ROOT = Path(__file__).resolve().parents[1]


def net_of(layers: str, input_shape, loss: str = "mse", **kw):
    body = "".join(f"  - {l}\n" for l in layers.strip().splitlines())
    return check_text(f"input: {list(input_shape)}\nlayers:\n{body}loss: {loss}\n", "t.yaml", **kw)


def shape(layer: str, input_shape) -> tuple:
    return net_of(layer, input_shape).layers[0].out_shape


def errors(layers: str, input_shape, loss: str = "mse", **kw) -> list[str]:
    with pytest.raises(SpecErrors) as exc:
        net_of(layers, input_shape, loss, **kw)
    return [d.message for d in exc.value.diagnostics]


# ---- conv2d: floor((in + 2p - d(k-1) - 1)/s) + 1 -------------------------------------------
@pytest.mark.parametrize("layer, inp, out", [
    ("conv2d: {out_channels: 6, kernel_size: 5}", (1, 28, 28), (6, 24, 24)),               # 28-5+1
    ("conv2d: {out_channels: 6, kernel_size: 5, padding: 2}", (1, 28, 28), (6, 28, 28)),   # 28+4-4-1+1
    ("conv2d: {out_channels: 5, kernel_size: 4, stride: 2}", (3, 32, 32), (5, 15, 15)),    # (32-4)/2+1
    ("conv2d: {out_channels: 5, kernel_size: 6, stride: 2}", (3, 32, 32), (5, 14, 14)),    # floor(26/2)+1
    ("conv2d: {out_channels: 8, kernel_size: 3, stride: 2, padding: 1}", (3, 32, 32), (8, 16, 16)),  # floor(31/2)+1
    ("conv2d: {out_channels: 8, kernel_size: 3, stride: 3}", (3, 10, 10), (8, 3, 3)),     # floor(7/3)+1
    ("conv2d: {out_channels: 4, kernel_size: [3, 5], stride: [2, 3]}", (2, 9, 11), (4, 4, 3)),
    ("conv2d: {out_channels: 3, kernel_size: 3, padding: [1, 2]}", (2, 5, 5), (3, 5, 7)),
    ("conv2d: {out_channels: 3, kernel_size: 3, padding: [0, 1], stride: 2}", (1, 6, 6), (3, 2, 3)),
    ("conv2d: {out_channels: 3, kernel_size: 3, padding: same}", (2, 7, 9), (3, 7, 9)),
    ("conv2d: {out_channels: 3, kernel_size: 4, padding: same}", (2, 7, 9), (3, 7, 9)),
    ("conv2d: {out_channels: 3, kernel_size: 3, padding: valid}", (2, 7, 9), (3, 5, 7)),
    ("conv2d: {out_channels: 2, kernel_size: 3, dilation: 2}", (1, 10, 10), (2, 6, 6)),    # 10-4-1+1
    ("conv2d: {out_channels: 2, kernel_size: 3, dilation: [2, 3], padding: 1}", (1, 12, 12), (2, 10, 8)),
    ("conv2d: {out_channels: 2, kernel_size: 3, dilation: 2, stride: 2}", (1, 11, 11), (2, 4, 4)),  # floor(6/2)+1
    ("conv2d: {out_channels: 10, kernel_size: 5}", (7, 5, 5), (10, 1, 1)),
])
def test_conv_output_size(layer, inp, out):
    assert shape(layer, inp) == out


@pytest.mark.parametrize("kernel, dilation, pads", [
    (3, 1, ((1, 1), (1, 1))),
    (4, 1, ((1, 2), (1, 2))),          # even kernel: the extra pixel goes bottom/right
    (2, 1, ((0, 1), (0, 1))),
    ("[2, 5]", 1, ((0, 1), (2, 2))),
    (4, 2, ((3, 3), (3, 3))),          # total 2*3 = 6
    (4, 3, ((4, 5), (4, 5))),          # total 3*3 = 9
])
def test_same_padding_is_asymmetric_like_pytorch(kernel, dilation, pads):
    layer = net_of(f"conv2d: {{out_channels: 2, kernel_size: {kernel}, dilation: {dilation}, padding: same}}",
                   (1, 16, 16)).layers[0]
    assert layer.out_shape == (2, 16, 16)
    assert layer.derived["pads"] == pads
    assert (layer.derived["pad_top"], layer.derived["pad_left"]) == (pads[0][0], pads[1][0])


def test_same_padding_needs_stride_1():
    assert errors("conv2d: {out_channels: 2, kernel_size: 3, stride: 2, padding: same}", (1, 8, 8)) == [
        "conv2d 'conv1': padding='same' needs stride 1 (as in PyTorch), got stride 2x2"]


@pytest.mark.parametrize("cin, cout, groups, params", [
    (4, 6, 2, 6 * 2 * 9 + 6),
    (4, 8, 4, 8 * 1 * 9 + 8),   # depthwise-like
    (6, 6, 1, 6 * 6 * 9 + 6),
])
def test_groups_divide_weight(cin, cout, groups, params):
    layer = net_of(f"conv2d: {{out_channels: {cout}, kernel_size: 3, groups: {groups}}}", (cin, 5, 5)).layers[0]
    assert layer.param_shapes()["weight"] == (cout, cin // groups, 3, 3)
    assert layer.params == params
    assert layer.kind.macs(layer) == cout * 3 * 3 * (cin // groups) * 9  # 3x3 output


@pytest.mark.parametrize("cin, cout, groups", [(6, 8, 4), (8, 6, 4), (3, 3, 2)])
def test_groups_must_divide_both_channel_counts(cin, cout, groups):
    assert errors(f"conv2d: {{out_channels: {cout}, kernel_size: 3, groups: {groups}}}", (cin, 5, 5)) == [
        f"conv2d 'conv1': groups={groups} must divide both in_channels ({cin}) and out_channels ({cout})"]


def test_kernel_larger_than_input():
    assert errors("conv2d: {out_channels: 2, kernel_size: 5}", (1, 4, 4)) == [
        "conv2d 'conv1': input 4x4 is smaller than kernel 5x5 (1+4-5 = 0)"]
    assert errors("conv2d: {out_channels: 2, kernel_size: [3, 7]}", (1, 4, 4)) == [
        "conv2d 'conv1': input 4x4 is smaller than kernel 3x7 (1+4-7 = -2)"]


def test_kernel_too_large_with_stride_explains_the_formula():
    assert errors("conv2d: {out_channels: 4, kernel_size: 5, stride: 2}", (1, 4, 4)) == [
        "conv2d 'conv1': input 4x4 is too small for kernel 5x5: output height "
        "floor((4 + 0 - 1*(5-1) - 1)/2) + 1 = 0"]


def test_in_channels_mismatch():
    assert errors("conv2d: {out_channels: 4, kernel_size: 3, in_channels: 1}", (3, 8, 8)) == [
        "conv2d 'conv1': in_channels is 1 but the input has 3 channels"]


def test_conv_needs_3d_input():
    assert errors("conv2d: {out_channels: 4, kernel_size: 3}", (64,)) == [
        "conv2d 'conv1': needs a 3-D input (channels, height, width), got 64"]


# ---- pooling -------------------------------------------------------------------------------
@pytest.mark.parametrize("layer, inp, out", [
    ("maxpool2d: {kernel_size: 2}", (6, 28, 28), (6, 14, 14)),
    ("maxpool2d: {kernel_size: 2}", (32, 11, 11), (32, 5, 5)),
    ("maxpool2d: {kernel_size: 2, ceil_mode: true}", (32, 11, 11), (32, 6, 6)),  # the seed's 11x11 -> 6x6
    ("maxpool2d: {kernel_size: 2, ceil_mode: true}", (32, 26, 26), (32, 13, 13)),
    # ceil would give 3, but the last window would start in the right padding: PyTorch drops it
    ("maxpool2d: {kernel_size: 2, stride: 2, padding: 1, ceil_mode: true}", (1, 3, 3), (1, 2, 2)),
    ("maxpool2d: {kernel_size: 2, stride: 2, padding: 1}", (1, 3, 3), (1, 2, 2)),
    ("maxpool2d: {kernel_size: 3, stride: 2, ceil_mode: true}", (1, 6, 6), (1, 3, 3)),
    ("maxpool2d: {kernel_size: 3, stride: 2}", (1, 6, 6), (1, 2, 2)),
    ("maxpool2d: {kernel_size: 2, stride: 1}", (5, 15, 15), (5, 14, 14)),
    ("maxpool2d: {kernel_size: 3, stride: 2, padding: 1}", (2, 7, 8), (2, 4, 4)),
    ("maxpool2d: {kernel_size: 3, stride: 1, dilation: 2}", (1, 9, 9), (1, 5, 5)),
    ("avgpool2d: {kernel_size: 2}", (3, 8, 8), (3, 4, 4)),
    ("avgpool2d: {kernel_size: 2, ceil_mode: true}", (3, 11, 11), (3, 6, 6)),
    ("avgpool2d: {kernel_size: 3, stride: 2, padding: 1, count_include_pad: false}", (3, 8, 8), (3, 4, 4)),
])
def test_pool_output_size(layer, inp, out):
    assert shape(layer, inp) == out


def test_pool_stride_defaults_to_kernel():
    layer = net_of("maxpool2d: {kernel_size: [2, 3]}", (1, 8, 9)).layers[0]
    assert layer.opts["stride"] == (2, 3)
    assert layer.out_shape == (1, 4, 3)


@pytest.mark.parametrize("kind", ["maxpool2d", "avgpool2d"])
def test_pool_padding_at_most_half_the_kernel(kind):
    assert errors(f"{kind}: {{kernel_size: 2, padding: 2}}", (1, 8, 8)) == [
        f"{kind} 'pool1': padding 2 is more than half the kernel size 2"]
    assert errors(f"{kind}: {{kernel_size: 3, padding: [1, 2]}}", (1, 8, 8)) == [
        f"{kind} 'pool1': padding 2 is more than half the kernel size 3"]
    assert shape(f"{kind}: {{kernel_size: 3, padding: 1}}", (1, 9, 9)) == (1, 3, 3)


def test_avgpool_count_include_pad_option():
    on = net_of("avgpool2d: {kernel_size: 3, padding: 1}", (1, 6, 6)).layers[0]
    off = net_of("avgpool2d: {kernel_size: 3, padding: 1, count_include_pad: false}", (1, 6, 6)).layers[0]
    assert on.opts["count_include_pad"] is True and off.opts["count_include_pad"] is False
    assert on.out_shape == off.out_shape == (1, 2, 2)
    assert on.kind.render_context(on)["count_include_pad"] is True
    assert off.kind.render_context(off)["count_include_pad"] is False


def test_pool_smaller_than_input():
    assert errors("maxpool2d: {kernel_size: 3}", (1, 2, 2)) == [
        "maxpool2d 'pool1': input 2x2 is smaller than kernel 3x3"]


# ---- flatten, linear --------------------------------------------------------------------------
def test_flatten_is_c_times_h_times_w():
    assert shape("flatten", (16, 5, 5)) == (400,)
    assert shape("flatten", (10, 2, 2)) == (40,)


def test_linear_on_3d_input_says_flatten():
    (msg,) = errors("linear: {out_features: 10}", (16, 5, 5))
    assert "flatten" in msg
    assert msg == ("linear 'fc1': input is 16x5x5 (3-D); a linear layer needs a 1-D input: "
                   "add '- flatten' before it (it would give 400 features)")


def test_in_features_mismatch():
    assert errors("linear: {out_features: 10, in_features: 399}", (400,)) == [
        "linear 'fc1': in_features is 399 but the input has 400 features"]
    assert shape("linear: {out_features: 10, in_features: 400}", (400,)) == (10,)


# ---- parameters, buffers, MACs --------------------------------------------------------------
LENET_PARAMS = {"conv1": 1 * 25 * 6 + 6, "conv2": 6 * 25 * 16 + 16, "fc1": 400 * 120 + 120,
                "fc2": 120 * 84 + 84, "fc3": 84 * 10 + 10}


def test_lenet5_layers_params_and_shapes():
    net = load(ROOT / "specs/lenet5.yaml")
    assert [(l.name, l.out_shape) for l in net.layers] == [
        ("conv1", (6, 28, 28)), ("relu1", (6, 28, 28)), ("pool1", (6, 14, 14)), ("conv2", (16, 10, 10)),
        ("relu2", (16, 10, 10)), ("pool2", (16, 5, 5)), ("flatten1", (400,)), ("fc1", (120,)),
        ("relu3", (120,)), ("fc2", (84,)), ("relu4", (84,)), ("fc3", (10,))]
    assert {l.name: l.params for l in net.layers if l.params} == LENET_PARAMS == {
        "conv1": 156, "conv2": 2416, "fc1": 48120, "fc2": 10164, "fc3": 850}
    assert net.total_params == 61706
    assert net.param_shapes() == {
        "conv1.weight": (6, 1, 5, 5), "conv1.bias": (6,), "conv2.weight": (16, 6, 5, 5), "conv2.bias": (16,),
        "fc1.weight": (120, 400), "fc1.bias": (120,), "fc2.weight": (84, 120), "fc2.bias": (84,),
        "fc3.weight": (10, 84), "fc3.bias": (10,)}
    assert [l.kind.macs(l) for l in net.layers if l.kind.macs(l)] == [117600, 240000, 48000, 10080, 840]


@pytest.mark.parametrize("spec, total, output", [
    ("lenet5", 61706, (10,)),
    ("lenet5_nobias", 61684, (10,)),
    ("alphabet", 137178, (26,)),
    ("cifar", 2596, (10,)),
    ("fashion_convnet", 135562, (10,)),
])
def test_spec_totals(spec, total, output):
    net = load(ROOT / f"specs/{spec}.yaml")
    assert net.total_params == total
    assert net.output_shape == output
    assert net.name == spec


def test_alphabet_shapes_follow_the_seed():
    net = load(ROOT / "specs/alphabet.yaml")
    assert [l.out_shape for l in net.layers if l.kind.kind == "maxpool2d"] == [(32, 13, 13), (64, 6, 6),
                                                                               (128, 2, 2)]


def test_batchnorm_running_stats_are_buffers_not_params():
    net = load(ROOT / "specs/cifar.yaml")
    bn = [l for l in net.layers if l.kind.kind == "batchnorm2d"]
    assert [l.name for l in bn] == ["bn1", "bn2"]
    assert [l.params for l in bn] == [10, 14]
    assert net.buffer_shapes() == {"bn1.running_mean": (5,), "bn1.running_var": (5,),
                                   "bn2.running_mean": (7,), "bn2.running_var": (7,)}
    assert not any("running" in k for k in net.param_shapes())
    assert net.total_params == 245 + 10 + 567 + 14 + 1760


def test_batchnorm_needs_3d_input():
    assert errors("batchnorm2d", (8,)) == ["batchnorm2d 'bn1': needs a 3-D input (channels, height, width), got 8"]


def test_bias_false_removes_bias():
    layer = net_of("conv2d: {out_channels: 6, kernel_size: 5, bias: false}", (1, 28, 28)).layers[0]
    assert layer.param_shapes() == {"weight": (6, 1, 5, 5)}
    assert layer.params == 150
    fc = net_of("linear: {out_features: 3, bias: false}", (4,)).layers[0]
    assert fc.params == 12


# ---- names, defaults, expect ------------------------------------------------------------------
def test_automatic_names_count_per_prefix():
    net = net_of("conv2d: {out_channels: 2, kernel_size: 3}\nrelu\nmaxpool2d: {kernel_size: 2}\n"
                 "conv2d: {out_channels: 2, kernel_size: 1}\nrelu\navgpool2d: {kernel_size: 1}\nflatten\n"
                 "linear: {out_features: 3}\ndropout\nlinear: {out_features: 2, name: head}", (1, 8, 8))
    assert [l.name for l in net.layers] == ["conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "flatten1",
                                            "fc1", "dropout1", "head"]


def test_defaults_are_pytorch_defaults():
    conv = net_of("conv2d: {out_channels: 2, kernel_size: 3}", (1, 8, 8)).layers[0]
    assert conv.opts == {"out_channels": 2, "kernel_size": (3, 3), "stride": (1, 1), "padding": (0, 0),
                         "dilation": (1, 1), "groups": 1, "bias": True, "in_channels": None}
    bn = net_of("batchnorm2d", (2, 3, 3)).layers[0]
    assert bn.opts == {"eps": 1e-5, "momentum": 0.1}
    assert net_of("leaky_relu", (3,)).layers[0].opts == {"negative_slope": 0.01}
    assert net_of("dropout", (3,)).layers[0].opts == {"p": 0.5}


def test_expect_matching_passes_and_mismatch_fails():
    assert shape("conv2d: {out_channels: 4, kernel_size: 3, expect: [4, 6, 6]}", (1, 8, 8)) == (4, 6, 6)
    assert errors("conv2d: {out_channels: 4, kernel_size: 3, expect: [4, 5, 5]}", (1, 8, 8)) == [
        "conv2d 'conv1': expected output 4x5x5, but it is 4x6x6 (from input 1x8x8)"]


def test_cifar_first_flattens_to_40_not_10():
    with pytest.raises(SpecErrors) as exc:
        load(ROOT / "tests/specs/cifar_first.yaml")
    (d,) = exc.value.diagnostics
    assert "expected output 10, but it is 40" in d.message
    assert d.line == 9


def test_errors_carry_file_line_and_column():
    with pytest.raises(SpecErrors) as exc:
        check_text("input: [1, 8, 8]\nlayers:\n  - conv2d: {out_channels: 2, kernel_size: 9}\n  - flatten\n"
                   "loss: mse\n", "nets/x.yaml")
    (d,) = exc.value.diagnostics
    assert (d.file, d.line, d.col, d.severity) == ("nets/x.yaml", 3, 5, "error")
    assert str(exc.value) == f"nets/x.yaml:3:5: error: {d.message}"


def test_cross_entropy_needs_1d_logits():
    assert errors("relu", (1, 4, 4), loss="cross_entropy") == [
        "loss cross_entropy needs 1-D logits, but the last layer relu 'relu1' outputs 1x4x4: "
        "add flatten and/or linear layers"]
    assert errors("linear: {out_features: 1}", (4,), loss="cross_entropy") == [
        "loss cross_entropy needs at least 2 classes, the last layer outputs 1"]


def test_network_name_defaults_to_file_stem():
    net = check_text("input: [4]\nlayers: [relu]\nloss: mse\n", "some/dir/my-net.yaml")
    assert net.name == "my_net"


def test_train_section_overrides():
    net = check_text("input: [4]\nlayers: [relu]\nloss: mse\ntrain: {epochs: 3, lr: 0.1, optimizer: sgd}\n")
    assert net.train == {"epochs": 3, "lr": 0.1, "optimizer": "sgd"}


@pytest.mark.parametrize("text", [
    "a: &x\n  - 1\n  - *x\n",                                          # recursive alias
    "input: " + "[" * 1000 + "]" * 1000 + "\n",                        # deep nesting
    "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(               # "billion laughs": 10^9 values
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9)),
], ids=["recursive_alias", "deep_nesting", "billion_laughs"])
def test_hostile_yaml_is_refused_quickly(text):
    with pytest.raises(SpecErrors):
        check_text(text, "t.yaml")
