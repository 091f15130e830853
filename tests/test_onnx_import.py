"""ONNX import: PyTorch models -> torch.onnx.export -> netc import -> the same network.

Each case is a PyTorch model (nn.Sequential with named modules, so ONNX initializers are
`conv1.weight`, ...) covering a set of layer kinds and options.  It is exported with the
TorchScript exporter (opset 17; the dynamo exporter needs onnxscript), imported, compiled,
and compared with the PyTorch model itself: evaluation forward (float64 rel 1e-9, float32
rel 1e-5) and training-mode loss and parameter gradients (float64 rel 1e-9, float32 rel
1e-4), names mapped one to one.  Hand-built ONNX graphs (MatMul + Add, Pad + Conv, shape
arithmetic, auto_pad) are compared with ONNX Runtime.
"""
from __future__ import annotations

import math
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, assert_close

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
nn = torch.nn
F = torch.nn.functional

import netcompiler as nc  # noqa: E402
from netcompiler import onnx_import  # noqa: E402
from netcompiler.onnx_import import OnnxImportError, import_onnx  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning",
                                        "ignore::torch.jit.TracerWarning")


class Reshape(nn.Module):
    """x.reshape(x.shape[0], -1): Shape/Gather/Unsqueeze/Concat feeding Reshape in ONNX."""

    def forward(self, x):
        return x.reshape(x.shape[0], -1)


def seq(**modules) -> nn.Sequential:
    return nn.Sequential(OrderedDict(modules))


# name -> (model builder, sample shape); together every layer kind and option on main
CASES = {
    "convs_pools": (lambda: seq(
        conv1=nn.Conv2d(1, 4, 3, padding=1), relu1=nn.ReLU(), pool1=nn.MaxPool2d(2, ceil_mode=True),
        conv2=nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0)), lrelu=nn.LeakyReLU(0.2),
        pool2=nn.AvgPool2d(3, 1, 1, count_include_pad=False), flat=nn.Flatten(),
        fc1=nn.Linear(6 * 3 * 3, 8), gelu1=nn.GELU(), fc2=nn.Linear(8, 5, bias=False)), (1, 9, 8)),
    "depthwise_bn": (lambda: seq(
        conv1=nn.Conv2d(2, 4, 3, padding="same", bias=False), tanh1=nn.Tanh(),
        conv2=nn.Conv2d(4, 4, 3, groups=4, dilation=2, padding=2), sig=nn.Sigmoid(),
        pool1=nn.MaxPool2d(3, 2, 1), relu1=nn.ReLU(), bn1=nn.BatchNorm2d(4, eps=1e-3, momentum=0.2),
        pool2=nn.AvgPool2d(2, ceil_mode=True), flat=Reshape(), fc1=nn.Linear(4 * 2 * 2, 6),
        gelu=nn.GELU(approximate="tanh"), fc2=nn.Linear(6, 3)), (2, 8, 8)),
    "same_even_dilated_pool": (lambda: seq(
        conv1=nn.Conv2d(1, 3, 4, padding="same"), pool1=nn.MaxPool2d(2, 1, dilation=2),
        pool2=nn.AvgPool2d(3, 2, 1), bn=nn.BatchNorm2d(3), flat=nn.Flatten(), fc=nn.Linear(3 * 4 * 4, 4)), (1, 10, 10)),
    "bn_first_dropout": (lambda: seq(
        bn1=nn.BatchNorm2d(3), conv1=nn.Conv2d(3, 5, 2, stride=2, dilation=1, groups=1), drop=nn.Dropout(0.3),
        relu=nn.ReLU(), flat=nn.Flatten(), fc=nn.Linear(5 * 2 * 2, 3), soft=nn.LogSoftmax(1)), (3, 5, 5)),
    "newer_kinds": (lambda: seq(
        conv1=nn.Conv2d(2, 4, 3, padding=1), act1=nn.ReLU6(), up=nn.Upsample(scale_factor=(2, 3), mode="nearest"),
        act2=nn.Hardswish(), pool1=nn.MaxPool2d(2), act3=nn.SiLU(), pool2=nn.AdaptiveAvgPool2d(1),
        flat=nn.Flatten(), bn=nn.BatchNorm1d(4, eps=1e-3, momentum=0.3), fc=nn.Linear(4, 3)), (2, 5, 4)),
    "mlp": (lambda: seq(fc1=nn.Linear(6, 7), act1=nn.LeakyReLU(), fc2=nn.Linear(7, 5), act2=nn.Sigmoid(),
                        fc3=nn.Linear(5, 4), soft=nn.Softmax(1)), (6,)),
}
DROPPED = {"soft"}  # trailing softmax: dropped by the import, so left out of the comparison


