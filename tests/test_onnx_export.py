"""netc export --format onnx / torch: ONNX Runtime and PyTorch give netcompiler's outputs.

Every spec in specs/ and a set of small specs that together hold every layer kind and option
are exported with random weights (and batch-norm statistics that are not the identity);
ONNX Runtime's output must equal `Net.forward` (float32, rel 1e-5), and importing the model
again must give the same layers (kinds, names, options, shapes) and the same weights.
"""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, assert_close, randomize_batchnorm, spec

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import netcompiler as nc  # noqa: E402
from netcompiler.check import check_text, load  # noqa: E402
from netcompiler.onnx_export import OnnxExportError, onnx_model  # noqa: E402
from netcompiler.onnx_import import import_onnx  # noqa: E402
from netcompiler.errors import NetcError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")

SPECS = sorted((ROOT / "specs").glob("*.yaml"))
# with specs/, every layer kind and option
KINDS = {
    "pools_acts": spec((2, 9, 8), [
        "conv2d: {out_channels: 4, kernel_size: 3, padding: same, bias: false}", "leaky_relu: {negative_slope: 0.2}",
        "avgpool2d: {kernel_size: 3, stride: 2, padding: 1, count_include_pad: false}", "sigmoid",
        "conv2d: {out_channels: 4, kernel_size: [2, 4], padding: same, dilation: [1, 2]}", "tanh",
        "avgpool2d: {kernel_size: 2, ceil_mode: true}", "dropout: {p: 0.3}", "flatten",
        "linear: {out_features: 6, bias: false}", "gelu: {approximate: tanh}", "linear: {out_features: 3}"]),
    "bn_groups": spec((4, 8, 8), [
        "batchnorm2d: {eps: 0.001, momentum: 0.2}",
        "conv2d: {out_channels: 8, kernel_size: 3, groups: 4, stride: 2, padding: [1, 2]}", "relu",
        "maxpool2d: {kernel_size: 3, stride: 1, padding: 1, dilation: 2}", "batchnorm2d",
        "maxpool2d: {kernel_size: 2, ceil_mode: true}", "flatten", "linear: {out_features: 5}", "gelu"], "mse"),
    "newer_kinds": spec((2, 7, 6), [
        "conv2d: {out_channels: 4, kernel_size: 3, stride: 2, padding: [0, 1, 1, 1]}", "relu6",
        "upsample: {scale_factor: [2, 3]}", "hardswish",
        "maxpool2d: {kernel_size: 2, stride: 2, padding: [1, 0, 0, 1]}", "silu",
        "avgpool2d: {kernel_size: 3, stride: 1, padding: [1, 1, 0, 1], count_include_pad: false}",
        "global_avgpool2d", "flatten", "batchnorm1d: {eps: 0.001, momentum: 0.3}", "linear: {out_features: 3}"],
        "binary_cross_entropy"),
}
KINDS["graph"] = spec((2, 6, 6), [
    "conv2d: {name: x, out_channels: 3, kernel_size: 3, padding: 1}", "relu: {name: r}",
    "conv2d: {name: y, out_channels: 3, kernel_size: 3, padding: 1, inputs: [r]}", "dropout: {name: d}",
    "add: {inputs: [d, x, r]}", "concat: {name: cat, inputs: [input, add1, x]}", "flatten",
    "linear: {out_features: 3}"])
KINDS["graph_padded"] = spec((2, 7, 6), [  # the Padded* modules inside a graph's torch source
    "conv2d: {name: a, out_channels: 3, kernel_size: 3, stride: 2, padding: [0, 1, 1, 1]}", "relu: {name: r}",
    "maxpool2d: {name: p, kernel_size: 2, stride: 1, padding: [1, 0, 0, 1], inputs: [a]}", "add: {inputs: [r, p]}",
    "flatten", "linear: {out_features: 2}"])
CASES = {p.stem: p.read_text() for p in SPECS} | KINDS


def trained_like(text: str, file: str = "case.yaml", seed: int = 0):
    net = nc.compile(check_text(text, file), dtype="float32", threads=1)
    net.init(seed)
    randomize_batchnorm(net, np.random.default_rng(seed))
    return net


