"""Networks as graphs: the plan's per-edge gradient decisions and views, reusable blocks
against hand-written PyTorch models, and ResNet-20.

The gradient cases of add, concat and tensors with several readers are in
tests/test_gradients.py (CASES "graph_*"); here are the plan decisions those cases rely on,
and blocks, whose PyTorch twins are written by hand (nested modules) rather than read from
the YAML.
"""
from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, assert_close, assert_twin_computes, build, random_batch, spec
from netcompiler.check import check_text, load
from netcompiler.graph import needs_grad, tensors
from netcompiler.plan import make_plan
from netcompiler.render import render
from test_gradients import CASES

torch = pytest.importorskip("torch")
nn = torch.nn


def _plan(case: str):
    return make_plan(check_text(CASES[case]))


def _lp(plan, name):
    return next(lp for lp in plan.layers if lp.layer.name == name)


# ---- the plan: who stores, who adds ----------------------------------------------------------
def test_three_readers_first_in_reverse_stores_the_others_add():
    """x is read by p, q and the add; backward runs the add first: it stores x's gradient, and
    the two convolutions (whose templates store) write into a slot of their own that is added."""
    plan = _plan("graph_three_readers")
    add, p, q = _lp(plan, "add1"), _lp(plan, "p"), _lp(plan, "q")
    x_edge = add.ins[2]
    assert (x_edge.tensor, x_edge.din, x_edge.add) == ("x", "OFF_x_out", False)
    for lp in (p, q):
        assert lp.need_din and lp.din_macro == "OFF_x_dsum"
        assert lp.grad_sums == [("OFF_x_out", "OFF_x_dsum", 2 * 7 * 6 * 3 // 2)]
    source = render(plan.net, "float64").source
    assert source.count("grad_add(da + OFF_x_out, da + OFF_x_dsum, 126);") == 2


def test_two_readers_of_one_add_edge_add():
    plan = _plan("graph_add_same_twice")
    e0, e1 = _lp(plan, "add1").ins
    assert (e0.din, e0.add, e1.din, e1.add) == ("OFF_x_out", False, "OFF_x_out", True)
    assert "din0[i] = d;" in render(plan.net, "float64").source


def test_batch_level_reader_adds_from_its_slot():
    plan = _plan("graph_two_readers_linear")
    p, q = _lp(plan, "p"), _lp(plan, "q")
    assert q.din_macro == "OFF_x_out" and not q.grad_sums  # q runs first in backward
    assert p.din_macro == "OFF_x_dsum" and p.grad_sums == [("OFF_x_out", "OFF_x_dsum", 4)]


def test_concat_parts_in_place_when_the_concat_reads_them_last():
    plan = _plan("graph_concat_3d")
    cat = _lp(plan, "cat")
    # a: read only by the concat -> in place; input: the network input -> copied; b: read by c
    # after the concat -> copied
    assert [(e.tensor, e.view, e.at) for e in cat.ins] == [("a", True, 0), ("input", False, 84),
                                                             ("b", False, 168)]
    # c's backward runs first and stores b's gradient; the concat adds its slice
    assert (cat.ins[2].din, cat.ins[2].add) == ("OFF_b_out", True)
    assert plan.tensors["a"].storage == "cat" and plan.tensors["a"].offset == 0
    assert _lp(plan, "a").out is None and _lp(plan, "a").out_macro == "OFF_a_out"
    offsets = {t.macro: t.offset for t in plan.activations + plan.views}
    assert offsets["OFF_a_out"] == offsets["OFF_cat_out"]
    # both parts of the last concat are in place: it runs no code at all
    last = _lp(plan, "concat2")
    assert all(e.view for e in last.ins) and last.aliases


def test_nested_concat_views_compose():
    plan = _plan("graph_concat_nested")
    offsets = {t.macro: t.offset for t in plan.activations + plan.views}
    out = offsets["OFF_concat2_out"]
    assert offsets["OFF_ab_out"] == offsets["OFF_a_out"] == out
    assert offsets["OFF_b_out"] == out + 2 * 7 * 6 and offsets["OFF_c_out"] == out + 4 * 7 * 6
    assert plan.tensors["a"].storage == "concat2"
    source = render(plan.net, "float64").source
    assert "concat2_forward" not in source and "ab_forward" not in source  # nothing to copy


def test_relu_fused_only_when_it_is_the_only_reader():
    plan = _plan("graph_residual_fused_relu")
    relu = next(lp for lp in plan.layers if lp.kind == "relu")
    assert relu.fused_into == ("add1", "pool1") and _lp(plan, "add1").relu_out
    # a ReLU whose input has another reader keeps its own pass: max(0, y) would change that reader's input
    text = spec([6], ["linear: {name: a, out_features: 4}", "relu", "linear: {out_features: 4}",
                      "add: {inputs: [fc2, a]}", "linear: {out_features: 2}"])
    assert not make_plan(check_text(text)).layers[1].fused_into


def test_needs_grad_is_a_pass_over_the_graph():
    """Only tensors with a trainable parameter upstream: a pooling of the input concatenated
    with a convolution needs none, the concat does, and the pool's backward is not emitted."""
    text = spec([2, 6, 6], ["maxpool2d: {name: p, kernel_size: 2}", "relu: {name: r}",
                            "conv2d: {name: c, out_channels: 2, kernel_size: 2, stride: 2, inputs: [input]}",
                            "concat: {inputs: [r, c]}", "flatten", "linear: {out_features: 2}"])
    net = check_text(text)
    assert needs_grad(net.layers) == {"c", "concat1", "flatten1", "fc1"}
    assert [t for t, gt in tensors(net.layers, net.input_shape).items() if len(gt.consumers) > 1] == ["input"]
    plan = make_plan(net)
    assert not _lp(plan, "p").need_din and not _lp(plan, "r").need_din and not _lp(plan, "c").need_din
    source = render(net, "float64").source
    assert "p_backward" not in source and "r_backward" not in source


# ---- blocks ---------------------------------------------------------------------------------
BLOCK_SPEC = """\
input: [6]
blocks:
  res:
    params: [width]
    layers:
      - linear: {name: fc1, out_features: $width}
      - relu
      - linear: {name: fc2, out_features: $width}
      - add: {name: sum, inputs: [fc2, input]}
layers:
  - linear: {name: stem, out_features: 5}
  - res: {name: blocks, repeat: 3, width: 5}
  - linear: {name: head, out_features: 3, inputs: [blocks]}
loss: cross_entropy
"""


class _Res(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x))) + x