def export(model: nn.Module, shape, path: Path, dtype=torch.float64) -> Path:
    model = model.to(dtype).eval()
    torch.onnx.export(model, torch.zeros((1, *shape), dtype=dtype), str(path), opset_version=17, dynamo=False,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    return path


def randomized(builder, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    model = builder()
    with torch.no_grad():  # batch-norm statistics that are not the identity
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2)
    return model


def compiled(imported, dtype: str):
    net = nc.compile(imported.network, dtype=dtype, threads=1)
    net.load_state_dict(imported.state)
    return net


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_pytorch_round_trip(case, dtype, tmp_path):
    builder, shape = CASES[case]
    tdtype = torch.float64 if dtype == "float64" else torch.float32
    model = randomized(builder).to(tdtype)
    imported = import_onnx(export(model, shape, tmp_path / f"{case}.onnx", tdtype))
    net = compiled(imported, dtype)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, *shape))
    model.eval()
    with torch.no_grad():
        want = model[:-1] if list(model._modules)[-1] in DROPPED else model
        expected = want(torch.as_tensor(x, dtype=tdtype)).numpy()
    assert_close(net.forward(x), expected, 1e-9 if dtype == "float64" else 1e-5, what=f"{case} forward")

    # training mode: batch statistics in batch norm; PyTorch's dropout stays off (the import drops it)
    want.train()
    for m in want.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    y = rng.integers(0, net.network.num_classes, 4)
    out = want(torch.as_tensor(x, dtype=tdtype))
    loss = F.cross_entropy(out, torch.as_tensor(y)) if net.network.loss == "cross_entropy" else None
    loss.backward()
    got_loss, grads = net.loss_and_grad(x, y)
    rtol = 1e-9 if dtype == "float64" else 1e-4
    assert_close(got_loss, float(loss), rtol, what=f"{case} loss")
    torch_grads = {k: p.grad.numpy() for k, p in want.named_parameters()}
    assert set(grads) == set(torch_grads), sorted(set(grads) ^ set(torch_grads))
    for k, g in grads.items():
        assert_close(g, torch_grads[k], rtol, what=f"{case} {k}")


def test_round_trip_spec_is_readable(tmp_path):
    imported = import_onnx(export(randomized(CASES["convs_pools"][0]), (1, 9, 8), tmp_path / "cp.onnx"))
    # names from the modules; options PyTorch's, defaults left out; Flatten and GELU's Erf pattern recognised
    assert imported.spec.splitlines()[1:] == [
        "name: cp",
        "input: [1, 9, 8]",
        "layers:",
        "  - conv2d: {out_channels: 4, kernel_size: 3, padding: 1}",
        "  - relu",
        "  - maxpool2d: {kernel_size: 2, ceil_mode: true}",
        "  - conv2d: {out_channels: 6, kernel_size: [3, 2], stride: [2, 1], padding: [1, 0]}",
        "  - leaky_relu: {name: lrelu, negative_slope: 0.2}",
        "  - avgpool2d: {kernel_size: 3, stride: 1, padding: 1, count_include_pad: false}",
        "  - flatten: {name: flat}",
        "  - linear: {out_features: 8}",
        "  - gelu",
        "  - linear: {out_features: 5, bias: false}",
        "loss: cross_entropy",
    ]
    assert [l.name for l in imported.network.layers] == ["conv1", "relu1", "pool1", "conv2", "lrelu", "pool2",
                                                         "flat", "fc1", "gelu1", "fc2"]


def test_notes_for_dropped_nodes(tmp_path):
    imported = import_onnx(export(randomized(CASES["mlp"][0]), (6,), tmp_path / "mlp.onnx"))
    assert any("Softmax" in n and "dropped" in n for n in imported.notes)
    assert imported.network.loss == "cross_entropy"


# ---- hand-built graphs, against ONNX Runtime ------------------------------------------------------
def make_model(nodes, inits: dict, in_shape, out_shape, opset=17, check=True):
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *in_shape])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", *out_shape])],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) if np.asarray(v).dtype.kind == "f"
         else numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    if check:
        onnx.checker.check_model(model)
    return model


def save(model, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def ort_run(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})[0]


def check_against_ort(model, tmp_path, shape, name="g"):
    path = save(model, tmp_path / f"{name}.onnx")
    imported = import_onnx(path)
    net = compiled(imported, "float32")
    x = np.random.default_rng(0).standard_normal((3, *shape)).astype(np.float32)
    assert_close(net.forward(x), ort_run(path, x), 1e-5, what=name)
    return imported


def H(op, ins, outs, name="", **attrs):
    from onnx import helper

    return helper.make_node(op, ins, outs if isinstance(outs, list) else [outs], name=name, **attrs)


