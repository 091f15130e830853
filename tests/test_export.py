"""`netc export`: the standalone C against the cffi build's forward.

For every spec in specs/ and some odd ones (every layer kind and option the exporter
lowers differently: folded and unfolded batch norm, fused and general pooling, cut
ceil_mode windows, groups, dilation, 'same' padding, a leading activation, a single step,
a network that is only a reshape), the test
- gives the network random weights (`Net.init`, batch norms random running statistics)
  and saves them with the weights writer, as `netc train` would;
- runs `netc export SPEC WEIGHTS --format c -o DIR`;
- compiles NAME.c with tests/c/export_driver.c under `-std=c99 -pedantic -Wall -Wextra
  -Werror -Wdouble-promotion -Wconversion ...` (gcc, and clang when it is installed);
- runs the driver on random inputs and compares its outputs with `Net.forward` (float32).
One spec also runs under AddressSanitizer and UndefinedBehaviorSanitizer with an arena
of exactly NAME_ARENA_BYTES filled with NaN.
"""
from __future__ import annotations

import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import netcompiler as nc
from conftest import ROOT, assert_close, randomize_batchnorm, spec, spec_params
from netcompiler.check import check_text, load
from netcompiler.cli import main
from netcompiler.errors import SpecErrors
from netcompiler.export import export_c, load_state
from netcompiler.weights import save_weights

DRIVER = ROOT / "tests" / "c" / "export_driver.c"
# every spec, and the graph test specs (fan-out, add, concat, the newer kinds)
SPECS = sorted((ROOT / "specs").glob("*.yaml")) + sorted((ROOT / "tests" / "specs").glob("export_*.yaml"))
STRICT = ["-std=c99", "-pedantic", "-Wall", "-Wextra", "-Werror",
          # no float promoted to double (slow on single-precision FPUs), no implicit narrowing
          "-Wdouble-promotion", "-Wconversion", "-Wshadow", "-Wcast-qual", "-Wstrict-prototypes"]
COMPILERS = [c for c in ("gcc", "clang") if shutil.which(c)]
RTOL, ATOL = 1e-5, 1e-6

ODD = {
    # batch norm folded into a grouped, dilated, strided, padded conv; general max- and
    # average pooling (padding, ceil_mode, count_include_pad off); a linear layer without bias
    "odd_groups": spec([4, 9, 11], [
        "conv2d: {out_channels: 6, kernel_size: [3, 2], stride: [2, 1], padding: [1, 2], dilation: [1, 2], groups: 2}",
        "batchnorm2d: {eps: 0.001}",
        "leaky_relu: {negative_slope: 0.2}",
        "maxpool2d: {kernel_size: 3, stride: 2, padding: 1, ceil_mode: true}",
        "avgpool2d: {kernel_size: 2, padding: 1, ceil_mode: true, count_include_pad: false}",
        "flatten",
        "linear: {out_features: 7, bias: false}",
        "sigmoid",
    ], name="odd_groups"),
    # explicit padding [top, bottom, left, right] (TensorFlow's 'SAME' with stride 2) on a conv and
    # both pools, and the activations relu6, hardswish and silu as epilogues
    "odd_pads4": spec([3, 10, 9], [
        "conv2d: {out_channels: 5, kernel_size: 3, stride: 2, padding: [0, 1, 1, 1]}",
        "relu6",
        "maxpool2d: {kernel_size: 3, stride: 1, padding: [1, 0, 0, 1]}",
        "hardswish",
        "avgpool2d: {kernel_size: 2, stride: 2, padding: [0, 1, 0, 1], count_include_pad: false}",
        "silu",
        "avgpool2d: {kernel_size: 2, stride: 1, padding: [1, 0, 0, 1]}",
        "flatten",
        "linear: {out_features: 4}",
    ], name="odd_pads4"),
    # an activation and a batch norm on the input (a step of their own), 'same' padding,
    # a max-pool fused into the conv with a cut last window, GELU both ways, dropout
    "odd_leading": spec([3, 5, 7], [
        "tanh",
        "batchnorm2d",
        "conv2d: {out_channels: 5, kernel_size: 3, padding: same, bias: false}",
        "gelu: {approximate: tanh}",
        "maxpool2d: {kernel_size: 2, ceil_mode: true}",
        "gelu",
        "dropout: {p: 0.3}",
        "flatten",
        "linear: {out_features: 3}",
    ], name="odd_leading"),
    # a batch norm after the activation (applied per channel before a fused max-pool), a
    # kernel row too long to unroll, average pooling with its padding counted
    "odd_wide": spec([2, 6, 40], [
        "conv2d: {out_channels: 3, kernel_size: [2, 17], padding: [0, 3]}",
        "relu",
        "batchnorm2d",
        "maxpool2d: {kernel_size: [1, 3], ceil_mode: true}",
        "avgpool2d: {kernel_size: 3, stride: 1, padding: 1}",
        "tanh",
    ], loss="mse", name="odd_wide"),
    # odd 'same' padding (0/1 rows, 3/3 columns) with dilation and groups; a dilated
    # max-pool (general path); a fused max-pool whose only window is cut to the 1-wide row
    "odd_dilated": spec([2, 7, 3], [
        "conv2d: {out_channels: 4, kernel_size: [2, 4], padding: same, dilation: [1, 2], groups: 2}",
        "maxpool2d: {kernel_size: [2, 1], stride: 1, dilation: [2, 1]}",
        "relu",
        "conv2d: {out_channels: 3, kernel_size: 3, stride: 2, expect: [3, 2, 1]}",
        "maxpool2d: {kernel_size: 2, ceil_mode: true, expect: [3, 1, 1]}",
        "sigmoid",
        "flatten",
        "linear: {out_features: 2}",
    ], name="odd_dilated"),
    # a batch norm on the input, then flatten: its channels are the input's
    "odd_bn_flatten": spec([3, 2, 2], ["leaky_relu", "batchnorm2d", "flatten", "linear: {out_features: 2}"],
                           name="odd_bn_flatten"),
    # names in mixed case, and layer names that differ only in case (their arena macros must not)
    "odd_case": spec([1, 6, 6], ["conv2d: {name: Conv, out_channels: 2, kernel_size: 3}",
                                 "conv2d: {name: conv, out_channels: 2, kernel_size: 1}",
                                 "conv2d: {name: CONV, out_channels: 2, kernel_size: 1}",
                                 "flatten", "linear: {out_features: 2}"], name="MixedCase"),
    # a chain of blocks: nested names (stage.0.conv, C names stage_0_conv)
    "odd_block": ("input: [2, 6, 6]\nblocks:\n  cbr:\n    params: [c]\n    layers:\n"
                  "      - conv2d: {name: conv, out_channels: $c, kernel_size: 3, padding: 1}\n"
                  "      - batchnorm2d: {name: bn}\n      - relu\n"
                  "layers:\n  - cbr: {name: stage, repeat: 2, c: 3}\n  - flatten\n  - linear: {out_features: 2}\n"
                  "loss: cross_entropy\nname: odd_block\n"),
    # one step: no arena at all
    "odd_linear": spec([5], ["linear: {out_features: 9}", "gelu"], name="odd_linear"),
    # only a reshape: the output is a copy of the input
    "odd_flatten": spec([2, 3, 2], ["dropout", "flatten"], name="odd_flatten"),
}


