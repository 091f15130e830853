"""ONNX import of graphs: residual adds, concat branches, tensors read by several nodes.

PyTorch models with the constructs of well-known architectures (a ResNet basic block with a
projection shortcut, SqueezeNet's fire module, MobileNetV2's inverted residual, a two-branch
MLP) are exported by torch.onnx.export, imported, and compared with PyTorch: forward in
evaluation mode (float64 rel 1e-9, float32 rel 1e-5), loss and every parameter gradient in
training mode (float64 rel 1e-9, float32 rel 1e-4), by PyTorch's own parameter names (the
import keeps the nested module names, layer1.0.conv1.weight).  They are exported without
constant folding, which would fold batch norm into the convolution before it (that export
is checked too, forward only).  Also ONNX's own Add/Sum/Concat node cases, and the refusals
(broadcasting, other axes) naming the node.  Export -> import of every spec in specs/ is in
test_onnx_export.py.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_close
from test_onnx_import import H, case_tol, compiled, make_model, node_cases, randomized, save  # noqa: F401

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
nn = torch.nn
F = torch.nn.functional

import netcompiler as nc  # noqa: E402
from netcompiler.onnx_import import OnnxImportError, import_onnx  # noqa: E402
from test_model_zoo import Fire  # noqa: E402 (SqueezeNet's module, written once)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning",
                                        "ignore::torch.jit.TracerWarning")


class Basic(nn.Module):
    """torchvision's BasicBlock: two 3x3 convs with batch norm, a projection shortcut where
    the shape changes, one ReLU module used twice."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(Basic(4, 4), Basic(4, 4))
        self.layer2 = nn.Sequential(Basic(4, 8, 2), Basic(8, 8))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class SqueezeNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(2, 8, 3, 2), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True),
                                      Fire(8, 2, 4, 4), Fire(8, 3, 4, 6))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(10, 4, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand, 3x3 depthwise, 1x1 project (each with batch norm),
    added to the input when the shape stays."""

    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU6()),
            InvertedResidual(4, 4, 1, 2), InvertedResidual(4, 6, 2, 3), InvertedResidual(6, 6, 1, 2))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(6, 3))

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


class TwoBranchMLP(nn.Module):
    """1-D tensors: two branches of one input concatenated (features), then a skip add."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 4)
        self.b = nn.Linear(5, 3)
        self.act = nn.Tanh()
        self.mix = nn.Linear(7, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        h = torch.cat([self.act(self.a(x)), torch.sigmoid(self.b(x))], 1)
        return self.head(F.relu(self.mix(h)) + x)


GRAPHS = {"resnet": (ResNetish, (3, 8, 8)), "squeezenet": (SqueezeNetish, (2, 15, 15)),
          "mobilenet": (MobileNetish, (3, 8, 8)), "two_branch": (TwoBranchMLP, (5,))}


def export(model, shape, path: Path, dtype, fold=False) -> Path:
    model = model.to(dtype).eval()
    torch.onnx.export(model, torch.zeros((1, *shape), dtype=dtype), str(path), opset_version=17, dynamo=False,
                      do_constant_folding=fold, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    return path


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", sorted(GRAPHS))
def test_pytorch_graph_round_trip(case, dtype, tmp_path):
    builder, shape = GRAPHS[case]
    tdtype = torch.float64 if dtype == "float64" else torch.float32
    model = randomized(builder).to(tdtype)
    imported = import_onnx(export(model, shape, tmp_path / f"{case}.onnx", tdtype))
    net = compiled(imported, dtype)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, *shape))
    model.eval()
    with torch.no_grad():
        expected = model(torch.as_tensor(x, dtype=tdtype)).numpy()
    assert_close(net.forward(x), expected, 1e-9 if dtype == "float64" else 1e-5, what=f"{case} forward")

    model.train()  # batch statistics; dropout off (the import leaves it out)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    y = rng.integers(0, net.network.num_classes, 4)
    loss = F.cross_entropy(model(torch.as_tensor(x, dtype=tdtype)), torch.as_tensor(y))
    loss.backward()
    got_loss, grads = net.loss_and_grad(x, y)
    rtol = 1e-9 if dtype == "float64" else 1e-4
    assert_close(got_loss, float(loss), rtol, what=f"{case} loss")
    torch_grads = {k: p.grad.numpy() for k, p in model.named_parameters()}
    assert set(grads) == set(torch_grads), sorted(set(grads) ^ set(torch_grads))
    # a gradient that is 0 in exact arithmetic (a batch norm's bias whose channel shift the next
    # batch norm removes) is rounding noise: measured against the model's largest gradient
    big = max(float(np.abs(g).max()) for g in torch_grads.values())
    for k, g in grads.items():
        assert_close(g, torch_grads[k], rtol, what=f"{case} {k}", atol=rtol * big)


@pytest.mark.parametrize("case", sorted(GRAPHS))
def test_folded_batchnorm_export(case, tmp_path):
    """torch.onnx.export's default folds batch norm into the conv before it: still the same
    forward, the conv named after its module (its weight initializer has lost the name)."""
    builder, shape = GRAPHS[case]
    model = randomized(builder).double()
    path = export(model, shape, tmp_path / f"{case}.onnx", torch.float64, fold=True)
    imported = import_onnx(path)
    net = compiled(imported, "float64")
    x = np.random.default_rng(2).standard_normal((3, *shape))
    with torch.no_grad():
        assert_close(net.forward(x), model.eval()(torch.as_tensor(x)).numpy(), 1e-9, what=case)
    if case == "resnet":
        names = [l.name for l in imported.network.layers]
        assert "layer2.0.downsample.0" in names and "layer1.1.conv2" in names, names


def test_resnet_spec_is_readable(tmp_path):
    """Nested module names as PyTorch's; `inputs:` only where the graph is not a chain; the add
    of a block's forward named inside the block; the reused ReLU module's second call relu_1."""
    imported = import_onnx(export(randomized(ResNetish), (3, 8, 8), tmp_path / "r.onnx", torch.float64))
    lines = imported.spec.splitlines()
    block = lines[lines.index("  - conv2d: {name: layer2.0.conv1, out_channels: 8, kernel_size: 3, stride: 2, "
                              "padding: 1, bias: false}"):][:10]
    assert block == [
        "  - conv2d: {name: layer2.0.conv1, out_channels: 8, kernel_size: 3, stride: 2, padding: 1, bias: false}",
        "  - batchnorm2d: {name: layer2.0.bn1}",
        "  - relu: {name: layer2.0.relu}",
        "  - conv2d: {name: layer2.0.conv2, out_channels: 8, kernel_size: 3, padding: 1, bias: false}",
        "  - batchnorm2d: {name: layer2.0.bn2}",
        "  - conv2d: {name: layer2.0.downsample.0, inputs: [layer1.1.relu_1], out_channels: 8, kernel_size: 1, "
        "stride: 2, bias: false}",
        "  - batchnorm2d: {name: layer2.0.downsample.1}",
        "  - add: {name: layer2.0.add, inputs: [layer2.0.bn2, layer2.0.downsample.1]}",
        "  - relu: {name: layer2.0.relu_1}",
        "  - conv2d: {name: layer2.1.conv1, out_channels: 8, kernel_size: 3, padding: 1, bias: false}",
    ]
    assert "  - add: {name: layer1.0.add, inputs: [layer1.0.bn2, relu]}" in lines


def test_concat_spec(tmp_path):
    imported = import_onnx(export(randomized(SqueezeNetish), (2, 15, 15), tmp_path / "s.onnx", torch.float64))
    lines = imported.spec.splitlines()
    assert "  - conv2d: {name: features.3.expand3x3, inputs: [features.3.squeeze_activation], out_channels: 4, " \
           "kernel_size: 3, padding: 1}" in lines
    assert "  - concat: {name: features.3.concat, inputs: [features.3.expand1x1_activation, " \
           "features.3.expand3x3_activation]}" in lines


# ---- ONNX's operator cases: Add, Sum, Concat ------------------------------------------------------------
def _selected(case):
    """The case's node reading its inputs as activations: the network input is all of them
    side by side (channels of one sample for 3-D inputs, features for 2-D), and a one-hot 1x1
    conv or Gemm per input picks its own part out (exact: products by 1 and sums of zeros).
    None when the case's tensors are not (N, C, H, W) or (N, F) with the node's meaning kept."""
    from onnx import TensorProto, helper, numpy_helper

    inputs, outputs = case.data_sets[0]
    node = case.model.graph.node[0]
    if inputs[0].dtype != np.float32 or any(x.shape[1:] != inputs[0].shape[1:] for x in inputs):
        return None
    if inputs[0].ndim == 3 and node.op_type == "Add":  # element-wise: one sample of (C, H, W)
        xs, y = [x[None] for x in inputs], outputs[0][None]
    elif inputs[0].ndim == 2:  # (batch, features)
        xs, y = list(inputs), outputs[0]
    elif inputs[0].ndim == 1 and node.op_type == "Sum":  # element-wise: one sample of features
        xs, y = [x[None] for x in inputs], outputs[0][None]
    else:
        return None
    sizes = [x.shape[1] for x in xs]
    z = np.concatenate(xs, axis=1).astype(np.float64)
    nodes, inits = [], []
    for i, (name, size) in enumerate(zip(node.input, sizes)):
        pick = np.zeros((size, sum(sizes)))
        pick[np.arange(size), sum(sizes[:i]) + np.arange(size)] = 1
        if z.ndim == 4:
            inits.append(numpy_helper.from_array(pick[:, :, None, None], f"pick{i}"))
            nodes.append(helper.make_node("Conv", ["z", f"pick{i}"], [name], name=f"pick{i}", kernel_shape=[1, 1]))
        else:
            inits.append(numpy_helper.from_array(pick, f"pick{i}"))
            nodes.append(helper.make_node("Gemm", ["z", f"pick{i}"], [name], name=f"pick{i}", transB=1))
    dbl = TensorProto.DOUBLE
    graph = helper.make_graph(nodes + [node], case.name, [helper.make_tensor_value_info("z", dbl, ["N", *z.shape[1:]])],
                              [helper.make_tensor_value_info(node.output[0], dbl, ["N", *y.shape[1:]])], inits)
    model = helper.make_model(graph, opset_imports=list(case.model.opset_import))
    model.ir_version = 8
    return model, z, y


# each case that can be posed with one network input (the rest: 3-D Concat and 1-D Concat
# along axis 0 mean other axes once a batch dimension is added; integer Add is not a network)
IMPORTED = {"test_add", "test_concat_2d_axis_1", "test_concat_2d_axis_negative_1", "test_sum_example",
            "test_sum_two_inputs", "test_sum_one_input"}
REFUSED = {"test_concat_2d_axis_0": "concatenates along axis 0 (the batch)",
           "test_concat_2d_axis_negative_2": "concatenates along axis 0 (the batch)"}


def test_onnx_merge_node_cases(node_cases, tmp_path):
    seen = set()
    for name, case in sorted(node_cases.items()):
        if case.model.graph.node[0].op_type not in ("Add", "Sum", "Concat") or len(case.model.graph.node) != 1:
            continue
        prepared = _selected(case)
        if prepared is None:
            continue
        seen.add(name)
        model, z, expected = prepared
        path = save(model, tmp_path / f"{name}.onnx")
        if name in REFUSED:
            with pytest.raises(OnnxImportError, match=re.escape(REFUSED[name])):
                import_onnx(path)
            continue
        net = compiled(import_onnx(path), "float64")
        np.testing.assert_allclose(net.forward(z), expected, rtol=case_tol(case), atol=1e-7, err_msg=name)
    assert seen == IMPORTED | set(REFUSED)


# ---- refusals -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nodes, inits, out_shape, message", [
    ([H("GlobalAveragePool", ["x"], "g", name="gap"), H("Add", ["x", "g"], "y", name="res")], {}, (2, 3, 3),
     "node 'res' (Add): broadcasts: it adds tensors of shapes [N, 2, 3, 3] and [N, 2, 1, 1]; add sums "
     "tensors of one shape"),
    ([H("Relu", ["x"], "r", name="r"), H("Concat", ["x", "r"], "y", name="cat", axis=2)], {}, (2, 6, 3),
     "node 'cat' (Concat, axis=2): concatenates along axis 2 (height); concat joins channels"),
    ([H("Relu", ["x"], "r", name="r"), H("Concat", ["x", "r"], "y", name="cat", axis=-1)], {}, (2, 3, 6),
     "node 'cat' (Concat, axis=-1): concatenates along axis 3 (width)"),
    ([H("Sigmoid", ["x"], "s", name="gate"), H("Mul", ["x", "s"], "m", name="scale"),
      H("Relu", ["m"], "y", name="r")], {}, (2, 3, 3), None),  # SiLU: imported (the pair is recognised)
    ([H("GlobalAveragePool", ["x"], "g", name="gap"), H("Sigmoid", ["g"], "s", name="gate"),
      H("Mul", ["x", "s"], "y", name="excite")], {}, (2, 3, 3),
     "node 'excite' (Mul): reads 2 activation tensors (x, s); netcompiler's layers read one tensor"),
    ([H("Add", ["x", "c"], "y", name="shift")], {"c": np.ones((1, 2, 1, 1))}, (2, 3, 3),
     "node 'shift' (Add): combines the activations with a constant tensor of shape [1, 2, 1, 1]"),
    ([H("Relu", ["x"], "r"), H("Sum", ["r", "c"], "y", name="s")], {"c": np.ones((1, 2, 3, 3))}, (2, 3, 3),
     "node 's' (Sum): adds a constant ('c') with activations"),
])
def test_graph_refusals(tmp_path, nodes, inits, out_shape, message):
    path = save(make_model(nodes, inits, (2, 3, 3), out_shape), tmp_path / "m.onnx")
    if message is None:
        assert [l.kind.kind for l in import_onnx(path).network.layers] == ["silu", "relu"]
        return
    with pytest.raises(OnnxImportError) as exc:
        import_onnx(path)
    text = str(exc.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text, text


def test_unused_nodes_are_left_out(tmp_path):
    nodes = [H("Relu", ["x"], "y", name="r"), H("Sigmoid", ["x"], "unused", name="dead")]
    imported = import_onnx(save(make_model(nodes, {}, (2, 3, 3), (2, 3, 3)), tmp_path / "m.onnx"))
    assert [l.kind.kind for l in imported.network.layers] == ["relu"]
    assert any("1 node the output does not depend on" in n for n in imported.notes)


@pytest.mark.parametrize("case", sorted(GRAPHS))
def test_import_then_torch_source_takes_the_original_state_dict(case, tmp_path):
    """PyTorch -> ONNX -> netc import -> netc's PyTorch source: a module that loads the original
    model's state_dict (strict) and computes what it computes."""
    import importlib.util

    from netcompiler.torchref import torch_source

    builder, shape = GRAPHS[case]
    model = randomized(builder).double().eval()
    imported = import_onnx(export(model, shape, tmp_path / f"{case}.onnx", torch.float64))
    py = tmp_path / f"{case}_model.py"
    py.write_text(torch_source(imported.network))
    spec = importlib.util.spec_from_file_location(f"{case}_model", py)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    written = getattr(mod, "".join(p.capitalize() for p in imported.name.split("_")))().double().eval()
    written.load_state_dict(model.state_dict())
    x = torch.as_tensor(np.random.default_rng(3).standard_normal((2, *shape)))
    with torch.no_grad():
        assert_close(written(x).numpy(), model(x).numpy(), 1e-12, what=case)


def test_shapes_without_onnx_shape_inference(tmp_path, monkeypatch):
    """When ONNX's shape inference fails, the shapes come from checking the layers converted
    so far, branches included."""
    from test_onnx_import import ort_run

    rng = np.random.default_rng(0)
    nodes = [H("Relu", ["x"], "r", name="r"), H("Add", ["r", "x"], "a", name="res"),
             H("Flatten", ["a"], "f"), H("Gemm", ["f", "W"], "y", transB=1)]
    path = save(make_model(nodes, {"W": rng.standard_normal((3, 18))}, (2, 3, 3), (3,)), tmp_path / "m.onnx")

    def fail(*args, **kw):
        raise RuntimeError("no shape inference")

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", fail)
    imported = import_onnx(path)
    assert [l.kind.kind for l in imported.network.layers] == ["relu", "add", "flatten", "linear"]
    x = rng.standard_normal((2, 2, 3, 3)).astype(np.float32)
    assert_close(compiled(imported, "float32").forward(x), ort_run(path, x), 1e-5, "no shape inference")


def test_activation_of_a_tensor_with_other_readers(tmp_path):
    # x read by Sigmoid and Tanh (no SiLU pair): each its own layer; then an Add of three
    from test_onnx_import import check_against_ort

    nodes = [H("Sigmoid", ["x"], "s", name="s"), H("Tanh", ["x"], "t", name="t"),
             H("Sum", ["s", "t", "x"], "y", name="total")]
    imported = check_against_ort(make_model(nodes, {}, (2, 3, 3), (2, 3, 3)), tmp_path, (2, 3, 3))
    assert imported.spec.splitlines()[-4:-1] == [
        "  - sigmoid: {name: s}", "  - tanh: {name: t, inputs: [input]}", "  - add: {name: total, inputs: [s, t, input]}"]


def test_cli_graph_import_and_torch_export(tmp_path):
    """README's flow: a PyTorch residual net -> ONNX -> netc import -> netc export --format torch
    -> a module that takes the original state_dict and computes what the original does."""
    import importlib.util
    import subprocess
    import sys

    from conftest import ROOT

    model = randomized(ResNetish).eval()
    onnx_path = export(model, (3, 8, 8), tmp_path / "resnetish.onnx", torch.float32)
    run = lambda *args: subprocess.run([sys.executable, "-m", "netcompiler", *map(str, args)], capture_output=True,
                                       text=True, cwd=ROOT)
    r = run("import", onnx_path, "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    params = sum(p.numel() for p in model.parameters())  # PyTorch's count
    assert r.stdout.splitlines()[-1] == f"{tmp_path / 'out' / 'resnetish.yaml'}: ok (resnetish: 3x8x8 -> 5, " \
                                        f"{params:,} parameters)"
    py = tmp_path / "resnetish_model.py"
    r = run("export", tmp_path / "out" / "resnetish.yaml", tmp_path / "out" / "resnetish.npz", "--format", "torch",
            "-o", py)
    assert r.returncode == 0, r.stderr
    spec = importlib.util.spec_from_file_location("resnetish_model", py)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    written = mod.Resnetish().eval()
    written.load_state_dict(model.state_dict())
    x = torch.as_tensor(np.random.default_rng(5).standard_normal((2, 3, 8, 8)), dtype=torch.float32)
    with torch.no_grad():
        assert_close(written(x).numpy(), model(x).numpy(), 1e-6, what="written module")
