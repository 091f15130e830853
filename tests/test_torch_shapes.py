"""Every layer kind and option against PyTorch: output shape, parameter count and MACs.

Each case is a one-layer spec checked by `check_text`; the layer's own `torch_module`
runs a zero tensor of the input shape, and PyTorch's output shape, parameter count and
weight shape are the reference.  MACs are recomputed here from torch's weight and output
shapes (conv: output elements * weight.shape[1] * kh * kw; linear: in * out), never with
the code under test.
"""
from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from netcompiler.check import check_text, load  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "specs").glob("*.yaml"))


def one_layer(layer: str, input_shape: list[int]):
    net = check_text(f"input: {input_shape}\nlayers:\n  - {layer}\nloss: mse\n", "case.yaml")
    assert len(net.layers) == 1
    return net.layers[0]


def torch_macs(module, out: "torch.Tensor") -> int:
    """MACs per sample from torch's own shapes."""
    if isinstance(module, nn.Conv2d):
        _, cin_per_group, kh, kw = module.weight.shape
        return out[0].numel() * cin_per_group * kh * kw
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features
    return 0


# (spec line, input shape, expected output shape written by hand)
CASES = [
    # conv2d: kernel, stride, padding (int, pair, same, valid), dilation, groups, bias
    ("conv2d: {out_channels: 6, kernel_size: 5}", [1, 28, 28], (6, 24, 24)),
    ("conv2d: {out_channels: 6, kernel_size: 5, padding: 2}", [1, 28, 28], (6, 28, 28)),
    ("conv2d: {out_channels: 4, kernel_size: [3, 5]}", [2, 9, 11], (4, 7, 7)),
    ("conv2d: {out_channels: 8, kernel_size: 3, stride: 2, padding: 1}", [3, 32, 32], (8, 16, 16)),
    ("conv2d: {out_channels: 4, kernel_size: [3, 5], stride: [2, 3]}", [2, 9, 11], (4, 4, 3)),
    ("conv2d: {out_channels: 5, kernel_size: 4, stride: 2}", [3, 32, 32], (5, 15, 15)),
    ("conv2d: {out_channels: 3, kernel_size: 3, padding: [1, 2]}", [2, 5, 5], (3, 5, 7)),
    ("conv2d: {out_channels: 3, kernel_size: 3, padding: same}", [2, 7, 7], (3, 7, 7)),
    ("conv2d: {out_channels: 3, kernel_size: 4, padding: same}", [2, 7, 7], (3, 7, 7)),
    ("conv2d: {out_channels: 3, kernel_size: [2, 5], padding: same}", [2, 6, 9], (3, 6, 9)),
    ("conv2d: {out_channels: 3, kernel_size: 4, padding: same, dilation: 3}", [1, 12, 12], (3, 12, 12)),
    ("conv2d: {out_channels: 3, kernel_size: 3, padding: valid}", [2, 7, 7], (3, 5, 5)),
    ("conv2d: {out_channels: 2, kernel_size: 3, dilation: 2}", [1, 10, 10], (2, 6, 6)),
    ("conv2d: {out_channels: 2, kernel_size: 3, dilation: [2, 3], padding: 1}", [1, 12, 12], (2, 10, 8)),
    ("conv2d: {out_channels: 6, kernel_size: 3, groups: 2}", [4, 8, 8], (6, 6, 6)),
    ("conv2d: {out_channels: 8, kernel_size: 3, groups: 4, padding: 1}", [4, 8, 8], (8, 8, 8)),
    ("conv2d: {out_channels: 6, kernel_size: 5, bias: false}", [1, 28, 28], (6, 24, 24)),
    ("conv2d: {out_channels: 6, kernel_size: 3, stride: 2, padding: 2, dilation: 2, groups: 3, bias: false}",
     [3, 15, 13], (6, 8, 7)),
    ("conv2d: {out_channels: 4, kernel_size: 1, in_channels: 3}", [3, 5, 5], (4, 5, 5)),
    ("conv2d: {out_channels: 4, kernel_size: 8}", [1, 8, 8], (4, 1, 1)),
    # explicit padding [top, bottom, left, right]: TensorFlow 'SAME' with stride 2 (32 -> 16), lopsided
    ("conv2d: {out_channels: 16, kernel_size: 3, stride: 2, padding: [0, 1, 0, 1]}", [3, 32, 32], (16, 16, 16)),
    ("conv2d: {out_channels: 2, kernel_size: [3, 2], padding: [2, 0, 0, 3]}", [1, 5, 5], (2, 5, 7)),
    # maxpool2d: stride default, explicit stride, padding, dilation, ceil_mode
    ("maxpool2d: {kernel_size: 2}", [6, 28, 28], (6, 14, 14)),
    ("maxpool2d: {kernel_size: 2}", [6, 11, 11], (6, 5, 5)),
    ("maxpool2d: {kernel_size: 2, ceil_mode: true}", [6, 11, 11], (6, 6, 6)),
    ("maxpool2d: {kernel_size: 2, stride: 2, padding: 1, ceil_mode: true}", [1, 3, 3], (1, 2, 2)),
    ("maxpool2d: {kernel_size: 3, stride: 2, ceil_mode: true}", [1, 6, 6], (1, 3, 3)),
    ("maxpool2d: {kernel_size: 2, stride: 3, ceil_mode: true}", [1, 4, 7], (1, 2, 3)),
    ("maxpool2d: {kernel_size: 3, stride: 2, padding: 1}", [2, 7, 8], (2, 4, 4)),
    ("maxpool2d: {kernel_size: 2, stride: 1}", [5, 15, 15], (5, 14, 14)),
    ("maxpool2d: {kernel_size: [2, 3], stride: [1, 2]}", [1, 6, 9], (1, 5, 4)),
    ("maxpool2d: {kernel_size: 2, dilation: 2, stride: 1, padding: 1}", [1, 8, 8], (1, 8, 8)),
    ("maxpool2d: {kernel_size: 3, dilation: 2, stride: 2, ceil_mode: true}", [1, 10, 10], (1, 4, 4)),
    ("maxpool2d: {kernel_size: 2, padding: [0, 1, 0, 1]}", [2, 7, 7], (2, 4, 4)),
    ("maxpool2d: {kernel_size: 3, stride: 2, padding: [1, 0, 0, 1], dilation: [1, 2]}", [1, 8, 9], (1, 4, 3)),
    # avgpool2d: padding, ceil_mode, count_include_pad
    ("avgpool2d: {kernel_size: 2}", [3, 8, 8], (3, 4, 4)),
    ("avgpool2d: {kernel_size: 3, stride: 2, padding: 1}", [3, 8, 8], (3, 4, 4)),
    ("avgpool2d: {kernel_size: 3, stride: 2, padding: 1, count_include_pad: false}", [3, 8, 8], (3, 4, 4)),
    ("avgpool2d: {kernel_size: 2, ceil_mode: true}", [3, 11, 11], (3, 6, 6)),
    ("avgpool2d: {kernel_size: 2, stride: 2, padding: 1, ceil_mode: true, count_include_pad: false}",
     [1, 3, 3], (1, 2, 2)),
    # adaptive_avgpool2d (even, uneven, larger than the input), global_avgpool2d
    ("adaptive_avgpool2d: {output_size: 2}", [3, 8, 8], (3, 2, 2)),
    ("adaptive_avgpool2d: {output_size: [3, 4]}", [2, 7, 6], (2, 3, 4)),
    ("adaptive_avgpool2d: {output_size: [5, 8]}", [1, 3, 6], (1, 5, 8)),
    ("global_avgpool2d", [16, 8, 8], (16, 1, 1)),
    ("global_avgpool2d", [3, 1, 5], (3, 1, 1)),
    ("avgpool2d: {kernel_size: 3, stride: 2, padding: [0, 1, 0, 1], count_include_pad: false}", [3, 8, 8],
     (3, 4, 4)),
    # linear, flatten
    ("linear: {out_features: 10}", [20], (10,)),
    ("linear: {out_features: 10, bias: false}", [20], (10,)),
    ("linear: {out_features: 120, in_features: 400}", [400], (120,)),
    ("flatten", [16, 5, 5], (400,)),
    ("flatten", [7], (7,)),
    # activations (3-D and 1-D), with their options
    ("relu", [2, 3, 4], (2, 3, 4)),
    ("relu", [5], (5,)),
    ("leaky_relu", [2, 3, 4], (2, 3, 4)),
    ("leaky_relu: {negative_slope: 0.2}", [5], (5,)),
    ("gelu", [2, 3, 4], (2, 3, 4)),
    ("gelu: {approximate: tanh}", [5], (5,)),
    ("tanh", [2, 3, 4], (2, 3, 4)),
    ("sigmoid", [5], (5,)),
    ("relu6", [2, 3, 4], (2, 3, 4)),
    ("hardswish", [5], (5,)),
    ("silu", [2, 3, 4], (2, 3, 4)),
    # batchnorm2d, dropout
    ("batchnorm2d", [5, 15, 15], (5, 15, 15)),
    ("batchnorm2d: {eps: 0.001, momentum: 0.2}", [3, 4, 4], (3, 4, 4)),
    ("batchnorm1d", [7], (7,)),
    ("batchnorm1d: {eps: 0.001, momentum: 0.2}", [3], (3,)),
    ("dropout", [10], (10,)),
    ("upsample: {scale_factor: 2}", [3, 4, 5], (3, 8, 10)),
    ("upsample: {scale_factor: [1, 3], mode: nearest}", [2, 3, 2], (2, 3, 6)),
    ("dropout: {p: 0.3}", [2, 3, 3], (2, 3, 3)),
    ("dropout: {p: 0}", [4], (4,)),
]