def _net_and_weights(spec_path: Path, tmp: Path, seed: int = 0):
    network = load(spec_path)
    net = nc.compile(network, dtype="float32", threads=1)
    net.init(seed)
    randomize_batchnorm(net, np.random.default_rng(seed))
    weights = tmp / "weights.npz"
    save_weights(weights, net, {"mean": np.float64(0.5), "std": np.float64(0.25)})
    return network, net, weights


def _compile(cc: str, out: Path, name: str, extra: list[str] = ()) -> Path:
    exe = out / f"driver_{cc}"
    nu = name.upper()
    defs = [f'-DNET_HEADER="{name}.h"', f"-DINFER={name}_infer", f"-DINPUT_SIZE={nu}_INPUT_SIZE",
            f"-DOUTPUT_SIZE={nu}_OUTPUT_SIZE", f"-DARENA_BYTES={nu}_ARENA_BYTES"]
    cmd = [cc, *STRICT, "-O2", *extra, f"-I{out}", *defs, str(out / f"{name}.c"), str(DRIVER), "-o", str(exe), "-lm"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr}"
    return exe


def _run(exe: Path, x: np.ndarray, out_size: int, tmp: Path) -> np.ndarray:
    xin, yout = tmp / "x.bin", tmp / "y.bin"
    np.ascontiguousarray(x, np.float32).tofile(xin)
    r = subprocess.run([str(exe), str(xin), str(yout), str(len(x))], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{exe.name} exited with {r.returncode}\n{r.stderr}"
    return np.fromfile(yout, np.float32).reshape(len(x), out_size)


def _export_cli(spec_path: Path, weights: Path, out: Path, target: str, capsys) -> str:
    assert main(["export", str(spec_path), str(weights), "--format", "c", "-o", str(out), "--target", target]) == 0
    return capsys.readouterr().out


def _check(spec_path: Path, tmp_path: Path, capsys, target: str = "generic", n: int = 3) -> dict:
    network, net, weights = _net_and_weights(spec_path, tmp_path)
    out = tmp_path / "out"
    printed = _export_cli(spec_path, weights, out, target, capsys)
    x = np.random.default_rng(7).standard_normal((n, *network.input_shape)).astype(np.float32)
    ref = net.forward(x).reshape(n, -1)
    for cc in COMPILERS:
        y = _run(_compile(cc, out, network.name), x, ref.shape[1], tmp_path)
        assert_close(y, ref, RTOL, f"{network.name} ({cc}, {target})", atol=ATOL)
    return dict(network=network, out=out, printed=printed)


@pytest.mark.parametrize("path", spec_params(SPECS))
def test_specs_match_forward(path, tmp_path, capsys):
    _check(path, tmp_path, capsys)


@pytest.mark.parametrize("name", sorted(ODD))
def test_odd_shapes_match_forward(name, tmp_path, capsys):
    path = tmp_path / f"{name}.yaml"
    path.write_text(ODD[name])
    _check(path, tmp_path, capsys)


ODD["odd_channels"] = spec([4, 9, 9], [  # host: 8 output channels at a time (strided, short rows, groups)
    "conv2d: {out_channels: 16, kernel_size: 3, stride: 2, padding: 1, groups: 2}",
    "relu",
    "conv2d: {out_channels: 8, kernel_size: [2, 3], padding: same, bias: false}",
    "maxpool2d: {kernel_size: 2, ceil_mode: true}",
    "tanh",
    "flatten",
    "linear: {out_features: 3}",
], name="odd_channels")


ODD["odd_pixels"] = spec([3, 5, 13], [  # host: 8 channels x blocks of 8 pixels, with a tail of 5 and of 3
    "conv2d: {out_channels: 8, kernel_size: 3, padding: 1}",
    "gelu",
    "conv2d: {out_channels: 16, kernel_size: [1, 3], padding: [0, 0, 0, 1], dilation: [1, 2]}",
    "maxpool2d: {kernel_size: [1, 1]}",
    "relu",
    "flatten",
    "linear: {out_features: 3}",
], name="odd_pixels")


# host: rows of 3 pixels, too few sums: even and odd input channels (3: one left over) sum apart
ODD["odd_split"] = spec([3, 7, 7], ["conv2d: {out_channels: 8, kernel_size: 3, stride: 2}", "relu",
                                    "conv2d: {out_channels: 8, kernel_size: 2, padding: 1}", "maxpool2d: {kernel_size: 2}",
                                    "flatten", "linear: {out_features: 2}"], name="odd_split")


# (input channels, output channels, kernel, padding) of a conv on 28x28 before a 2x2 max-pool, and the
# host form that ran it faster when both were timed (whole inference, -O3 -march=native, one core):
# rows hold a small kernel's broadcast weights in registers and waste nothing on padding channels
HOST_FORMS = [((1, 6, 5, 2), "rows"),       # lenet5's conv1: 7.35 us against 7.97 (channels)
              ((1, 6, 3, 0), "rows"),       # 2.34 against 2.58
              ((2, 6, 3, 1), "rows"),       # 3.11 against 3.94
              ((1, 8, 3, 1), "channels"),   # 2.93-3.18 against 3.59-3.89: no padding channel
              ((1, 16, 5, 2), "channels"),  # 4.62 against 9.35
              ((1, 32, 3, 0), "channels")]  # alphabet's conv1


@pytest.mark.parametrize("shape, form", HOST_FORMS, ids=[f"{c[0]}x{c[1]}k{c[2]}" for c, _ in HOST_FORMS])
def test_host_conv_forms(shape, form):
    """The cost estimate picks the form that measured faster on these small first convs."""
    cin, cout, k, pad = shape
    network = check_text(spec([cin, 28, 28], [f"conv2d: {{out_channels: {cout}, kernel_size: {k}, padding: {pad}}}",
                                             "relu", "maxpool2d: {kernel_size: 2}", "flatten",
                                             "linear: {out_features: 2}"]), "forms.yaml")
    e = export_c(network, _state(network), "host")
    assert [s.form for s in e.steps if s.op == "conv"] == [form]


@pytest.mark.parametrize("name", ["lenet5", "cifar", "alphabet", "odd_channels", "odd_pixels", "odd_split"])
def test_host_target_matches_forward(name, tmp_path, capsys):
    """host: GCC vectors (rows of 8 outputs, 8 channels at a time, linear dot products), and
    the same C with -DNETC_NO_VECTORS (plain C)."""
    if name in ODD:
        path = tmp_path / f"{name}.yaml"
        path.write_text(ODD[name])
    else:
        path = ROOT / "specs" / f"{name}.yaml"
    r = _check(path, tmp_path, capsys, target="host")
    e = export_c(r["network"], load_state(r["network"], tmp_path / "weights.npz")[0], "host")
    # every net here has a conv of 8 channels at once: a multiple of 8, or padded to 8 with zero
    # channels (cifar's 7; not cifar's 5 and 10: more than a quarter of padding), unless it is a
    # Winograd step (alphabet's conv2 and conv3: test_export_winograd.py); lenet5's conv1 (6
    # channels, 5x5 weights that stay in registers) is cheaper in rows (test_host_conv_forms)
    convs = [s for s in e.steps if s.op == "conv"]
    assert all(s.c["COUT"] % 8 for s in convs if s.form == "rows")
    assert [s.name for s in convs if s.form == "rows" and s.c["COUT"] == 6] == (["conv1"] if name == "lenet5" else [])
    assert [s.c["COUT"] for s in convs if s.form == "channels" and s.c["COUT"] % 8] == ([7] if name == "cifar" else [])
    assert all(s.c.get("VECC") == (s.form == "channels") for s in e.steps if s.op == "conv")
    assert any(s.c.get("VECC") for s in e.steps)
    assert (name in ("alphabet", "lenet5", "odd_pixels")) == any(s.c.get("VL") == 16 for s in e.steps)  # 16-channel groups
    network, net, _ = _net_and_weights(path, tmp_path)
    x = np.random.default_rng(7).standard_normal((3, *network.input_shape)).astype(np.float32)
    y = _run(_compile(COMPILERS[0], r["out"], network.name, ["-DNETC_NO_VECTORS"]), x, math.prod(network.output_shape),
             tmp_path)
    assert_close(y, net.forward(x).reshape(3, -1), RTOL, f"{name} (host, no vectors)", atol=ATOL)


@pytest.mark.parametrize("path", [ROOT / "specs" / "resnet20.yaml", ROOT / "tests" / "specs" / "export_graph.yaml"],
                         ids=["resnet20", "export_graph"])
def test_host_target_matches_forward_on_graphs(path, tmp_path, capsys):
    _check(path, tmp_path, capsys, target="host", n=2)


def test_cortex_m_targets_match_forward(tmp_path, capsys):
    """float32 --target cortex-m4 / cortex-m7: the generic C (the DSP forms are int8's)."""
    for target in ("cortex-m4", "cortex-m7"):
        (tmp_path / target).mkdir()
        r = _check(ROOT / "specs" / "lenet5.yaml", tmp_path / target, capsys, target=target)
        assert f"Target {target}: " in (r["out"] / "lenet5.c").read_text()


def test_bench_export_speed_runs():
    """bench/export_speed.py --quick runs and prints its table (no time is asserted)."""
    import sys

    r = subprocess.run([sys.executable, str(ROOT / "bench" / "export_speed.py"), "--quick", "--nets", "lenet5",
                        "--min-time", "0.005", "--reps", "2"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "export/NAME_forward" in r.stdout and re.search(r"^\s*lenet5\s+[0-9.]+\s+[0-9.]+\s+[0-9.]+", r.stdout, re.M)


def test_sanitizers(tmp_path, capsys):
    """odd_leading (every epilogue, a leading step, fused pooling with a cut window),
    cifar (unfused batch norm and pooling) and export_graph (views, in-place adds) under ASan + UBSan, arena exactly as large as
    the header says and filled with NaN."""
    for name in ("odd_leading", "cifar", "export_graph"):
        tmp = tmp_path / name
        tmp.mkdir()
        path = {"cifar": ROOT / "specs" / "cifar.yaml",
                "export_graph": ROOT / "tests" / "specs" / "export_graph.yaml"}.get(name, tmp / f"{name}.yaml")
        if name in ODD:
            path.write_text(ODD[name])
        network, net, weights = _net_and_weights(path, tmp)
        _export_cli(path, weights, tmp / "out", "generic", capsys)
        exe = _compile("gcc", tmp / "out", network.name,
                       ["-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"])
        x = np.random.default_rng(3).standard_normal((2, *network.input_shape)).astype(np.float32)
        ref = net.forward(x).reshape(2, -1)
        assert_close(_run(exe, x, ref.shape[1], tmp), ref, RTOL, f"{name} (sanitizers)", atol=ATOL)


def test_host_target_under_sanitizers(tmp_path, capsys):
    """--target host (vectors of 16 and 8 channels, zero channels padding 6 to 8, blocks of 8 pixels and their tails) under
    ASan + UBSan, arena exactly as large as the header says."""
    for name in ("alphabet", "odd_pixels", "lenet5", "odd_split"):  # lenet5: conv1 padded to 8 channels
        tmp = tmp_path / name
        tmp.mkdir()
        path = ROOT / "specs" / f"{name}.yaml" if name not in ODD else tmp / f"{name}.yaml"
        if name in ODD:
            path.write_text(ODD[name])
        network, net, weights = _net_and_weights(path, tmp)
        _export_cli(path, weights, tmp / "out", "host", capsys)
        exe = _compile("gcc", tmp / "out", network.name,
                       ["-O2", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"])
        x = np.random.default_rng(3).standard_normal((2, *network.input_shape)).astype(np.float32)
        ref = net.forward(x).reshape(2, -1)
        assert_close(_run(exe, x, ref.shape[1], tmp), ref, RTOL, f"{name} (host, sanitizers)", atol=ATOL)


# ---- random chains against the independent PyTorch reference --------------------------------
ACTS = ["relu", "tanh", "sigmoid", "gelu", "gelu: {approximate: tanh}", "leaky_relu: {negative_slope: 0.3}", "dropout"]


def _random_layer(r, dims: int) -> str:
    if dims == 1:
        return r.choice(ACTS + [f"linear: {{out_features: {r.randint(1, 9)}}}",
                                f"linear: {{out_features: {r.randint(1, 6)}, bias: false}}"])
    kind = r.choice(["conv", "conv", "max", "max", "avg", "bn", "act", "flatten"])
    if kind == "conv":
        pad = r.choice(["0", "1", "same", "[0, 1]", "valid"])
        return (f"conv2d: {{out_channels: {2 * r.randint(1, 3)}, kernel_size: {r.choice(['1', '2', '3', '[2, 3]'])}, "
                f"stride: {1 if pad == 'same' else r.choice([1, 2])}, padding: {pad}, dilation: {r.choice([1, 1, 2])}, "
                f"groups: {r.choice([1, 1, 2])}, bias: {r.choice(['true', 'false'])}}}")
    k = r.choice([1, 2, 3])
    if kind == "max":
        return (f"maxpool2d: {{kernel_size: {k}, stride: {r.choice(['null', '1', '2', str(k)])}, padding: "
                f"{r.choice([0, k // 2])}, dilation: {r.choice([1, 1, 2])}, ceil_mode: {r.choice(['true', 'false'])}}}")
    if kind == "avg":
        return (f"avgpool2d: {{kernel_size: {k}, stride: {r.choice(['null', '1', '2'])}, padding: {r.choice([0, k // 2])}, "
                f"ceil_mode: {r.choice(['true', 'false'])}, count_include_pad: {r.choice(['true', 'false'])}}}")
    return {"bn": "batchnorm2d", "act": r.choice(ACTS), "flatten": "flatten"}[kind]


def random_chains(count: int, seed: int = 0):
    """`count` valid random specs: up to 7 layers of every kind and option the exporter treats
    differently (invalid draws, e.g. a kernel larger than its input, are skipped)."""
    import random

    r = random.Random(seed)
    while count:
        shape = [r.randint(1, 4), r.randint(3, 12), r.randint(3, 12)]
        layers, dims = [], 3
        for _ in range(r.randint(1, 7)):
            layers.append(_random_layer(r, dims))
            dims = 1 if layers[-1].startswith(("flatten", "linear")) else dims
        text = spec(shape, layers, loss="mse", name=f"chain{count}")
        try:
            network = check_text(text, "chain.yaml")
        except SpecErrors:
            continue
        count -= 1
        yield text, network


def test_random_chains_match_pytorch(tmp_path):
    """30 random chains (batch norms with random statistics and signed scales) against
    conftest's PyTorch model built from the raw YAML, in float64."""
    import types

    import torch

    from conftest import reference_model

    rng = np.random.default_rng(0)
    for i, (text, network) in enumerate(random_chains(30)):
        state = _state(network, i)
        for k, v in state.items():
            if k.split(".")[0].startswith("bn"):
                low, high = {"weight": (-1.5, 1.5), "bias": (-0.5, 0.5), "running_mean": (-0.5, 0.5),
                             "running_var": (0.5, 2.0)}[k.split(".")[1]]
                state[k] = rng.uniform(low, high, v.shape)
        state = {k: np.asarray(v, np.float32) for k, v in state.items()}
        out = tmp_path / str(i)
        export_c(network, state).write(out)
        x = rng.standard_normal((2, *network.input_shape)).astype(np.float32)
        y = _run(_compile("gcc", out, network.name), x, math.prod(network.output_shape), out)
        model = reference_model(types.SimpleNamespace(network=network), text, state).eval()
        with torch.no_grad():
            ref = model(torch.as_tensor(x, dtype=torch.float64)).numpy().reshape(2, -1)
        assert_close(y, ref, RTOL, f"random chain {i}:\n{text}", atol=ATOL)


# ---- the memory plan -----------------------------------------------------------------------
def _state(network, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"{l.name}.{k}": np.asarray(v) for l in network.layers for k, v in l.kind.init_params(l, rng).items()}


def test_lenet5_arena_holds_only_live_tensors():
    """conv1+relu+pool1 and conv2+relu+pool2 are each one step (the 6x28x28 and 16x10x10
    conv outputs never exist); the arena is the largest (input + scratch + output) of a
    step: conv1's padded input 1x32x32 and one conv row of 28, next to its pooled output 6x14x14."""
    network = load(ROOT / "specs" / "lenet5.yaml")
    e = export_c(network, _state(network))
    assert [[l.name for l in s.layers] for s in e.steps] == [
        ["conv1", "relu1", "pool1"], ["conv2", "relu2", "pool2", "flatten1"], ["fc1", "relu3"], ["fc2", "relu4"], ["fc3"]]
    assert e.arena_bytes == 4 * (6 * 14 * 14 + 32 * 32 + 28)
    assert e.weights_bytes == 4 * network.total_params
    assert f"#define LENET5_ARENA_BYTES {e.arena_bytes} " in e.header


def test_ping_pong_offsets_do_not_overlap():
    """Each step's input, scratch and output are disjoint and inside the arena."""
    network = check_text(ODD["odd_groups"], "odd.yaml")
    e = export_c(network, _state(network))
    offsets = {b.macro: (b.offset, b.size) for b in e.memory.buffers}
    for s in e.steps:
        spans = []
        for ref, size in ((s.in_ref, s.in_size), (s.out_ref, s.out_size), (s.scratch_ref, s.scratch)):
            if ref.startswith("a + "):
                key = ref[4:]
                start = offsets[key][0] if key in offsets else int(key)
                spans.append((start, start + size))
        spans.sort()
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), (s.name, spans)
        assert all(0 <= a and b <= e.memory.arena_floats for a, b in spans), (s.name, spans)


def check_plan(e) -> None:
    """Run the memory plan of an export step by step, tracking which step's value each
    element of the arena and of the output holds: every input a step reads must still be
    there (its producer's, or a concat's that took it in place), a scratch must not overlap
    the step's input or output, every region must lie inside its buffer, and the last
    value must be the whole output."""
    plan = e.memory
    sizes = {"arena": plan.arena_floats, "output": e.steps[-1].out_size}
    owner = {base: [None] * n for base, n in sizes.items()}
    provides: dict = {}  # owner -> the steps whose values it holds (itself; concats that took it in place)

    def span(step):
        base, start, n = plan.region(step)
        assert base == "input" or 0 <= start and start + n <= sizes[base], (step.name, base, start, n)
        return base, start, n

    for s in e.steps:
        for src in s.inputs:
            if src is None:
                continue
            base, start, n = span(src)
            held = owner[base][start:start + n]
            assert all(id(src) in provides.get(h, ()) for h in held), f"{s.name} reads {src.name}, overwritten"
        base, start, n = span(s)
        if s.scratch:
            sbase, sstart = "arena", next(b.offset for b in plan.buffers if f"a + {b.macro}" == s.scratch_ref)
            assert sstart + s.scratch <= plan.arena_floats
            for src in [*s.inputs, s]:
                if src is not None:
                    b2, st2, n2 = span(src)
                    assert b2 != "arena" or st2 + n2 <= sstart or sstart + s.scratch <= st2, (s.name, "scratch")
            owner["arena"][sstart:sstart + s.scratch] = [("scratch", s.name)] * s.scratch
        provides[id(s)] = {id(s)}
        if s.op == "concat":
            for k, src in enumerate(s.inputs):
                off = s.c["OFFSETS"][k]
                if src is not None and span(src) == (base, start + off, src.out_size):  # in place
                    for h in provides.values():
                        if id(src) in h:
                            h.add(id(s))
                elif src is not None or k in [c[0] for c in s.copies]:
                    assert k in [c[0] for c in s.copies], (s.name, k)
                    owner[base][start + off:start + off + s.c["SIZES"][k]] = [id(s)] * s.c["SIZES"][k]
        else:
            owner[base][start:start + n] = [id(s)] * n
    final = next(s for s in e.steps if s.output)
    assert span(final) == ("output", 0, sizes["output"])


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_memory_plan_keeps_every_value_until_its_last_reader(path):
    network = load(path)
    for target in ("generic", "host"):
        check_plan(export_c(network, _state(network), target))


@pytest.mark.parametrize("name", sorted(ODD))
def test_memory_plan_of_odd_chains(name):
    network = check_text(ODD[name], f"{name}.yaml")
    check_plan(export_c(network, _state(network)))


def test_check_plan_catches_an_overwritten_input():
    """The checker above fails when a buffer is reused while a reader is still to come."""
    network = load(ROOT / "tests" / "specs" / "export_graph.yaml")
    e = export_c(network, _state(network))
    stem = next(s for s in e.steps if s.name == "stem")
    e.memory.places[id(stem)].base.end = e.memory.places[id(stem)].base.start  # as if dead after it ran
    from netcompiler.export.memory import _greedy

    regions = e.memory.buffers
    e.memory.arena_floats = _greedy(regions)
    with pytest.raises(AssertionError, match="overwritten|scratch"):
        check_plan(e)


def test_graph_plan_shares_memory():
    """export_graph: concat parts written in place (cat1, cat3 copy nothing; cat2 copies only
    the network input), an add in place in its dying input (res2 over mix), a batch norm in
    place on the features it alone reads; the arena is smaller than the sum of the buffers."""
    network = load(ROOT / "tests" / "specs" / "export_graph.yaml")
    e = export_c(network, _state(network))
    steps = {s.name: s for s in e.steps}
    assert steps["cat1"].copies == [] and steps["cat3"].copies == []
    assert steps["cat2"].copies == [(2, 900, 300)]  # after up [4][10][10] and res1_act [5][10][10]
    assert steps["res2"].out_ref == steps["res2"].in_refs[0] == steps["mix"].out_ref
    assert steps["feats_bn"].out_ref == steps["feats_bn"].in_ref
    assert steps["mix_bn"].out_ref != steps["mix_bn"].in_ref  # mix is read by res2 too
    assert steps["b"].out_ref == steps["cat1"].out_ref + " + 300"
    assert [l.name for l in steps["fc1"].layers] == ["fc1", "fc1_bn", "gelu1"]  # batchnorm1d folded
    assert steps["fc1"].folded.name == "fc1_bn"
    own = sum(-(-s.out_size // 4) * 4 for s in e.steps if not s.output and s.op != "concat")
    assert e.memory.arena_floats < own


def test_elementwise_step_runs_in_place():
    network = check_text(spec([2, 4, 4], ["conv2d: {out_channels: 2, kernel_size: 1}", "maxpool2d: {kernel_size: 3, stride: 1}",
                                         "flatten", "linear: {out_features: 2}"]), "x.yaml")
    e = export_c(network, _state(network))
    assert [s.op for s in e.steps] == ["conv", "maxpool", "linear"]  # overlapping windows: not fused
    network = check_text(spec([2, 4, 4], ["relu", "batchnorm2d", "flatten", "linear: {out_features: 2}"]), "x.yaml")
    e = export_c(network, _state(network))
    assert e.steps[0].op == "elementwise" and e.steps[0].in_ref == "input"
    network = check_text(spec([8], ["linear: {out_features: 8}", "linear: {out_features: 8}"]), "x.yaml")
    assert export_c(network, _state(network)).arena_bytes == 4 * 8


def test_batchnorm_folds_into_the_conv():
    network = load(ROOT / "specs" / "cifar.yaml")
    e = export_c(network, _state(network))
    # cifar's batch norms follow a ReLU: applied per channel, not folded
    assert all(not s.layers[-1].kind.kind == "batchnorm2d" or s.post for s in e.steps)
    network = check_text(spec([1, 4, 4], ["conv2d: {out_channels: 2, kernel_size: 3, bias: false}", "batchnorm2d",
                                          "flatten"]), "x.yaml")
    state = _state(network)
    state["bn1.running_mean"][:] = [1.0, -2.0]
    state["bn1.running_var"][:] = [4.0, 0.25]
    state["bn1.weight"][:] = [3.0, 0.5]
    state["bn1.bias"][:] = [0.5, 1.0]
    e = export_c(network, state)
    (step,) = e.steps
    assert not step.post and [a.name for a in step.arrays] == ["conv1_weight", "conv1_bias"]
    eps = 1e-5
    scale = np.array([3.0 / math.sqrt(4 + eps), 0.5 / math.sqrt(0.25 + eps)])
    np.testing.assert_allclose(step.arrays[1].values, [0.5 - 1.0 * scale[0], 1.0 + 2.0 * scale[1]], rtol=1e-6)
    w = state["conv1.weight"].reshape(2, -1)
    np.testing.assert_allclose(step.arrays[0].values.reshape(2, -1), w * scale[:, None], rtol=1e-6)


# ---- the C text ------------------------------------------------------------------------------
def test_generic_c_uses_no_extensions_and_documents_the_api():
    network = load(ROOT / "specs" / "alphabet.yaml")
    e = export_c(network, _state(network))
    for bad in ("__attribute__", "#pragma", "_Pragma", "omp_", "<omp.h>", "malloc", "vector_size", "__builtin"):
        assert bad not in e.source, bad
    assert "static const float conv1_weight[288] = {" in e.source
    assert not re.search(r"^(?!static )(?:const )?float \w+\[", e.source, re.M), "a global array that is not static const"
    h = e.header
    for line in ("#define ALPHABET_INPUT_SIZE 784", "#define ALPHABET_OUTPUT_SIZE 26", "#define ALPHABET_ARENA_BYTES ",
                 "int alphabet_infer(const float *input, float *output, void *arena);", "returns 0 on success",
                 "uses only these from <math.h> and <string.h>: copysignf, fabsf, memcpy."):
        assert line in h, line
    network = load(ROOT / "specs" / "lenet5.yaml")  # fused pooling only: no INFINITY, no exp
    assert "uses nothing from the C library." in export_c(network, _state(network)).header


def test_outside_text_reaches_c_only_escaped(tmp_path, capsys):
    """A spec path with comment terminators, a newline and trigraphs is written into comments
    without them; the C still compiles."""
    d = tmp_path / "we*/ird\n??/ dir" / "n*"
    d.mkdir(parents=True)
    path = d / "et.yaml"
    path.write_text(ODD["odd_linear"])
    from netcompiler.weights import save_npz

    weights = tmp_path / "w.npz"
    save_npz(weights, _state(load(path)))
    _export_cli(path, weights, tmp_path / "out", "generic", capsys)
    src = (tmp_path / "out" / "odd_linear.c").read_text()
    banner = src[:src.index("*/")]
    assert "we*\\x2fird\\n?\\x3f/ dir/n*\\x2fet.yaml" in banner  # escaped by ctext.comment, one line
    assert "\n" not in banner.split("odd_linear' from ")[1].split("(sha256")[0]
    _compile(COMPILERS[0], tmp_path / "out", "odd_linear")


# ---- the CLI ---------------------------------------------------------------------------------
def test_cli_prints_flash_and_ram(tmp_path, capsys):
    path = ROOT / "specs" / "lenet5.yaml"
    network, net, weights = _net_and_weights(path, tmp_path)
    printed = _export_cli(path, weights, tmp_path / "out", "generic", capsys)
    state, norm = load_state(network, weights)
    assert norm == (0.5, 0.25)  # stored by _net_and_weights
    e = export_c(network, state, weights_name="weights.npz", normalisation=norm)
    assert f"flash: {e.weights_bytes + e.code_bytes_estimate:,} B = {e.weights_bytes:,} B weights" in printed
    assert f"RAM:   {e.arena_bytes + e.stack_bytes_estimate:,} B = {e.arena_bytes:,} B arena" in printed
    assert (tmp_path / "out" / "lenet5.c").read_text() == e.source
    header = (tmp_path / "out" / "lenet5.h").read_text()
    assert header == e.header
    assert "#define LENET5_INPUT_MEAN 0.5f " in header and "#define LENET5_INPUT_STD 0.25f\n" in header


def test_cli_errors_are_one_line(tmp_path, capsys):
    path = ROOT / "specs" / "lenet5.yaml"
    other = tmp_path / "other.npz"
    network = load(ROOT / "specs" / "lenet5_nobias.yaml")
    from netcompiler.weights import save_npz

    save_npz(other, _state(network))
    assert main(["export", str(path), str(other), "-o", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("netc: error: ") and "missing 'conv1.bias'" in err and "Traceback" not in err
    assert main(["export", str(path), str(tmp_path / "none.npz"), "-o", str(tmp_path / "o")]) == 1
    assert "no such weights file" in capsys.readouterr().err
    bad = _state(load(path))
    bad["fc1.weight"][0, 0] = np.nan
    save_npz(other, bad)
    assert main(["export", str(path), str(other), "-o", str(tmp_path / "o")]) == 1
    assert "'fc1.weight' contains NaN" in capsys.readouterr().err
    save_npz(other, _state(load(path)))
    (tmp_path / "file").write_text("")
    assert main(["export", str(path), str(other), "-o", str(tmp_path / "file")]) == 1
    assert capsys.readouterr().err.startswith("netc: error: cannot write to ")


def test_kinds_without_export_c_are_a_one_line_error(tmp_path, capsys, monkeypatch):
    """A layer kind the exporter has no step for is refused in one line naming the layer."""
    import importlib

    monkeypatch.delitem(importlib.import_module("netcompiler.export.lower").STARTS, "upsample")
    path = tmp_path / "net.yaml"
    path.write_text(spec([2, 4, 4], ["conv2d: {out_channels: 2, kernel_size: 1}", "upsample: {scale_factor: 2}",
                                     "flatten", "linear: {out_features: 2}"], name="net"))
    _, _, weights = _net_and_weights(path, tmp_path)
    assert main(["export", str(path), str(weights), "-o", str(tmp_path / "o")]) == 1
    assert capsys.readouterr().err == "netc: error: upsample 'up1': netc export has no C for layer kind 'upsample'\n"


def test_scratch_offset_macros_are_distinct_for_names_differing_in_case():
    """Each step's scratch offsets are macros named for it; `conv` and `CONV` are two layers."""
    from netcompiler.export import _random_state_and_ranges, export_int8

    network = check_text(spec([1, 8, 8], ["conv2d: {out_channels: 2, kernel_size: 3, padding: 1, name: conv}",
                                          "maxpool2d: {kernel_size: 2}",
                                          "conv2d: {out_channels: 2, kernel_size: 3, padding: 1, name: CONV}",
                                          "maxpool2d: {kernel_size: 2}", "flatten", "linear: {out_features: 3}"],
                              name="cases"), "cases.yaml")
    state, ranges = _random_state_and_ranges(network)
    for source in (export_c(network, state).source, export_int8(network, state, None, ranges=ranges).source):
        names = re.findall(r"^#define (\w+_OFF) ", source, re.M)
        assert len(names) >= 2 and len(names) == len(set(names)), names