class _BlockNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(6, 5)
        self.blocks = nn.Sequential(_Res(5), _Res(5), _Res(5))
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def test_block_expands_to_pytorch_nested_names():
    net = check_text(BLOCK_SPEC)
    assert [l.name for l in net.layers][:6] == ["stem", "blocks.0.fc1", "blocks.0.relu1", "blocks.0.fc2",
                                               "blocks.0.sum", "blocks.1.fc1"]
    assert net.layers[4].inputs == ["blocks.0.fc2", "stem"]  # 'input' in a block: the block's input
    assert net.layers[8].inputs == ["blocks.1.fc2", "blocks.0.sum"]
    assert net.layers[-1].inputs == ["blocks.2.sum"]  # the use's name: the last repetition's output
    ref = _BlockNet()
    assert list(net.param_shapes()) == list(ref.state_dict())
    assert all(tuple(v.shape) == net.param_shapes()[k] for k, v in ref.state_dict().items())
    plan = make_plan(net)
    assert plan.layers[1].name == "blocks_0_fc1"  # C names
    assert all(lp.fused_into for lp in plan.layers if lp.kind == "relu")
    assert "static void blocks_0_fc1_forward(" in render(net, "float64").source


@pytest.mark.parametrize("dtype, threads", [("float64", 1), ("float64", 2), ("float32", 1), ("float32", 2)])
def test_block_repeated_three_times_matches_torch(dtype, threads):
    net = build(BLOCK_SPEC, dtype, threads)
    rng = np.random.default_rng(3)
    net.init(11)
    x, y = random_batch(net, 5, rng)
    x = x.astype(net.dtype)
    model = _BlockNet().double()
    model.load_state_dict({k: torch.as_tensor(v.astype(np.float64)) for k, v in net.state_dict().items()})
    out = model(torch.as_tensor(x.astype(np.float64)))
    loss = nn.functional.cross_entropy(out, torch.as_tensor(y))
    loss.backward()
    rtol = 1e-9 if dtype == "float64" else 1e-4
    assert_close(net.forward(x), out.detach().numpy(), rtol, "forward")
    got, grads = net.loss_and_grad(x, y)
    assert abs(got - loss.item()) <= rtol * abs(loss.item())
    for k, p in model.named_parameters():
        assert_close(grads[k], p.grad.numpy(), rtol, f"d{k}")