def test_matmul_add_and_shape_arithmetic(tmp_path):
    rng = np.random.default_rng(0)
    nodes = [
        H("Shape", ["x"], "s"), H("Gather", ["s", "zero"], "n", axis=0), H("Unsqueeze", ["n", "ax0"], "n1"),
        H("Concat", ["n1", "minus1"], "target", axis=0), H("Reshape", ["x", "target"], "flat", name="flatten_x"),
        H("MatMul", ["flat", "W"], "mm", name="dense"), H("Add", ["mm", "b"], "h"),
        H("Relu", ["h"], "r"), H("MatMul", ["r", "W2"], "y", name="head"),
    ]
    inits = {"zero": np.array(0), "ax0": np.array([0]), "minus1": np.array([-1]),
             "W": rng.standard_normal((12, 5)), "b": rng.standard_normal(5), "W2": rng.standard_normal((5, 3))}
    imported = check_against_ort(make_model(nodes, inits, (3, 2, 2), (3,)), tmp_path, (3, 2, 2))
    assert [(l.kind.kind, l.name) for l in imported.network.layers] == [
        ("flatten", "flatten_x"), ("linear", "dense"), ("relu", "relu1"), ("linear", "head")]
    assert imported.network.layers[3].opts["bias"] is False
    np.testing.assert_array_equal(imported.state["dense.weight"], inits["W"].astype(np.float32).T)


def test_more_shape_arithmetic(tmp_path):
    # target [N, C*H*W] from Shape -> Slice / ReduceProd / Cast / Squeeze / Unsqueeze / Concat
    nodes = [
        H("Shape", ["x"], "s"), H("Slice", ["s", "i0", "i1"], "n"), H("Slice", ["s", "i1", "i4"], "chw"),
        H("ReduceProd", ["chw"], "k", keepdims=1), H("Cast", ["k"], "kf", to=1), H("Cast", ["kf"], "k2", to=7),
        H("Squeeze", ["k2", "i0"], "k0"), H("Unsqueeze", ["k0", "i0"], "k1"), H("Concat", ["n", "k1"], "t", axis=0),
        H("Reshape", ["x", "t"], "f"), H("Gemm", ["f", "W"], "y", transB=1)]
    inits = {"i0": np.array([0]), "i1": np.array([1]), "i4": np.array([4]),
             "W": np.random.default_rng(0).standard_normal((3, 12))}
    imported = check_against_ort(make_model(nodes, inits, (3, 2, 2), (3,)), tmp_path, (3, 2, 2))
    assert [l.kind.kind for l in imported.network.layers] == ["flatten", "linear"]


def test_batch_dependent_reshape_is_refused(tmp_path):
    # [N*C, H*W] mixes samples: refused, naming the batch
    nodes = [H("Shape", ["x"], "s"), H("Slice", ["s", "i0", "i2"], "nc"), H("ReduceProd", ["nc"], "a", keepdims=1),
             H("Concat", ["a", "m1"], "t", axis=0), H("Reshape", ["x", "t"], "y", name="mix")]
    inits = {"i0": np.array([0]), "i2": np.array([2]), "m1": np.array([-1])}
    model = make_model(nodes, inits, (3, 2, 2), (4,))
    with pytest.raises(OnnxImportError, match="node 'mix' \\(Reshape\\): reshapes a batch of 2 samples of "
                                              "\\[3, 2, 2\\] to \\[6, -1\\], which does not keep the batch"):
        import_onnx(save(model, tmp_path / "m.onnx"))


def test_pad_folded_into_conv_and_auto_pad(tmp_path):
    rng = np.random.default_rng(0)
    nodes = [
        H("Pad", ["x", "pads"], "p", mode="constant"),
        H("Conv", ["p", "W", "B"], "c", name="c1", kernel_shape=[3, 3], pads=[0, 0, 0, 0]),
        H("Conv", ["c", "W2"], "c2", name="c2", auto_pad="SAME_LOWER", strides=[2, 2]),
        H("Gemm", ["flat", "G", "C"], "y", name="g1", transB=0, alpha=0.5, beta=2.0),
        H("Flatten", ["c2"], "flat", axis=1),
    ]
    nodes = nodes[:3] + [nodes[4], nodes[3]]
    inits = {"pads": np.array([0, 0, 2, 1, 0, 0, 2, 1]), "W": rng.standard_normal((4, 2, 3, 3)),
             "B": rng.standard_normal(4), "W2": rng.standard_normal((2, 4, 3, 3)),
             "G": rng.standard_normal((2 * 4 * 4, 3)), "C": rng.standard_normal((1, 3))}
    imported = check_against_ort(make_model(nodes, inits, (2, 5, 7), (3,)), tmp_path, (2, 5, 7))
    assert imported.network.layers[0].opts["padding"] == (2, 1)  # the Pad's, folded into the conv
    assert imported.network.layers[1].opts["padding"] == (1, 1)  # SAME_LOWER, stride 2, input 7x7: symmetric