@pytest.mark.parametrize("spec_line, input_shape, expected", CASES, ids=[f"{c[0]} on {c[1]}" for c in CASES])
def test_layer_matches_torch(spec_line, input_shape, expected):
    layer = one_layer(spec_line, input_shape)
    assert layer.out_shape == expected  # hand-derived
    module = layer.kind.torch_module(layer).eval()
    with torch.no_grad():
        out = module(torch.zeros(1, *input_shape))
    assert tuple(out.shape[1:]) == layer.out_shape
    torch_params = {k: tuple(p.shape) for k, p in module.named_parameters()}
    assert torch_params == layer.param_shapes()
    assert sum(p.numel() for p in module.parameters()) == layer.params
    assert layer.kind.macs(layer) == torch_macs(module, out)


# Options must reach the torch module (else the shape tests above prove nothing about them).
@pytest.mark.parametrize("spec_line, input_shape, attrs", [
    ("conv2d: {out_channels: 6, kernel_size: 3, stride: 2, padding: 2, dilation: 2, groups: 3, bias: false}",
     [3, 15, 13], dict(stride=(2, 2), padding=(2, 2), dilation=(2, 2), groups=3, bias=None, kernel_size=(3, 3))),
    ("conv2d: {out_channels: 3, kernel_size: 4, padding: same}", [2, 7, 7], dict(padding="same")),
    ("maxpool2d: {kernel_size: 3, stride: 2, padding: 1, dilation: 2, ceil_mode: true}", [1, 9, 9],
     dict(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(2, 2), ceil_mode=True)),
    ("avgpool2d: {kernel_size: 3, stride: 2, padding: 1, ceil_mode: true, count_include_pad: false}", [1, 9, 9],
     dict(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), ceil_mode=True, count_include_pad=False)),
    ("avgpool2d: {kernel_size: 2}", [1, 4, 4], dict(count_include_pad=True, ceil_mode=False)),
    ("leaky_relu: {negative_slope: 0.2}", [3], dict(negative_slope=0.2)),
    ("leaky_relu", [3], dict(negative_slope=0.01)),
    ("gelu: {approximate: tanh}", [3], dict(approximate="tanh")),
    ("gelu", [3], dict(approximate="none")),
    ("dropout: {p: 0.3}", [3], dict(p=0.3)),
    ("dropout", [3], dict(p=0.5)),
    ("batchnorm2d: {eps: 0.001, momentum: 0.2}", [3, 2, 2], dict(eps=0.001, momentum=0.2)),
    ("batchnorm2d", [3, 2, 2], dict(eps=1e-5, momentum=0.1)),
    ("batchnorm1d: {eps: 0.001, momentum: 0.2}", [3], dict(eps=0.001, momentum=0.2)),
    ("linear: {out_features: 4, bias: false}", [3], dict(bias=None)),
])
def test_options_reach_torch_module(spec_line, input_shape, attrs):
    layer = one_layer(spec_line, input_shape)
    module = layer.kind.torch_module(layer)
    for name, want in attrs.items():
        got = getattr(module, name)
        if isinstance(want, tuple) and isinstance(got, int):
            got = (got, got)
        assert got == want, name