def test_block_gradients_match_finite_differences():
    net = build(BLOCK_SPEC, "float64")
    rng = np.random.default_rng(4)
    x, y = random_batch(net, 3, rng)
    _, grads = net.loss_and_grad(x, y)
    h = 1e-6
    for name in ("stem.weight", "blocks.0.fc1.weight", "blocks.1.fc2.bias", "blocks.2.fc1.bias"):
        flat, g = net.params[name].reshape(-1), grads[name].reshape(-1)
        for i in {int(np.argmax(np.abs(g))), 0}:
            old = flat[i]
            flat[i] = old + h
            lp = net.loss_and_grad(x, y)[0]
            flat[i] = old - h
            lm = net.loss_and_grad(x, y)[0]
            flat[i] = old
            fd = (lp - lm) / (2 * h)
            assert abs(fd - g[i]) <= 1e-6 * max(abs(fd), 1e-3) + 1e-9, (name, i, fd, g[i])


def test_nested_blocks_and_dotted_local_names():
    text = """\
input: [4]
blocks:
  inner:
    params: [n]
    layers:
      - linear: {name: proj.0, out_features: $n}
      - relu: {name: proj.1}
  outer:
    params: [n]
    layers:
      - inner: {name: a, n: $n}
      - inner: {name: b, n: $n}
      - add: {inputs: [a, b.proj.1]}
layers:
  - outer: {name: stage, repeat: 2, n: 4}
  - linear: {out_features: 2}
loss: cross_entropy
"""
    net = check_text(text)
    assert [l.name for l in net.layers] == [
        "stage.0.a.proj.0", "stage.0.a.proj.1", "stage.0.b.proj.0", "stage.0.b.proj.1", "stage.0.add1",
        "stage.1.a.proj.0", "stage.1.a.proj.1", "stage.1.b.proj.0", "stage.1.b.proj.1", "stage.1.add1", "fc1"]
    assert net.layers[4].inputs == ["stage.0.a.proj.1", "stage.0.b.proj.1"]
    assert net.layers[5].inputs == ["stage.0.add1"]