def test_global_average_pool(tmp_path):
    rng = np.random.default_rng(0)
    nodes = [H("Conv", ["x", "W"], "c", kernel_shape=[1, 1]), H("GlobalAveragePool", ["c"], "g"),
             H("Flatten", ["g"], "f"), H("Gemm", ["f", "G"], "y", transB=1)]
    inits = {"W": rng.standard_normal((4, 2, 1, 1)), "G": rng.standard_normal((3, 4))}
    imported = check_against_ort(make_model(nodes, inits, (2, 5, 3), (3,)), tmp_path, (2, 5, 3))
    assert imported.network.layers[1].kind.kind == "global_avgpool2d"


def test_newer_kinds_spec_is_readable(tmp_path):
    imported = import_onnx(export(randomized(CASES["newer_kinds"][0]), (2, 5, 4), tmp_path / "nk.onnx"))
    # ReLU6's Clip, SiLU's Sigmoid + Mul, Upsample's Resize, BatchNorm1d on (features,)
    assert [(l.kind.kind, l.name) for l in imported.network.layers] == [
        ("conv2d", "conv1"), ("relu6", "act1"), ("upsample", "up"), ("hardswish", "act2"),
        ("maxpool2d", "pool1"), ("silu", "act3"), ("global_avgpool2d", "pool2"), ("flatten", "flat"),
        ("batchnorm1d", "bn"), ("linear", "fc")]
    assert "  - upsample: {name: up, scale_factor: [2, 3]}" in imported.spec.splitlines()


def test_resize_coordinate_modes(tmp_path):
    """Nearest Resize by 3 under each coordinate mode: imported where it copies each pixel to
    a 3x3 block (equal to ONNX Runtime), refused where it does not (align_corners)."""
    for coord, nearest, ok in (("asymmetric", "floor", True), ("half_pixel", "round_prefer_floor", True),
                               ("pytorch_half_pixel", "round_prefer_ceil", True), ("asymmetric", "ceil", False),
                               ("align_corners", "round_prefer_floor", False)):
        nodes = [H("Resize", ["x", "", "scales"], "y", name="r1", mode="nearest",
                   coordinate_transformation_mode=coord, nearest_mode=nearest)]
        model = make_model(nodes, {"scales": np.array([1, 1, 3, 3], np.float32)}, (2, 3, 4), (2, 9, 12))
        if ok:
            imported = check_against_ort(model, tmp_path, (2, 3, 4), f"{coord}_{nearest}")
            assert [l.kind.kind for l in imported.network.layers] == ["upsample"]
            continue
        with pytest.raises(OnnxImportError, match=f"node 'r1' .*coordinate_transformation_mode '{coord}' with "
                                                  f"nearest_mode '{nearest}' does not copy each input pixel"):
            import_onnx(save(model, tmp_path / "m.onnx"))


# ---- ONNX's own operator tests ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def node_cases():
    import warnings

    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {c.name: c for c in collect_testcases()}


# ONNX node tests whose first input is a single NCHW sample (or 1-D features) and whose other
# inputs are weights: each must import and match; the rest of their op's cases must be a
# clear OnnxImportError (asymmetric padding, 3-D pooling, padding over half the kernel as in
# test_maxpool_2d_pads, which PyTorch refuses too), never another exception
NODE_TESTS = {
    "Conv": ["test_basic_conv_with_padding", "test_basic_conv_without_padding", "test_conv_with_strides_padding",
             "test_conv_with_strides_no_padding", "test_conv_with_autopad_same"],
    "MaxPool": ["test_maxpool_2d_default", "test_maxpool_2d_strides",
                "test_maxpool_2d_precomputed_strides", "test_maxpool_2d_dilations", "test_maxpool_2d_ceil",
                "test_maxpool_2d_precomputed_pads"],
    "AveragePool": ["test_averagepool_2d_default", "test_averagepool_2d_strides",
                    "test_averagepool_2d_precomputed_strides",
                    "test_averagepool_2d_precomputed_pads", "test_averagepool_2d_precomputed_pads_count_include_pad"],
    "GlobalAveragePool": ["test_globalaveragepool", "test_globalaveragepool_precomputed"],
    "Relu": ["test_relu"], "LeakyRelu": ["test_leakyrelu", "test_leakyrelu_default"],
    "Sigmoid": ["test_sigmoid"], "Tanh": ["test_tanh"], "Gelu": ["test_gelu_default_2", "test_gelu_tanh_2"],
    "BatchNormalization": ["test_batchnorm_epsilon", "test_batchnorm_example"],
    "Gemm": ["test_gemm_default_no_bias", "test_gemm_transposeB", "test_gemm_alpha", "test_gemm_beta",
             "test_gemm_default_single_elem_vector_bias", "test_gemm_default_vector_bias"],
    "Flatten": ["test_flatten_axis1"],
    "HardSwish": ["test_hardswish"], "Clip": [],  # no case clips to [0, 6]: the others must be refused
    "Resize": ["test_resize_upsample_scales_nearest"], "Upsample": ["test_upsample_nearest"],
}