@pytest.mark.parametrize("kernel, dilation", [(2, 1), (4, 1), ([2, 5], 1), (4, 3), (3, 2)])
def test_same_padding_matches_torch_values(kernel, dilation):
    """'same' with an even kernel pads asymmetrically, the extra pixel bottom/right as in
    PyTorch: the derived pads, applied explicitly, reproduce torch's 'same' output."""
    layer = one_layer(f"conv2d: {{out_channels: 2, kernel_size: {kernel}, padding: same, dilation: {dilation}}}",
                      [2, 7, 9])
    (top, bottom), (left, right) = layer.derived["pads"]
    torch.manual_seed(0)
    conv = layer.kind.torch_module(layer)
    x = torch.randn(1, 2, 7, 9)
    with torch.no_grad():
        want = conv(x)
        padded = nn.functional.pad(x, (left, right, top, bottom))
        got = nn.functional.conv2d(padded, conv.weight, conv.bias, dilation=dilation)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-6)
    assert (layer.derived["pad_top"], layer.derived["pad_left"]) == (top, left)


def test_adaptive_bins_are_pytorchs():
    """Bins [floor(i * In / Out), ceil((i + 1) * In / Out)), worked out by hand."""
    from netcompiler.layers.adaptive_pool import adaptive_bins

    assert adaptive_bins(7, 3) == [(0, 3), (2, 5), (4, 7)]  # uneven and overlapping
    assert adaptive_bins(8, 2) == [(0, 4), (4, 8)]
    assert adaptive_bins(3, 5) == [(0, 1), (0, 2), (1, 2), (1, 3), (2, 3)]  # more outputs than inputs
    assert adaptive_bins(5, 1) == [(0, 5)]