# ---- ResNet-20 ------------------------------------------------------------------------------
class _Basic(nn.Module):
    """He et al.'s CIFAR basic block, written here as torchvision writes it."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class _ResNet20(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = nn.Sequential(*[_Basic(16, 16, 1) for _ in range(3)])
        self.layer2 = nn.Sequential(_Basic(16, 32, 2), _Basic(32, 32, 1), _Basic(32, 32, 1))
        self.layer3 = nn.Sequential(_Basic(32, 64, 2), _Basic(64, 64, 1), _Basic(64, 64, 1))
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def test_resnet20_matches_a_pytorch_resnet20():
    net = load(ROOT / "specs" / "resnet20.yaml")
    ref = _ResNet20()
    assert net.total_params == sum(p.numel() for p in ref.parameters()) == 272_474
    sd = {k: tuple(v.shape) for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    ours = {**net.param_shapes(), **net.buffer_shapes()}
    assert set(ours) == set(sd) and all(ours[k] == sd[k] for k in sd)
    # the same function: the spec's torch twin with the reference's weights gives its outputs
    assert_twin_computes(net, ref, (3, 32, 32))


@pytest.mark.slow
def test_resnet20_verifies():
    out = subprocess.run([sys.executable, "-m", "netcompiler", "verify", "specs/resnet20.yaml", "--batch-size", "2",
                          "--samples", "2"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "verify: ok" in out.stdout


def test_show_finds_a_block_layer_by_its_dotted_or_c_name(capsys):
    from netcompiler.cli import main

    spec_path = str(ROOT / "specs" / "resnet20.yaml")
    assert main(["show", spec_path, "--layer", "layer2.0.add1", "--backward"]) == 0
    dotted = capsys.readouterr().out
    assert "static void layer2_0_add1_backward(real_t *din0, real_t *din1" in dotted
    assert "layer2_0_add1_forward" not in dotted
    assert main(["show", spec_path, "--layer", "layer2_0_add1", "--backward"]) == 0
    assert capsys.readouterr().out == dotted
    # layer1.0.conv1's functions only, not those of layer1.0.conv10 or of another block's conv1
    assert main(["show", spec_path, "--layer", "layer1.0.conv1"]) == 0
    out = capsys.readouterr().out
    assert "static void layer1_0_conv1_forward(" in out and "layer1_1_conv1" not in out


def test_report_lists_each_layers_inputs():
    from netcompiler.report import build_report, format_report, table_lines

    rep = build_report(load(ROOT / "specs" / "resnet20.yaml"))
    rows = {r["name"]: r for r in rep["layers"]}
    assert rows["layer2.0.add1"]["inputs"] == ["layer2.0.bn2", "layer2.0.downsample.1"]
    assert rows["layer2.0.downsample.0"]["inputs"] == ["layer1.2.relu2"]
    lines = table_lines(rep)
    assert lines[0].split()[:5] == ["#", "name", "kind", "inputs", "input"]
    assert any("layer2.0.bn2, layer2.0.downsample.1" in line for line in lines)
    assert "inputs" in format_report(rep, "csv").splitlines()[0]
    header = render(load(ROOT / "specs" / "resnet20.yaml")).source.split("*/")[0]
    assert re.search(r"\* +\d+  layer2\.0\.add1 +add +layer2\.0\.bn2, layer2\.0\.downsample\.1 ", header)
    # a chain keeps its table as it was: no inputs column
    chain = build_report(load(ROOT / "specs" / "lenet5.yaml"))
    assert not chain["graph"] and "inputs" not in table_lines(chain)[0]


def test_readme_residual_example_is_a_valid_spec():
    text = (ROOT / "README.md").read_text()
    block = next(b for b in text.split("```yaml\n")[1:] if "blocks:" in b).split("```")[0]
    net = check_text(block, "README.md")
    assert [l.name for l in net.layers][3:6] == ["layer1.0.conv1", "layer1.0.bn1", "layer1.0.relu1"]
    assert net.layers[-1].name == "fc" and net.output_shape == (10,)
    assert sum(l.kind.kind == "add" for l in net.layers) == 3


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("graph_")] + ["resnet20", "lenet5"])
def test_report_counts_the_plans_activation_slots(case):
    """The memory the report (and the budget check) counts is the plan's per-sample block: the
    input, every output with a slot of its own (no concat part in place, no alias), saved
    slots, and the slots of gradients that are added afterwards."""
    from netcompiler.report import build_report

    net = load(ROOT / "specs" / f"{case}.yaml") if case in ("resnet20", "lenet5") else check_text(CASES[case])
    plan = make_plan(net)
    rep = build_report(net)
    assert sum(t.size for t in plan.activations) == plan.in_size + rep["saved_activations"]
    # each slot starts at whole vectors: the block is larger only by the gaps that align them
    assert [t.offset % plan.vec for t in plan.activations] == [0] * len(plan.activations)
    assert 0 <= plan.acts_per_sample - sum(t.size for t in plan.activations) < plan.vec * len(plan.activations)
    assert plan.ints_per_sample == rep["saved_indices"]


def test_templates_write_input_gradients_where_the_plan_says():
    """Backward writes an input gradient at L.din_macro (u.DIN), never at the input's own slot
    (L.in_macro): with several readers the plan points it at a slot it adds afterwards."""
    for path in sorted((ROOT / "templates" / "layers").glob("*.j2")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if "L.in_macro" in line:
                assert not re.search(r"\bda\b|dacts|\bdin\b|\bdx\b|DX", line), f"{path.name}:{n}: {line.strip()}"


@pytest.mark.parametrize("text", [BLOCK_SPEC, None], ids=["blocks", "san_graph"])
def test_verify_passes_on_graphs(text, tmp_path):
    """netc verify's comparisons (the torch twin running the graph, finite differences) on a
    repeated block and on the sanitizer test's graph (views, copies, sums, a fused ReLU)."""
    from netcompiler.verify import verify
    from test_sanitizers import SAN_SPECS

    path = tmp_path / "g.yaml"
    path.write_text(text or SAN_SPECS["san_graph"])
    rows, _ = verify(str(path), batch=3, seed=1, per_tensor=2, use_torch=True, threads=2)
    assert rows and all(r.ok for r in rows), [r for r in rows if not r.ok]
    assert {r.reference for r in rows} == {"torch", "finite-diff"}


def test_report_counts_the_gradient_sums_as_backward_flops():
    """x (3x7x6 = 126 values) has three readers: the add stores its gradient, p and q each add
    theirs (126 FLOPs each); add(x, x) adds its second copy (2x5x4 = 40)."""
    from netcompiler.report import build_report

    for case, extra in [("graph_three_readers", {"p": 126, "q": 126, "add1": 0}),
                        ("graph_add_same_twice", {"add1": 2 * 5 * 4, "x": 0})]:
        net = check_text(CASES[case])
        rows = {r["name"]: r for r in build_report(net)["layers"]}
        layers = {l.name: l for l in net.layers}
        for name, n in extra.items():
            assert rows[name]["backward_flops"] - layers[name].kind.flops(layers[name])[1] == n, (case, name)