def sample_model(case):
    """The case's model with every input but the first turned into an initializer, each
    sample of the first input a separate batch row; None if it does not fit."""
    from onnx import helper, numpy_helper

    inputs, outputs = case.data_sets[0]
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    g = model.graph
    x, y = inputs[0], outputs[0]
    if len(g.output) != 1 or len(outputs) != 1 or x.ndim not in (1, 2, 3, 4) or x.dtype.kind != "f":
        return None
    if x.ndim in (1, 3):  # one sample: a batch of 1 (element-wise ops only: the shape is theirs)
        if len(g.node) != 1 or g.node[0].op_type not in ("Relu", "LeakyRelu", "Sigmoid", "Tanh", "Gelu",
                                                           "HardSwish", "Clip"):
            return None
        x, y = x[None], y[None]
    for vi, value in zip(list(g.input[1:]), inputs[1:]):
        g.initializer.append(numpy_helper.from_array(value, vi.name))
        g.input.remove(vi)
    elem = g.input[0].type.tensor_type.elem_type
    g.input[0].CopyFrom(helper.make_tensor_value_info(g.input[0].name, elem, ["N", *x.shape[1:]]))
    g.output[0].CopyFrom(helper.make_tensor_value_info(g.output[0].name, elem, ["N", *y.shape[1:]]))
    return model, x, y


def case_tol(case) -> float:
    """The case's own tolerance (some expected outputs are given to 4 decimals), at most 1e-3."""
    return min(float(case.rtol), 1e-3)


@pytest.mark.parametrize("op", sorted(NODE_TESTS))
def test_onnx_node_cases(op, node_cases, tmp_path):
    for name in NODE_TESTS[op]:
        prepared = sample_model(node_cases[name])
        assert prepared is not None, name
        model, x, expected = prepared
        path = save(model, tmp_path / f"{name}.onnx")
        imported = import_onnx(path)
        net = compiled(imported, "float64")
        got = net.forward(x.astype(np.float64))
        np.testing.assert_allclose(got, expected, rtol=case_tol(node_cases[name]), atol=1e-7, err_msg=name)
    # the op's other cases: imported and right, or a clear refusal
    for name, case in node_cases.items():
        if case.model.graph.node[0].op_type != op or name in NODE_TESTS[op] or len(case.model.graph.node) != 1:
            continue
        prepared = sample_model(case)
        if prepared is None:
            continue
        model, x, expected = prepared
        path = save(model, tmp_path / f"{name}.onnx")
        try:
            imported = import_onnx(path)
        except OnnxImportError:
            continue
        if imported.network.input_shape != x.shape[1:]:
            continue
        net = compiled(imported, "float64")
        np.testing.assert_allclose(net.forward(x.astype(np.float64)), expected, rtol=case_tol(case), atol=1e-7,
                                   err_msg=name)


# ---- refusals: one clear line naming the node -----------------------------------------------------------
def one_node(tmp_path, op, attrs=None, inits=None, in_shape=(2, 5, 5), out_shape=None, extra_ins=()):
    node = H(op, ["x", *extra_ins], "y", name="n1", **(attrs or {}))
    model = make_model([node], inits or {}, in_shape, out_shape or in_shape, check=False)  # bad attributes too
    return save(model, tmp_path / "m.onnx")