def test_adaptive_pool_flops_follow_the_avgpool_convention():
    """Forward: one add or division per input element of each output's window; backward: that
    plus one division per output.  [2, 7, 6] -> [3, 4]: row bins 3, 3, 3 (sum 9), column bins
    [0, 2), [1, 3), [3, 5), [4, 6) (sum 8): 2 * 9 * 8 = 144; 24 outputs."""
    layer = one_layer("adaptive_avgpool2d: {output_size: [3, 4]}", [2, 7, 6])
    assert layer.kind.flops(layer) == (144, 144 + 24)
    glob = one_layer("global_avgpool2d", [16, 8, 8])
    assert glob.kind.flops(glob) == (16 * 64, 16 * 64 + 16) and glob.params == 0


def test_flatten_after_global_pool_gives_channels():
    net = check_text("input: [5, 4, 3]\nlayers:\n  - global_avgpool2d\n  - flatten\nloss: mse\n")
    assert net.output_shape == (5,)


def test_upsample_flops():
    """Forward copies (0 FLOPs); backward adds each input pixel's 2 x 3 output gradients: 5 adds."""
    layer = one_layer("upsample: {scale_factor: [2, 3]}", [2, 3, 4])
    assert layer.kind.flops(layer) == (0, 2 * 3 * 4 * 5)


@pytest.mark.parametrize("size, kernel, stride", [(32, 3, 2), (7, 2, 2), (8, 3, 2), (9, 3, 2), (5, 4, 1),
                                                 (10, 1, 3)])