def ort_forward(model, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input"] and [o.name for o in sess.get_outputs()] == ["output"]
    return sess.run(None, {"input": x})[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_onnx_runtime_matches(case, tmp_path):
    net = trained_like(CASES[case], f"{case}.yaml")
    model = onnx_model(net.network, net.state_dict())
    assert model.opset_import[0].version >= 17
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param == "batch" and not batch.HasField("dim_value")  # symbolic
    x = np.random.default_rng(1).standard_normal((5, *net.network.input_shape)).astype(np.float32)
    assert_close(ort_forward(model, x), net.forward(x), 1e-5, f"{case}: ONNX Runtime")

    # export -> import: the same layers, graph edges and weights (dropout, the identity in
    # evaluation, is left out: what read it reads its input)
    path = tmp_path / f"{case}.onnx"
    path.write_bytes(model.SerializeToString())
    back = import_onnx(path, name=net.network.name)

    def layer_facts(layers):
        alias, out = {}, []
        for l in layers:
            ins = [alias.get(t, t) for t in l.inputs]
            if l.kind.kind == "dropout":
                alias[l.output] = ins[0]
                continue
            opts = {k: v for k, v in l.opts.items() if k not in ("padding", "in_channels", "in_features", "inputs")}
            kind = l.kind.kind
            if (kind, opts) == ("adaptive_avgpool2d", {"output_size": (1, 1)}):  # GlobalAveragePool in ONNX
                kind, opts = "global_avgpool2d", {}
            out.append((kind, l.name, opts, l.derived.get("pads"), ins, l.in_shape, l.out_shape))
        return out

    assert layer_facts(back.network.layers) == layer_facts(net.network.layers)
    state = net.state_dict()
    assert set(back.state) == set(state)
    for k, v in state.items():
        np.testing.assert_array_equal(back.state[k], v, err_msg=k)


def test_normalisation_travels_as_metadata(tmp_path):
    net = trained_like(CASES["lenet5"], "lenet5.yaml")
    model = onnx_model(net.network, net.state_dict(), normalisation=(0.286, 0.353))
    props = {p.key: p.value for p in model.metadata_props}
    assert props["netc.mean"] == "0.286" and props["netc.std"] == "0.353"
    path = tmp_path / "lenet5.onnx"
    path.write_bytes(model.SerializeToString())
    meta = import_onnx(path).meta
    assert float(meta["mean"]) == 0.286 and float(meta["std"]) == 0.353


def test_pytorch_ceil_rule_is_not_exported():
    # input 3, kernel 2, stride 2, padding 1, ceil_mode: PyTorch 2 outputs, ONNX 3
    net = check_text(spec((1, 3, 3), ["maxpool2d: {kernel_size: 2, padding: 1, ceil_mode: true}", "flatten"], "mse"))
    with pytest.raises(OnnxExportError, match="maxpool2d 'pool1': with ceil_mode ONNX gives 3 outputs where "
                                              "PyTorch and netcompiler give 2"):
        onnx_model(net, {})


def test_cli_export_onnx_and_torch(tmp_path):
    torch = pytest.importorskip("torch")
    net = trained_like(CASES["cifar"], "cifar.yaml")
    weights = tmp_path / "weights.npz"
    net.save_weights(weights)
    spec_path = ROOT / "specs" / "cifar.yaml"
    out = tmp_path / "cifar.onnx"
    r = subprocess.run([sys.executable, "-m", "netcompiler", "export", str(spec_path), str(weights), "--format",
                        "onnx", "-o", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == f"model: {out}"
    x = np.random.default_rng(2).standard_normal((3, 3, 32, 32)).astype(np.float32)
    assert_close(ort_forward(onnx.load(str(out)), x), net.forward(x), 1e-5, "netc export --format onnx")

    py = tmp_path / "cifar_model.py"
    r = subprocess.run([sys.executable, "-m", "netcompiler", "export", str(spec_path), str(weights), "--format",
                        "torch", "-o", str(py)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    mod_spec = importlib.util.spec_from_file_location("cifar_model", py)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    model = mod.Cifar()
    mod.load_netc_weights(model, weights)
    names = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    assert names == set(net.state_dict())
    with torch.no_grad():
        got = model.eval()(torch.from_numpy(x)).numpy()
    assert_close(got, net.forward(x), 1e-5, "netc export --format torch")


def test_adaptive_average_pooling(tmp_path):
    # uniform bins (6x6 -> 3x2): AveragePool; 1x1: GlobalAveragePool; ONNX Runtime agrees
    for size, op in (("[3, 2]", "AveragePool"), ("1", "GlobalAveragePool")):
        net = trained_like(spec((2, 6, 6), [f"adaptive_avgpool2d: {{output_size: {size}}}", "flatten"], "mse"))
        model = onnx_model(net.network, net.state_dict())
        assert [n.op_type for n in model.graph.node] == [op, "Flatten"]
        x = np.random.default_rng(4).standard_normal((3, 2, 6, 6)).astype(np.float32)
        assert_close(ort_forward(model, x), net.forward(x), 1e-5, f"adaptive_avgpool2d {size}")


def test_uneven_adaptive_bins_are_not_exported():
    net = check_text(spec((1, 5, 6), ["adaptive_avgpool2d: {output_size: [2, 3]}", "flatten"], "mse"))
    with pytest.raises(OnnxExportError, match="adaptive_avgpool2d 'pool1': output 2x3 of input 5x6 has bins of "
                                              "unequal sizes"):
        onnx_model(net, {})


def test_every_layer_kind_has_an_onnx_form():
    from netcompiler.layers import REGISTRY
    from netcompiler.onnx_export import EMIT

    assert sorted(set(REGISTRY) - set(EMIT)) == []


@pytest.mark.parametrize("case", sorted(CASES))
def test_torch_source_matches(case, tmp_path):
    """The written module, its state_dict loaded from the weights file (strictly: the same
    names), gives Net.forward: an nn.Sequential for chains, a graph's forward with nested
    modules for graphs and blocks (resnet20)."""
    torch = pytest.importorskip("torch")
    from netcompiler.torchref import torch_source

    net = trained_like(CASES[case], f"{case}.yaml")
    weights = tmp_path / "w.npz"
    net.save_weights(weights)
    py = tmp_path / f"{case}_model.py"
    py.write_text(torch_source(net.network))
    mod_spec = importlib.util.spec_from_file_location(f"{case}_model", py)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    model = next(v for k, v in vars(mod).items() if isinstance(v, type) and issubclass(v, torch.nn.Module)
                 and v.__module__ == mod.__name__)()
    mod.load_netc_weights(model, weights)
    x = np.random.default_rng(3).standard_normal((3, *net.network.input_shape)).astype(np.float32)
    with torch.no_grad():
        got = model.eval()(torch.from_numpy(x)).numpy()
    assert_close(got, net.forward(x), 1e-5, f"{case}: torch source")


def test_quantize_is_for_c_only(tmp_path, capsys):
    from netcompiler.cli import main

    net = trained_like(CASES["lenet5"], "lenet5.yaml")
    weights = tmp_path / "w.npz"
    net.save_weights(weights)
    assert main(["export", str(ROOT / "specs" / "lenet5.yaml"), str(weights), "--format", "onnx", "-o",
                 str(tmp_path / "m.onnx"), "--quantize", "int8", "--calibration", "fashion-mnist"]) == 1
    assert capsys.readouterr().err == "netc: error: --quantize int8 is for --format c, not onnx\n"
    assert not (tmp_path / "m.onnx").exists()


def test_torch_source_of_a_graph_reads_as_the_spec():
    from netcompiler.torchref import torch_source

    src = torch_source(check_text(CASES["graph"], "graph.yaml"))
    assert "class Graph(nn.Module):" in src
    forward = src[src.index("    def forward(self, x):"):].splitlines()
    assert forward[1:10] == [
        "        x_ = self.x(x)  # 3x6x6",  # the layer named x: its local takes a '_'
        "        r = self.r(x_)  # 3x6x6",
        "        y = self.y(r)  # 3x6x6",
        "        d = self.d(y)  # 3x6x6",
        "        add1 = d + x_ + r  # 3x6x6",
        "        cat = torch.cat([x, add1, x_], 1)  # 8x6x6",
        "        flatten1 = self.flatten1(cat)  # 288",
        "        fc1 = self.fc1(flatten1)  # 3",
        "        return fc1",
    ]
    src = torch_source(load(ROOT / "specs" / "resnet20.yaml"))
    assert "        self.layer1 = nn.Sequential(*(nn.Module() for _ in range(3)))" in src
    assert "        layer2_0_downsample_1 = self.layer2[0].downsample[1](layer2_0_downsample_0)  # 32x16x16" in src
    assert "        layer2_0_add1 = layer2_0_bn2 + layer2_0_downsample_1  # 32x16x16" in src


@pytest.mark.parametrize("layers, message", [
    (["relu: {name: a}", "relu: {name: a.b}"], "relu 'a': its name is also the start of other layers' names (a.b)"),
    (["relu: {name: blk.train}", "relu"], "layer name 'blk.train': 'train' is an attribute of torch's nn.Module"),
])
def test_torch_source_refuses_names_no_module_can_have(layers, message):
    from netcompiler.torchref import torch_source

    with pytest.raises(NetcError, match=re.escape(message)):
        torch_source(check_text(spec((2,), layers, "mse")))