@pytest.mark.parametrize("op, attrs, extra, inits, message", [
    ("Clip", {}, ("lo", "hi"), {"lo": np.float32(-1), "hi": np.float32(1)},
     "node 'n1' (Clip): Clip to [-1, 1] is not supported; Clip(0, 6) is relu6"),
    ("Clip", {}, ("lo",), {"lo": np.float32(0)}, "node 'n1' (Clip): Clip to [0, inf] is not supported"),
    ("Resize", {"mode": "linear"}, ("", "sc"), {"sc": np.array([1, 1, 2, 2], np.float32)},
     "node 'n1' (Resize, mode='linear'): mode 'linear' is not supported; upsample is nearest-neighbour"),
    ("Resize", {}, ("", "sc"), {"sc": np.array([1, 1, 1.5, 2], np.float32)},
     "scales [1.0, 1.0, 1.5, 2.0] of an input of shape [2, 5, 5]"),
    ("Conv", {"strides": [0, 1]}, ("W",), {"W": np.ones((2, 2, 3, 3))},
     "attribute 'strides' values must be in 1..1,048,576, got [0, 1]"),
    ("MaxPool", {"kernel_shape": [2, 2], "storage_order": 1}, (), {}, "attribute 'storage_order' must be in 0..0"),
    ("AveragePool", {"kernel_shape": [2, 2], "foo": 3}, (), {},
     "not a valid ONNX model: Unrecognized attribute: foo for operator AveragePool"),
    ("LeakyRelu", {"alpha": float("inf")}, (), {}, "attribute 'alpha' must be a finite number"),
    ("Softmax", {"axis": 1}, (), {}, "only a final Softmax/LogSoftmax over the features"),
    ("Erf", {}, (), {}, "starts an element-wise computation (Erf) that is none of the activations"),
])
def test_refusals(tmp_path, op, attrs, extra, inits, message):
    path = one_node(tmp_path, op, attrs, inits, extra_ins=extra)
    with pytest.raises(OnnxImportError) as exc:
        import_onnx(path)
    text = str(exc.value)
    assert message in text and text.startswith(str(path)) and "\n" not in text, text


def test_asymmetric_padding(tmp_path):
    """TensorFlow's SAME with stride 2 and explicit uneven pads: imported as [top, bottom, left,
    right] and equal to ONNX Runtime where the kind's padding option takes four values, else
    refused naming the node."""
    from netcompiler.layers import REGISTRY
    from netcompiler.layers.base import OptionError

    rng = np.random.default_rng(0)
    nodes = [H("Conv", ["x", "W"], "c", name="c1", auto_pad="SAME_UPPER", strides=[2, 2]),
             H("MaxPool", ["c"], "p", name="p1", kernel_shape=[2, 2], pads=[0, 1, 1, 0], strides=[1, 1]),
             H("Flatten", ["p"], "f"), H("Gemm", ["f", "G"], "y", transB=1)]
    model = make_model(nodes, {"W": rng.standard_normal((3, 2, 3, 3)), "G": rng.standard_normal((2, 48))},
                       (2, 8, 7), (2,))
    try:
        next(o for o in REGISTRY["conv2d"].options if o.name == "padding").parse([0, 1, 1, 1])
    except OptionError:
        with pytest.raises(OnnxImportError, match="node 'c1' \\(Conv, auto_pad='SAME_UPPER', strides=\\[2, 2\\]\\): "
                                                  "asymmetric padding \\(top 0, left 1, bottom 1, right 1\\) is "
                                                  "not supported yet"):
            import_onnx(save(model, tmp_path / "m.onnx"))
        return
    imported = check_against_ort(model, tmp_path, (2, 8, 7))
    assert "padding: [0, 1, 1, 1]" in imported.spec.splitlines()[4]  # conv: top 0, bottom 1, left 1, right 1
    assert "padding: [0, 1, 1, 0]" in imported.spec.splitlines()[5]  # the pool's


def test_attribute_the_row_does_not_read(tmp_path):
    # opset 7's BatchNormalization has 'spatial'; what it means is not implemented: refused
    node = H("BatchNormalization", ["x", "s", "b", "m", "v"], "y", name="bn", spatial=0)
    inits = {k: np.ones(2) for k in "sbmv"}
    model = make_model([node], inits, (2, 3, 3), (2, 3, 3), opset=7)
    with pytest.raises(OnnxImportError, match="node 'bn' \\(BatchNormalization, spatial=0\\): attribute spatial "
                                              "not supported"):
        import_onnx(save(model, tmp_path / "m.onnx"))


def test_damaged_files_are_one_error(tmp_path):
    """Random byte changes in a real model: imported or an OnnxImportError, nothing else."""
    src = export(randomized(CASES["convs_pools"][0]), (1, 9, 8), tmp_path / "src.onnx", torch.float32).read_bytes()
    rng = np.random.default_rng(0)
    for i in range(300):
        b = bytearray(src)
        for _ in range(rng.integers(1, 4)):
            b[rng.integers(0, min(len(b), 3000))] = rng.integers(0, 256)
        path = tmp_path / "fz.onnx"
        path.write_bytes(bytes(b))
        try:
            import_onnx(path)
        except OnnxImportError as exc:
            assert "\n" not in str(exc)


def test_branch_imports_as_a_graph(tmp_path):
    # x read by two nodes (fan-out) and an Add of two tensors: the spec names what add reads
    nodes = [H("Relu", ["x"], "a", name="r"), H("Add", ["a", "x"], "y", name="residual")]
    imported = check_against_ort(make_model(nodes, {}, (2, 3, 3), (2, 3, 3)), tmp_path, (2, 3, 3))
    assert imported.spec.splitlines()[-3:-1] == ["  - relu: {name: r}", "  - add: {name: residual, inputs: [r, input]}"]