def test_tensorflow_same_padding(size, kernel, stride):
    """TensorFlow's 'SAME': output ceil(size / stride), total padding max((out - 1) * stride +
    kernel - size, 0), the odd pixel at the bottom/right.  Written as [top, bottom, left, right],
    conv2d and both pools give that output size, and the torch twins the values of F.pad then
    the layer with padding 0."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    pad = [total // 2, total - total // 2] * 2
    x = torch.randn(1, 2, size, size, generator=torch.Generator().manual_seed(size))
    padded = nn.functional.pad(x, (pad[2], pad[3], pad[0], pad[1]))
    for line in (f"conv2d: {{out_channels: 3, kernel_size: {kernel}, stride: {stride}, padding: {pad}}}",
                 f"maxpool2d: {{kernel_size: {kernel}, stride: {stride}, padding: {pad}}}",
                 f"avgpool2d: {{kernel_size: {kernel}, stride: {stride}, padding: {pad}}}"):
        if "pool" in line and max(pad) > kernel // 2:
            continue
        layer = one_layer(line, [2, size, size])
        assert layer.out_shape[1:] == (out, out), line
        module = layer.kind.torch_module(layer)
        with torch.no_grad():
            got = module(x)
            if line.startswith("conv2d"):
                want = nn.functional.conv2d(padded, module.weight, module.bias, stride=stride)
            elif line.startswith("maxpool2d"):
                want = nn.functional.max_pool2d(nn.functional.pad(x, (pad[2], pad[3], pad[0], pad[1]),
                                                                  value=-float("inf")), kernel, stride)
            else:
                want = nn.functional.avg_pool2d(padded, kernel, stride)
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-6), line


def test_avgpool_explicit_padding_count_include_pad():
    """count_include_pad with padding [top, bottom, left, right]: true divides a corner window by
    the whole kernel; false by its input elements only (TensorFlow's 'SAME' average)."""
    x = torch.ones(1, 1, 4, 4)
    for include, corner in ((True, 4 / 9), (False, 1.0)):
        layer = one_layer(f"avgpool2d: {{kernel_size: 3, stride: 2, padding: [0, 1, 0, 1], "
                          f"count_include_pad: {str(include).lower()}}}", [1, 4, 4])
        out = layer.kind.torch_module(layer)(x)
        assert out.shape == (1, 1, 2, 2)
        assert out[0, 0, 1, 1].item() == pytest.approx(corner)  # rows 2..4 and columns 2..4: 4 inputs
        assert out[0, 0, 0, 0].item() == pytest.approx(1.0)  # a window of inputs only


def test_avgpool_count_include_pad_changes_values():
    """The option is not only passed: it changes the border averages as in PyTorch."""
    with_pad = one_layer("avgpool2d: {kernel_size: 3, stride: 1, padding: 1}", [1, 3, 3])
    without = one_layer("avgpool2d: {kernel_size: 3, stride: 1, padding: 1, count_include_pad: false}", [1, 3, 3])
    x = torch.ones(1, 1, 3, 3)
    a = with_pad.kind.torch_module(with_pad)(x)
    b = without.kind.torch_module(without)(x)
    assert a[0, 0, 0, 0].item() == pytest.approx(4 / 9)
    assert b[0, 0, 0, 0].item() == pytest.approx(1.0)


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_whole_spec_matches_torch(path):
    """Each layer's torch module, run on the tensors the layer reads (a graph: by name)."""
    net = load(path)
    modules = [l.kind.torch_module(l).eval() for l in net.layers]
    assert sum(p.numel() for m in modules for p in m.parameters()) == net.total_params
    # shapes and MACs of the whole network from torch's shapes, layer by layer
    env, macs = {"input": torch.zeros(2, *net.input_shape)}, 0
    with torch.no_grad():
        for layer, module in zip(net.layers, modules):
            x = env[layer.output] = module(*[env[t] for t in layer.inputs])
            assert tuple(x.shape[1:]) == layer.out_shape, layer.name
            macs += torch_macs(module, x)
    assert tuple(x.shape) == (2, *net.output_shape)
    assert macs == sum(l.kind.macs(l) for l in net.layers)


def test_batchnorm_buffers_match_torch():
    layer = one_layer("batchnorm2d", [5, 4, 4])
    bn = layer.kind.torch_module(layer)
    assert layer.params == 10  # weight and bias only
    torch_buffers = {k: tuple(b.shape) for k, b in bn.named_buffers() if k != "num_batches_tracked"}
    assert torch_buffers == layer.buffer_shapes() == {"running_mean": (5,), "running_var": (5,)}


# ---- former disagreements with PyTorch, now fixed in netcompiler/layers ----

def test_ceil_mode_window_larger_than_input():
    layer = one_layer("maxpool2d: {kernel_size: 2, ceil_mode: true}", [1, 1, 1])
    out = layer.kind.torch_module(layer)(torch.zeros(1, 1, 1, 1))
    assert tuple(out.shape[1:]) == layer.out_shape == (1, 1, 1)


def test_maxpool_padding_limit_ignores_dilation():
    from netcompiler.errors import SpecErrors

    with pytest.raises(RuntimeError):
        nn.MaxPool2d(3, 1, 2, dilation=2)(torch.zeros(1, 1, 8, 8))
    with pytest.raises(SpecErrors, match="more than half the kernel"):
        one_layer("maxpool2d: {kernel_size: 3, stride: 1, padding: 2, dilation: 2}", [1, 8, 8])