def test_channels_last_flatten_is_refused(tmp_path):
    # Keras' Flatten of an NHWC tensor, as tf2onnx writes it: the features come in another order
    nodes = [H("Transpose", ["x"], "t", name="to_nhwc", perm=[0, 2, 3, 1]), H("Flatten", ["t"], "f"),
             H("Gemm", ["f", "W"], "y", transB=1)]
    model = make_model(nodes, {"W": np.ones((3, 12))}, (3, 2, 2), (3,))
    with pytest.raises(OnnxImportError, match="node 'to_nhwc' \\(Transpose, perm=\\[0, 2, 3, 1\\]\\): operator not "
                                              "supported; a Transpose of activations \\(a channels-last layout"):
        import_onnx(save(model, tmp_path / "m.onnx"))


def test_pytorch_ceil_rule_differs_from_onnx(tmp_path):
    # input 3, kernel 2, stride 2, padding 1, ceil: ONNX 3 outputs, PyTorch (last window in the padding) 2
    path = one_node(tmp_path, "MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [1, 1, 1, 1],
                                          "ceil_mode": 1}, in_shape=(1, 3, 3), out_shape=(1, 3, 3))
    with pytest.raises(OnnxImportError, match="maxpool2d gives \\[1, 2, 2\\] where ONNX gives \\[1, 3, 3\\]"):
        import_onnx(path)


def test_file_checks(tmp_path, monkeypatch):
    with pytest.raises(OnnxImportError, match="not a regular file"):
        import_onnx(tmp_path)
    with pytest.raises(OnnxImportError, match="no such file|cannot read model"):
        import_onnx(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff\x00garbage" * 10)
    with pytest.raises(OnnxImportError, match="not an ONNX model"):
        import_onnx(junk)
    path = one_node(tmp_path, "Relu")
    monkeypatch.setattr(onnx_import, "MAX_MODEL_BYTES", 16)
    with pytest.raises(OnnxImportError, match="models over 16 bytes are refused"):
        import_onnx(path)


def test_cli_import(tmp_path):
    model = export(randomized(CASES["mlp"][0]), (6,), tmp_path / "mlp.onnx", torch.float32)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "netcompiler", "import", str(model), "-o", str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"spec: {out / 'mlp.yaml'}" and lines[1] == f"weights: {out / 'mlp.npz'}"
    assert lines[-1] == f"{out / 'mlp.yaml'}: ok (mlp: 6 -> 4, 113 parameters)"
    # what netc check says of the written spec, and the weights load as netc train's do
    r = subprocess.run([sys.executable, "-m", "netcompiler", "check", "-q", str(out / "mlp.yaml")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.stdout.strip() == lines[-1]
    net = nc.compile(str(out / "mlp.yaml"), threads=1)
    net.load_weights(out / "mlp.npz")
    x = np.random.default_rng(0).standard_normal((2, 6)).astype(np.float32)
    m = randomized(CASES["mlp"][0]).eval()
    with torch.no_grad():
        assert_close(net.forward(x), m[:-1](torch.as_tensor(x)).numpy(), 1e-5, "netc import")
    bad = subprocess.run([sys.executable, "-m", "netcompiler", "import", str(out / "mlp.yaml"), "-o", str(out)],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 1 and bad.stderr.startswith("netc: error: ") and bad.stderr.count("\n") == 1, bad.stderr


def test_names_from_torch_scopes_and_clashes():
    from netcompiler.onnx_import import ImportedLayer, assign_names

    def L(kind, *names):
        return ImportedLayer(kind, {}, None, names=list(names))

    layers = [L("conv2d", "/features/0/Conv", "features.0", "features_0"), L("relu", "conv1"),
              L("conv2d", "x y"), L("relu", "_bad"), L("linear", "net")]
    assign_names(layers, "net")
    # invalid identifiers, '_' starts and the network's name are passed over; dotted names
    # (PyTorch's nested modules) are kept, so parameters are named as in the state_dict
    assert [l.name for l in layers] == ["features.0", "conv1", None, None, None]
    # 'Null' would be YAML's null unquoted; 'y' is text in YAML 1.2; 'a.b' and 'a_b' are one name in C
    odd = [L("relu", "Null"), L("relu", "y"), L("relu", "a.b"), L("relu", "a_b"), L("relu", "input")]
    assign_names(odd, "net")
    assert [l.name for l in odd] == [None, "y", None, None, None]
    clash = [L("conv2d"), L("relu", "conv1")]  # 'conv1' is the conv's automatic name
    assign_names(clash, "net")
    assert [l.name for l in clash] == [None, None]


def test_batchnorm_options_come_back(tmp_path):
    # ONNX's momentum is the share of the old running value: 1 - PyTorch's
    imported = import_onnx(export(randomized(CASES["depthwise_bn"][0]), (2, 8, 8), tmp_path / "d.onnx"))
    (bn,) = [l for l in imported.network.layers if l.kind.kind == "batchnorm2d"]
    assert (bn.name, bn.opts["eps"], bn.opts["momentum"]) == ("bn1", 0.001, 0.2)


def test_network_name_that_is_a_layer_name(tmp_path):
    path = export(randomized(CASES["mlp"][0]), (6,), tmp_path / "fc1.onnx")
    assert import_onnx(path).name == "fc1_net"
    with pytest.raises(OnnxImportError, match="network name 'fc2' is also a layer's name"):
        import_onnx(path, name="fc2")


def test_constant_of_shape_and_old_unsqueeze(tmp_path):
    # weights made by ConstantOfShape (as the ONNX model zoo's light models have them), a
    # bias through opset 11's Unsqueeze with an axes attribute, then Squeeze back
    nodes = [H("ConstantOfShape", ["wshape"], "W", value=onnx.numpy_helper.from_array(np.array([0.25], np.float32))),
             H("Unsqueeze", ["b0"], "b1", axes=[0]), H("Squeeze", ["b1"], "b", axes=[0]),
             H("Conv", ["x", "W", "b"], "c", name="c1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             H("Relu", ["c"], "y")]
    inits = {"wshape": np.array([3, 2, 3, 3]), "b0": np.array([0.5, -1.0, 2.0], np.float32)}
    imported = check_against_ort(make_model(nodes, inits, (2, 4, 4), (3, 4, 4), opset=11), tmp_path, (2, 4, 4))
    assert (imported.state["c1.weight"] == 0.25).all() and imported.state["c1.weight"].shape == (3, 2, 3, 3)
    np.testing.assert_array_equal(imported.state["c1.bias"], inits["b0"])


def test_fixed_batch_reshape_is_a_flatten(tmp_path):
    """A model exported for batch 1 (Caffe2's ResNet-50 and VGG-19) flattens with a constant
    [1, C*H*W]: imported as flatten, with a note; a target that keeps no batch is refused."""
    from onnx import TensorProto, helper, numpy_helper

    def model(target):
        nodes = [H("Reshape", ["x", "t"], "f", name="flat"), H("Gemm", ["f", "W"], "y", transB=1)]
        graph = helper.make_graph(
            nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
            [numpy_helper.from_array(np.array(target), "t"),
             numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 18)).astype(np.float32), "W")])
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        m.ir_version = 8
        return m

    path = save(model([1, 18]), tmp_path / "fixed.onnx")
    imported = import_onnx(path)
    assert [l.kind.kind for l in imported.network.layers] == ["flatten", "linear"]
    assert any("batch size is fixed at 1" in n for n in imported.notes)
    x = np.random.default_rng(1).standard_normal((1, 2, 3, 3)).astype(np.float32)
    assert_close(compiled(imported, "float32").forward(x), ort_run(path, x), 1e-5, "fixed batch")
    with pytest.raises(OnnxImportError, match="node 'flat' \\(Reshape\\): reshapes a batch of 2 samples"):
        import_onnx(save(model([2, 9]), tmp_path / "bad.onnx"))


def test_final_softmax_over_channels_of_a_pooled_map(tmp_path):
    """SqueezeNet's classifier ends in a global pool and a Softmax over (C, 1, 1): dropped as the
    Softmax over features is; opset 13's default axis (the last, of size 1) is refused."""
    rng = np.random.default_rng(0)
    nodes = [H("Conv", ["x", "W"], "c", kernel_shape=[1, 1]), H("GlobalAveragePool", ["c"], "g"),
             H("Softmax", ["g"], "y", name="prob", axis=1)]
    inits = {"W": rng.standard_normal((4, 2, 1, 1))}
    imported = import_onnx(save(make_model(nodes, inits, (2, 3, 3), (4, 1, 1), opset=11), tmp_path / "s.onnx"))
    assert [l.kind.kind for l in imported.network.layers] == ["conv2d", "global_avgpool2d"]
    assert any("'prob' (Softmax, axis=1): dropped" in n for n in imported.notes)
    nodes[-1] = H("Softmax", ["g"], "y", name="prob")
    with pytest.raises(OnnxImportError, match="node 'prob' \\(Softmax\\): only a final Softmax"):
        import_onnx(save(make_model(nodes, inits, (2, 3, 3), (4, 1, 1), opset=13), tmp_path / "s13.onnx"))
